"""Affine paths beyond the straight line, and the conversions between what a net can predict on them.

A path x_t = a(t) x0 + b(t) x1 (+ g(t) z) runs from the source x0 (t = 0, noise) to the data x1 (t = 1). flow_matching
(FAIR) writes the same path as x_t = sigma_t x0 + alpha_t x1 in the same time direction, so a = sigma_t and
b = alpha_t. The kinds (``path.kind``; derivatives are exact, written out):

- ``linear``      a = 1 - t,                 b = t                    (CondOTScheduler; rectified flow)
- ``cosine``      a = cos(pi t / 2),         b = sin(pi t / 2)        (CosineScheduler; trigonometric interpolant)
- ``polynomial``  a = 1 - t^n,               b = t^n                  (PolynomialConvexScheduler(n), n > 0)
- ``vp``          a = sqrt(1 - e^{-T}),      b = e^{-T / 2},          (VPScheduler(beta_min, beta_max))
                  T(t) = int_t^1 beta = (1 - t) beta_min + (1 - t)^2 (beta_max - beta_min) / 2: the VP-SDE of Song
                  et al. (2021) with its time s = 1 - t, so a^2 + b^2 = 1. It never reaches pure noise: b(0) =
                  e^{-(beta_min + beta_max) / 4} (6.6e-3 for 0.1, 20).
- ``linear_vp``   a = sqrt(1 - t^2),         b = t                    (LinearVPScheduler)

``vp`` and ``linear_vp`` have a'(t) -> -inf at t = 1, and ``polynomial`` with n < 1 has b'(t) -> inf at t = 0: their
``time_range`` stops ``t_clip`` short of that end, so a training target is never infinite. Noise g(t) z on top of
any kind is :class:`~flowprobe.paths.StochasticPath`'s (``sigma``, ``schedule`` constant or bridge).

Parameterisations (``PARAMETERISATIONS``) on a deterministic affine path, all at flowprobe time t and state x = x_t:
``velocity`` v = a' x0 + b' x1, ``noise`` the source sample x0 (an epsilon prediction for a Gaussian source; FAIR's
"epsilon"), ``data`` the target sample x1 (FAIR's "target", an x0-prediction in diffusion's naming), and ``score``
grad log p_t(x) = -E[x0 | x_t = x] / a for a standard-normal source drawn independently of the data. Every
conversion goes through the pair (x0_hat, x1_hat) that x and the prediction determine:

    noise e:     x0 = e,                      x1 = (x - a e) / b
    data d:      x0 = (x - b d) / a,          x1 = d
    velocity v:  x0 = (b' x - b v) / D,       x1 = (a v - a' x) / D,       D = a b' - b a'
    score s:     x0 = -a s,                   x1 = (x + a^2 s) / b

and back: v = a' x0 + b' x1, noise = x0, data = x1, score = -x0 / a. Each divisor vanishes somewhere (b = 0 at
t = 0, a = 0 at t = 1); with ``eps`` a divisor of magnitude below eps is replaced by eps with its sign (+ for 0), so
the conversion is exact wherever the divisors are >= eps and bounded at the ends. A noisy path (g != 0) or a
non-standard source needs :func:`flowprobe.solvers.velocity_to_score` for the score.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .paths import LinearPath, ProbabilityPath, StochasticPath, expand_like, make_path

__all__ = ["PATH_KINDS", "PARAMETERISATIONS", "ScheduledPath", "make_scheduled_path", "check_path_params",
           "guard_divisor", "endpoints", "convert"]

PATH_KINDS = ("linear", "cosine", "polynomial", "vp", "linear_vp")
#: each kind's parameters and their defaults (VPScheduler's 0.1 and 20; polynomial n = 2)
PATH_DEFAULTS = {"linear": {}, "cosine": {}, "polynomial": {"n": 2.0}, "vp": {"beta_min": 0.1, "beta_max": 20.0},
                 "linear_vp": {}}
PARAMETERISATIONS = ("velocity", "noise", "data", "score")


def check_path_params(kind: str, params: dict | None) -> dict:
    """The parameters of path ``kind`` with defaults filled in; ValueError (one line) for a bad kind, an unknown
    key or a value out of range."""
    if kind not in PATH_KINDS:
        raise ValueError(f"path kind must be one of {', '.join(PATH_KINDS)}, got {kind!r}")
    params = dict(params or {})
    allowed = PATH_DEFAULTS[kind]
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise ValueError(f"{kind}: unknown parameter {unknown[0]!r}; allowed: {', '.join(allowed) or 'none'}")
    out = {}
    for name, default in allowed.items():
        value = params.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{kind}: {name} must be a finite number, got {value!r}")
        out[name] = float(value)
    if kind == "polynomial" and not 0 < out["n"] <= 100:
        raise ValueError(f"polynomial: n must be in (0, 100], got {out['n']!r}")
    if kind == "vp" and not 0 < out["beta_min"] <= out["beta_max"] <= 1e4:
        raise ValueError(f"vp: need 0 < beta_min <= beta_max <= 1e4, got {out['beta_min']!r}, {out['beta_max']!r}")
    return out


class ScheduledPath(ProbabilityPath):
    """x_t = a(t) x0 + b(t) x1 + g(t) z with (a, b) of a named ``kind`` (the module docstring) and g from
    ``StochasticPath(sigma, schedule, t_clip)`` (none for sigma = 0)."""

    def __init__(self, kind: str = "linear", params: dict | None = None, sigma: float = 0.0,
                 schedule: str = "constant", t_clip: float = 1e-4):
        self.kind, self.params = kind, check_path_params(kind, params)
        self.noise = StochasticPath(sigma, schedule, t_clip)
        self.sigma, self.schedule, self.t_clip = self.noise.sigma, schedule, t_clip
        self.deterministic = self.noise.deterministic

    @property
    def time_range(self) -> tuple[float, float]:
        """The noise's range, stopped t_clip short of an end where a' or b' is infinite."""
        lo, hi = self.noise.time_range
        if self.kind in ("vp", "linear_vp"):
            hi = min(hi, 1 - self.t_clip)
        if self.kind == "polynomial" and self.params["n"] < 1:
            lo = max(lo, self.t_clip)
        return lo, hi

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(a, b, a', b') at t."""
        k, p = self.kind, self.params
        if k == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        if k == "cosine":
            h = math.pi / 2
            return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)
        if k == "polynomial":
            n = p["n"]
            tn, dtn = t ** n, n * t ** (n - 1)
            return 1 - tn, tn, -dtn, dtn
        if k == "linear_vp":
            a = torch.sqrt(1 - t * t)
            return a, t, -t / a, torch.ones_like(t)
        lo, hi = p["beta_min"], p["beta_max"]
        s = 1 - t
        big_t = 0.5 * s * s * (hi - lo) + s * lo  # int_t^1 beta(1 - r) dr
        d_big_t = -s * (hi - lo) - lo
        b = torch.exp(-0.5 * big_t)
        one_minus = -torch.expm1(-big_t)  # 1 - e^{-T}, accurate near t = 1
        a = torch.sqrt(one_minus)
        return a, b, 0.5 * d_big_t * torch.exp(-big_t) / a, -0.5 * d_big_t * b

    def a(self, t):
        return self.coefficients(t)[0]

    def b(self, t):
        return self.coefficients(t)[1]

    def da(self, t):
        return self.coefficients(t)[2]

    def db(self, t):
        return self.coefficients(t)[3]

    def g(self, t):
        return self.noise.g(t)

    def dg(self, t):
        return self.noise.dg(t)

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x_t, u_t) as :meth:`ProbabilityPath.sample`, with the four coefficients computed once."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        tt = expand_like(t.to(device=x0.device, dtype=x0.dtype), x0)
        a, b, da, db = self.coefficients(tt)
        x_t, u_t = a * x0 + b * x1, da * x0 + db * x1
        if not self.deterministic:
            if z is None or z.shape != x0.shape:
                raise ValueError(f"ScheduledPath with sigma > 0 needs z of shape {tuple(x0.shape)}")
            x_t, u_t = x_t + self.g(tt) * z, u_t + self.dg(tt) * z
        return x_t, u_t

    def describe(self) -> dict:
        return {"path": "scheduled", "kind": self.kind, "params": dict(self.params), "sigma": self.sigma,
                "schedule": self.schedule, "t_clip": self.t_clip}


def make_scheduled_path(kind: str = "linear", params: dict | None = None, sigma: float = 0.0,
                        schedule: str = "constant") -> ProbabilityPath:
    """The path of a config: ``kind`` linear gives :func:`flowprobe.paths.make_path` (LinearPath or
    StochasticPath, as before kinds existed), any other kind a :class:`ScheduledPath`."""
    if kind == "linear":
        check_path_params(kind, params)
        return make_path(sigma, schedule)
    return ScheduledPath(kind, params, sigma, schedule)


# ----------------------------------------------------------------------------------------------------------
# Conversions between parameterisations


def guard_divisor(c: Tensor, eps: float | None) -> Tensor:
    """c with entries of magnitude below eps replaced by eps * sign(c) (sign(0) = +1); c itself for eps None."""
    if eps is None:
        return c
    sign = torch.where(c < 0, -torch.ones_like(c), torch.ones_like(c))
    return torch.where(c.abs() < eps, eps * sign, c)


def _coefficients(path: ProbabilityPath, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not path.deterministic:
        raise ValueError(f"conversions need a deterministic path (g = 0), got {type(path).__name__} with noise; "
                         f"use flowprobe.solvers.velocity_to_score for the score")
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    tt = expand_like(t.to(device=x.device, dtype=x.dtype), x)
    if isinstance(path, ScheduledPath):
        return path.coefficients(tt)
    return path.a(tt), path.b(tt), path.da(tt), path.db(tt)


def endpoints(pred: Tensor, kind: str, t: Tensor, x: Tensor, path: ProbabilityPath | None = None,
              eps: float | None = None) -> tuple[Tensor, Tensor]:
    """(x0_hat, x1_hat): the source and data samples that a prediction of ``kind`` at (t, x) implies (module
    docstring). ``t``: shape (B,) or a scalar; ``path``: deterministic, default the straight line."""
    path = path if path is not None else LinearPath()
    a, b, da, db = _coefficients(path, t, x)
    if kind == "noise":
        return pred, (x - a * pred) / guard_divisor(b, eps)
    if kind == "data":
        return (x - b * pred) / guard_divisor(a, eps), pred
    if kind == "velocity":
        det = guard_divisor(a * db - b * da, eps)
        return (db * x - b * pred) / det, (a * pred - da * x) / det
    if kind == "score":
        x0 = -a * pred
        return x0, (x - a * x0) / guard_divisor(b, eps)
    raise ValueError(f"parameterisation must be one of {', '.join(PARAMETERISATIONS)}, got {kind!r}")


def convert(pred: Tensor, source: str, target: str, t: Tensor, x: Tensor, path: ProbabilityPath | None = None,
            eps: float | None = None) -> Tensor:
    """A prediction of kind ``source`` at (t, x) as kind ``target`` (each one of PARAMETERISATIONS) on a
    deterministic affine ``path`` (default linear); see the module docstring for the formulas and ``eps``."""
    if target not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation must be one of {', '.join(PARAMETERISATIONS)}, got {target!r}")
    if source == target and source in PARAMETERISATIONS:
        return pred
    path = path if path is not None else LinearPath()
    x0, x1 = endpoints(pred, source, t, x, path, eps)
    if target == "noise":
        return x0
    if target == "data":
        return x1
    a, _, da, db = _coefficients(path, t, x)
    if target == "velocity":
        return da * x0 + db * x1
    return -x0 / guard_divisor(a, eps)
