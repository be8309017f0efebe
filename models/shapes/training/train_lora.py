"""Teach the embedded ``shapes`` model a shape it never saw, as a LoRA: the one shipped in models/shapes/loras/.

The base model was trained on four shapes (``dataset.SHAPES``); "diamond" was never in a caption nor drawn,
so the base draws something else for it. This trains a rank-8 LoRA (PEFT, on the UNet's attention,
projection and feed-forward layers and the text encoder's attention and MLP) on scenes of diamonds mixed
half and half with the base distribution (so the other words stay as they were, as far as they do), with the base model's own v-prediction
loss, then saves it as diffusers does (``save_lora_weights``: PEFT ``lora_A`` / ``lora_B`` keys) and measures
it with the runtime and the numpy evaluation, with and without the LoRA:

    python models/shapes/training/train_lora.py --out models/shapes/loras/diamond.safetensors

(A new colour cannot be taught this way: the model's VAE, trained on eight colours, decodes any other
colour as one of them, cyan as red; a shape it reconstructs.)

CPU: a few minutes on 2 cores (the model is small); ``--device cuda`` on a GPU. Needs torch, diffusers, peft.
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

sys.path.insert(0, str(Path(__file__).parent))
from train import SCHEDULER, encode_all, log, v_prediction_loss  # noqa: E402  (the base model's training script, beside this one)

from edgediff.models.shapes import dataset  # noqa: E402

BASE = Path(__file__).resolve().parents[1] / "diffusers"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def training_set(shape: str, n: int, replay: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """Scenes of ``shape`` (every colour, size and background) and, ``replay`` of them, the base model's data."""
    rng = np.random.default_rng(seed)
    scenes = dataset.scenes_of(shape)
    new = n - int(n * replay)
    picks = [scenes[i] for i in rng.integers(len(scenes), size=new)]
    new_images = np.stack([np.asarray(dataset.draw(s, rng)) for s in picks])
    replay_images, replay_captions, _ = dataset.sample(rng, n - new)
    return (np.concatenate([new_images, replay_images]),
            [dataset.caption(s, rng) for s in picks] + replay_captions)


def train(shape: str, steps: int, batch: int, rank: int, lr: float, images: int, replay: float, text_encoder_lora: bool,
          device: str, seed: int):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(BASE, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(BASE, subfolder="text_encoder", torch_dtype=torch.float32).to(device)
    unet = UNet2DConditionModel.from_pretrained(BASE, subfolder="unet", torch_dtype=torch.float32).to(device)
    vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae", torch_dtype=torch.float32).to(device)
    pixels, captions = training_set(shape, images, replay, seed)
    latents = encode_all(vae, pixels, device) * vae.config.scaling_factor
    log(f"{len(latents)} training latents ({sum(shape in c for c in captions)} captions with {shape!r})")
    text_encoder.requires_grad_(False)
    adapted = ((unet, UNET_TARGETS),) + (((text_encoder, TEXT_TARGETS),) if text_encoder_lora else ())
    for model, targets in adapted:
        model.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    params = [p for m in (unet, text_encoder) for n, p in m.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    acp = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"}).alphas_cumprod.to(device)
    ids_all = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx].to(device)
        ids = ids_all[idx].clone()
        ids[torch.rand(batch, generator=gen) < 0.1] = empty[0]  # unconditional rows, as in the base training
        loss = v_prediction_loss(unet, text_encoder, x0, ids, acp, gen, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"lora step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    text_layers = get_peft_model_state_dict(text_encoder) if text_encoder_lora else None
    return get_peft_model_state_dict(unet), text_layers, time.time() - t0


def measure(lora: Path, shape: str, seeds: int) -> dict:
    """The runtime's evaluation with and without the LoRA: the new shape's scenes, and the base vocabulary's."""
    from edgediff.models.shapes import evaluate
    from edgediff.runtime import Pipeline

    out = {}
    for label, loras in (("base", []), ("with_lora", [lora])):
        pipe = Pipeline.load(backend="onnxruntime", device="cpu", loras=loras, cache=False)
        new = evaluate.evaluate(pipe, dataset.scenes_of(shape), range(seeds))
        large = [r for r in new["rows"] if "large" in r["prompt"]]
        old = evaluate.evaluate(pipe, evaluate.prompt_set(), range(seeds))
        out[label] = {shape: new["all"], f"{shape}_large": evaluate.summarize(large)["all"],
                      "base_vocabulary": old["all"]}
        log(f"{label}: {shape} {new['all']}, large {out[label][f'{shape}_large']}, base vocabulary {old['all']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("models/shapes/loras/diamond.safetensors"))
    p.add_argument("--shape", default="diamond", choices=dataset.NEW_SHAPES)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--replay", type=float, default=0.5, help="share of the base model's own scenes in the data")
    p.add_argument("--unet-only", dest="text_encoder", action="store_false",
                   help="no LoRA on the text encoder (with --replay 0.75: the other words moved less, shape -4.7 "
                        "points instead of -10.7, but diamonds were learned far less: 0.29 instead of 0.71)")
    p.add_argument("--seeds", type=int, default=1, help="evaluation seeds per scene")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    unet_layers, text_layers, seconds = train(args.shape, args.steps, args.batch, args.rank, args.lr, args.images,
                                              args.replay, args.text_encoder, args.device, args.seed)
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "pytorch_lora_weights.safetensors", args.out)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {seconds:.0f} s of training)")
    record = {"shape": args.shape, "steps": args.steps, "batch": args.batch, "replay": args.replay,
              "text_encoder_lora": args.text_encoder,
              "rank": args.rank, "lr": args.lr, "images": args.images, "seed": args.seed, "device": args.device,
              "training_seconds": round(seconds), "threads": torch.get_num_threads(),
              "evaluation": measure(args.out, args.shape, args.seeds)}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
