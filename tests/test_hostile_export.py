"""The export and quantize side of #11 (needs the export and quantize extras): nothing of the user's lost,
nothing outside the artifact read or deleted, concurrent writers serialised. The runtime side, torch-free, is
test_hostile_input.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgediff.runtime import ArtifactError, load_manifest  # noqa: E402

from .conftest import run_cli  # noqa: E402
from .test_hostile_input import SECRET, edit_manifest, marker  # noqa: E402,F401  (marker: a fixture)


@pytest.fixture
def artifact(tiny_sd1, tmp_path):
    """A private copy of the tiny SD1 artifact (exported here by our own CLI)."""
    dst = tmp_path / "artifact"
    shutil.copytree(tiny_sd1[1], dst)
    return dst


# -- data loss: export --force ---------------------------------------------------------------


def test_force_never_replaces_a_folder_of_user_files(tiny_sd1, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    r = run_cli("export", str(tiny_sd1[0]), str(mine), "--force")
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert "is not an edgediff artifact: it holds holiday.jpg" in out and "--force would have deleted them" in out
    assert (mine / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]


def test_force_never_deletes_the_source(tiny_sd1, tmp_path):
    models = tmp_path / "models"
    source = models / "sd1src"
    shutil.copytree(tiny_sd1[0], source)
    before = sorted(str(p.relative_to(models)) for p in models.rglob("*"))
    r = run_cli("export", str(source), str(models), "--force")  # the source inside OUT
    assert r.exit_code == 2 and "the source" in r.output and "is inside" in r.output
    r = run_cli("export", str(models), str(models / "sd1src" / "out"), "--force")  # OUT inside the source
    assert r.exit_code == 2
    r = run_cli("export", str(source), str(source), "--force")
    assert r.exit_code == 2
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*")) == before


def test_export_refuses_a_file_as_out_and_a_file_as_parent(tiny_sd1, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    r = run_cli("export", str(tiny_sd1[0]), str(notes), "--force")
    assert r.exit_code == 2 and "is a file" in r.output
    r = run_cli("export", str(tiny_sd1[0]), str(notes / "artifact"))
    assert r.exit_code == 2 and "is a file, not a folder" in " ".join(r.output.split())
    assert notes.read_text() == "mine"


def test_force_replaces_an_empty_folder_and_cleans_stale_partials(tiny_sd1, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    stale = tmp_path / ".a.partial-killed"  # what an export killed with -9 left
    (stale / "unet").mkdir(parents=True)
    (stale / ".edgediff-partial").touch()
    foreign = tmp_path / ".a.partial-not-ours"  # same pattern, no marker: not ours to delete
    foreign.mkdir()
    r = run_cli("export", str(tiny_sd1[0]), str(out), "--force")
    assert r.exit_code == 0, r.output
    assert load_manifest(out).prediction_type == "epsilon"
    assert not stale.exists() and foreign.exists()
    # folders and files get the user's umask, not mkdtemp's 0700
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_two_concurrent_exports_to_one_out(tiny_sd1, tmp_path):
    out = tmp_path / "a"
    procs = [subprocess.Popen([sys.executable, "-c", "from edgediff.cli import main; main()", "export",
                               str(tiny_sd1[0]), str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=600), p.stdout.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert "already exists (an edgediff artifact); pass --force" in " ".join(results[1][1].split())
    assert load_manifest(out).prediction_type == "epsilon"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock", "a"]


def test_missing_clip_vocabulary_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else find_spec(name, *a))
    r = run_cli("export", "--random-weights", "tiny-sd1", str(tmp_path / "a"))
    assert r.exit_code == 2 and "pip install --no-deps 'open-clip-torch==3.3.0'" in " ".join(r.output.split())
    assert not (tmp_path / "a").exists()


# -- concurrent writers ----------------------------------------------------------------------


def test_two_concurrent_quantize_runs_keep_both_variants(artifact):
    gate = ["--components", "text_encoder", "--steps", "2", "--seeds", "1", "--prompts", "a red circle", "--force"]
    procs = [subprocess.Popen([sys.executable, "-c", "from edgediff.cli import main; main()", "quantize", str(artifact),
                               "-p", precision, *gate], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for precision in ("fp16", "int8")]
    outputs = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    assert [code for code, _ in outputs] == [0, 0], outputs
    assert set(load_manifest(artifact).components["text_encoder"]) == {"fp32", "fp16", "int8"}
    assert sorted(p.name for p in (artifact / "text_encoder").iterdir()) == ["model.fp16.onnx", "model.int8.onnx",
                                                                             "model.onnx", "weights.json"]  # no orphans
    assert sorted(p.name for p in artifact.iterdir() if p.is_file()) == ["manifest.json"]


def test_quantize_refuses_a_graph_whose_external_data_escapes(artifact, marker):
    import onnx

    from edgediff.quantize import quantize_artifact
    from edgediff.runtime.manifest import disk_bytes

    path = artifact / "text_encoder" / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../outside/secret.onnx"
    onnx.save_model(model, str(path))
    edit_manifest(artifact, lambda d: d["components"]["text_encoder"]["variants"]["fp32"].update(bytes=disk_bytes(path)))
    with pytest.raises(ArtifactError, match="the fp16 conversion of .* failed") as e:
        quantize_artifact(artifact, "fp16", ("text_encoder",))
    assert SECRET not in str(e.value) and marker.read_text() == SECRET
    assert not list((artifact / "text_encoder").glob("*.partial-*"))
