"""Reading foreign weights without running foreign code: safetensors, or ``torch.load(weights_only=True)``.

Every failure is a :class:`~flowprobe.config.ConfigError` whose one-line message names the file or option.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError

__all__ = ["read_weights", "select_state_dict", "strip_prefixes", "load_strict", "read_json_mapping", "existing_file",
           "import_object", "build", "count_parameters", "one_line", "STRIPPED_PREFIXES"]

#: Prefixes added by wrappers around a module: DataParallel / DistributedDataParallel, torch.compile.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


def existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}: no such file {str(p)!r}")
    return p


def read_weights(path: str | Path, what: str = "weights") -> Any:
    """The object stored in a weights file: ``.safetensors`` through safetensors, anything else through
    ``torch.load(map_location="cpu", weights_only=True)`` (tensors, containers and numbers only; no code runs)."""
    p = existing_file(path, what)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # summarised in one line
            raise ConfigError(f"{what}: cannot read safetensors file {str(p)!r}: {one_line(e)}") from e
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip / pickle), ...
        raise ConfigError(f"{what}: cannot read {str(p)!r} with torch.load(weights_only=True) "
                          f"(only tensors and plain containers are read, never pickled code): {one_line(e)}") from e


def one_line(e: BaseException) -> str:
    """One line for an exception: its type and the most telling line of its message (ANSI colour codes removed)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    telling = [ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler error" in ln]
    line = (telling or lines or [""])[0]
    return f"{type(e).__name__}: {line}".rstrip(": ")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def select_state_dict(obj: Any, source: str, keys: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], str | None]:
    """The state dict in a loaded checkpoint: ``obj`` itself when it maps names to tensors, else ``obj[key]`` for
    the first of ``keys`` present. Returns (state dict, the key used or None)."""
    if _is_state_dict(obj):
        return dict(obj), None
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{source}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    for key in keys:
        if key in obj:
            if not _is_state_dict(obj[key]):
                raise ConfigError(f"{source}: entry {key!r} is not a state dict (names -> tensors)")
            return dict(obj[key]), key
    found = ", ".join(repr(k) for k in list(obj)[:8])
    wanted = " or ".join(repr(k) for k in keys) if keys else "names mapped to tensors"
    raise ConfigError(f"{source}: expected {wanted}; the file holds keys {found}")


def strip_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``) carried by every key; returns (state, removed)."""
    removed = []
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                removed.append(prefix)
                changed = True
    return state, removed


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``module.load_state_dict(state, strict=True)``; a mismatch becomes one line counting missing, unexpected and
    mis-shaped entries with an example of each."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {items[0]})")
    if parts:
        raise ConfigError(f"{source}: weights do not fit {type(module).__name__}: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:  # dtype or other errors, summarised in one line
        raise ConfigError(f"{source}: load_state_dict into {type(module).__name__} failed: {one_line(e)}") from e


def read_json_mapping(value: str | Path | Mapping | None, what: str) -> dict:
    """A mapping given directly, or read from a JSON file; None gives {}."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    p = existing_file(value, what)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what}: cannot read JSON from {str(p)!r}: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {str(p)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def import_object(spec: str, what: str = "factory") -> Any:
    """The object named ``package.module:Name`` (``Name`` may be dotted). Importing runs the named module: the
    user's own code."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{what}: expected 'package.module:Name', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # ImportError or an error inside the user's module
        raise ConfigError(f"{what}: cannot import module {mod_name!r}: {one_line(e)}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build(factory: Any, kwargs: dict, source: str) -> nn.Module:
    """``factory(**kwargs)``, checked to be an nn.Module; errors (bad kwargs) become one line naming ``source``."""
    try:
        module = factory(**kwargs)
    except Exception as e:  # TypeError for a bad keyword, or the constructor's own errors
        name = getattr(factory, "__name__", repr(factory))
        raise ConfigError(f"{source}: {name}(**kwargs) failed: {one_line(e)}") from e
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{source}: the factory returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
