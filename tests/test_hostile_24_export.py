"""Issue #24, the writing side: export --force, remove_variant, quantize and tune on a read-only artifact, the
gate's thresholds. Each case asserts the exact outcome: the user's files still there byte for byte, one error line
and exit code 2, nothing half-written left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgediff.runtime import ArtifactError, load_manifest

from .conftest import run_cli


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with its content's digest (folders: '/')."""
    return {p.relative_to(folder).as_posix(): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def one_line(output: str) -> str:
    return " ".join(output.split())


# -- 1. export --force: only what the old manifest names is replaced ----------------------------------------------


@pytest.fixture
def user_files(embedded_copy):
    """An artifact with the user's LoRA put in it, and an empty folder of theirs."""
    (embedded_copy / "loras").mkdir()
    (embedded_copy / "loras" / "mine.safetensors").write_bytes(b"my LoRA, trained for a week")
    (embedded_copy / "outputs").mkdir()
    return embedded_copy


def test_force_refuses_an_artifact_holding_the_users_files(user_files):
    pytest.importorskip("torch")
    before = tree(user_files.parent)
    t0 = time.perf_counter()
    r = run_cli("export", "--random-weights", "tiny-sd1", str(user_files), "--force")
    assert r.exit_code == 2, r.output
    assert f"error: {user_files} holds files that are not this artifact's: loras/mine.safetensors, outputs/. --force " \
           "replaces only what the artifact's manifest names; move them out or choose another OUT" in one_line(r.output)
    assert "Traceback" not in r.output
    assert time.perf_counter() - t0 < 60  # refused before the random checkpoint is built
    assert tree(user_files.parent) == before  # nothing written beside it either (no partial folder, no lock)


def test_force_refuses_an_input_inside_out(embedded_copy, tmp_path):
    pytest.importorskip("torch")
    from edgediff.export import ExportError, export_artifact

    cn = embedded_copy / "cn"  # the case: a ControlNet source inside OUT
    cn.mkdir()
    (cn / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    source = tmp_path / "src"
    source.mkdir()
    before = tree(tmp_path)
    for args, said in [
        (["--controlnet", f"mask={cn}"], f"--controlnet mask={cn}: {cn} is inside {embedded_copy}"),
        # an input the manifest names itself: not a foreign file, still read by the export that would replace it
        (["--controlnet", f"mask={embedded_copy / 'controlnet_mask' / 'model.onnx'}"], "is inside"),
        (["--tiny-vae", str(embedded_copy / "vae_decoder")], f"--tiny-vae: {embedded_copy / 'vae_decoder'} is inside"),
    ]:
        r = run_cli("export", str(source), str(embedded_copy), "--force", *args)
        assert r.exit_code == 2, r.output
        assert said in one_line(r.output) and "move it out of OUT or choose another OUT" in one_line(r.output)
    with pytest.raises(ExportError, match="is inside"):  # the API checks it too
        export_artifact(str(source), embedded_copy, force=True, controlnets=[f"mask={cn}"])
    assert tree(tmp_path) == before


def test_force_replaces_only_what_the_old_manifest_names(embedded_copy, tmp_path):
    """One real export (tens of seconds): edgediff's own leftovers go with the old artifact; a replaced artifact
    left beside OUT by an interrupted export loses only its named files, never a file of the user's in it."""
    pytest.importorskip("torch")
    art = embedded_copy
    (art / ".manifest.json.x1y2.tmp").write_text("{")  # Manifest.save interrupted
    (art / "unet" / "model.int8.partial-0123456789ab.onnx").write_bytes(b"half")  # a killed quantize
    (art / "text_encoder" / ".edgediff-probe-abc").touch()
    stale_mine = tmp_path / ".artifact.old-1"  # a replaced artifact the user had put a file in
    shutil.copytree(art, stale_mine)
    (stale_mine / "unet" / "notes.txt").write_text("mine")
    stale = tmp_path / ".artifact.old-2"
    shutil.copytree(models_artifact(), stale)
    r = run_cli("export", "--random-weights", "tiny-sd1", str(art), "--force", "--no-deepcache")
    assert r.exit_code == 0, r.output
    m = load_manifest(art)
    assert m.random_weights and m.prediction_type == "epsilon"  # the new artifact, not the embedded v-prediction one
    assert not (art / ".manifest.json.x1y2.tmp").exists() and not (art / "unet_shallow").exists()
    assert sorted(p.name for p in (art / "unet").iterdir()) == ["model.onnx", "weights.json"]
    assert not stale.exists()
    assert tree(stale_mine) == {"manifest.json": tree(models_artifact())["manifest.json"], "unet": "/",
                                "unet/notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".artifact.lock", ".artifact.old-1", "artifact"]


def models_artifact() -> Path:
    from edgediff.models import default_model_path

    return default_model_path()


def test_a_replaced_artifact_keeps_a_file_put_in_it_during_the_export(embedded_copy):
    """The last check before the swap and the swap are not one step: a file put in OUT between them survives."""
    pytest.importorskip("torch")
    from edgediff.export.exporter import _discard

    (embedded_copy / "vae_decoder" / "late.png").write_bytes(b"png")
    notes = []
    _discard(embedded_copy, notes.append)
    assert tree(embedded_copy) == {"manifest.json": tree(models_artifact())["manifest.json"], "vae_decoder": "/",
                                   "vae_decoder/late.png": hashlib.sha256(b"png").hexdigest()}
    assert notes and "late.png" in notes[0]


# -- 4. remove_variant never deletes a file another variant or component uses -----------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("file", ["unet/model.onnx", "vae_decoder/model.onnx", "unet/./model.onnx"])
def test_remove_variant_keeps_a_file_another_variant_uses(embedded_copy, file):
    from edgediff.quantize import remove_variant

    art = embedded_copy
    d = json.loads((art / "manifest.json").read_text())
    fp32 = d["components"]["unet"]["variants"]["fp32"]
    d["components"]["unet"]["variants"]["fp16"] = dict(fp32, file=file, bytes=(art / file).stat().st_size)
    (art / "manifest.json").write_text(json.dumps(d))
    before = tree(art)
    remove_variant(art, "unet", "fp16")
    assert "fp16" not in load_manifest(art).components["unet"]  # the entry goes, every graph loads
    assert {k: v for k, v in tree(art).items() if k != "manifest.json"} == \
           {k: v for k, v in before.items() if k != "manifest.json"}


@pytest.mark.fast
def test_remove_variant_keeps_a_file_two_variants_share(embedded_copy):
    from edgediff.quantize import remove_variant

    art = embedded_copy
    shutil.copy(art / "unet" / "model.onnx", art / "unet" / "model.fp16.onnx")
    d = json.loads((art / "manifest.json").read_text())
    fp32 = d["components"]["unet"]["variants"]["fp32"]
    for precision in ("fp16", "int8"):
        d["components"]["unet"]["variants"][precision] = dict(fp32, file="unet/model.fp16.onnx")
    (art / "manifest.json").write_text(json.dumps(d))
    remove_variant(art, "unet", "fp16")
    assert (art / "unet" / "model.fp16.onnx").exists()  # int8 still names it
    remove_variant(art, "unet", "int8")
    assert not (art / "unet" / "model.fp16.onnx").exists()  # the last user gone: the file goes
    assert set(load_manifest(art).components["unet"]) == {"fp32"}


# -- 18. quantize and tune on a read-only artifact: refused before any work ---------------------------------------


@contextmanager
def read_only(*folders: Path):
    """Make ``folders`` refuse new files: chmod for a user; for root (whom chmod and os.access do not stop) the
    immutable attribute (chattr +i). Skips where neither holds, after trying a write."""
    if os.geteuid() == 0:
        def attr(flag: str):
            return subprocess.run(["chattr", flag, *map(str, folders)], capture_output=True, text=True)

        if shutil.which("chattr") is None or attr("+i").returncode:
            pytest.skip("running as root without chattr +i: no way to make a folder read-only here")
        undo = lambda: attr("-i")  # noqa: E731
    else:
        modes = {f: f.stat().st_mode for f in folders}
        for f in folders:
            f.chmod(modes[f] & ~0o222)
        undo = lambda: [f.chmod(m) for f, m in modes.items()]  # noqa: E731
    try:
        for f in folders:
            try:
                fd, probe = tempfile.mkstemp(dir=f)
            except OSError:
                continue
            os.close(fd)
            os.unlink(probe)
            pytest.skip(f"{f} still takes new files: this file system ignores the read-only technique")
        yield
    finally:
        undo()


def _no_work(*_a, **_k):
    raise AssertionError("the work started before the folder was checked")


QUANTIZE = ["-p", "fp16", "--components", "text_encoder", "--steps", "2", "--seeds", "1", "--prompts", "a red circle"]


@pytest.mark.fast
@pytest.mark.parametrize("which", ["artifact", "root", "component"])
def test_quantize_refuses_a_read_only_artifact_before_converting(embedded_copy, monkeypatch, which):
    pytest.importorskip("onnx")
    from edgediff.quantize import quantize as q

    monkeypatch.setattr(q, "_convert", _no_work)
    art = embedded_copy
    folders = {"artifact": [art] + [p for p in art.iterdir() if p.is_dir()], "root": [art],
               "component": [art / "text_encoder"]}[which]
    before = tree(art)
    with read_only(*folders):
        r = run_cli("quantize", str(art), *QUANTIZE)
    assert r.exit_code == 2, r.output
    blocked = art if which != "component" else art / "text_encoder"
    assert f"error: cannot write into {blocked} (" in one_line(r.output)
    assert "quantize writes the fp16 variants and the manifest there; nothing was changed" in one_line(r.output)
    assert "Traceback" not in r.output
    assert tree(art) == before


@pytest.mark.fast
def test_quantize_leaves_no_orphan_when_the_manifest_cannot_be_saved(embedded_copy, monkeypatch):
    """The issue's orphan model.fp16.onnx: the variant moved into place, then the manifest's save failed."""
    pytest.importorskip("onnx")
    from edgediff.quantize import GateSettings, quantize_artifact
    from edgediff.runtime.manifest import Manifest

    def full_disk(self, root):
        raise OSError(28, "No space left on device")

    before = tree(embedded_copy)
    monkeypatch.setattr(Manifest, "save", full_disk)
    with pytest.raises(ArtifactError, match=r"cannot save .*manifest.json \(No space left on device\); text_encoder "
                                            "fp16 was not added"):
        quantize_artifact(embedded_copy, "fp16", ("text_encoder",), force=True,
                          settings=GateSettings(prompts=("a red circle",), seeds=(0,), steps=2))
    assert tree(embedded_copy) == before


@pytest.mark.fast
@pytest.mark.parametrize("which", ["artifact", "lock folder"])
def test_tune_refuses_a_read_only_artifact_before_measuring(embedded_copy, monkeypatch, which):
    import edgediff.tune

    monkeypatch.setattr(edgediff.tune, "Measure", _no_work)
    art = embedded_copy
    blocked = art if which == "artifact" else art.parent
    before = tree(art.parent)
    with read_only(blocked):
        r = run_cli("tune", str(art), "--prompts", "a red circle", "--seeds", "1")
    assert r.exit_code == 2, r.output
    assert f"error: cannot write into {blocked} (" in one_line(r.output)
    assert "tune saves the fast profile in the artifact's manifest; nothing was changed" in one_line(r.output)
    assert tree(art.parent) == before


# -- 19. the gate's and tune's thresholds: finite and in range ----------------------------------------------------


BAD_THRESHOLDS = [("--min-psnr", "nan"), ("--min-psnr", "inf"), ("--min-psnr", "-1"), ("--min-psnr", "101"),
                  ("--min-ssim", "nan"), ("--min-ssim", "-0.1"), ("--min-ssim", "1.5"),
                  ("--max-accuracy-drop", "nan"), ("--max-accuracy-drop", "2")]
ACCEPTED = {"--min-psnr": "from 0 to 100 dB", "--min-ssim": "from 0 to 1", "--max-accuracy-drop": "from 0 to 1"}


@pytest.mark.fast
@pytest.mark.parametrize("option,value", BAD_THRESHOLDS)
@pytest.mark.parametrize("command", ["quantize", "tune"])
def test_thresholds_must_be_finite_and_in_range(embedded_copy, monkeypatch, command, option, value):
    import edgediff.tune
    from edgediff.quantize import quantize as q

    monkeypatch.setattr(q, "_convert", _no_work)
    monkeypatch.setattr(edgediff.tune, "Measure", _no_work)
    before = tree(embedded_copy)
    args = QUANTIZE if command == "quantize" else ["--prompts", "a red circle", "--seeds", "1"]
    r = run_cli(command, str(embedded_copy), *args, option, value)
    assert r.exit_code == 2, r.output
    name = option[2:].replace("-", "_")
    assert f"error: {name} ({option}) must be a finite number {ACCEPTED[option]}, got {float(value)!r}" \
           in one_line(r.output)
    assert tree(embedded_copy) == before


@pytest.mark.fast
def test_thresholds_at_their_ends_are_accepted():
    from edgediff.quantize import Gate
    from edgediff.tune import Bounds

    for cls in (Gate, Bounds):
        cls(min_psnr=0, min_ssim=0, max_accuracy_drop=0)
        cls(min_psnr=100, min_ssim=1, max_accuracy_drop=1)
        with pytest.raises(ValueError, match="min_ssim"):
            cls(min_ssim=float("nan"))
