"""Building a velocity net from a portable spec: the one seeded-net builder of the library.

A spec is ``{"class": "MLP" | "FlatMLP" | "UNet" | "DiT", "kwargs": {...}}``; :func:`model_spec` makes one from a
model config and a sample shape, checkpoint sidecars store it, and :func:`build_net` rebuilds the net.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .dit import DIT_PRESETS, DiT
from .embedding import TIME_SCALE
from .mlp import MLP
from .unet import UNET_PRESETS, UNet

__all__ = ["model_spec", "build_net", "FlatMLP", "NET_CLASSES"]


class FlatMLP(nn.Module):
    """An MLP velocity on flattened samples (images): v(t, x) = MLP(t, x.flatten()).reshape(x.shape)."""

    def __init__(self, dim: int, width: int = 256, depth: int = 3, time_embed_dim: int = 32,
                 activation: str = "silu", **options):
        super().__init__()
        self.mlp = MLP(dim, width, depth, time_embed_dim, activation, **options)

    def forward(self, t: Tensor, x: Tensor, h: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        return self.mlp(t, x.reshape(x.shape[0], -1), h, y=y).reshape(x.shape)


def model_spec(model, shape: tuple[int, ...] | list[int], step_embed: bool = False) -> dict:
    """The portable description of a net, ``{"class": "MLP" | "FlatMLP" | "UNet" | "DiT", "kwargs": {...}}``, for
    samples of ``shape`` (``(d,)`` vectors or ``(C, H, W)`` images). It is stored in checkpoint sidecars
    (``extra["model"]``) and :func:`build_net` rebuilds the net from it. ``model`` is a
    :class:`flowprobe.runs.config.ModelConfig`
    (or anything with its fields, like the image experiments' ``ImageModelConfig``). ``step_embed``: the net
    takes a step h too (few-step objectives). Keys at their defaults are left out, so older specs still match."""
    shape = tuple(int(s) for s in shape)
    extra = {"step_embed": True} if step_embed else {}
    if getattr(model, "num_classes", None):  # class-conditional (flowprobe.guidance); left out when unconditional
        extra["num_classes"] = int(model.num_classes)
    time_scale = getattr(model, "time_scale", TIME_SCALE)
    if model.arch == "mlp":
        mlp = {"width": model.width, "depth": model.depth, "time_embed_dim": getattr(model, "time_embed_dim", 32),
               "activation": getattr(model, "activation", "silu"), **extra}
        if time_scale != TIME_SCALE:
            mlp["time_scale"] = float(time_scale)
        if len(shape) == 1:
            return {"class": "MLP", "kwargs": {"dim": shape[0], **mlp}}
        return {"class": "FlatMLP", "kwargs": {"dim": math.prod(shape), **mlp}}
    if model.arch == "dit":
        return _dit_spec(model, shape, extra, time_scale)
    if model.arch != "unet":
        raise ConfigError(f"model.arch: {model.arch!r} is not allowed; choose mlp, unet or dit")
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"model.arch: unet needs square images (C, H, H), got samples of shape {shape}")
    kw = dict(UNET_PRESETS[model.preset])
    kw.update(image_size=shape[1], in_channels=shape[0])
    for name in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout"):
        v = getattr(model, name, None)
        if v is not None:
            kw[name] = v
    kw.update(extra)
    if time_scale != TIME_SCALE:
        kw["time_scale"] = float(time_scale)
    kw = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items()}
    # attention only where the feature map exists; a preset's resolution may not fit a small image
    sides = {shape[1] // 2 ** i for i in range(len(kw["channel_mult"]))}
    kw["attention_resolutions"] = [r for r in kw["attention_resolutions"] if r in sides]
    return {"class": "UNet", "kwargs": kw}


def _dit_spec(model, shape: tuple[int, ...], extra: dict, time_scale: float) -> dict:
    """The DiT spec: ``DIT_PRESETS[model.preset]`` for square images of ``shape``, with the optional overrides
    ``patch_size``, ``hidden_size``, ``num_blocks`` (the DiT's depth; ``model.depth`` is the MLP's) and
    ``num_heads``."""
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"model.arch: dit needs square images (C, H, H), got samples of shape {shape}")
    if model.preset not in DIT_PRESETS:
        raise ConfigError(f"model.preset: {model.preset!r} is not a DiT preset; choose one of {', '.join(DIT_PRESETS)}")
    kw = dict(DIT_PRESETS[model.preset])
    kw.update(image_size=shape[1], in_channels=shape[0])
    for name, key in (("patch_size", "patch_size"), ("hidden_size", "hidden_size"), ("num_blocks", "depth"),
                      ("num_heads", "num_heads")):
        v = getattr(model, name, None)
        if v is not None:
            kw[key] = v
    if shape[1] % kw["patch_size"]:
        raise ConfigError(f"model.patch_size: {kw['patch_size']} does not divide the image side {shape[1]}")
    if kw["hidden_size"] % 4 or kw["hidden_size"] % kw["num_heads"]:
        raise ConfigError(f"model.hidden_size: {kw['hidden_size']} must be divisible by 4 and by "
                          f"model.num_heads ({kw['num_heads']})")
    kw.update(extra)
    if time_scale != TIME_SCALE:
        kw["time_scale"] = float(time_scale)
    return {"class": "DiT", "kwargs": kw}


def build_net(spec: dict, seed: int | None = None) -> nn.Module:
    """The net of a :func:`model_spec` (``class`` MLP, FlatMLP, UNet or DiT with its ``kwargs``), initialised
    from torch's global RNG seeded with ``seed`` inside a forked RNG scope (the caller's global RNG state is
    left untouched); ``seed=None`` draws from the current global state."""
    cls = NET_CLASSES.get(spec.get("class"))
    if cls is None:
        raise ConfigError(f"model class {spec.get('class')!r} is unknown; allowed: {', '.join(NET_CLASSES)}")
    kwargs = dict(spec.get("kwargs", {}))
    if "time_embed_scale" in kwargs:  # the UNet's name for time_scale in specs written before 0.2
        kwargs["time_scale"] = kwargs.pop("time_embed_scale")
    if seed is None:
        return cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kwargs)


#: the classes a spec may name
NET_CLASSES = {"MLP": MLP, "FlatMLP": FlatMLP, "UNet": UNet, "DiT": DiT}
