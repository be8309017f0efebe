"""Train the embedded ``shapes`` model: a small Stable Diffusion on procedurally drawn shapes.

Standard SD components at small widths (CLIPTextModel with the real CLIP BPE
tokenizer, UNet2DConditionModel with cross-attention, AutoencoderKL with a
downsampling factor of 8), trained from scratch on ``dataset.py``'s images in
three stages:

1. the VAE, on random 64x64 crops of the 128x128 images (it is fully
   convolutional; crops make it 4x cheaper);
2. the dataset's latents, encoded once; ``scaling_factor`` = 1 / their std;
3. the UNet and the text encoder together, v-prediction loss on a zero
   terminal SNR schedule (see SCHEDULER), 10% empty captions so
   classifier-free guidance works, EMA weights.

Seeded and reproducible for a given device. On the 2-core CPU of our machines
the defaults take 43 minutes and learn the colours but not yet the shapes
(benchmarks/results/shapes_cpu_training.json); CUDA is used when present.
Writes a diffusers folder that ``edgediff export`` turns into the artifact::

    python models/shapes/training/train.py --out /tmp/shapes-diffusers
    edgediff export /tmp/shapes-diffusers models/shapes/artifact --force --default-steps 20 --default-guidance 4

The shipped weights (models/shapes/diffusers/training.json holds the exact
command) come from a lent H100: the VAE of an earlier run, then 2,954 steps of
batch 256 (4.7 min), which ``--vae models/shapes/diffusers --images 48000
--batch 256 --lr 1e-3 --unet-steps 4000 --stop-at-step 2954 --fp16-weights``
replays.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgediff.models.shapes import dataset

TEXT = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4)
UNET = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 4),  # heads per block: 16 channels each
    norm_num_groups=16,
)
VAE = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
# Zero terminal SNR betas, v-prediction and "trailing" timesteps (Lin et al.
# 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). SD's
# scaled_linear schedule leaves 7% of the image in x_T; at 16x16 latents that
# leak carries the flat colours (the background is the latent mean), so the
# first model drew the colours of the starting noise instead of the prompt
# (colour 0.28, background 0.20). With zero terminal SNR the last timestep sees
# pure noise and must take every colour from the text.
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=1,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(images: np.ndarray, steps: int, device: str, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(VAE["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, sample_size=dataset.SIZE, **VAE).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=min(0.3, max(0.05, 3 / steps)))
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(steps):
        idx = rng.integers(len(images), size=16)
        y, x = rng.integers(0, dataset.SIZE - 64 + 1, size=2) // 8 * 8
        batch = to_tensor(images[idx, y : y + 64, x : x + 64]).to(device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + 0.5 * (recon - batch).abs().mean()
        loss = loss + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return vae.eval()


@torch.no_grad()
def encode_all(vae, images: np.ndarray, device: str) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 256):
        out.append(vae.encode(to_tensor(images[i : i + 256]).to(device)).latent_dist.mean.cpu())
    return torch.cat(out)


def build_denoiser(tokenizer, text: dict, unet: dict):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **text)
    return (CLIPTextModel(text_config),
            UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=text["hidden_size"], **unet))


def v_prediction_loss(unet, text_encoder, x0: torch.Tensor, ids: torch.Tensor, acp: torch.Tensor, gen, device: str):
    """The denoiser's loss on one batch: noise at random timesteps, predict v (the schedule's ``acp``)."""
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, 1000, (len(x0),), generator=gen).to(device)
    a = acp[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
    context = text_encoder(ids.to(device), return_dict=False)[0]
    return torch.nn.functional.mse_loss(unet(xt, t, context, return_dict=False)[0], target)


def train_denoiser(latents: torch.Tensor, captions: list[str], tokenizer, steps: int, batch: int, device: str, seed: int,
                   init: Path | None = None, lr: float = 5e-4, text: dict = TEXT, unet_config: dict = UNET,
                   max_minutes: float | None = None, stop_at: int | None = None):
    """UNet + text encoder with the v-prediction loss; returns their EMA copies and the steps run."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    if init:  # continue from a trained model (fine-tuning)
        text_encoder = CLIPTextModel.from_pretrained(init, subfolder="text_encoder", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(init, subfolder="unet", torch_dtype=torch.float32)
    else:
        text_encoder, unet = build_denoiser(tokenizer, text, unet_config)
    text_encoder, unet = text_encoder.to(device), unet.to(device)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"})
    acp = noise_sched.alphas_cumprod.to(device)  # acp[999] == 0: x_T is pure noise
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=min(0.3, max(0.03, 3 / steps)))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    ids_all = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    step = 0
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx].to(device)
        ids = ids_all[idx].clone()
        ids[torch.rand(batch, generator=gen) < 0.1] = empty[0]  # unconditional rows for guidance
        loss = v_prediction_loss(unet, text_encoder, x0, ids, acp, gen, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        elapsed = time.time() - t0
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} ({elapsed:.0f} s)")
        if stops(step, steps, elapsed, max_minutes, stop_at):
            break
    return ema_unet, ema_text, step + 1


def stops(step: int, steps: int, elapsed: float, max_minutes: float | None, stop_at: int | None) -> bool:
    """Whether a training loop ends after ``step``: ``--max-minutes`` reached, or ``--stop-at-step`` (which
    replays a run that ``--max-minutes`` ended)."""
    if max_minutes and elapsed > 60 * max_minutes:
        log(f"stopping at step {step + 1}/{steps}: --max-minutes {max_minutes} reached")
        return True
    if stop_at and step + 1 >= stop_at:
        log(f"stopping at step {step + 1}/{steps} (--stop-at-step)")
        return True
    return False


@torch.no_grad()
def quick_eval(pipe, device: str, seeds: int, guidance: float, steps: int = 20) -> dict:
    """The numpy evaluation (all 448 scenes) on images drawn by the diffusers pipeline, batched, on ``device``."""
    from edgediff.models.shapes import evaluate

    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    scenes = evaluate.prompt_set()
    for seed in range(seeds):
        for i in range(0, len(scenes), 112):
            part = scenes[i : i + 112]
            images = pipe([sc.plain_prompt() for sc in part], num_inference_steps=steps, guidance_scale=guidance,
                          generator=torch.Generator(device).manual_seed(seed), output_type="np").images
            for sc, im in zip(part, images):
                reading = evaluate.classify((im * 255).round().astype(np.uint8))
                rows.append({"held_out": (sc.color, sc.shape) in dataset.HELD_OUT, **evaluate.score(reading, sc)})
    pipe.to("cpu")
    return evaluate.summarize(rows) | {"settings": {"steps": steps, "guidance": guidance, "seeds": seeds,
                                                    "pipeline": "diffusers, one generator per batch"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=24000, help="training images drawn")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae", type=Path, default=None, help="reuse the VAE of this diffusers folder instead of training one")
    p.add_argument("--unet-steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--init", type=Path, default=None, help="continue training the UNet and text encoder of this diffusers folder")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--text-layers", type=int, default=TEXT["num_hidden_layers"], help="text encoder layers")
    p.add_argument("--heads", default=",".join(map(str, UNET["attention_head_dim"])),
                   help="UNet attention heads per block, e.g. 2,4,4")
    p.add_argument("--layers-per-block", type=int, default=UNET["layers_per_block"])
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop the UNet stage early after this long (the steps run are recorded in training.json)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop the UNet stage after this many steps of the --unet-steps schedule (replays a --max-minutes run)")
    p.add_argument("--eval-seeds", type=int, default=0,
                   help="after training, evaluate all 448 scenes with this many seeds through diffusers on the training device")
    p.add_argument("--eval-guidance", default="7.5", help="guidance scales of that evaluation, comma separated")
    p.add_argument("--fp16-weights", action="store_true", help="save the weights in fp16 (as models/shapes/diffusers ships them)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = p.parse_args()

    import diffusers

    from edgediff.export.clip_tokenizer import build_clip_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    text = TEXT | {"num_hidden_layers": args.text_layers}
    heads = tuple(int(h) for h in args.heads.split(","))
    unet_config = UNET | {"attention_head_dim": heads if len(heads) > 1 else heads[0],
                          "layers_per_block": args.layers_per_block}
    started = time.time()
    log(f"device {device}, {torch.get_num_threads()} threads, seed {args.seed}")
    rng = np.random.default_rng(args.seed)
    images, captions, _ = dataset.sample(rng, args.images)
    log(f"drew {len(images)} images; e.g. {captions[:3]}")

    if args.vae:
        vae = diffusers.AutoencoderKL.from_pretrained(args.vae, subfolder="vae", torch_dtype=torch.float32).to(device).eval()
        log(f"reusing the VAE of {args.vae}")
    else:
        vae = train_vae(images, args.vae_steps, device, args.seed)
    latents = encode_all(vae, images, device)
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    log(f"latents {tuple(latents.shape)}, scaling_factor {scaling_factor:.4f}")
    with torch.no_grad():
        check = to_tensor(images[:64]).to(device)
        recon = vae.decode(encode_all(vae, images[:64], device).to(device)).sample.clamp(-1, 1)
        mse = torch.mean(((recon - check) / 2) ** 2).item()
    vae_psnr = 10 * math.log10(1 / mse)
    log(f"vae reconstruction PSNR {vae_psnr:.1f} dB")

    tokenizer = build_clip_tokenizer(args.out / "tokenizer")
    unet, text_encoder, steps_run = train_denoiser(
        latents, captions, tokenizer, args.unet_steps, args.batch, device, args.seed, init=args.init, lr=args.lr,
        text=text, unet_config=unet_config, max_minutes=args.max_minutes, stop_at=args.stop_at_step)
    train_minutes = (time.time() - started) / 60

    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
        scheduler=diffusers.DPMSolverMultistepScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if args.fp16_weights:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(args.out)
    evaluation = {}
    for g in (float(x) for x in args.eval_guidance.split(",")) if args.eval_seeds else ():
        evaluation[f"guidance_{g:g}"] = quick_eval(pipe.to(torch.float32), device, args.eval_seeds, g)
        log(f"evaluation at guidance {g:g}: {evaluation[f'guidance_{g:g}']['all']}")
    (args.out / "training.json").write_text(json.dumps({
        "seed": args.seed, "device": device, "threads": torch.get_num_threads(), "images": args.images,
        "vae_steps": 0 if args.vae else args.vae_steps, "vae_from": str(args.vae) if args.vae else None,
        "init": str(args.init) if args.init else None, "lr": args.lr, "unet_steps": args.unet_steps,
        "unet_steps_run": steps_run, "batch": args.batch, "text": text,
        "unet": {k: unet_config[k] for k in ("block_out_channels", "layers_per_block", "attention_head_dim")},
        "weights": "fp16" if args.fp16_weights else "fp32", "schedule": SCHEDULER,
        "vae_reconstruction_psnr_db": round(vae_psnr, 2), "scaling_factor": scaling_factor,
        "minutes": round(train_minutes, 1), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "held_out": sorted(map(list, dataset.HELD_OUT)), "evaluation": evaluation,
    }, indent=2))
    log(f"wrote {args.out}: trained in {train_minutes:.1f} min")


if __name__ == "__main__":
    main()
