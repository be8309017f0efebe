"""``edgediff bench`` smoke test on a tiny model: fields present, numbers positive, JSON parses, compare renders."""

from __future__ import annotations

import json

from PIL import Image

from .conftest import run_cli


def test_bench_rows_and_compare(tiny_sd1, tmp_path):
    a, b = tmp_path / "ort.jsonl", tmp_path / "ov.jsonl"
    r = run_cli("bench", str(tiny_sd1[1]), "--backend", "onnxruntime", "--device", "cpu", "--size", "64x48",
                "--steps", "3", "--runs", "2", "--warmup", "1", "--json", str(a))
    assert r.exit_code == 0, r.output
    r = run_cli("bench", str(tiny_sd1[1]), "--backend", "openvino", "--device", "cpu", "--size", "64x48",
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
    assert Image.open(chart).size[0] == 1000


def test_bench_bad_input(tiny_sd1, tmp_path):
    r = run_cli("bench", str(tiny_sd1[1]), "--size", "big")
    assert r.exit_code == 2 and "--size must be WIDTHxHEIGHT" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = run_cli("bench", "--compare", str(bad))
    assert r.exit_code == 2 and "bad.jsonl:1 is not a JSON row" in r.output
