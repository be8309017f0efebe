"""Quantize a copy of an artifact to every precision and tabulate size, quality and speed (markdown).

    python benchmarks/quantize_report.py [ARTIFACT] --out benchmarks/results/quantize_shapes.md

Quality is what ``edgediff quantize`` measures (PSNR/SSIM of final images vs
fp32, and on the shapes model the attribute accuracy of a 16-scene subset);
speed is the median UNet call (text encoder for text_encoder variants, VAE
decode for vae_decoder ones) on ONNX Runtime and OpenVINO, as a ratio to fp32.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from edgediff.models import default_model_path
from edgediff.quantize import GateSettings, QualityGateError, quantize_artifact
from edgediff.runtime import Pipeline, load_manifest

STAGE = {"unet": "unet", "text_encoder": "text_encoder", "vae_decoder": "vae_decoder"}


def step_time(root: Path, component: str, precision: str, backend: str, size: int, runs: int = 3) -> float:
    pipe = Pipeline.load(root, backend=backend, device="cpu", precision={component: precision}, ov_precision="f32")
    pipe.txt2img("warm up", steps=2, width=size, height=size)
    times = []
    for seed in range(runs):
        result = pipe.txt2img("a red circle on a blue background", steps=8, seed=seed, width=size, height=size)
        times += result.timings.stages[STAGE[component]]
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", nargs="?", type=Path, default=default_model_path())
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shapes", action="store_true", default=None, help="also measure attribute accuracy")
    p.add_argument("--no-speed", action="store_true", help="skip the timing columns (e.g. when the CPU is shared)")
    args = p.parse_args()
    shapes = args.shapes if args.shapes is not None else args.artifact.resolve() == default_model_path().resolve()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "artifact"
        shutil.copytree(args.artifact, root)
        size = load_manifest(root).sample_size
        for precision in ("fp16", "int8", "int8-static", "int8-static-attn", "int4", "nncf-int8", "nncf-hybrid"):
            settings = GateSettings(evaluate_shapes=shapes, size=size)
            try:
                quantize_artifact(root, precision, force=True, settings=settings)
            except QualityGateError as e:  # force=True adds them anyway; keep going
                print(e)
        m = load_manifest(root)
        lines = ["| component | precision | MB | size vs fp32 | PSNR dB | SSIM | accuracy colour / bg / shape "
                 "| gate | ORT time vs fp32 | OpenVINO time vs fp32 |", "|---" * 10 + "|"]
        for comp, variants in m.components.items():
            for prec, v in variants.items():
                if prec == "fp32":
                    continue
                q = v.quality
                acc = q.get("accuracy")
                acc_s = f"{acc['color']:.2f} / {acc['background']:.2f} / {acc['shape']:.2f}" if acc else ""
                if acc:
                    ref = q["accuracy_fp32"]
                    acc_s += f" (fp32 {ref['color']:.2f} / {ref['background']:.2f} / {ref['shape']:.2f})"
                speed = []
                for backend in ("onnxruntime", "openvino"):
                    if comp in STAGE and not args.no_speed and (not v.backends or backend in v.backends):
                        base = step_time(root, comp, "fp32", backend, size)
                        speed.append(f"{step_time(root, comp, prec, backend, size) / base:.2f}x")
                    else:
                        speed.append("")
                lines.append(f"| {comp} | {prec} | {v.bytes / 1e6:.1f} | {q['size_ratio_vs_fp32']:.2f} | "
                             f"{q['psnr_db']:.1f} | {q['ssim']:.3f} | {acc_s} | "
                             f"{'pass' if q['gate']['passed'] else 'FAIL'} | {speed[0]} | {speed[1]} |")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
