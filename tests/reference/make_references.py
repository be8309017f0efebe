"""Regenerate the torch-free tier's references from diffusers (needs the export extra: torch, diffusers).

    python tests/reference/make_references.py

Writes, beside this file:

- ``schedulers.npz``: diffusers' sampling loop (``tests/scheduler_harness.run_diffusers``: the stand-in UNet on
  torch-seeded noise) for every scheduler of the registry, three checkpoint styles, txt2img at 4/10/25 steps and
  img2img at strengths 0.3/0.75; per case the timesteps, ``init_noise_sigma`` and the final latents.
- ``shapes_txt2img.npz``: diffusers' ``StableDiffusionPipeline`` on the embedded model's PyTorch weights
  (``models/shapes/diffusers``), uint8 images, for a few schedulers, a negative prompt and a two-image batch
  with one generator per image (our image k is seeded seed + k).

The fast tier (``pytest -m fast``) compares the runtime against these without importing torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # `tests` as a package, for its harness

from tests.scheduler_harness import CONFIGS, ODD_SHAPE, run_diffusers  # noqa: E402

from edgediff.runtime.schedulers import schedulers_for  # noqa: E402

SCHEDULER_STEPS = (4, 10, 25)
STRENGTHS = (0.3, 0.75)
SEED = 1234
# the shapes model's references
SHAPES_CASES = [  # (scheduler, prompt, negative, seeds)
    ("dpmpp_2m", "a red circle on a blue background", None, [42]),
    ("euler_a", "a small yellow star on a black background", None, [7]),
    ("ddim", "a large green square on a white background", "a circle", [3]),
    ("heun", "a red circle on a blue background", None, [42]),
    ("dpmpp_2m", "a blue triangle on a yellow background", None, [11, 12]),
]
SHAPES_STEPS, SHAPES_GUIDANCE = 8, 4.0


def scheduler_key(name: str, config: str, steps: int, strength: float | None) -> str:
    return f"{name}|{config}|{steps}|{strength}"


def shapes_key(k: int) -> str:
    return f"case{k}"  # the images; "case{k}|case" holds what made them, as JSON


def schedulers() -> dict[str, np.ndarray]:
    out = {}
    for name in schedulers_for("epsilon"):  # the UNet schedulers; the flow ones: tests/test_schedulers_flow.py
        for config_name, config in CONFIGS.items():
            for steps in SCHEDULER_STEPS:
                for strength in (None,) + (STRENGTHS if config_name != "linspace" else ()):
                    try:
                        run = run_diffusers(name, config, steps, SEED, ODD_SHAPE, strength)
                    except Exception as e:  # noqa: BLE001 - diffusers refuses some combinations; so do we
                        print(f"skip {name} {config_name} {steps} {strength}: {type(e).__name__}")
                        continue
                    if not np.isfinite(run.latents).all():
                        continue
                    key = scheduler_key(name, config_name, steps, strength)
                    out[key + "|timesteps"] = np.asarray(run.timesteps, dtype=np.float64)
                    out[key + "|init_noise_sigma"] = np.asarray(float(run.init_noise_sigma))
                    out[key + "|latents"] = run.latents
    return out


def shapes() -> dict[str, np.ndarray]:
    import diffusers
    import torch

    from tests.scheduler_harness import diffusers_scheduler

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(REPO / "models/shapes/diffusers"),
                                                             torch_dtype=torch.float32, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    default = pipe.scheduler.config
    out = {}
    for k, (scheduler, prompt, negative, seeds) in enumerate(SHAPES_CASES):
        pipe.scheduler = diffusers_scheduler(scheduler, default)
        images = pipe(prompt, negative_prompt=negative, num_inference_steps=SHAPES_STEPS,
                      guidance_scale=SHAPES_GUIDANCE, num_images_per_prompt=len(seeds), output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        out[shapes_key(k)] = (images * 255).round().astype(np.uint8)
        out[shapes_key(k) + "|case"] = np.asarray(json.dumps({"scheduler": scheduler, "prompt": prompt, "negative": negative,
                                                              "seeds": seeds, "steps": SHAPES_STEPS,
                                                              "guidance": SHAPES_GUIDANCE}))
    return out


if __name__ == "__main__":
    np.savez_compressed(HERE / "schedulers.npz", **schedulers())
    np.savez_compressed(HERE / "shapes_txt2img.npz", **shapes())
    for f in ("schedulers.npz", "shapes_txt2img.npz"):
        print(f"wrote {HERE / f} ({(HERE / f).stat().st_size / 1e3:.0f} kB)")
