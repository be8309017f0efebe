"""Train the x2 upscaler shipped for the embedded ``shapes`` model (models/shapes/upscaler/).

A compact SRVGGNetCompact (Real-ESRGAN's realesr-general architecture, 32 channels, 8 convolutions) learns to
enlarge the model's pictures twice: pairs are the dataset's own renders (flat shapes on flat backgrounds, at
128 pixels, the high-resolution side) and the same renders halved, blurred a little and noised (the
low-resolution side: soft edges, as the model's VAE draws them). L1 loss, Adam. It is exported with
``edgediff export-upscaler`` like any downloaded upscaler, and measured on held-out renders against Lanczos
(PSNR of the x2 result against the crisp render):

    python models/shapes/training/train_upscaler.py --out models/shapes/upscaler

CPU: about seven minutes on 2 cores (416 s here). Needs torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgediff.export.upscaler import build, export_upscaler, random_checkpoint
from edgediff.models.shapes import dataset
from edgediff.runtime.metrics import psnr

CROP = 32  # low-resolution training crops (64 at high resolution)


def pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (low, high) image pairs as uint8 arrays: [n, 64, 64, 3] and [n, 128, 128, 3]."""
    high, _, _ = dataset.sample(rng, n)
    return np.stack([dataset.low_resolution(image, rng) for image in high]), high


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)


def evaluate(run, low: np.ndarray, high: np.ndarray) -> float:
    """Mean PSNR of ``run``'s x2 results against the crisp renders."""
    return float(np.mean([psnr(run(Image.fromarray(lo)), hi) for lo, hi in zip(low, high)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    net, _, _ = build(random_checkpoint("shapes-x2", args.seed), Path("shapes-x2"))
    net.train()
    low, high = pairs(rng, 2048)
    test_low, test_high = pairs(np.random.default_rng(10_000 + args.seed), 64)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    t0 = time.time()
    for step in range(args.steps):
        pick = rng.integers(len(low), size=args.batch)
        y, x = rng.integers(0, 64 - CROP + 1, size=2)
        lo = to_tensor(low[pick][:, y : y + CROP, x : x + CROP])
        hi = to_tensor(high[pick][:, 2 * y : 2 * (y + CROP), 2 * x : 2 * (x + CROP)])
        loss = torch.nn.functional.l1_loss(net(lo), hi)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step}: L1 {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()

    def upscaled(image: Image.Image) -> np.ndarray:
        with torch.no_grad():
            out = net(to_tensor(np.asarray(image)[None]))[0].numpy().transpose(1, 2, 0)
        return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)

    trained = evaluate(upscaled, test_low, test_high)
    lanczos = evaluate(lambda im: np.asarray(im.resize((128, 128), Image.LANCZOS)), test_low, test_high)
    print(f"held-out renders, x2 vs the crisp render: trained {trained:.2f} dB, Lanczos {lanczos:.2f} dB")
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "shapes-x2.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        if args.out.exists():
            shutil.rmtree(args.out)
        manifest = export_upscaler(weights, args.out)
    manifest |= {"source": "models/shapes/training/train_upscaler.py", "training": {
        "steps": args.steps, "batch": args.batch, "seed": args.seed, "seconds": round(time.time() - t0),
        "held_out_psnr_db": {"trained": round(trained, 2), "lanczos": round(lanczos, 2), "renders": len(test_low)}}}
    (args.out / "upscaler.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["training"]))


if __name__ == "__main__":
    sys.exit(main())
