"""The architecture-exact Sana 600M and Sana-Sprint 0.6B recipes, counted on the meta device (no weights) against the
published sizes: the DiT 0.59 B, Gemma2-2B's decoder 2.61 B, the f32c32 DC-AE 312 M (its decoder 159 M)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")  # the recipes are diffusers / transformers configs


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes(name: str) -> dict[str, int]:
    import diffusers
    from transformers import Gemma2Config, Gemma2Model

    from edgediff.export.recipes import RECIPES

    r = RECIPES[name]
    with torch.device("meta"):
        vae = diffusers.AutoencoderDC(in_channels=3, **r["vae"])
        return {"transformer": count(diffusers.SanaTransformer2DModel(**r["transformer"])),
                "gemma": count(Gemma2Model(Gemma2Config(**r["gemma"]))),
                "vae": count(vae), "decoder": count(vae.decoder)}


def test_sana_600m_recipe_has_the_published_sizes():
    s = sizes("sana-600m")
    assert [round(s[k] / 1e9, 2) for k in ("transformer", "gemma", "vae", "decoder")] == [0.59, 2.61, 0.31, 0.16]
    assert round(s["vae"] / 1e6) == 312 and round(s["decoder"] / 1e6) == 159
    # the exact counts (diffusers 0.42, transformers 5.25), so a changed width or depth shows
    assert (s["transformer"], s["gemma"], s["vae"], s["decoder"]) == (591_747_872, 2_614_341_888, 312_250_275,
                                                                      159_223_171)


def test_sana_sprint_recipe_is_sanas_dit_with_qk_norm_and_guidance():
    """Sprint's DiT is Sana's plus the guidance embedder (two 256->1152->1152 linears) and per-layer RMS qk-norm
    (self- and cross-attention, 4 x 1152 weights a layer): 593.5 M, published as 0.59 B ("0.6B") too."""
    sana, sprint = sizes("sana-600m"), sizes("sana-sprint-0.6b")
    assert round(sprint["transformer"] / 1e9, 2) == 0.59 and sprint["transformer"] == 593_501_216
    guidance = 256 * 1152 + 1152 + 1152 * 1152 + 1152
    assert sprint["transformer"] - sana["transformer"] == guidance + 28 * 4 * 1152
    assert {k: sprint[k] for k in ("gemma", "vae", "decoder")} == {k: sana[k] for k in ("gemma", "vae", "decoder")}


def test_sana_recipes_schedulers_and_sprint_config():
    import diffusers

    from edgediff.export.recipes import GEMMA2_2B, RECIPES

    sana, sprint = RECIPES["sana-600m"], RECIPES["sana-sprint-0.6b"]
    t = sprint["transformer"]
    assert t["guidance_embeds"] and t["qk_norm"] == "rms_norm_across_heads" and t["guidance_embeds_scale"] == 0.1
    assert "qk_norm" not in sana["transformer"] and not sana["transformer"].get("guidance_embeds")
    assert "conditioning_gain" not in sana and "conditioning_gain" not in sprint  # real-size recipes: weights as drawn
    assert sana["gemma"] is GEMMA2_2B and GEMMA2_2B["vocab_size"] == 256000
    s = getattr(diffusers, sana["scheduler"][0]).from_config(sana["scheduler"][1])
    assert isinstance(s, diffusers.DPMSolverMultistepScheduler)
    assert (s.config.flow_shift, s.config.use_flow_sigmas, s.config.prediction_type) == (3.0, True, "flow_prediction")
    s = getattr(diffusers, sprint["scheduler"][0]).from_config(sprint["scheduler"][1])
    assert isinstance(s, diffusers.SCMScheduler)
    assert (s.config.prediction_type, s.config.sigma_data) == ("trigflow", 0.5)
