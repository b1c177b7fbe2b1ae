"""Interpolants between a source sample x0 (t = 0) and a target sample x1 (t = 1).

Every path is affine in (x0, x1, z):

    x_t = a(t) x0 + b(t) x1 + g(t) z,           z ~ N(0, I) independent of (x0, x1)
    u_t = a'(t) x0 + b'(t) x1 + g'(t) z         (the conditional regression target, d x_t / dt)

Tensors are batch-first: x0, x1, z have shape (B, ...) and t has shape (B,). All arithmetic is done in
the inputs' dtype, so float64 inputs give float64 outputs.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["ProbabilityPath", "AffinePath", "LinearPath", "StochasticPath", "expand_like", "make_path"]

Schedule = Callable[[Tensor], Tensor]


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector t of shape (B,) to (B, 1, ..., 1) so it broadcasts against x."""
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


class ProbabilityPath:
    """Base class of interpolants x_t = a(t) x0 + b(t) x1 + g(t) z.

    Subclasses define the six scalar schedules ``a, b, g, da, db, dg`` as functions of a tensor t.
    """

    #: True when g is identically zero (a deterministic interpolant).
    deterministic: bool = False

    def a(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def b(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def g(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def da(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def db(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dg(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return (x_t, u_t) for a batch.

        x_t = a(t) x0 + b(t) x1 + g(t) z and u_t = a'(t) x0 + b'(t) x1 + g'(t) z. ``z`` may be None
        for a deterministic path; a stochastic path then raises, because hidden noise would make the
        result irreproducible (draw z with an explicit generator instead).
        """
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        t = t.to(device=x0.device, dtype=x0.dtype)
        tt = expand_like(t, x0)
        x_t = self.a(tt) * x0 + self.b(tt) * x1
        u_t = self.da(tt) * x0 + self.db(tt) * x1
        if not self.deterministic:
            if z is None:
                raise ValueError(f"{type(self).__name__} is stochastic: pass z (standard normal, shape of x0)")
            if z.shape != x0.shape:
                raise ValueError(f"z must have the shape of x0 {tuple(x0.shape)}, got {tuple(z.shape)}")
            x_t = x_t + self.g(tt) * z
            u_t = u_t + self.dg(tt) * z
        return x_t, u_t

    def describe(self) -> dict:
        """A JSON-able description recorded with every run."""
        return {"path": type(self).__name__}


class AffinePath(ProbabilityPath):
    """A general affine path from callables a, b, g and their derivatives da, db, dg.

    Useful for cosine / variance-preserving schedules: e.g. a = cos(pi t / 2), b = sin(pi t / 2).
    ``g`` and ``dg`` default to zero (deterministic).
    """

    def __init__(self, a: Schedule, b: Schedule, da: Schedule, db: Schedule,
                 g: Schedule | None = None, dg: Schedule | None = None, name: str = "affine"):
        if (g is None) != (dg is None):
            raise ValueError("give both g and dg, or neither")
        self._a, self._b, self._da, self._db = a, b, da, db
        self._g, self._dg = g, dg
        self.deterministic = g is None
        self.name = name

    def a(self, t):
        return self._a(t)

    def b(self, t):
        return self._b(t)

    def da(self, t):
        return self._da(t)

    def db(self, t):
        return self._db(t)

    def g(self, t):
        return torch.zeros_like(t) if self._g is None else self._g(t)

    def dg(self, t):
        return torch.zeros_like(t) if self._dg is None else self._dg(t)

    def describe(self) -> dict:
        return {"path": "affine", "name": self.name}


class LinearPath(ProbabilityPath):
    """Rectified Flow / I-CFM: x_t = (1 - t) x0 + t x1, u_t = x1 - x0 (g = 0)."""

    deterministic = True

    def a(self, t):
        return 1 - t

    def b(self, t):
        return t

    def da(self, t):
        return -torch.ones_like(t)

    def db(self, t):
        return torch.ones_like(t)

    def describe(self) -> dict:
        return {"path": "linear", "sigma": 0.0}

    def sample(self, x0, x1, t, z=None):
        # Same result as the generic formula, written directly (one fewer pass over memory).
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        tt = expand_like(t.to(device=x0.device, dtype=x0.dtype), x0)
        return x0 + tt * (x1 - x0), x1 - x0


class StochasticPath(ProbabilityPath):
    """Linear mean plus Gaussian noise: x_t = (1 - t) x0 + t x1 + g(t) z.

    ``schedule="constant"``: g = sigma and the target stays u_t = x1 - x0. This is torchcfm's
    ``ConditionalFlowMatcher(sigma)`` and the paper's CFM(sigma).

    ``schedule="bridge"``: g = sigma sqrt(t (1 - t)) (a Brownian bridge) and the target carries the
    noise derivative, u_t = x1 - x0 + sigma (1 - 2t) / (2 sqrt(t (1 - t))) z. This is torchcfm's
    Schrodinger-bridge target. g'(t) diverges at t = 0 and t = 1, so g' is evaluated at t clamped to
    [t_clip, 1 - t_clip] (default 1e-4, where |g'| <= sigma / (2 sqrt(t_clip)) = 50 sigma). Training
    should draw t from U[t_clip, 1 - t_clip] (``time_range``) so that clamping never changes a target.
    """

    def __init__(self, sigma: float, schedule: str = "constant", t_clip: float = 1e-4):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        if schedule not in ("constant", "bridge"):
            raise ValueError(f"schedule must be 'constant' or 'bridge', got {schedule!r}")
        if not 0 < t_clip < 0.5:
            raise ValueError(f"t_clip must be in (0, 0.5), got {t_clip}")
        self.sigma = float(sigma)
        self.schedule = schedule
        self.t_clip = t_clip
        self.deterministic = self.sigma == 0

    @property
    def time_range(self) -> tuple[float, float]:
        """The interval training times should be drawn from."""
        return (self.t_clip, 1 - self.t_clip) if self.schedule == "bridge" else (0.0, 1.0)

    def a(self, t):
        return 1 - t

    def b(self, t):
        return t

    def da(self, t):
        return -torch.ones_like(t)

    def db(self, t):
        return torch.ones_like(t)

    def g(self, t):
        if self.schedule == "constant":
            return torch.full_like(t, self.sigma)
        return self.sigma * torch.sqrt((t * (1 - t)).clamp_min(0))

    def dg(self, t):
        if self.schedule == "constant":
            return torch.zeros_like(t)
        tc = t.clamp(self.t_clip, 1 - self.t_clip)
        return self.sigma * (1 - 2 * tc) / (2 * torch.sqrt(tc * (1 - tc)))

    def describe(self) -> dict:
        return {"path": "stochastic", "sigma": self.sigma, "schedule": self.schedule, "t_clip": self.t_clip}


def make_path(sigma: float = 0.0, schedule: str = "constant") -> ProbabilityPath:
    """The path named by a config: LinearPath for sigma = 0, else StochasticPath(sigma, schedule)."""
    if sigma == 0:
        if schedule not in ("constant", "bridge"):
            raise ValueError(f"schedule must be 'constant' or 'bridge', got {schedule!r}")
        return LinearPath()
    return StochasticPath(sigma, schedule)
