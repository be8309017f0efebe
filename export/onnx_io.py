"""Saving ONNX graphs in one layout (torch-free, shared by export and quantize)."""

from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's limit is 2 GiB; leave headroom


def needs_external_data(model) -> bool:
    try:
        return model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    except Exception:  # protobuf refuses to size messages over 2 GiB
        return True


def save_onnx(model, path: Path) -> int:
    """Save ``model`` at ``path``: one file below the protobuf limit, else ``<name>.data`` beside it.

    Returns the bytes written (graph plus external data).
    """
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    big = needs_external_data(model)
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True, location=data.name)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
