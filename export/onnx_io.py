"""Saving ONNX graphs in one layout (torch-free, shared by export and quantize)."""

from __future__ import annotations

from pathlib import Path

from edgediff.runtime.manifest import disk_bytes

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
    return disk_bytes(path)


def consolidate_external_data(path: Path) -> int:
    """Gather the per-tensor files torch's exporter writes for a graph over 2 GB into one ``<name>.data``.

    Streams one tensor at a time: a 10 GB SDXL UNet is never loaded whole
    (``onnx.load`` + ``save_onnx`` would hold a second copy of every weight
    beside the PyTorch model). Returns the bytes of graph plus data.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    folder = path.parent
    model = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    tmp = data.with_name(data.name + ".tmp")
    old_files = set()
    with open(tmp, "wb") as out:
        for tensor in _all_tensors(model):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            with open(folder / info.location, "rb") as f:
                f.seek(info.offset or 0)
                raw = f.read(info.length) if info.length else f.read()
            old_files.add(folder / info.location)
            out.seek((out.tell() + 4095) // 4096 * 4096)  # page-aligned, as onnx does for mmap
            offset = out.tell()
            out.write(raw)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    for f in old_files:
        if f != data:
            f.unlink()
    tmp.replace(data)
    onnx.save_model(model, str(path))
    return disk_bytes(path)


def _all_tensors(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
