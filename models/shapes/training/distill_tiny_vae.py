"""Distil a tiny VAE (TAESD: diffusers' ``AutoencoderTiny``) for the embedded ``shapes`` model from its own full VAE.

The teacher is the AutoencoderKL of ``models/shapes/diffusers/vae`` (4 latent
channels, 8x downsampling, 128x128 images -> 16x16 latents). The student keeps
TAESD's conventions, but for one: it works on the diffusion model's *scaled* latents
(the full VAE's latent mean x its ``scaling_factor``) divided by its own
``scaling_factor`` (``--scaling-factor``, 3.0 here; TAESD's is 1.0), its decoder
returns images in [-1, 1] and its encoder takes images in [-1, 1];
``latent_magnitude`` / ``latent_shift`` keep their defaults. Why not 1.0: TAESD's
decoder squashes its input with tanh(x / 3) * 3, and this model's own latents
reach |z| = 8 (5% of them beyond 3 on red, yellow and orange backgrounds), so at
1.0 the flat colours it should draw saturate and read as their palette
neighbours; at 3.0 they stay in tanh's near-linear range.

Both halves are trained in one run, against targets computed once up front on
``dataset.py``'s images:

* decoder: input z = full_vae.encode(img).latent_dist.mean * scaling_factor,
  for a share of the images (``--noise-fraction``) plus Gaussian noise of a
  random std up to ``--noise``, and ``--generated`` latents drawn by the
  diffusion model itself (the pipeline of the same folder, ``output_type=
  "latent"``, 8 or 20 steps, guidance 2 / 4 / 7.5; they sit up to ~0.4 rms off
  the encoder's manifold, and a decoder distilled on encoder latents alone
  broke on them); target full_vae.decode(z / scaling_factor).sample clipped to
  [-1, 1] (the full decoder, not the original image); loss MSE + ``--l1`` x L1;
* encoder: target the clean z; loss MSE.

Both train on random latent-aligned crops (``--crop`` latents a side, 64x64
pixels by default; the blocks are fully convolutional): at equal time they
scored better on whole held-out images than whole-image batches did. Adam
with a one-cycle learning rate over ``--steps``; ``--max-minutes`` is a hard
stop on the whole run (the steps run are recorded; ``--stop-at-step`` replays
such a run). Seeded and reproducible for a given device and thread count.
Afterwards, on held-out images drawn with ``--eval-seed``: the PSNR / SSIM
(``edgediff.runtime.metrics``, uint8 HWC images) of the tiny decoder vs the
full VAE's decode of the same latents, of the tiny round trip (tiny encoder
-> tiny decoder) vs the full VAE's round trip, and of the tiny decoder vs the
full one on held-out latents the diffusion model drew. Writes the
``AutoencoderTiny`` folder (``save_pretrained``, safetensors; fp16 only if fp32
would exceed ~5 MB) and ``training.json`` in it.

The shipped weights (models/shapes/tiny_vae; its training.json holds the
command, losses and held-out figures) come from this command, the defaults on
both CPU threads of our 2-core machine, in 6.8 minutes (1.5 min of teacher
targets and generated latents, 5.3 min for the 1,800 steps)::

    python models/shapes/training/distill_tiny_vae.py --out models/shapes/tiny_vae --threads 2 --max-minutes 12

They decode held-out images at 29.9 dB PSNR against the full VAE, but the
export's quality gate refuses them: on the gate's 16 scenes the tiny decoder
reads 2 backgrounds other than the full VAE does (orange drawn towards yellow;
the full decoder already sits 20 levels off orange in green), a 12-point drop
where 10 are allowed. The artifact carries them anyway (``--force-tiny-vae``,
recorded as forced), so ``--vae tiny`` can be tried and ``edgediff tune``
measures them against its own, tighter bounds. Runs tried on the way: encoder
latents only (24 dB on the model's own latents, whole regions in the wrong
colour), 1,024 generated latents at lr 3e-3, TAESD's scaling 1.0, and an extra
L1 loss on 8x8 mean colours: none read those two backgrounds right.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgediff.models.shapes import dataset
from edgediff.runtime import metrics

ROOT = Path(__file__).resolve().parents[3]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def tiny_config(channels: tuple[int, ...], scaling: float) -> dict:
    """TAESD's layout (4 stages, 3 upsamplings = 8x, 4 latent channels) at the given widths."""
    return dict(encoder_block_out_channels=channels, decoder_block_out_channels=channels, latent_channels=4,
                num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1), upsampling_scaling_factor=2,
                act_fn="relu", upsample_fn="nearest", scaling_factor=scaling)


@torch.no_grad()
def generated_latents(pipe, n: int, seed: int, batch: int = 32) -> torch.Tensor:
    """Scaled latents the diffusion model itself draws (``output_type="latent"``): prompts over every scene,
    held-out pairs included, in the dataset's caption forms; 8 or 20 steps, guidance 2, 4 or 7.5."""
    rng = np.random.default_rng(seed)
    scenes = dataset.all_scenes()
    out = []
    t0 = time.time()
    for i in range(0, n, batch):
        k = min(batch, n - i)
        prompts = [dataset.caption(scenes[j], rng) for j in rng.integers(len(scenes), size=k)]
        steps, guidance = int(rng.choice([8, 20])), float(rng.choice([2.0, 4.0, 7.5]))
        out.append(pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                        generator=torch.Generator().manual_seed(seed * 100_003 + i)).images)
        log(f"generated latents {i + k}/{n} ({time.time() - t0:.0f} s)")
    return torch.cat(out)


@torch.no_grad()
def teacher_targets(vae, images: np.ndarray, noise: float, noise_fraction: float, seed: int, chunk: int = 32):
    """Scaled clean latents (encoder targets), decoder inputs (some with noise) and the full decoder's images."""
    sf = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    z_clean, z_in, target = [], [], []
    t0 = time.time()
    for i in range(0, len(images), chunk):
        z = vae.encode(to_tensor(images[i : i + chunk])).latent_dist.mean * sf
        n = len(z)
        sigma = torch.rand(n, generator=gen) * noise * (torch.rand(n, generator=gen) < noise_fraction)
        zi = z + sigma.view(-1, 1, 1, 1) * torch.randn(z.shape, generator=gen)
        z_clean.append(z)
        z_in.append(zi)
        target.append(vae.decode(zi / sf).sample.clamp(-1, 1))
        if (i // chunk) % 16 == 0:
            log(f"teacher targets {i + n}/{len(images)} ({time.time() - t0:.0f} s)")
    return torch.cat(z_clean), torch.cat(z_in), torch.cat(target)


def crops(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    """Random latent-aligned crops: ``size`` latents (8 * size pixels) of images x, latents z and targets y."""
    n, _, h, w = z.shape
    offs = torch.randint(0, h - size + 1, (n, 2), generator=gen).tolist()
    xs, zs, ys = [], [], []
    for k, (a, b) in enumerate(offs):
        zs.append(z[k, :, a : a + size, b : b + size])
        xs.append(x[k, :, 8 * a : 8 * (a + size), 8 * b : 8 * (b + size)])
        ys.append(y[k, :, 8 * a : 8 * (a + size), 8 * b : 8 * (b + size)])
    return torch.stack(xs), torch.stack(zs), torch.stack(ys)


def psnr_db(mse: float) -> float:
    """PSNR of a mean squared error on the [-1, 1] scale."""
    return 10 * math.log10(4 / mse) if mse > 0 else float("inf")


@torch.no_grad()
def pair(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-image PSNR / SSIM of two uint8 NHWC batches, averaged (and the worst image)."""
    p = [min(metrics.psnr(u, v), metrics.PSNR_CAP) for u, v in zip(a, b)]
    s = [metrics.ssim(u, v) for u, v in zip(a, b)]
    return {"psnr_db": round(float(np.mean(p)), 2), "psnr_db_min": round(float(np.min(p)), 2),
            "ssim": round(float(np.mean(s)), 4), "ssim_min": round(float(np.min(s)), 4)}


@torch.no_grad()
def held_out(tiny, vae, images: np.ndarray, generated: torch.Tensor | None) -> dict:
    """The tiny VAE against the full one on held-out images (per-image PSNR / SSIM on uint8, averaged), and the
    tiny decoder against the full one on held-out latents drawn by the diffusion model."""
    from edgediff.models.shapes import evaluate

    sf, st = vae.config.scaling_factor, tiny.config.scaling_factor
    x = to_tensor(images)
    z = vae.encode(x).latent_dist.mean * sf
    full = vae.decode(z / sf).sample  # the full VAE's decode of z = the full round trip
    tiny_dec = tiny.decode(z / st).sample
    tiny_z = tiny.encode(x).latents * st
    tiny_rt = tiny.decode(tiny_z / st).sample
    full_u8, dec_u8, rt_u8 = to_uint8(full), to_uint8(tiny_dec), to_uint8(tiny_rt)
    gen = {}
    if generated is not None:
        ours, theirs = to_uint8(tiny.decode(generated / st).sample), to_uint8(vae.decode(generated / sf).sample)
        readings = [(evaluate.classify(a), evaluate.classify(b)) for a, b in zip(ours, theirs)]
        gen = {"generated_latents_decoder_vs_full_decode": pair(ours, theirs),
               # what the quality gate reads on the embedded model: the same colour, background and shape?
               "generated_latents_same_reading": {
                   attr: round(float(np.mean([getattr(a, attr) == getattr(b, attr) for a, b in readings])), 4)
                   for attr in ("color", "background", "shape")}}

    enc_mse = torch.mean((tiny_z - z) ** 2).item()
    return {
        "images": len(images),
        "decoder_vs_full_decode": pair(dec_u8, full_u8),
        "roundtrip_vs_full_roundtrip": pair(rt_u8, full_u8),
        "full_roundtrip_vs_original": pair(full_u8, images),
        "tiny_roundtrip_vs_original": pair(rt_u8, images),
        **gen,
        "encoder_latent_mse": round(enc_mse, 5),
        "encoder_latent_rel_mse": round(enc_mse / torch.mean(z**2).item(), 5),
        "latent_abs_max": round(z.abs().max().item(), 3),
        # AutoencoderTiny.forward() stores latents as uint8 in [-latent_magnitude, latent_magnitude]
        "latent_share_outside_magnitude": round(((z / st).abs() > tiny.latent_magnitude).float().mean().item(), 5),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("models/shapes/tiny_vae"), help="AutoencoderTiny folder to write")
    p.add_argument("--vae", type=Path, default=ROOT / "models/shapes/diffusers",
                   help="diffusers folder whose vae/ is the teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1, help="rng seed of the held-out images (not the training seed)")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--images", type=int, default=1536, help="training images drawn (teacher targets computed once)")
    p.add_argument("--generated", type=int, default=512,
                   help="decoder inputs drawn by the diffusion model itself (its latents, the full decode as target)")
    p.add_argument("--eval-generated", type=int, default=64, help="held-out latents drawn by the diffusion model")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--stop-at-step", type=int, default=None, help="stop after this many steps of the --steps schedule")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", type=int, default=32,
                   help="width of all four stages (TAESD: 64; AutoencoderTiny's blocks need one width throughout)")
    p.add_argument("--crop", type=int, default=8,
                   help="train on random crops of this many latents per side (0: whole 16x16 latents)")
    p.add_argument("--noise", type=float, default=0.25, help="largest std of the decoder inputs' noise augmentation")
    p.add_argument("--noise-fraction", type=float, default=0.5, help="share of the decoder inputs with noise")
    p.add_argument("--l1", type=float, default=0.5, help="weight of the decoder's L1 loss (beside MSE)")
    p.add_argument("--max-minutes", type=float, default=14.0, help="hard stop of the training loop, from the start")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--scaling-factor", type=float, default=3.0,
                   help="the tiny VAE's own scaling factor: its decoder takes the model's latents divided by it")
    args = p.parse_args()

    import diffusers
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    started = time.time()
    channels = (args.channels,) * 4
    log(f"{torch.get_num_threads()} threads, seed {args.seed}, channels {channels}")

    pipe = StableDiffusionPipeline.from_pretrained(args.vae, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae.eval()
    sf = vae.config.scaling_factor
    images, _, _ = dataset.sample(np.random.default_rng(args.seed), args.images)
    log(f"drew {len(images)} training images; teacher scaling_factor {sf}")
    z_clean, z_in, target = teacher_targets(vae, images, args.noise, args.noise_fraction, args.seed)
    x_all = to_tensor(images)
    if args.generated:
        z_gen = generated_latents(pipe, args.generated, args.seed)
        with torch.no_grad():
            y_gen = torch.cat([vae.decode(z / sf).sample.clamp(-1, 1) for z in z_gen.split(32)])
        z_in, target = torch.cat([z_in, z_gen]), torch.cat([target, y_gen])
        log(f"generated latents: std {z_gen.std():.3f}, |max| {z_gen.abs().max():.2f}")
    precompute_min = (time.time() - started) / 60
    log(f"targets done in {precompute_min:.1f} min; dataset latent std {z_clean.std():.3f}, "
        f"|max| {z_clean.abs().max():.2f}")

    torch.manual_seed(args.seed)
    tiny = AutoencoderTiny(**tiny_config(channels, args.scaling_factor))
    st = args.scaling_factor
    n_params = sum(q.numel() for q in tiny.parameters())
    log(f"AutoencoderTiny: {n_params:,} parameters")
    params = list(tiny.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=min(0.3, max(0.05, 3 / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    hist: dict[str, list[float]] = {"dec_mse": [], "dec_l1": [], "enc_mse": []}
    step = 0
    stopped_by = "steps"
    for step in range(args.steps):
        # the encoder learns from the dataset images, the decoder from their (noised) latents and the generated ones
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        jdx = torch.randint(len(z_in), (args.batch,), generator=gen)
        x, zc, zi, y = x_all[idx], z_clean[idx], z_in[jdx], target[jdx]
        if args.crop:
            _, zi, y = crops(y, zi, y, args.crop, gen)
            x, zc, _ = crops(x, zc, x, args.crop, gen)
        out = tiny.decode(zi / st).sample
        dec_mse = torch.nn.functional.mse_loss(out, y)
        dec_l1 = (out - y).abs().mean()
        enc_mse = torch.nn.functional.mse_loss(tiny.encode(x).latents, zc / st)
        loss = dec_mse + args.l1 * dec_l1 + enc_mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for k, v in (("dec_mse", dec_mse), ("dec_l1", dec_l1), ("enc_mse", enc_mse)):
            hist[k].append(v.item())
        if step % 50 == 0 or step == args.steps - 1:
            m = {k: float(np.mean(v[-50:])) for k, v in hist.items()}
            log(f"step {step}/{args.steps} dec mse {m['dec_mse']:.5f} (~{psnr_db(m['dec_mse']):.1f} dB) "
                f"l1 {m['dec_l1']:.4f} enc mse {m['enc_mse']:.5f} lr {sched.get_last_lr()[0]:.2e} "
                f"({time.time() - t0:.0f} s)")
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            stopped_by = "max_minutes"
            log(f"stopping at step {step + 1}/{args.steps}: --max-minutes {args.max_minutes} reached")
            break
        if args.stop_at_step and step + 1 >= args.stop_at_step:
            stopped_by = "stop_at_step"
            log(f"stopping at step {step + 1}/{args.steps} (--stop-at-step)")
            break
    steps_run = step + 1
    train_min = (time.time() - t0) / 60
    final = {k: round(float(np.mean(v[-100:])), 6) for k, v in hist.items()}
    final["dec_psnr_db_train"] = round(psnr_db(final["dec_mse"]), 2)
    log(f"trained {steps_run} steps in {train_min:.1f} min; last-100-step losses {final}")

    tiny.eval()
    rng = np.random.default_rng(args.eval_seed)
    eval_images, _, _ = dataset.sample(rng, args.eval_images)
    eval_gen = generated_latents(pipe, args.eval_generated, args.eval_seed) if args.eval_generated else None
    figures = held_out(tiny, vae, eval_images, eval_gen)
    log(f"held out ({args.eval_images} images, seed {args.eval_seed}): "
        f"decoder vs full decode {figures['decoder_vs_full_decode']}, "
        f"round trip vs full round trip {figures['roundtrip_vs_full_roundtrip']}, "
        f"generated latents {figures.get('generated_latents_decoder_vs_full_decode')}")

    fp16 = n_params * 4 > 5 * 2**20
    args.out.mkdir(parents=True, exist_ok=True)
    (tiny.half() if fp16 else tiny).save_pretrained(args.out, safe_serialization=True)
    weights = args.out / "diffusion_pytorch_model.safetensors"
    weights.chmod(0o644)  # save_pretrained writes it 0600 (a temporary file renamed)
    total_min = (time.time() - started) / 60
    (args.out / "training.json").write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]),
        "teacher": "models/shapes/diffusers/vae (AutoencoderKL), scaling_factor " + repr(sf),
        "convention": "TAESD's, on the scaled latents (full-VAE mean x its scaling_factor) divided by the tiny "
                      f"VAE's own scaling_factor {args.scaling_factor}; images in [-1, 1]",
        "seed": args.seed, "eval_seed": args.eval_seed, "threads": torch.get_num_threads(), "device": "cpu",
        "images": args.images, "generated": args.generated, "eval_generated": args.eval_generated,
        "steps": args.steps, "steps_run": steps_run, "stopped_by": stopped_by,
        "batch": args.batch, "lr": args.lr, "crop_latents": args.crop, "noise": args.noise,
        "noise_fraction": args.noise_fraction, "l1": args.l1, "scaling_factor": args.scaling_factor,
        "channels": list(channels),
        "parameters": n_params, "weights": "fp16" if fp16 else "fp32", "weights_bytes": weights.stat().st_size,
        "minutes": {"teacher_targets": round(precompute_min, 1), "training": round(train_min, 1),
                    "total": round(total_min, 1)},
        "final_losses_last_100_steps": final, "held_out": figures,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }, indent=2) + "\n")
    log(f"wrote {args.out} ({weights.stat().st_size / 2**20:.2f} MiB weights) in {total_min:.1f} min")


if __name__ == "__main__":
    main()
