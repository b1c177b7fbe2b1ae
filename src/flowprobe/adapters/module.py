"""Any ``torch.nn.Module``: ``package.module:Factory`` + keyword arguments + a weights file + convention flags.

The factory is imported by name (the user's own code runs, as with any import); the weights are read without
unpickling code (safetensors, or ``torch.load(weights_only=True)``), loaded strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError
from ..paths import ProbabilityPath
from .convention import Convention, ConventionAdapter
from .weights import (build, count_parameters, import_object, load_strict, read_json_mapping, read_weights,
                      select_state_dict, strip_prefixes)

__all__ = ["build_module", "load_weights_into", "load_module"]


def build_module(factory: str, kwargs: str | Path | dict | None = None) -> tuple[nn.Module, dict]:
    """``Factory(**kwargs)`` for ``factory = "package.module:Factory"``; kwargs a mapping or a JSON file of one."""
    fn = import_object(factory, "factory")
    if not callable(fn):
        raise ConfigError(f"factory {factory!r} is not callable")
    source = f"kwargs {str(kwargs)!r}" if isinstance(kwargs, (str, Path)) else f"factory {factory!r}"
    kw = read_json_mapping(kwargs, "kwargs")
    return build(fn, kw, source), kw


def load_weights_into(module: nn.Module, weights: str | Path, key: str | None = None,
                      strip_prefix: bool = True) -> dict[str, Any]:
    """Load a weights file into ``module`` strictly; ``key`` picks an entry of a checkpoint dict."""
    source = f"weights {str(weights)!r}"
    obj = read_weights(weights, "weights")
    state, used = select_state_dict(obj, source, (key,) if key else ())
    removed: list[str] = []
    if strip_prefix:
        state, removed = strip_prefixes(state)
    load_strict(module, state, source)
    return {"weights": str(weights), "key": used, "stripped_prefixes": removed}


def load_module(factory: str, weights: str | Path | None = None, kwargs: str | Path | dict | None = None, *,
                key: str | None = None, order: str = "tx", time: str = "forward", scale: float = 1.0,
                output: str = "velocity", x_keyword: str | None = None, t_keyword: str | None = None,
                extra: dict | None = None, channels: int | None = None, path: str | ProbabilityPath = "linear",
                eps: float = 1e-4, strip_prefix: bool = True) -> tuple[ConventionAdapter, dict[str, Any]]:
    """Any module as flowprobe's ``net(t, x)`` (in eval mode) and an info dict. The convention flags are the
    fields of :class:`Convention`; ``path`` (``linear``, ``cosine`` or a ProbabilityPath) serves noise / data
    outputs. ``weights=None`` keeps the factory's initialisation."""
    conv = Convention(order=order, time=time, scale=scale, output=output, x_keyword=x_keyword,
                      t_keyword=t_keyword, extra=dict(extra or {}), channels=channels, eps=eps)
    module, kw = build_module(factory, kwargs)
    loaded = load_weights_into(module, weights, key, strip_prefix) if weights is not None else {"weights": None}
    net = ConventionAdapter(module.eval(), conv, path).eval()
    info = {"kind": "module", "factory": factory, "kwargs": kw, **loaded,
            "parameters": count_parameters(module), **net.describe()}
    return net, info
