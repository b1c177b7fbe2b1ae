"""ODE solvers for dx/dt = v(t, x), forward (0 -> 1) or backward (1 -> 0), counting evaluations.

Fixed-step methods run over an explicit time grid t_0, ..., t_K (any monotone sequence, so the grid
can go backward or be non-uniform); their orders are euler 1, midpoint 2, heun 2, rk4 4. ``dopri5``
(adaptive, through torchdiffeq) uses ``atol`` / ``rtol``. Every result carries the number of function
evaluations (nfe) that produced it, and optionally the trajectory at the grid times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["SolveResult", "time_grid", "integrate", "FIXED_STEP_METHODS", "METHODS", "ORDERS"]

Field = Callable[[Tensor, Tensor], Tensor]

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
FIXED_STEP_METHODS = tuple(ORDERS)
METHODS = FIXED_STEP_METHODS + ("dopri5",)


@dataclass
class SolveResult:
    """x: the state at the last time; times: the grid; nfe: evaluations of the field;
    trajectory: states at every grid time, shape (K + 1, B, ...), when asked for."""

    x: Tensor
    times: Tensor
    nfe: int
    method: str
    trajectory: Tensor | None = None


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0, schedule: str = "uniform",
              dtype=torch.float64, device=None) -> Tensor:
    """K + 1 times from t0 to t1 (t1 < t0 runs backward).

    ``uniform``: t_k = t0 + (t1 - t0) k / K. ``cosine``: denser steps at both ends
    (t0 + (t1 - t0)(1 - cos(pi k / K)) / 2).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    s = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if schedule == "cosine":
        s = (1 - torch.cos(torch.pi * s)) / 2
    elif schedule != "uniform":
        raise ValueError(f"schedule must be 'uniform' or 'cosine', got {schedule!r}")
    return (t0 + (t1 - t0) * s).to(dtype=dtype, device=device)


def _tvec(t: Tensor, x: Tensor) -> Tensor:
    return t.to(device=x.device, dtype=x.dtype).expand(x.shape[0])


def _step(field: Field, method: str, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    if method == "euler":
        return x + h * field(_tvec(t, x), x)
    if method == "midpoint":
        k1 = field(_tvec(t, x), x)
        return x + h * field(_tvec(t + h / 2, x), x + (h / 2) * k1)
    if method == "heun":
        k1 = field(_tvec(t, x), x)
        k2 = field(_tvec(t + h, x), x + h * k1)
        return x + (h / 2) * (k1 + k2)
    if method == "rk4":
        k1 = field(_tvec(t, x), x)
        k2 = field(_tvec(t + h / 2, x), x + (h / 2) * k1)
        k3 = field(_tvec(t + h / 2, x), x + (h / 2) * k2)
        k4 = field(_tvec(t + h, x), x + h * k3)
        return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"unknown method {method!r}")


_EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


@torch.no_grad()
def integrate(field: Field, x: Tensor, method: str = "euler", steps: int | None = None,
              t0: float = 0.0, t1: float = 1.0, grid: Tensor | None = None, schedule: str = "uniform",
              atol: float = 1e-5, rtol: float = 1e-5, return_trajectory: bool = False) -> SolveResult:
    """Integrate dx/dt = field(t, x) from x at t0 to t1.

    Give either ``steps`` (a uniform or cosine grid from t0 to t1) or an explicit ``grid``. For
    ``dopri5`` the grid only sets where the trajectory is reported; steps are adaptive. ``field`` is
    called as field(t, x) with t of shape (B,), like every net in flowprobe.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if grid is None:
        if steps is None:
            if method != "dopri5":
                raise ValueError("give steps or grid for a fixed-step method")
            steps = 1
        grid = time_grid(steps, t0, t1, schedule)
    grid = grid.to(torch.float64).cpu()
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("grid must be a 1-D tensor of at least two times")
    d = torch.diff(grid)
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise ValueError("grid must be strictly monotone")

    if method == "dopri5":
        from torchdiffeq import odeint

        nfe = 0

        def f(t, y):
            nonlocal nfe
            nfe += 1
            return field(_tvec(t, y), y)

        ts = grid.to(device=x.device, dtype=x.dtype if x.dtype == torch.float64 else torch.float32)
        traj = odeint(f, x, ts, method="dopri5", atol=atol, rtol=rtol)
        return SolveResult(traj[-1], grid, nfe, method, traj if return_trajectory else None)

    states = [x] if return_trajectory else None
    for k in range(grid.numel() - 1):
        t = grid[k]
        h = grid[k + 1] - grid[k]
        x = _step(field, method, t.to(x.dtype), h.to(x.dtype), x)
        if states is not None:
            states.append(x)
    nfe = _EVALS_PER_STEP[method] * (grid.numel() - 1)
    traj = torch.stack(states) if states is not None else None
    return SolveResult(x, grid, nfe, method, traj)
