"""Train the embedded ``shapes`` model's ControlNet: the shape goes where a mask or an outline says.

The base model puts its shape at a random place. This trains a diffusers ``ControlNetModel`` made from the
base UNet (``ControlNetModel.from_unet``: the UNet's encoder copied, zero convolutions out) with the base
UNet and text encoder frozen, on the base model's own v-prediction loss. The control image is the
object's mask (white on black) or, a third of the time, its outline as the runtime's canny preprocessor
draws it (``edgediff.runtime.canny``), so ``--preprocess NAME=canny`` on a drawing works too.
10% of the captions are empty, as in the base training, so guidance works with the control on.

    python models/shapes/training/train_controlnet.py --out models/shapes/controlnet --stop-at-step 2714
    edgediff export models/shapes/diffusers models/shapes/artifact --force --default-steps 20 \\
        --default-guidance 4 --tiny-vae models/shapes/tiny_vae --controlnet mask=models/shapes/controlnet
    python models/shapes/training/train_controlnet.py --measure models/shapes/controlnet

``--measure`` draws held-out prompts (every colour-shape pair, the held-out ones included) with masks at
positions and sizes never trained on (another seed), through the runtime with and without the ControlNet,
and reports the intersection-over-union of the drawn foreground with the mask and the colour/shape
accuracy (``models/shapes/evaluate.py``). The shipped one: 2,714 steps (``--max-minutes 26`` on this machine's 2
cores; ``--stop-at-step 2714`` replays it); ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train import SCHEDULER, encode_all, log, stops  # noqa: E402  (the base model's training script, beside this one)

from edgediff.models.shapes import dataset  # noqa: E402

BASE = Path(__file__).resolve().parents[1] / "diffusers"
ARTIFACT = Path(__file__).resolve().parents[1] / "artifact"
OUTLINE_SHARE = 1 / 3
CONTROL_NAME = "mask"


def control_image(mask, outline: bool):
    """The control image of one object: its mask, or its canny outline (RGB, white on black)."""
    from edgediff.runtime.canny import canny

    rgb = mask.convert("RGB")
    return canny(rgb) if outline else rgb


def training_set(n: int, seed: int):
    """``n`` renders (held-out colour-shape pairs excluded, as the base), captions and control images."""
    rng = np.random.default_rng(seed)
    scenes = dataset.all_scenes(held_out=False)
    picks = [scenes[i] for i in rng.integers(len(scenes), size=n)]
    images, controls = [], []
    for scene in picks:
        image, mask = dataset.draw_with_mask(scene, rng)
        images.append(np.asarray(image))
        controls.append(np.asarray(control_image(mask, rng.random() < OUTLINE_SHARE)))
    return np.stack(images), [dataset.caption(s, rng) for s in picks], np.stack(controls)


def train(steps: int, batch: int, lr: float, images: int, device: str, seed: int, max_minutes: float | None,
          stop_at: int | None = None):
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(BASE, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(BASE, subfolder="text_encoder", torch_dtype=torch.float32).to(device)
    unet = UNet2DConditionModel.from_pretrained(BASE, subfolder="unet", torch_dtype=torch.float32).to(device)
    vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae", torch_dtype=torch.float32).to(device)
    pixels, captions, controls = training_set(images, seed)
    latents = encode_all(vae, pixels, device) * vae.config.scaling_factor
    cond = torch.from_numpy(controls).permute(0, 3, 1, 2).float() / 255.0  # [0, 1], as diffusers' control processor
    log(f"{len(latents)} training latents and control images")
    controlnet = ControlNetModel.from_unet(unet).to(device).train()
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
    with torch.no_grad():  # the text encoder is frozen: its outputs once
        ids_all = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        contexts = torch.cat([text_encoder(ids_all[i : i + 256].to(device), return_dict=False)[0].cpu()
                              for i in range(0, len(ids_all), 256)])
        empty_context = text_encoder(empty.to(device), return_dict=False)[0].cpu()
    params = list(controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    acp = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"}).alphas_cumprod.to(device)
    gen = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0, control, context = latents[idx].to(device), cond[idx].to(device), contexts[idx].clone()
        context[torch.rand(batch, generator=gen) < 0.1] = empty_context[0]  # unconditional rows for guidance
        context = context.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        down, mid = controlnet(xt, t, context, controlnet_cond=control, return_dict=False)
        pred = unet(xt, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        elapsed = time.time() - t0
        if step % 100 == 0 or step == steps - 1:
            log(f"controlnet step {step}/{steps} loss {loss.item():.4f} ({elapsed:.0f} s)")
        if stops(step, steps, elapsed, max_minutes, stop_at):
            break
    return controlnet.eval(), step + 1, time.time() - t0


def measure(artifact: Path, scenes: int, seeds: int, outline: bool = False) -> dict:
    """IoU of the drawn foreground with the control mask, and accuracy, with and without the ControlNet."""
    from PIL import Image

    from edgediff.models.shapes import evaluate
    from edgediff.runtime import Control, Pipeline

    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache=False)
    cases = evaluate.control_cases(scenes)
    out = {}
    for label in ("without", "with"):
        rows = []
        for scene, mask in cases:
            control = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
            if outline:
                control = control_image(Image.fromarray(mask.astype(np.uint8) * 255), True)
            controls = [Control(CONTROL_NAME, control)] if label == "with" else []
            for seed in range(seeds):
                (image,) = pipe.txt2img(scene.plain_prompt(), seed=seed, width=dataset.SIZE, height=dataset.SIZE,
                                        controls=controls)
                drawn = np.asarray(image)
                reading = evaluate.classify(drawn)
                rows.append({"held_out": (scene.color, scene.shape) in dataset.HELD_OUT,
                             "iou": evaluate.iou(evaluate.foreground(drawn), mask), **evaluate.score(reading, scene)})
        summary = evaluate.summarize(rows)
        for split in summary:
            part = [r for r in rows if split == "all" or r["held_out"] == (split == "held_out")]
            summary[split]["iou"] = round(float(np.mean([r["iou"] for r in part])), 4)
        out[label] = summary
        log(f"{label} ControlNet ({'outlines' if outline else 'masks'}): {summary['all']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("models/shapes/controlnet"), help="diffusers folder to write")
    p.add_argument("--measure", type=Path, default=None,
                   help="measure this trained ControlNet folder (the artifact must have been exported with it)")
    p.add_argument("--artifact", type=Path, default=ARTIFACT)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this many steps (replays a --max-minutes run: the shipped one ran 2714)")
    p.add_argument("--scenes", type=int, default=64, help="held-out scenes measured")
    p.add_argument("--seeds", type=int, default=2, help="seeds per measured scene")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.measure is not None:
        record_file = args.measure / "training.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        record["evaluation"] = {"masks": measure(args.artifact, args.scenes, args.seeds),
                                "outlines": measure(args.artifact, args.scenes, args.seeds, outline=True),
                                "scenes": args.scenes, "seeds": args.seeds, "backend": "onnxruntime cpu"}
        record_file.write_text(json.dumps(record, indent=1) + "\n")
        return
    import torch

    controlnet, steps_run, seconds = train(args.steps, args.batch, args.lr, args.images, args.device, args.seed,
                                           args.max_minutes, args.stop_at_step)
    controlnet.save_pretrained(args.out)
    record = {"steps": args.steps, "steps_run": steps_run, "batch": args.batch, "lr": args.lr, "images": args.images,
              "outline_share": round(OUTLINE_SHARE, 3), "seed": args.seed, "device": args.device,
              "threads": torch.get_num_threads(), "training_seconds": round(seconds)}
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {args.out} ({steps_run} steps, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
