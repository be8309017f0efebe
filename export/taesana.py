"""taesana: madebyollin's tiny decoder for Sana's 32x deep-compression autoencoder (DC-AE f32c32).

Written here after ``F32Decoder`` of madebyollin/taesd's ``taesd.py`` (MIT), because diffusers has no class for it
(its ``AutoencoderTiny`` upsamples 8x with 64 channels throughout) and ``taesd.py`` is a script, not a package. The
module tree is taesd.py's, so its parameter names are the released ``taesana_decoder.pth``'s and that state dict
loads with ``strict=True``: an ``nn.Sequential`` of ``Clamp``, ``conv(latent_channels, 256)``, ReLU, five stages
of three ``Block``s, a 2x ``Upsample`` and a bias-free conv (256 -> 128 -> 64 -> 64 -> 64 -> 64 channels), a last
``Block`` and ``conv(64, 3)``. ``upscale`` below 32 keeps only the last stages (the tiny test recipes' 2x DC-AE);
at 32 the module is taesd.py's exactly.

Latent units (taesd's README): TAESD decoders take the latents the denoiser works on, "TAESD's scale_factor for
latents is 1 instead of some long decimal" (its preview notebook feeds the UNet's latents, or the VAE's input times
``scaling_factor``); its images are in [0, 1], not [-1, 1]. For Sana that is the transformer's latents as they are
(SanaPipeline's ``output_type="latent"``), not the DC-AE's input ``latents / 0.41407``; so the ``tiny`` variant
records scaling 1.0 and shift 0.0, and its graph maps the image to [-1, 1] (``* 2 - 1``) as every VAE graph here
gives it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from edgediff.runtime.manifest import TensorSpec

from .components import Contract, ExportError

# (in, out) channels of the five 2x stages of taesd.py's F32Decoder
STAGES = ((256, 128), (128, 64), (64, 64), (64, 64), (64, 64))
SCALING_FACTOR, SHIFT_FACTOR = 1.0, 0.0  # taesana's latent units: the denoiser's latents as they are
SUFFIXES = (".safetensors", ".pth", ".pt")


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def F32Decoder(latent_channels: int = 32, upscale: int = 32) -> nn.Sequential:  # noqa: N802 (taesd.py's name)
    """taesd.py's ``F32Decoder`` (latents -> [0, 1] images, ``upscale``x larger); ``upscale`` a power of 2 up to 32,
    fewer stages below 32."""
    stages = _stages(upscale)
    layers: list[nn.Module] = [Clamp(), conv(latent_channels, stages[0][0]), nn.ReLU()]
    for n_in, n_out in stages:
        layers += [Block(n_in, n_in), Block(n_in, n_in), Block(n_in, n_in), nn.Upsample(scale_factor=2),
                   conv(n_in, n_out, bias=False)]
    return nn.Sequential(*layers, Block(64, 64), conv(64, 3))


def _stages(upscale: int) -> tuple[tuple[int, int], ...]:
    n = {2 ** k: k for k in range(1, len(STAGES) + 1)}.get(upscale)
    if n is None:
        raise ExportError(f"taesana upsamples 2, 4, 8, 16 or 32 times, not {upscale!r}")
    return STAGES[len(STAGES) - n:]


def latent_channels(decoder: nn.Sequential) -> int:
    return int(decoder[1].in_channels)


def upscale(decoder: nn.Sequential) -> int:
    return 2 ** sum(isinstance(m, nn.Upsample) for m in decoder)


def random_taesana(latent_channels: int = 32, seed: int = 0, upscale: int = 32) -> nn.Sequential:
    """A taesana decoder with seeded random weights, for recipes and tests: PyTorch's default initialisation, the
    last conv rescaled so that unit-normal latents draw a visible image (mid-grey, std 0.25) rather than a nearly
    black one (the default gives about 0 +- 0.08, half of it clipped)."""
    torch.manual_seed(seed)
    decoder = F32Decoder(latent_channels, upscale).eval()
    with torch.no_grad():
        probe = decoder(torch.randn(1, latent_channels, 8, 8, generator=torch.Generator().manual_seed(seed)))
        last = decoder[-1]
        last.weight.mul_(0.25 / max(float(probe.std()), 1e-6))
        last.bias.add_(0.5 - float(decoder(torch.zeros(1, latent_channels, 8, 8)).mean()))
    return decoder


def save_random_taesana(out: str | Path, seed: int = 0, latent_channels: int = 32, upscale: int = 32) -> Path:
    """``random_taesana`` written as ``out/taesana_decoder.safetensors`` (``out`` a new or empty folder); its path."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; the random taesana is written to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "taesana_decoder.safetensors"
    state = random_taesana(latent_channels, seed, upscale).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a .pth/.pt state dict (``torch.load(weights_only=True)``: no code
    runs); ExportError naming what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not found"
        raise ExportError(f"taesana decoder {path}: {what}; give the decoder's weight file, taesana_decoder.pth "
                          "(madebyollin/taesd) or a .safetensors of the same state dict")
    if path.suffix not in SUFFIXES:
        raise ExportError(f"taesana decoder {path}: a {path.suffix or 'suffix-less'} file; accepted: "
                          f"{', '.join(SUFFIXES)} (taesana_decoder.pth from madebyollin/taesd)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a damaged or foreign file raises whatever its reader raises)
        raise ExportError(f"taesana decoder {path} could not be read as a {path.suffix} state dict: "
                          f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ExportError(f"taesana decoder {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_taesana(path: str | Path) -> nn.Sequential:
    """taesd.py's ``F32Decoder`` with the weights of ``path`` (taesana_decoder.pth, or the same tensors as
    .safetensors), loaded with strict keys and shapes, fp32, in eval mode. The latent channels are read from the
    first conv, the upscale from the last conv's index; a file that is not such a decoder (taesana's encoder,
    another TAESD's decoder, missing, extra or misshapen tensors) is an ExportError that names the tensors."""
    state = read_state_dict(path)
    first = state.get("1.weight")
    if first is None or first.ndim != 4:
        if isinstance(state.get("0.weight"), torch.Tensor) and state["0.weight"].ndim == 4 \
                and state["0.weight"].shape[1] == 3:
            raise ExportError(f"{path} is a TAESD encoder (its first conv takes an RGB image); give the decoder, "
                              "taesana_decoder.pth")
        raise ExportError(f"{path} is not a taesana decoder: it has no 4-d tensor '1.weight' (the first conv, "
                          f"latents -> 256 channels); its tensors begin {', '.join(sorted(state)[:6]) or 'none'}")
    last = max((int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()), default=0)
    n = (last - 4) // 5  # the last conv's index is 4 + 5 * stages
    if last != 4 + 5 * n or not 1 <= n <= len(STAGES):
        raise ExportError(f"{path} is not a taesana decoder: its last module index is {last}; taesana's decoder ends "
                          f"at {4 + 5 * len(STAGES)} (5 upsampling stages; 1 to 5 accepted)")
    decoder = F32Decoder(int(first.shape[1]), 2 ** n)
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{label}: {', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
                if names]
    if problems:
        raise ExportError(f"{path} does not fit taesd.py's F32Decoder({int(first.shape[1])} latent channels, "
                          f"{2 ** n}x): " + "; ".join(problems))
    decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return decoder.float().eval()


def check_fits(decoder: nn.Sequential, channels: int, scale: int, label: str) -> None:
    """The decoder must speak the checkpoint's latents: its channels and its spatial scale."""
    if latent_channels(decoder) != channels:
        raise ExportError(f"the taesana decoder {label} takes {latent_channels(decoder)} latent channels, the "
                          f"checkpoint's autoencoder gives {channels}: it belongs to another model")
    if upscale(decoder) != scale:
        raise ExportError(f"the taesana decoder {label} upsamples {upscale(decoder)}x, the checkpoint's autoencoder "
                          f"{scale}x: it belongs to another model")


class _Decode(nn.Module):
    """The denoiser's latents -> [-1, 1] images (taesana's [0, 1] ones, * 2 - 1, as diffusers' AutoencoderTiny)."""

    def __init__(self, decoder: nn.Sequential):
        super().__init__()
        self.decoder = decoder

    def forward(self, latent_sample):
        return self.decoder(latent_sample) * 2 - 1


def decode(decoder: nn.Sequential, latents: torch.Tensor) -> torch.Tensor:
    """What the tiny variant's graph computes, for the references: SanaPipeline's latents -> [-1, 1] images."""
    with torch.no_grad():
        return _Decode(decoder)(latents)


def taesana_decoder_contract(decoder: nn.Sequential, latent_size: int) -> Contract:
    """The ``tiny`` variant of vae_decoder: the runtime's decoder contract in taesana's own latent units."""
    ch = latent_channels(decoder)

    def sample():
        return (torch.randn(1, ch, latent_size, latent_size + 2, generator=torch.Generator().manual_seed(2)),)

    return Contract("vae_decoder", _Decode(decoder),
                    (TensorSpec("latent_sample", "float32", ("batch", ch, "latent_height", "latent_width")),),
                    (TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
                    sample, variant="tiny", scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR)


__all__ = ["F32Decoder", "check_fits", "decode", "load_taesana", "random_taesana", "read_state_dict",
           "save_random_taesana", "taesana_decoder_contract"]
