"""torchcfm (``pip install torchcfm``): ``UNetModelWrapper`` and ``MLP`` as flowprobe nets.

torchcfm's convention is flowprobe's: time t in [0, 1] from noise (t = 0) to data (t = 1), the net predicts the
velocity x1 - x0 of the straight path. ``UNetModelWrapper`` is called ``model(t, x)`` (``y=`` labels when
class-conditional); ``MLP`` takes one tensor, ``cat([x, t], 1)`` when ``time_varying=True`` (torchcfm's
``torch_wrapper``), else x alone.

Checkpoints of torchcfm's image scripts (``examples/images/cifar10/train_cifar10.py``) are ``torch.save`` dicts
``{"net_model", "ema_model", "sched", "optim", "step"}``; the EMA weights are used unless ``use_ema=False``, and a
``module.`` prefix (DataParallel / DDP) is removed. A plain state dict (``.pt``) or ``.safetensors`` file works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError
from .convention import Convention, ConventionAdapter
from .weights import (build, count_parameters, import_object, load_strict, read_json_mapping, read_weights,
                      select_state_dict, strip_prefixes)

__all__ = ["TORCHCFM_CLASSES", "torchcfm_convention", "adapt_torchcfm", "build_torchcfm", "load_torchcfm"]

#: Architecture names accepted in the ``class`` field of an architecture JSON.
TORCHCFM_CLASSES = {
    "UNetModelWrapper": "torchcfm.models.unet.unet:UNetModelWrapper",
    "UNetModel": "torchcfm.models.unet.unet:UNetModelWrapper",  # torchcfm.models exports the wrapper by this name
    "MLP": "torchcfm.models.models:MLP",
}


def _require_torchcfm() -> None:
    try:
        import torchcfm  # noqa: F401
    except ImportError as e:
        raise ConfigError("the torchcfm adapter needs the package torchcfm (pip install torchcfm)") from e


def torchcfm_convention(module: nn.Module, extra: dict | None = None) -> Convention:
    """flowprobe's convention for a torchcfm model: ``(t, x)`` for the UNet, ``cat([x, t])`` (or x alone) for MLP."""
    extra = dict(extra or {})
    _require_torchcfm()
    from torchcfm.models.models import MLP

    if isinstance(module, MLP):
        order = "concat" if module.time_varying else "x"
        return Convention(order=order, extra=extra)
    channels = None
    in_channels = getattr(module, "in_channels", None)
    if isinstance(in_channels, int) and getattr(module, "out_channels", in_channels) == 2 * in_channels:
        channels = in_channels  # learn_sigma=True: the second half of the channels is a variance
    return Convention(order="tx", extra=extra, channels=channels)


def adapt_torchcfm(module: nn.Module, extra: dict | None = None) -> ConventionAdapter:
    """A torchcfm model (already built and loaded) as flowprobe's ``net(t, x)``."""
    return ConventionAdapter(module, torchcfm_convention(module, extra))


def build_torchcfm(arch: str | Path | dict) -> tuple[nn.Module, dict]:
    """A randomly initialised torchcfm model from ``{"class": ..., "kwargs": {...}}`` (a mapping or a JSON file)."""
    _require_torchcfm()
    source = f"torchcfm arch {arch!r}" if not isinstance(arch, dict) else "torchcfm arch"
    spec = read_json_mapping(arch, "torchcfm arch")
    unknown = set(spec) - {"class", "kwargs"}
    if unknown or "class" not in spec:
        raise ConfigError(f"{source}: expected keys 'class' and 'kwargs', got {sorted(spec)}")
    name = spec["class"]
    if name not in TORCHCFM_CLASSES:
        raise ConfigError(f"{source}: unknown class {name!r} (known: {', '.join(TORCHCFM_CLASSES)})")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{source}: 'kwargs' must be a mapping, got {type(kwargs).__name__}")
    module = build(import_object(TORCHCFM_CLASSES[name], "torchcfm class"), kwargs, source)
    return module, {"class": name, "kwargs": kwargs}


def load_torchcfm(checkpoint: str | Path, arch: str | Path | dict, *, use_ema: bool = True,
                  extra: dict | None = None, strip_prefix: bool = True) -> tuple[ConventionAdapter, dict[str, Any]]:
    """A torchcfm checkpoint as flowprobe's ``net(t, x)`` (in eval mode) and an info dict.

    ``checkpoint``: a training-script dict (``ema_model`` / ``net_model``), a plain state dict, or a
    ``.safetensors`` file. ``arch``: ``{"class": "UNetModelWrapper" | "MLP", "kwargs": {...}}`` or a JSON file of it.
    ``use_ema``: take ``ema_model`` (default) or ``net_model``. ``extra``: keyword arguments on every call (``y``).
    """
    module, arch_info = build_torchcfm(arch)
    source = f"torchcfm checkpoint {str(checkpoint)!r}"
    obj = read_weights(checkpoint, "torchcfm checkpoint")
    key = "ema_model" if use_ema else "net_model"
    state, used = select_state_dict(obj, source, (key,))
    removed: list[str] = []
    if strip_prefix:
        state, removed = strip_prefixes(state)
    load_strict(module, state, source)
    net = adapt_torchcfm(module.eval(), extra).eval()
    info = {"kind": "torchcfm", "file": str(checkpoint), "weights": used or "state_dict", **arch_info,
            "stripped_prefixes": removed, "parameters": count_parameters(module),
            "convention": net.convention.describe()}
    if isinstance(obj, dict) and "step" in obj and isinstance(obj["step"], (int, float)):
        info["step"] = obj["step"]
    return net, info
