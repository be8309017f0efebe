"""``edgediff bench`` smoke test on a tiny model: fields present, numbers positive, JSON parses, compare renders."""

from __future__ import annotations

import json

import pytest

from PIL import Image

from .conftest import load_script, run_cli


@pytest.mark.fast
def test_bench_rows_and_compare(tmp_path):
    a, b = tmp_path / "ort.jsonl", tmp_path / "ov.jsonl"
    r = run_cli("bench", "--backend", "onnxruntime", "--device", "cpu", "--size", "64x48",
                "--steps", "3", "--runs", "2", "--warmup", "1", "--json", str(a))
    assert r.exit_code == 0, r.output
    r = run_cli("bench", "--backend", "openvino", "--device", "cpu", "--size", "64x48",
                "--steps", "3", "--runs", "1", "--json", str(b))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 2
    row = rows[0]
    for key in ("load_s", "text_encoder_s", "unet_first_s", "unet_rest_median_s", "unet_rest_p90_s", "vae_decode_s",
                "end_to_end_s", "peak_rss_mb", "disk_bytes"):
        assert row[key] > 0, key
    assert row["unet_calls"] == len(row["raw"]["unet"]) >= 3  # PNDM makes steps + 1 calls
    assert row["execution"]["unet"] == "CPUExecutionProvider"
    assert row["machine"]["cores"] >= 1 and row["machine"]["cpu"] and "onnxruntime" in row["machine"]["backends"]
    assert (row["width"], row["height"], row["steps"]) == (64, 48, 3)
    ov = json.loads(b.read_text().splitlines()[0])
    assert ov["backend"] == "openvino" and ov["load_cached_s"] > 0 and ov["execution"]["unet"] == "CPU"
    assert ov["execution_precision"]["unet"] in ("f32", "bf16", "f16")

    chart = tmp_path / "chart.png"
    r = run_cli("bench", "--compare", str(a), "--compare", str(b), "--chart", str(chart))
    assert r.exit_code == 0, r.output
    assert "onnxruntime/cpu" in r.output and "openvino/cpu" in r.output and "1.00x" in r.output
    assert Image.open(chart).format == "PNG"
    # drawn with matplotlib: the machine in the title, labels with their spaces, load as its own bar, room
    # to the right of the longest bar for its value
    from edgediff import bench as B

    summary = B.summarize(B.read_rows([a, b]))
    fig = B.chart(summary, tmp_path / "again.png")
    ax = fig.axes[0]
    assert row["machine"]["cpu"] in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == [s["config"] for s in summary]
    assert " " in summary[0]["config"]
    assert {t.get_text().split()[0] for t in ax.texts} >= {"load"}
    longest = max(max(s["end_to_end_s"], s["load_s"]) for s in summary)
    assert ax.get_xlim()[1] > longest * 1.1


@pytest.mark.fast
def test_bench_bad_input(tmp_path):
    r = run_cli("bench", "--size", "big")
    assert r.exit_code == 2 and "--size must be WIDTHxHEIGHT" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = run_cli("bench", "--compare", str(bad))
    assert r.exit_code == 2 and "bad.jsonl:1 is not a JSON row" in r.output


def test_floor_counts_unet_flops_on_the_graph(tiny_sd1):
    pytest.importorskip("onnx")
    """Convolution FLOPs scale exactly with the pixel count; attention products faster than linearly."""
    unet_flops = load_script("benchmarks/floor.py").unet_flops
    small, big = unet_flops(tiny_sd1[1], 64), unet_flops(tiny_sd1[1], 128)
    assert small["total"] == small["Convolution"] + small["MatMul"] > 0
    assert big["Convolution"] / small["Convolution"] == pytest.approx(4.0, rel=1e-9)
    assert big["MatMul"] / small["MatMul"] > 4.0  # token-by-token attention grows with the square of the tokens


@pytest.mark.fast
def test_results_md_ratios_and_floor():
    """RESULTS.md's table divides each row by edgediff's OpenVINO fp32 row and by GenAI's, gives cold and warm
    loads and the first image of a process, and states the floor."""
    from types import SimpleNamespace

    results_md = load_script("benchmarks/peers.py").results_md

    def row(tool, step, total, **extra):
        return {"tool": tool, "size": 512, "steps": 20, "guidance": 7.5, "load_s": 1.0, "text_encoder_s": 0.1,
                "unet_first_s": step, "unet_rest_median_s": step, "vae_decode_s": 2.0, "end_to_end_s": total,
                "peak_rss_mb": 2048, "disk_bytes": 4e9} | extra

    rows = [row("OpenVINO GenAI Text2ImagePipeline", 12.5, 90.0), row("diffusers PyTorch fp32", 15.0, 100.0),
            row("edgediff openvino unet=fp32 (f32)", 12.0, 80.0, load_cached_s=0.5),
            row("edgediff openvino unet=fp32 vae=tiny cache=3 (f32)", 12.0, 30.0, unet_shallow_median_s=1.2,
                unet_shallow_calls=14)]
    floor = {"size": 512, "threads": 2, "unet_gflop_per_step": {"total": 1606.5, "Convolution": 887.9, "MatMul": 718.7},
             "gflops_per_s": {"fp32_matmul": 129.6, "int8_matmulinteger": 267.7},
             "floor_s_per_step": {"fp32_matmul": 12.4, "int8_matmulinteger": 6.0}}
    md = results_md(rows, {"cpu": "X", "cores": 2, "cpu_flags": ["avx2"], "ram_gb": 24}, SimpleNamespace(threads=2),
                    {"sd15": floor})
    assert "## sd15, 512x512, 20 steps, guidance 7.5 (CFG batch 2)" in md
    # the first image of a process: the load (warm where the row has a compile cache) plus that image
    assert ("| diffusers PyTorch fp32 | 1.0 | 0.10 | 15.00 | 15.00 | – | 2.00 | 100.0 | 101.0 | 2.0 | 4.00 | 1.25x "
            "| 1.25x | 1.11x | 1.11x |") in md  # 101/91
    assert "| edgediff openvino unet=fp32 (f32) | 1.0 / 0.5 | 0.10 | 12.00 | 12.00 | – | 2.00 | 80.0 | 80.5 |" in md
    (saving,) = [line for line in md.splitlines() if line.startswith("| edgediff openvino unet=fp32 vae=tiny cache=3")]
    assert "| 1.20 (14 calls) |" in saving and saving.endswith("| 1.00x | 0.38x | 0.33x | 0.34x |")  # 30/80, 30/90, 31/91
    assert "**1,606 GFLOP**" in md and "12.4 s in fp32 or 6.0 s in int8" in md


@pytest.mark.fast
def test_info_prints_quality_in_words():
    from edgediff.cli import quality_words

    from edgediff.models import default_model_path

    r = run_cli("info", str(default_model_path()))
    assert r.exit_code == 0 and "parity vs PyTorch" in " ".join(r.output.split())
    assert quality_words({"parity_vs_torch": {"max_rel_err": 3.71e-06}}) == "parity vs PyTorch 3.7e-06 relative"
    assert quality_words({"psnr_db": 65.43, "ssim": 0.99991, "vs": "fp32", "accuracy": {"color": 0.94},
                          "gate": {"forced": True}}) == \
        "PSNR 65.4 dB, SSIM 1.000 vs fp32, accuracy color 0.94 (below the gate, added with --force)"
    assert quality_words({"psnr_db": "x"}) == "quality record unreadable"
