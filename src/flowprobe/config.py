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
import math
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
           default_factory: Any = dataclasses.MISSING, help: str = "", min_len: int | None = None):
    """A dataclass field with constraints checked by :func:`from_dict`. A list value must hold at least
    ``min_len`` items (default 1: an empty sweep is a mistake; pass ``min_len=0`` where empty means "none")."""
    given = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "help": help, "min_len": min_len}
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
        if len(errors) == 1:  # Optional[X]: X's own message says more
            raise ConfigError(errors[0])
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
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float range
                raise ConfigError(f"{key}: {value!r} is too large for a number") from None
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _check(value: Any, meta: dict, key: str) -> None:
    if value is None:
        return
    if isinstance(value, (list, tuple)) and len(value) < meta.get("min_len", 1):
        raise ConfigError(f"{key}: needs at least {meta.get('min_len', 1)} item(s), got {list(value)!r}")
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
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{prefix}{bad_keys[0]!r}: keys must be names (strings), got {type(bad_keys[0]).__name__}")
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
    except (yaml.YAMLError, RecursionError):
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let the base class report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


#: YAML nested deeper than this is refused before it is parsed (a config is a few levels deep).
MAX_YAML_DEPTH = 64


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping in a YAML file (``yaml.safe_load`` semantics, UTF-8); a missing or unreadable file, text that
    is not UTF-8, invalid or absurdly nested YAML, a duplicated key, an empty file or a top level that is not a
    mapping raises a one-line :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    depth = max((len(line) - len(line.lstrip("[{ -")) for line in text.splitlines()), default=0)
    if depth > 4 * MAX_YAML_DEPTH or text.count("[") + text.count("{") > 100_000:
        raise ConfigError(f"{p}: nested too deeply to be a config")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    if data is None:
        raise ConfigError(f"{p}: the config file is empty; give at least one key (or no file for the defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys")
    bad = _non_string_key(data)
    if bad is not None:
        raise ConfigError(f"{p}: key {bad!r} is not a name; config keys are strings")
    return data


def _non_string_key(node: Any, depth: int = 0) -> Any:
    """The first mapping key of ``node`` (searched depth-first) that is not a string, else None."""
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                return k
            found = _non_string_key(v, depth + 1)
            if found is not None:
                return found
    return None


def load_config(cls: type[T], source: str | Path | dict | None = None, overrides: list[str] | None = None) -> T:
    """Read ``cls`` from a YAML file (or a mapping), apply ``key=value`` overrides, validate."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = source
    else:
        data = read_yaml_mapping(source)
    return from_dict(cls, apply_overrides(data, overrides))
