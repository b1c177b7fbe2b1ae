"""Training-time densities: where on [0, 1] the CFM loss is evaluated.

flowprobe's time runs from the source (t = 0, noise) to the target (t = 1, data). Every sampler here is a
monotone quantile function Q applied to one uniform draw u ~ U[0, 1) from an explicit generator,

    t = lo + (hi - lo) Q(u),        [lo, hi] = the objective's ``time_range``,

so a seed reproduces the draws bit for bit, ``uniform`` is the identity (the draws of :func:`sample_uniform`
before this module existed), and the few-step objectives can push both ends of an interval through the same Q.
The densities on [0, 1] (before the affine map to [lo, hi]):

- ``uniform``:        p(t) = 1.
- ``logit_normal``:   t = sigmoid(m + s n), n ~ N(0, 1) (n = Phi^-1(u));
                      p(t) = exp(-(logit t - m)^2 / (2 s^2)) / (s sqrt(2 pi) t (1 - t)),  CDF Phi((logit t - m) / s).
                      m > 0 favours the data end (t -> 1), m < 0 the noise end. Stable Diffusion 3 (Esser et al.
                      2024, eq. 19) writes the same density for its own time, which runs the other way
                      (x = (1 - t) data + t noise): SD3's ``lognorm(m, s)`` is flowprobe's ``logit_normal(-m, s)``.
- ``mode``:           SD3's mode sampling with heavy tails (eq. 20), f(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u),
                      s in [-1, 2 / (pi - 2)] (f is monotone there). f(1 - u) = 1 - f(u): the density is symmetric
                      about 1/2, so SD3's direction does not matter; flowprobe draws t = 1 - f(u) = u + s (cos^2(pi
                      u / 2) - 1 + u), increasing in u (s = 0 is uniform). s > 0 puts mass at the middle, s < 0 at
                      both ends. CDF: F(t) = Q^-1(t) (no closed form for the inverse; Q is monotone).
- ``u_shaped``:       the U-shaped density of Lee, Lin and Fanti, "Improving the Training of Rectified Flows"
                      (NeurIPS 2024, arXiv 2405.20320; their code mixes C e^{a t} and C e^{a (1 - t)} half and half,
                      a = 4): p(t) = a cosh(a (t - 1/2)) / (2 sinh(a / 2)), symmetric, heaviest at both ends.
                      CDF F(t) = (1 + sinh(a (t - 1/2)) / sinh(a / 2)) / 2; drawn as t = 1/2 + asinh((2u - 1)
                      sinh(a / 2)) / a (one uniform per sample, instead of their mixture and permutation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TIME_SAMPLERS", "TimeSampler", "sample_uniform"]

TIME_SAMPLERS = ("uniform", "logit_normal", "mode", "u_shaped")
#: each sampler's parameters and their defaults (SD3's lognorm(0, 1) and mode(1.29); Lee et al.'s a = 4)
DEFAULTS = {"uniform": {}, "logit_normal": {"m": 0.0, "s": 1.0}, "mode": {"s": 1.29}, "u_shaped": {"a": 4.0}}
MODE_MAX = 2 / (math.pi - 2)


def sample_uniform(n: int, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """u ~ U[0, 1), shape (n,), on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device, dtype=dtype)


def _number(kind: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{kind}: {name} must be a finite number, got {value!r}")
    return float(value)


class TimeSampler:
    """A training-time density on [0, 1] (see the module docstring), mapped into a ``time_range``.

    ``TimeSampler("logit_normal", m=0.0, s=1.0)``, ``TimeSampler("mode", s=1.29)``, ``TimeSampler("u_shaped", a=4)``;
    a bad kind, an unknown parameter or a value out of range raises ValueError with one line.
    """

    def __init__(self, kind: str = "uniform", **params):
        if kind not in TIME_SAMPLERS:
            raise ValueError(f"time sampling must be one of {', '.join(TIME_SAMPLERS)}, got {kind!r}")
        allowed = DEFAULTS[kind]
        unknown = [k for k in params if k not in allowed]
        if unknown:
            names = ", ".join(allowed) or "none"
            raise ValueError(f"{kind}: unknown parameter {unknown[0]!r}; allowed: {names}")
        values = {k: _number(kind, k, params.get(k, v)) for k, v in allowed.items()}
        if kind == "logit_normal" and values["s"] <= 0:
            raise ValueError(f"logit_normal: s must be > 0, got {values['s']!r}")
        if kind == "mode" and not -1 <= values["s"] <= MODE_MAX:
            raise ValueError(f"mode: s must be in [-1, 2/(pi-2) = {MODE_MAX:.4f}] (monotone), got {values['s']!r}")
        if kind == "u_shaped" and not 0 < values["a"] <= 50:
            raise ValueError(f"u_shaped: a must be in (0, 50], got {values['a']!r}")
        self.kind, self.params = kind, values

    def quantile(self, u: Tensor) -> Tensor:
        """Q(u): the time in [0, 1] of the uniform draw u (monotone increasing)."""
        p = self.params
        if self.kind == "uniform":
            return u
        if self.kind == "logit_normal":
            return torch.sigmoid(p["m"] + p["s"] * torch.special.ndtri(u))
        if self.kind == "mode":
            return (u + p["s"] * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)).clamp(0, 1)
        a = p["a"]
        return (0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a).clamp(0, 1)

    def density(self, t: Tensor) -> Tensor:
        """p(t) on (0, 1) for the closed-form densities (uniform, logit_normal, u_shaped); mode raises."""
        p = self.params
        if self.kind == "uniform":
            return torch.ones_like(t)
        if self.kind == "logit_normal":
            z = (torch.logit(t) - p["m"]) / p["s"]
            return torch.exp(-0.5 * z * z) / (p["s"] * math.sqrt(2 * math.pi) * t * (1 - t))
        if self.kind == "u_shaped":
            a = p["a"]
            return a * torch.cosh(a * (t - 0.5)) / (2 * math.sinh(a / 2))
        raise NotImplementedError("mode: the density is 1 / Q'(Q^-1(t)); Q^-1 has no closed form")

    def sample(self, n: int, generator: torch.Generator, device=None, dtype=torch.float32,
               time_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
        """t = lo + (hi - lo) Q(u), shape (n,), u from ``generator`` (on its device), then moved to ``device``."""
        lo, hi = time_range
        t = self.quantile(sample_uniform(n, generator, dtype))
        return (lo + (hi - lo) * t).to(device if device is not None else t.device)

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform"

    def describe(self) -> dict:
        return {"time_sampling": self.kind, **({"time_params": dict(self.params)} if self.params else {})}

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"TimeSampler({self.kind!r}{args})"
