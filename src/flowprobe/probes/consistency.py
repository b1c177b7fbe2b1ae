"""Solver consistency: do two accurate ODE solvers agree on where a field sends each source point?

For a well-defined (smooth) velocity field, the flow map x0 -> x1 = Phi(x0) does not depend on the solver
once the solver is accurate, so endpoints computed with, say, RK4 with 11 and with 101 steps agree. A
field that memorised a pairing whose interpolation lines cross (the paper's "ill-defined field") has a
sharp layer in time where the lines meet; its endpoints then depend on how the solver steps through that
layer. The probe

    agreement = (1/n) #{ i : || Phi_a(x0_i) - Phi_b(x0_i) || <= tol }

flags this without knowing the ground-truth coupling: low agreement between two solvers that would agree
on a smooth field is a symptom of memorisation. Non-finite endpoints never agree.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..solvers import METHODS, integrate

__all__ = ["parse_solver", "endpoint_distance", "agreement_fraction", "endpoint_gaps", "solver_agreement"]

Field = Callable[[Tensor, Tensor], Tensor]


def parse_solver(spec) -> tuple[str, int | None]:
    """A solver given as ``(method, steps)`` or ``"method:steps"`` (``"dopri5"`` alone for the adaptive
    solver) -> (method, steps)."""
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) == 1 and parts[0] == "dopri5":
            return "dopri5", None
        if len(parts) == 2:
            try:
                spec = (parts[0], int(parts[1]))
            except ValueError:
                pass
    if not (isinstance(spec, Sequence) and len(spec) == 2 and spec[0] in METHODS):
        raise ValueError(f"a solver is (method, steps) or 'method:steps' with method in {METHODS}, got {spec!r}")
    method, steps = spec
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"solver steps must be an integer >= 1, got {steps!r}")
    if steps is None and method != "dopri5":
        raise ValueError(f"{method} needs a number of steps")
    return method, steps


def endpoint_distance(x_a: Tensor, x_b: Tensor) -> Tensor:
    """gap_i = ||x_a,i - x_b,i|| over the flattened sample, in float64; inf where either endpoint is not finite."""
    n = x_a.shape[0]
    a, b = x_a.reshape(n, -1).double(), x_b.reshape(n, -1).double().to(x_a.device)
    gap = (a - b).norm(dim=1)
    finite = torch.isfinite(a).all(1) & torch.isfinite(b).all(1) & torch.isfinite(gap)
    return torch.where(finite, gap, torch.full_like(gap, float("inf")))


def agreement_fraction(x_a: Tensor, x_b: Tensor, tol: float = 0.5) -> float:
    """(1/n) #{ i : ||x_a,i - x_b,i|| <= tol } for two sets of endpoints of the same sources (non-finite
    endpoints never agree)."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if x_a.shape != x_b.shape:
        raise ValueError(f"endpoints must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    return float((endpoint_distance(x_a, x_b) <= tol).double().mean())


def endpoint_gaps(field: Field, x0: Tensor, solver_a=("rk4", 11), solver_b=("rk4", 101), t0: float = 0.0,
                  t1: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Integrate ``field`` from x0 (t0 -> t1) with both solvers; returns (gap, x_a, x_b) where
    gap_i = ||x_a,i - x_b,i|| over the flattened sample (inf where either endpoint is not finite)."""
    ma, na = parse_solver(solver_a)
    mb, nb = parse_solver(solver_b)
    xa = integrate(field, x0, ma, na, t0=t0, t1=t1).x
    xb = integrate(field, x0, mb, nb, t0=t0, t1=t1).x
    return endpoint_distance(xa, xb), xa, xb


def solver_agreement(field: Field, x0: Tensor, solver_a=("rk4", 11), solver_b=("rk4", 101), tol: float = 0.5,
                     t0: float = 0.0, t1: float = 1.0) -> float:
    """Fraction of source points whose endpoints under the two solvers agree within ``tol`` (Euclidean):

        (1/n) #{ i : || Phi_a(x0_i) - Phi_b(x0_i) || <= tol }.

    Near 1 for a smooth field and two accurate solvers; low values flag an ill-defined (memorising)
    field whose endpoint depends on the step size. Non-finite endpoints count as disagreeing."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    _, xa, xb = endpoint_gaps(field, x0, solver_a, solver_b, t0, t1)
    return agreement_fraction(xa, xb, tol)
