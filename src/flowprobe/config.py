"""Typed configs: dataclasses read from YAML (``yaml.safe_load``) with ``key=value`` overrides.

Every field is checked against its annotation and against optional metadata
(``choices``, ``ge``, ``gt``, ``le``, ``lt``); nested dataclasses are addressed with dots
(``--set model.width=512``). A bad key, type or value raises :class:`ConfigError`, whose message is one
line naming the key and what is allowed; the CLI prints it and exits with status 2.

Use :func:`option` to declare constrained fields::

    @dataclass
    class SolverConfig:
        method: str = option("rk4", choices=("euler", "rk4"))
        steps: int = option(100, ge=1)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "option", "from_dict", "to_dict", "load_config", "apply_overrides", "parse_override",
           "read_yaml_mapping"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key, type or value is not allowed. The message is a single line."""


def option(default: Any = dataclasses.MISSING, *, choices=None, ge=None, gt=None, le=None, lt=None,
           default_factory: Any = dataclasses.MISSING, help: str = ""):
    """A dataclass field with constraints checked by :func:`from_dict`."""
    given = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    meta = {k: v for k, v in given.items() if v not in (None, "")}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected a list of {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _check(value: Any, meta: dict, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        vals = value if isinstance(value, (list, tuple)) else [value]
        for v in vals:
            if v not in choices:
                raise ConfigError(f"{key}: {v!r} is not allowed; choose from {', '.join(map(str, choices))}")
    for name, op, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                           ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        if name in meta:
            vals = value if isinstance(value, (list, tuple)) else [value]
            for v in vals:
                if isinstance(v, (int, float)) and not op(v, meta[name]):
                    raise ConfigError(f"{key}: must be {word} {meta[name]}, got {v!r}")


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys, types and constraints."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            value = _coerce(data[name], hints[name], key)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"{key}: required key is missing")
        _check(value, dict(f.metadata), key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass (recursively) as plain JSON/YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value), the value read as YAML (so 3, 0.5, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Set each ``key.sub=value`` in a nested mapping (a copy)."""
    import copy

    data = copy.deepcopy(data or {})
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping in a YAML file (``yaml.safe_load``); a missing file, invalid YAML or a top level that is
    not a mapping raises a one-line :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys")
    return data


def load_config(cls: type[T], source: str | Path | dict | None = None, overrides: list[str] | None = None) -> T:
    """Read ``cls`` from a YAML file (or a mapping), apply ``key=value`` overrides, validate."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = source
    else:
        data = read_yaml_mapping(source)
    return from_dict(cls, apply_overrides(data, overrides))
