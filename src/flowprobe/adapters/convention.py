"""Time and output conventions of velocity nets trained elsewhere, and the wrapper that turns them into flowprobe's.

flowprobe calls a velocity net as ``net(t, x)``: ``t`` of shape (B,) runs from the source (t = 0, noise) to the
target (t = 1, data) and the net returns dx/dt. A model trained elsewhere differs in up to five ways, each a field
of :class:`Convention`:

- how it is called (``order``): ``module(t, x)``, ``module(x, t)``, ``module(cat([x, s], 1))`` (flat x, time as a
  last column), ``module(x)`` (an autonomous field); either argument may instead go by keyword (``x_keyword``,
  ``t_keyword``), and ``extra`` keyword arguments (class labels, conditioning) go on every call;
- which way its time runs (``time``): ``forward`` (s = t) or ``reverse`` (s = 1 - t, time from data to noise);
- the scale of its time input (``scale``): the model receives ``scale * s`` (1000 for diffusers timesteps);
- what it returns (``output``): ``velocity`` (dx/dt), ``minus_velocity`` (-dx/dt, e.g. noise minus data),
  ``noise`` (the source sample x0, an eps-prediction) or ``data`` (the target sample x1); the last two are turned
  into a velocity with the formulas of an affine path (below);
- ``channels``: keep only the first ``channels`` channels (dim 1) of the output (models that also predict a variance).

Noise and data predictions on a deterministic affine path x_t = a(t) x0 + b(t) x1 (u_t = a' x0 + b' x1), with x0
the source noise and x1 the data, all in flowprobe time t, are converted by :func:`flowprobe.affine_paths.convert`:

    noise e = x0_hat:  x1_hat = (x_t - a e) / b,    v = a' e + b' x1_hat
    data  d = x1_hat:  x0_hat = (x_t - b d) / a,    v = a' x0_hat + b' d

The divisor vanishes at one end (b = 0 at t = 0 for noise, a = 0 at t = 1 for data on the linear path). There a
divisor of magnitude below ``eps`` (default 1e-4) is replaced by ``eps`` with its sign (+ for 0): the conversion is
exact wherever |a|, |b| >= eps, and bounded (by 1/eps times the prediction) at the endpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..affine_paths import PATH_KINDS, ScheduledPath, convert
from ..config import ConfigError
from ..paths import LinearPath, ProbabilityPath

__all__ = ["Convention", "ConventionAdapter", "ORDERS", "TIMES", "OUTPUTS", "named_path", "unwrap_output",
           "to_velocity", "module_dtype"]

ORDERS = ("tx", "xt", "concat", "x")
TIMES = ("forward", "reverse")
OUTPUTS = ("velocity", "minus_velocity", "noise", "data")


@dataclass
class Convention:
    """How a foreign model is called and what it returns; see the module docstring for each field."""

    order: str = "tx"
    time: str = "forward"
    scale: float = 1.0
    output: str = "velocity"
    x_keyword: str | None = None
    t_keyword: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    channels: int | None = None
    eps: float = 1e-4

    def __post_init__(self):
        for name, value, allowed in (("order", self.order, ORDERS), ("time", self.time, TIMES),
                                     ("output", self.output, OUTPUTS)):
            if value not in allowed:
                raise ConfigError(f"convention.{name}: expected one of {', '.join(allowed)}, got {value!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale != 0):
            raise ConfigError(f"convention.scale: expected a finite non-zero number, got {self.scale!r}")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 1):
            raise ConfigError(f"convention.eps: expected a number in (0, 1), got {self.eps!r}")
        if self.channels is not None and (not isinstance(self.channels, int) or self.channels < 1):
            raise ConfigError(f"convention.channels: expected an integer >= 1 or null, got {self.channels!r}")
        if not isinstance(self.extra, dict) or not all(isinstance(k, str) for k in self.extra):
            raise ConfigError(f"convention.extra: expected a mapping of keyword names, got {self.extra!r}")
        if self.order in ("concat", "x") and (self.x_keyword or self.t_keyword):
            raise ConfigError(f"convention: order {self.order!r} takes no x_keyword / t_keyword")
        clash = {self.x_keyword, self.t_keyword} & set(self.extra)
        if clash - {None}:
            raise ConfigError(f"convention.extra: {sorted(clash - {None})} is already the x or t keyword")

    def model_time(self, t: Tensor) -> Tensor:
        """The time input the model receives for flowprobe time t: scale * t, or scale * (1 - t) when reversed."""
        s = t if self.time == "forward" else 1 - t
        return s * self.scale if self.scale != 1 else s

    def describe(self) -> dict:
        """A JSON-able description (extra arguments by name and shape, not value)."""
        out = asdict(self)
        out["extra"] = {k: (list(v.shape) if isinstance(v, Tensor) else repr(v)) for k, v in self.extra.items()}
        return out


def named_path(name: str | ProbabilityPath) -> ProbabilityPath:
    """A path by name: ``linear`` (x_t = (1 - t) x0 + t x1) or another kind of :mod:`flowprobe.affine_paths` with
    its default parameters (``cosine``: a = cos(pi t / 2), b = sin(pi t / 2); ``vp``, ``linear_vp``,
    ``polynomial``)."""
    if isinstance(name, ProbabilityPath):
        return name
    if name == "linear":
        return LinearPath()
    if name in PATH_KINDS:
        return ScheduledPath(name)
    raise ConfigError(f"path: expected one of {', '.join(PATH_KINDS)} (or a ProbabilityPath), got {name!r}")


def unwrap_output(out: Any) -> Tensor:
    """The tensor in a model's return value: a tensor, the first item of a tuple / list, ``.sample``, ``["sample"]``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, dict) and isinstance(out.get("sample"), Tensor):
        return out["sample"]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__} (expected a tensor, tuple or .sample)")


def to_velocity(out: Tensor, output: str, t: Tensor, x: Tensor, path: ProbabilityPath, eps: float = 1e-4) -> Tensor:
    """The velocity dx/dt from a model output of kind ``output`` at flowprobe time t (shape (B,)) and state x."""
    if output == "velocity":
        return out
    if output == "minus_velocity":
        return -out
    if output in ("noise", "data"):
        return convert(out, output, "velocity", t, x, path, eps)
    raise ValueError(f"unknown output {output!r}")


def module_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter or buffer (None when it has none)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _batch_extra(value: Any, batch: int, device: torch.device) -> Any:
    """A tensor extra on x's device; a leading dimension of 1 is expanded to the batch."""
    if not isinstance(value, Tensor):
        return value
    value = value.to(device)
    if value.dim() > 0 and value.shape[0] == 1 and batch != 1:
        value = value.expand(batch, *value.shape[1:])
    return value


class ConventionAdapter(nn.Module):
    """flowprobe's ``net(t, x)`` around a module with another :class:`Convention`.

    The model is called with x and its time input cast to the module's dtype (its first floating parameter); its
    output is cast back to x's dtype and converted to a velocity in that dtype. ``path`` (flowprobe time) is used
    only for ``noise`` / ``data`` outputs and must then be deterministic.
    """

    def __init__(self, module: nn.Module, convention: Convention | None = None,
                 path: ProbabilityPath | str = "linear"):
        super().__init__()
        self.module = module
        self.convention = convention if convention is not None else Convention()
        self.path = named_path(path)
        if self.convention.output in ("noise", "data") and not self.path.deterministic:
            raise ConfigError(f"convention.output={self.convention.output!r} needs a deterministic path, "
                              f"got {type(self.path).__name__} (g != 0)")

    def call_module(self, t: Tensor, x: Tensor) -> Tensor:
        """The raw model output (a tensor, before conversion) at flowprobe time t."""
        conv = self.convention
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        dtype = module_dtype(self.module) or x.dtype
        xm = x.to(dtype)
        s = conv.model_time(t.to(device=x.device, dtype=dtype))
        kwargs = {k: _batch_extra(v, x.shape[0], x.device) for k, v in conv.extra.items()}
        if conv.order == "concat":
            out = self.module(torch.cat([xm, s[:, None]], dim=1), **kwargs)
        elif conv.order == "x":
            out = self.module(xm, **kwargs)
        else:
            args: list[Tensor] = []
            pairs = (("t", s, conv.t_keyword), ("x", xm, conv.x_keyword))
            for _, value, keyword in (pairs if conv.order == "tx" else pairs[::-1]):
                if keyword:
                    kwargs[keyword] = value
                else:
                    args.append(value)
            out = self.module(*args, **kwargs)
        out = unwrap_output(out)
        if conv.channels is not None:
            out = out[:, : conv.channels]
        if out.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}")
        return out.to(x.dtype)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out = self.call_module(t, x)
        conv = self.convention
        return to_velocity(out, conv.output, t, x, self.path, conv.eps)

    def describe(self) -> dict:
        return {"module": type(self.module).__name__, "convention": self.convention.describe(),
                "path": self.path.describe()}
