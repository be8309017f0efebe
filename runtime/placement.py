"""Which device runs which component: one device for all (``"gpu"``), or one per component
(``"text_encoder=cpu,unet=gpu,vae_decoder=gpu"``, or the same as a dict).

A bare name in the list sets the device of every component not named (``"gpu,text_encoder=cpu"``); without
one they get ``auto``. Two group names save typing: ``vae`` sets both VAE graphs and ``text_encoders`` every
text encoder; a component's own name wins over its group. DeepCache's shallow UNet graph runs where the UNet
does unless it is named itself, and the VAE encoder where the decoder does.

One pipeline runs on one backend (its sessions share one runtime and one compile cache), so the devices
must all be that backend's: ``cuda``/``dml`` are ONNX Runtime's, ``gpu``/``npu`` OpenVINO's, ``cpu`` and
``auto`` both.
"""

from __future__ import annotations

from typing import Any

from .backends import DEVICES, BackendError, require_device, resolve

GROUPS = {"vae": "vae", "text_encoders": "text_encoder"}  # group name -> the role it covers
FOLLOWS = {"shallow_denoiser": "denoiser", "controlnet": "denoiser", "vae_encoder": "vae_decoder"}  # a role -> the role it runs beside


def parse_devices(spec: str | dict[str, str] | None, roles: dict[str, str]) -> tuple[str, dict[str, str]]:
    """``(default device, {component: device named for it})`` from ``spec``; ``roles``: component -> role.
    Unknown components or devices, and a component named twice, are errors naming what is accepted."""
    if spec is None:
        return "auto", {}
    if isinstance(spec, dict):
        pairs = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        pairs = [tuple(p.split("=", 1)) if "=" in p else (None, p) for p in spec.split(",")]
        if not spec.strip() or any(not str(v).strip() for _, v in pairs):
            raise BackendError(f"device {spec!r:.80} has an empty entry; give a device ({', '.join(DEVICES)}) or "
                               "component=device pairs such as text_encoder=cpu,unet=gpu")
    else:
        raise BackendError(f"device must be a string or a dict of component -> device, got {type(spec).__name__}")
    default, named, grouped = "auto", {}, {}
    bare = 0
    for name, device in pairs:
        device = str(device).strip().lower()
        if device not in DEVICES:
            raise BackendError(f"unknown device {device!r:.40}" + (f" for {name.strip()}" if name else "")
                               + f"; valid: {', '.join(DEVICES)}")
        if name is None:
            bare += 1
            default = device
            continue
        name = name.strip()
        if name in GROUPS:
            members = [c for c, r in roles.items() if r.startswith(GROUPS[name])]
            target = grouped
        elif name in roles:
            members, target = [name], named
        else:
            raise BackendError(f"unknown component {name!r:.40} in device; this artifact has: {', '.join(roles)} "
                               f"(and the groups {', '.join(GROUPS)})")
        for c in members:
            if c in target:
                raise BackendError(f"device names {c} twice")
            target[c] = device
    if bare > 1:
        raise BackendError(f"device {spec!r:.80} names more than one default device; give one, then "
                           "component=device pairs")
    return default, grouped | named


def place(default: str, named: dict[str, str], roles: dict[str, str]) -> dict[str, str]:
    """Every component's requested device: its own, else (for a follower) its leader's, else the default."""
    leaders = {role: [c for c, r in roles.items() if r == role] for role in set(FOLLOWS.values())}
    devices = {}
    for comp, role in roles.items():
        if comp in named:
            devices[comp] = named[comp]
        elif role in FOLLOWS and any(c in named for c in leaders[FOLLOWS[role]]):
            devices[comp] = next(named[c] for c in leaders[FOLLOWS[role]] if c in named)
        else:
            devices[comp] = default
    return devices


def resolve_placement(backend: str, spec: str | dict[str, str] | None,
                      roles: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The backend and each component's device, ``auto`` resolved: the backend is the one every named device
    belongs to (an error when they belong to different ones)."""
    default, named = parse_devices(spec, roles)
    wanted = place(default, named, roles)
    if backend == "auto":
        owners = {resolve("auto", d)[0] for d in set(wanted.values()) if d not in ("auto", "cpu")}
        if len(owners) > 1:
            by = {d: resolve("auto", d)[0] for d in sorted(set(wanted.values())) if d not in ("auto", "cpu")}
            raise BackendError("one pipeline runs on one backend, and these devices belong to different ones: "
                               + ", ".join(f"{d} ({b})" for d, b in by.items())
                               + "; choose devices of one backend (cuda/dml: onnxruntime; gpu/npu: openvino)")
        backend = owners.pop() if owners else resolve("auto", "auto")[0]
    resolved = {comp: resolve(backend, device)[1] for comp, device in wanted.items()}
    for device in sorted(set(resolved.values())):
        require_device(backend, device)  # a device that is not here fails now, before anything is compiled
    return backend, resolved


def describe_placement(devices: dict[str, str]) -> str:
    """``unet=gpu, text_encoder=cpu`` (or the one device when all agree), for messages."""
    if len(set(devices.values())) == 1:
        return next(iter(devices.values()))
    return ", ".join(f"{c}={d}" for c, d in devices.items())
