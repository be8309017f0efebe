"""Issue 24, the command line's cases: outputs exclusive between processes, upscale's size limits and scale,
prompts that are not UTF-8, bench rows and info records that are malformed, the out-of-memory and Ctrl-C lines.

Each case asserts the exact outcome: the exit code and error line, no traceback, the user's files as they were,
nothing half-written left (no temporary file beside the output).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from edgediff.models import shapes_upscaler
from edgediff.runtime.outputs import output_paths, write_png, write_pngs
from edgediff.runtime.upscale import Upscaler, UpscalerError

from .conftest import run_cli
from .test_hostile_input import cli_subprocess

pytestmark = pytest.mark.fast
CLI = [sys.executable, "-c", "from edgediff.cli import main; main()"]


def one_line(text: str) -> str:
    return " ".join(text.split())


def leftovers(folder: Path) -> list[str]:
    """Temporary files of an output write (``.NAME.xxx.tmp``) or of the writability probe."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- 3: the no-overwrite rule between processes ------------------------------------------------------


def _race(args: list[str], n: int = 4) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([*CLI, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in args]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _one_won(runs: list[subprocess.CompletedProcess], message: str) -> int:
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 2, 2, 2], [(r.returncode, r.stderr[-400:]) for r in runs]
    for r in runs:
        assert "Traceback" not in r.stderr
        if r.returncode == 2:
            assert message in one_line(r.stderr) and "pass --overwrite to replace it" in one_line(r.stderr), r.stderr
    return next(k for k, r in enumerate(runs) if r.returncode == 0)


def test_concurrent_generates_to_one_name_write_it_once(tmp_path):
    out = tmp_path / "same.png"
    runs = _race([["generate", "a red circle", "--backend", "onnxruntime", "--steps", "40", "--seed", str(k),
                   "-o", str(out)] for k in range(4)])
    winner = _one_won(runs, "same.png already exists")
    assert runs[winner].stdout.strip() == f"wrote {out}"
    with Image.open(out) as image:
        image.verify()  # a whole PNG
    with Image.open(out) as image:
        assert json.loads(image.text["edgediff"])["seed"] == winner  # the winner's image, not another's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]


def test_concurrent_batches_write_all_their_files_or_none(tmp_path):
    out = tmp_path / "batch.png"
    runs = _race([["generate", "a red circle", "--backend", "onnxruntime", "--steps", "40", "--num-images", "2",
                   "--seed", str(10 * k), "-o", str(out)] for k in range(4)])
    winner = _one_won(runs, "already exists")
    seeds = []
    for name in ("batch-1.png", "batch-2.png"):
        with Image.open(tmp_path / name) as image:
            seeds.append(json.loads(image.text["edgediff"])["seed"])
    assert seeds == [10 * winner, 10 * winner + 1]  # both files from the one process that wrote
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-1.png", "batch-2.png"]


def test_concurrent_upscales_to_one_name_write_it_once(tmp_path):
    for k in range(4):
        Image.new("RGB", (40, 40), (60 * k, 0, 0)).save(tmp_path / f"in{k}.png")
    out = tmp_path / "up.png"
    runs = _race([["upscale", str(tmp_path / f"in{k}.png"), "--upscaler", str(shapes_upscaler()),
                   "--backend", "onnxruntime", "-o", str(out)] for k in range(4)])
    winner = _one_won(runs, "up.png already exists")
    with Image.open(out) as image:
        assert image.size == (80, 80) and json.loads(image.text["edgediff"])["source"].endswith(f"in{winner}.png")
    assert leftovers(tmp_path) == []


def _write_after(barrier, path: str, k: int, results) -> None:
    image = Image.new("RGB", (32, 32), (40 * k, 0, 0))
    barrier.wait()
    try:
        write_png(image, Path(path), overwrite=False)
        results.put((k, "wrote"))
    except ValueError as e:
        results.put((k, str(e)))


def test_exclusive_create_holds_when_four_processes_write_at_the_same_instant(tmp_path):
    """The race itself, without the model's load to spread the processes out: all four pass a barrier, then
    write the same new name; one file, from the one that reports it."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    path = tmp_path / "same.png"
    procs = [ctx.Process(target=_write_after, args=(barrier, str(path), k, results)) for k in range(4)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    winners = [k for k, what in outcomes.items() if what == "wrote"]
    assert len(winners) == 1, outcomes
    assert all("same.png already exists" in what for k, what in outcomes.items() if k != winners[0])
    with Image.open(path) as image:
        assert image.getpixel((0, 0)) == (40 * winners[0], 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]


def test_a_batch_meeting_a_taken_name_leaves_none_of_its_files(tmp_path):
    paths = output_paths(tmp_path / "out.png", 3)
    paths[2].write_text("mine")  # another process wrote out-3.png after the check, before the write
    images = [(Image.new("RGB", (8, 8)), p, None) for p in paths]
    with pytest.raises(ValueError, match="out-3.png already exists .*pass --overwrite"):
        write_pngs(images, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-3.png"] and paths[2].read_text() == "mine"


@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_while_the_files_go_in_place_leaves_none_of_them(tmp_path, monkeypatch, overwrite):
    """A SIGINT that arrives between two files' placing: both taken back, the old files as they were."""
    paths = output_paths(tmp_path / "out.png", 2, overwrite=True)
    if overwrite:
        for p in paths:
            p.write_text(f"old {p.name}")
    real_replace, real_link, calls = os.replace, os.link, []

    def interrupting(move):
        def run(src, dst, **kw):
            move(src, dst, **kw)
            if str(dst).endswith(".png") and not calls:
                calls.append(dst)
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the first file is in place
        return run

    monkeypatch.setattr(os, "replace", interrupting(real_replace))
    monkeypatch.setattr(os, "link", interrupting(real_link))
    with pytest.raises(KeyboardInterrupt):
        write_pngs([(Image.new("RGB", (8, 8)), p, None) for p in paths], overwrite=overwrite)
    assert calls  # the interrupt came while the files were going in place
    if overwrite:
        assert [p.read_text() for p in paths] == ["old out-1.png", "old out-2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out-1.png", "out-2.png"] if overwrite else [])


def test_ctrl_c_during_generate_says_nothing_written(tmp_path):
    out = tmp_path / "o.png"
    # 1000 steps at 256x256 (about 0.04 s a step here, 40 s in all): the Ctrl-C lands mid-run even when the progress
    # bar's first lines reach the pipe late (at the embedded model's own 128x128 a CI run ended all 1000 steps in 7 s,
    # before the signal came)
    p = subprocess.Popen([*CLI, "generate", "x", "--backend", "onnxruntime", "--steps", "1000", "--width", "256",
                          "--height", "256", "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"FORCE_COLOR": "1"})
    seen, t0 = b"", time.monotonic()
    while b"denoising" not in seen:  # the progress bar: the model is loaded and the steps run
        chunk = os.read(p.stderr.fileno(), 4096)
        assert chunk and time.monotonic() - t0 < 300, seen[-2000:]
        seen += chunk
    p.send_signal(signal.SIGINT)
    out_text, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-1000:]
    assert b"interrupted; nothing written" in err and b"Traceback" not in err and b"wrote" not in out_text
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_upscale_says_nothing_written(tmp_path, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Upscaler, "upscale", interrupted)
    r = run_cli("upscale", str(tmp_path / "in.png"), "--upscaler", str(shapes_upscaler()), "-o",
                str(tmp_path / "up.png"))
    assert r.exit_code == 130 and "interrupted; nothing written" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


# -- 21: the out-of-memory line --------------------------------------------------------------------


@pytest.mark.parametrize("size, words", [([], "at the model's default size;"),
                                         (["--width", "64"], "at width 64 (the other side the model's default);"),
                                         (["--width", "64", "--height", "48"], "at 64x48;")])
def test_out_of_memory_names_the_size_asked(tmp_path, monkeypatch, size, words):
    from edgediff.runtime import Pipeline

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Pipeline, "open", exhausted)  # what the CLI opens its artifact with
    r = run_cli("generate", "x", *size, "-o", str(tmp_path / "o.png"))
    assert r.exit_code == 2
    assert f"error: out of memory generating 1 image(s) {words} ask for a smaller size" in one_line(r.output)
    assert list(tmp_path.iterdir()) == []


# -- 5: upscale's size limits, checked from the header ---------------------------------------------


def write_constant_png(path: Path, width: int, height: int) -> None:
    """A black RGB PNG of any size, streamed: a few MB of file and no image in memory (every byte of its
    scanlines, the filter bytes included, is zero, so it deflates about 1000:1)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, stride = zlib.compressobj(1), 1 + 3 * width
    band = bytes(stride * 64)
    data = bytearray()
    for y in range(0, height, 64):
        data += z.compress(band[: stride * min(64, height - y)])
    data += z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", bytes(data)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side, words", [
    (12000, "image {} is 12000x12000 = 144,000,000 pixels; an upscale x2 reads at most 16,000,000 pixels, so that "
            "its result fits the pixel budget of 64,000,000"),
    (20000, "image {} is 400,000,000 pixels; an upscale x2 reads at most 16,000,000 pixels"),  # past PIL's guard
])
def test_huge_upscale_inputs_are_refused_from_the_header(tmp_path, side, words):
    big = tmp_path / f"big{side}.png"
    write_constant_png(big, side, side)
    assert struct.unpack(">II", big.read_bytes()[16:24]) == (side, side)  # IHDR's width and height
    t0 = time.monotonic()
    r = cli_subprocess("upscale", str(big), "--upscaler", str(shapes_upscaler()), "--backend", "onnxruntime",
                       "-o", str(tmp_path / "up.png"), memory_gb=3)  # decoding 12000x12000 alone takes 4.5 GB
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert words.format(big) in one_line(r.stderr) and "raise it with --max-pixels N" in one_line(r.stderr)
    assert time.monotonic() - t0 < 60 and not (tmp_path / "up.png").exists()


def test_max_pixels_bounds_and_lifts_the_upscale_budget(tmp_path):
    Image.new("RGB", (300, 300), "red").save(tmp_path / "in.png")
    common = ["upscale", str(tmp_path / "in.png"), "--upscaler", str(shapes_upscaler()), "--backend", "onnxruntime"]
    r = run_cli(*common, "--max-pixels", "300000", "-o", str(tmp_path / "a.png"))
    assert r.exit_code == 2 and "is 300x300 = 90,000 pixels; an upscale x2 reads at most 75,000 pixels" \
        in one_line(r.output)
    r = run_cli(*common, "--max-pixels", "360000", "-o", str(tmp_path / "b.png"))  # exactly the result's 600x600
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "b.png") as image:
        assert image.size == (600, 600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "in.png"]


# -- 6: the upscaler's scale is checked against its graph -------------------------------------------


@pytest.fixture
def upscaler_copy(tmp_path) -> Path:
    dst = tmp_path / "upscaler"
    shutil.copytree(shapes_upscaler(), dst)
    return dst


def set_scale(folder: Path, value) -> None:
    record = json.loads((folder / "upscaler.json").read_text())
    record["scale"] = value
    (folder / "upscaler.json").write_text(json.dumps(record))


@pytest.mark.parametrize("value, message", [
    (4, "says scale 4, but upscaler.onnx enlarges x2 (a 16x16 probe came out 32x32)"),
    (1, "says scale 1, but upscaler.onnx enlarges x2"),
    (100000, "scale must be an integer from 1 to 8, got 100000"),
    (0, "scale must be an integer from 1 to 8, got 0"),
    (2.5, "scale must be an integer from 1 to 8, got 2.5"),
    ("2", "scale must be an integer from 1 to 8, got '2'"),
    (True, "scale must be an integer from 1 to 8, got True"),
    (float("inf"), "scale must be an integer from 1 to 8, got inf"),
])
def test_a_wrong_scale_is_refused_on_load(upscaler_copy, tmp_path, value, message):
    set_scale(upscaler_copy, value)
    with pytest.raises(UpscalerError, match="upscaler.json") as e:
        Upscaler.load(upscaler_copy, backend="onnxruntime", device="cpu")
    assert message in str(e.value)
    Image.new("RGB", (300, 300), "red").save(tmp_path / "in.png")
    r = run_cli("upscale", str(tmp_path / "in.png"), "--upscaler", str(upscaler_copy), "--backend", "onnxruntime",
                "-o", str(tmp_path / "up.png"))
    assert r.exit_code == 2 and message in one_line(r.output) and not (tmp_path / "up.png").exists()


@pytest.mark.parametrize("case, message", [
    ("fifo", "(upscaler.json: missing, or not a regular file)"),  # reading it would block forever
    ("list", "(upscaler.json: a JSON list, not an object)"),
    ("no scale", "(upscaler.json has no 'scale' field)"),
    ("file elsewhere", "names '../upscaler.onnx', which is not a file in"),
])
def test_a_malformed_upscaler_json_is_refused(upscaler_copy, case, message):
    record = json.loads((upscaler_copy / "upscaler.json").read_text())
    (upscaler_copy / "upscaler.json").unlink()
    if case == "fifo":
        os.mkfifo(upscaler_copy / "upscaler.json")
    else:
        record = [record] if case == "list" else record
        if case == "no scale":
            del record["scale"]
        if case == "file elsewhere":
            shutil.copy(upscaler_copy / "upscaler.onnx", upscaler_copy.parent / "upscaler.onnx")
            record["file"] = "../upscaler.onnx"
        (upscaler_copy / "upscaler.json").write_text(json.dumps(record))
    with pytest.raises(UpscalerError) as e:
        Upscaler.load(upscaler_copy, backend="onnxruntime", device="cpu")
    assert message in str(e.value)


def test_the_right_scale_loads_and_upscales(upscaler_copy):
    up = Upscaler.load(upscaler_copy, backend="onnxruntime", device="cpu")
    assert up.scale == 2
    result = up.upscale(Image.new("RGB", (300, 300), (200, 30, 30)))
    assert result.size == (600, 600) and result.getpixel((300, 300))[0] > 150  # red, not a black grid


# -- 14: prompts that are not UTF-8 ------------------------------------------------------------------


@pytest.mark.parametrize("args, what", [([b"a caf\xe9 in the rain"], "the prompt (PROMPT)"),
                                        ([b"a red circle", b"--negative", b"blurry \xff\xfe"], "--negative")])
def test_prompts_that_are_not_utf8_are_refused(tmp_path, args, what):
    """Bytes of a latin-1 file passed through the shell: Python keeps them as surrogate escapes."""
    r = subprocess.run([*CLI, "generate", *args, "-o", str(tmp_path / "o.png")], capture_output=True, timeout=300)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert f"error: {what} is not valid UTF-8 text" in one_line(err) and "prompts must be UTF-8" in err
    assert list(tmp_path.iterdir()) == []


# -- 16: bench --compare on rows that are no measurement ----------------------------------------------


def bench_row(**changes) -> dict:
    row = {"artifact": "/models/art", "backend": "onnxruntime", "device": "cpu", "precision": {"unet": "fp32"},
           "width": 64, "height": 64, "machine": {"cpu": "test cpu"}, "disk_bytes": 1000, "load_s": 1.0,
           "text_encoder_s": 0.1, "unet_first_s": 0.2, "unet_rest_median_s": 0.1, "vae_decode_s": 0.1,
           "end_to_end_s": 1.0, "peak_rss_mb": 100.0}
    return row | changes


@pytest.mark.parametrize("rows", [
    [bench_row(end_to_end_s=0), bench_row(device="gpu")],  # the first row's total 0: every ratio undefined
    [bench_row(), bench_row(device="gpu", end_to_end_s=0)],
])
def test_bench_compare_with_a_zero_total_shows_no_ratio(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("bench", "--compare", str(path))
    assert r.exit_code == 0, r.output
    ratios = [line.split("│")[9].strip() for line in r.output.splitlines() if line.startswith("│")]
    assert ratios == (["-", "-"] if rows[0]["end_to_end_s"] == 0 else ["1.00x", "0.00x"])


def test_bench_compare_survives_malformed_optional_fields(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(bench_row(artifact=5, savings=["x"], machine={"cpu": "c", "cpu_flags": 5})) + "\n")
    r = run_cli("bench", "--compare", str(path))
    assert r.exit_code == 0, r.output


# -- 17: info on malformed optional records -----------------------------------------------------------


def test_info_survives_malformed_fast_profile_records(embedded_copy):
    from edgediff.cli import fast_profile_words, speed_words

    shutil.copy(embedded_copy / "unet" / "model.onnx", embedded_copy / "unet" / "model.int8.onnx")
    d = json.loads((embedded_copy / "manifest.json").read_text())
    d["components"]["unet"]["variants"]["int8"] = dict(d["components"]["unet"]["variants"]["fp32"],
                                                       file="unet/model.int8.onnx")
    d["family"] = "sd1 [/oops]"  # text, not rich markup
    for candidates, measured in (([5], {"machine": "m"}), (5, "[/x]"), ([{"settings": 5}], 5)):
        d["fast_profile"]["candidates"], d["fast_profile"]["measured"] = candidates, measured
        (embedded_copy / "manifest.json").write_text(json.dumps(d))
        r = run_cli("info", str(embedded_copy))
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    profile = d["fast_profile"] | {"candidates": [5]}
    assert speed_words(profile, "unet", "int8") == "speed record unreadable (edgediff tune measures it again)"
    assert speed_words(profile | {"candidates": [{"settings": {"unet": "int8"}, "seconds_per_image": 0.07}],
                                  "full_seconds_per_image": 0.14, "measured": {"machine": "m", "backend": "b"}},
                       "unet", "int8") == "2.00x faster per image than fp32 on m, b (edgediff tune)"
    assert fast_profile_words(profile | {"measured": "x"}).endswith("(its record is unreadable)")
    assert fast_profile_words({"settings": 5}) == "fast profile (generate --fast): unreadable"


def test_an_error_quoting_a_huge_word_is_cut_and_printed_at_once(capsys):
    # any message that quotes what a user or a file gave is one short line, printed at once: rich took minutes to
    # wrap a 100 KB word
    import time

    import typer

    from edgediff import cli

    start = time.perf_counter()
    with pytest.raises(typer.Exit):
        cli._fail("no such thing: " + "m" * 300_000)
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "298,015 more characters)" in err and len(err) < 3000


def test_a_path_the_system_refuses_is_an_error_line_not_a_traceback(tmp_path):
    too_long = str(tmp_path / ("m" * 5000))  # ENAMETOOLONG from the first stat
    r = cli_subprocess("generate", "x", "--model", too_long, "-o", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot be read as an artifact folder (File name too long)" in r.stderr and len(r.stderr) < 3000
    r = cli_subprocess("upscale", too_long, "-o", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr) < 3000
    assert not (tmp_path / "o.png").exists()
