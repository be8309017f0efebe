"""The runtime runs without PyTorch, transformers or diffusers: proven with them made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.fast

BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = ("torch", "transformers", "diffusers", "optimum", "accelerate")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_blocker_really_blocks():
    r = _run("import torch")
    assert r.returncode != 0 and "blocked" in r.stderr


def test_import_runtime_without_torch():
    r = _run(
        """
        import edgediff.runtime, edgediff.cli
        from edgediff.runtime import Pipeline
        from edgediff.runtime.schedulers import SCHEDULER_NAMES, make_scheduler
        for name in SCHEDULER_NAMES:
            make_scheduler(name, {}, 4)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("heavy:", heavy)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout


def test_generate_cli_without_torch(tmp_path):
    out = tmp_path / "img.png"
    r = _run(
        f"""
        sys.argv = ["edgediff", "generate", "a red circle", "--steps", "3",  # the embedded model
                    "--width", "64", "--height", "64", "--output", {str(out)!r}, "--verbose"]
        from edgediff.cli import main
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        """
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"wrote {out}" in r.stdout
    from PIL import Image

    image = Image.open(out)
    assert image.size == (64, 64)
    meta = json.loads(image.text["edgediff"])
    assert meta["prompt"] == "a red circle" and meta["steps"] == 3 and meta["seed"] == 0
    assert "Steps: 3" in image.text["parameters"]
