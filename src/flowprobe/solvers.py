"""ODE and SDE solvers for a velocity field v(t, x), forward (0 -> 1) or backward (1 -> 0), counting evaluations.

ODE: dx/dt = v(t, x). Fixed-step methods run over an explicit time grid t_0, ..., t_K (any monotone
sequence, so the grid can go backward or be non-uniform); their orders are euler 1, midpoint 2, heun 2,
rk4 4. ``dopri5`` (adaptive, through torchdiffeq) uses ``atol`` / ``rtol``.

SDE (:func:`integrate_sde`): the family of SDEs with the same marginals p_t as the ODE,

    dX = [v(t, X) + eps(t) grad log p_t(X)] dt + sqrt(2 eps(t)) dW        (forward in t),

integrated by Euler-Maruyama. The score grad log p_t is given, or derived from the velocity itself
(:func:`velocity_to_score`) when the source is Gaussian and drawn independently of the target.

Every result carries the number of function evaluations (nfe) that produced it, and optionally the
trajectory at the grid times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .paths import LinearPath, ProbabilityPath, expand_like

__all__ = ["SolveResult", "time_grid", "integrate", "integrate_sde", "velocity_to_score", "score_from_velocity",
           "diffusion_schedule", "DIFFUSION_SCHEDULES", "integrate_average", "StepSchedule", "local_error_matrix",
           "best_path", "optimal_schedule", "push_forward", "FIXED_STEP_METHODS", "METHODS",
           "ORDERS"]

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


def _checked_grid(grid: Tensor | None, steps: int | None, t0: float, t1: float, schedule: str) -> Tensor:
    """The integration grid (float64, on the CPU): ``grid`` itself, or ``steps`` steps from t0 to t1."""
    if grid is None:
        if steps is None:
            raise ValueError("give steps or grid")
        grid = time_grid(steps, t0, t1, schedule)
    grid = torch.as_tensor(grid).to(torch.float64).cpu()
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("grid must be a 1-D tensor of at least two times")
    d = torch.diff(grid)
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise ValueError("grid must be strictly monotone")
    return grid


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
    if grid is None and steps is None:
        if method != "dopri5":
            raise ValueError("give steps or grid for a fixed-step method")
        steps = 1
    grid = _checked_grid(grid, steps, t0, t1, schedule)

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


# ----------------------------------------------------------------------------------------------------------
# SDE sampling with the ODE's marginals


def velocity_to_score(v: Tensor, t: Tensor, x: Tensor, path: ProbabilityPath | None = None,
                      source_std: float = 1.0) -> Tensor:
    """The marginal score grad_x log p_t(x) from the marginal velocity v = E[u_t | x_t = x] at the same (t, x).

    Valid when the source is x0 ~ N(0, s0^2 I) (s0 = ``source_std``) drawn *independently* of the target
    (the independent coupling; not minibatch OT or fixed pairs), along an affine path
    x_t = a x0 + b x1 + g z (:mod:`flowprobe.paths`). Write x_t = b x1 + e with e = a x0 + g z ~ N(0, S^2 I),
    S^2 = a^2 s0^2 + g^2, independent of x1. Then (Tweedie) grad log p_t(x) = -E[e | x_t = x] / S^2, and

        v = E[a' x0 + b' x1 + g' z | x] = b' (x - E[e | x]) / b + c E[e | x],   c = (a a' s0^2 + g g') / S^2,

    so E[e | x] = (b v - b' x) / (b c - b'). Linear path (a = 1 - t, b = t, g = 0, s0 = 1):
    grad log p_t(x) = -(x - t v) / (1 - t). The score is singular where S = 0 (t = 1 for a path with
    g(1) = 0): an SDE should switch its noise off there (:func:`diffusion_schedule` ``"decay"``).
    ``t`` has shape (B,) or is a scalar.
    """
    path = path or LinearPath()
    if not (source_std > 0 and math.isfinite(source_std)):
        raise ValueError(f"source_std must be a finite number > 0, got {source_std!r}")
    t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
    a, b, g, da, db, dg = (f(t64) for f in (path.a, path.b, path.g, path.da, path.db, path.dg))
    s0sq = float(source_std) ** 2
    S2 = a * a * s0sq + g * g
    c = (a * da * s0sq + g * dg) / S2
    den = b * c - db
    kv, kx = b / (den * S2), db / (den * S2)  # score = -(kv v - kx x)
    if kv.numel() == 1:
        kv, kx = kv.expand(x.shape[0]), kx.expand(x.shape[0])
    kv = expand_like(kv.to(x.device), x)
    kx = expand_like(kx.to(x.device), x)
    return kx * x - kv * v


def score_from_velocity(field: Field, path: ProbabilityPath | None = None, source_std: float = 1.0) -> Field:
    """``score(t, x)`` = :func:`velocity_to_score` of ``field(t, x)`` (one evaluation of the field per call)."""
    return lambda t, x: velocity_to_score(field(t, x), t, x, path, source_std)


DIFFUSION_SCHEDULES = ("constant", "decay")


def diffusion_schedule(eps: float, kind: str = "decay") -> Callable[[float], float]:
    """eps(t) for :func:`integrate_sde`: ``"constant"`` eps, or ``"decay"`` eps (1 - t), which switches the
    noise off at the data end t = 1, where a velocity-derived score is singular."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"diffusion must be a finite number >= 0, got {eps!r}")
    if kind == "constant":
        return lambda t: float(eps)
    if kind == "decay":
        return lambda t: float(eps) * max(0.0, 1.0 - float(t))
    raise ValueError(f"diffusion schedule must be one of {DIFFUSION_SCHEDULES}, got {kind!r}")


@torch.no_grad()
def integrate_sde(field: Field, x: Tensor, diffusion: float | Callable[[float], float], generator: torch.Generator,
                  steps: int | None = None, t0: float = 0.0, t1: float = 1.0, grid: Tensor | None = None,
                  schedule: str = "uniform", score: Field | None = None, path: ProbabilityPath | None = None,
                  source_std: float = 1.0, return_trajectory: bool = False) -> SolveResult:
    """Euler-Maruyama for the SDE with the ODE's marginals, from x at t0 to t1 (either direction):

        x_{k+1} = x_k + h v(t_k, x_k) + |h| eps(t_k) s(t_k, x_k) + sqrt(2 eps(t_k) |h|) xi_k,   xi_k ~ N(0, I)

    with h = t_{k+1} - t_k. Forward this is dX = (v + eps s) dt + sqrt(2 eps) dW; backward (h < 0) it is
    the same SDE in the reversed time, dX = (-v + eps s) d(-t) + sqrt(2 eps) dW. In both directions the
    Fokker-Planck equation reduces to the continuity equation of the ODE (eps div(p s) = eps Laplacian p
    cancels the diffusion), so every eps gives the marginals p_t of the ODE; eps = 0 is Euler's method.

    ``diffusion``: eps as a number (constant) or a function of t (e.g. :func:`diffusion_schedule`).
    ``score``: grad log p_t as a callable; by default derived from the same evaluation of ``field`` with
    :func:`velocity_to_score` (``path``, ``source_std``), valid for a Gaussian source drawn independently of
    the target. The score is not evaluated at steps where eps(t_k) = 0. Noise comes from ``generator``, so
    a seed gives the same samples. nfe counts evaluations of ``field`` and of ``score``.
    """
    eps_of = diffusion if callable(diffusion) else diffusion_schedule(diffusion, "constant")
    grid = _checked_grid(grid, steps, t0, t1, schedule)
    states = [x] if return_trajectory else None
    nfe = 0
    for k in range(grid.numel() - 1):
        t, h = grid[k], float(grid[k + 1] - grid[k])
        eps = float(eps_of(float(t)))
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"diffusion eps(t) must be finite and >= 0, got {eps!r} at t = {float(t):.6g}")
        tv = _tvec(t, x)
        v = field(tv, x)
        nfe += 1
        x_next = x + h * v
        if eps > 0:
            if score is None:
                s = velocity_to_score(v, t, x, path, source_std)  # t: the grid's CPU scalar, no device sync
            else:
                s = score(tv, x)
                nfe += 1
            noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
            x_next = x_next + (abs(h) * eps) * s + math.sqrt(2 * eps * abs(h)) * noise
        x = x_next
        if states is not None:
            states.append(x)
    traj = torch.stack(states) if states is not None else None
    return SolveResult(x, grid, nfe, "euler_maruyama", traj)


# ----------------------------------------------------------------------------------------------------------
# Few-step sampling with an average-velocity net


@torch.no_grad()
def integrate_average(net: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, steps: int | None = None,
                      t0: float = 0.0, t1: float = 1.0, grid: Tensor | None = None, schedule: str = "uniform",
                      return_trajectory: bool = False) -> SolveResult:
    """Jumps x_{k+1} = x_k + h_k u(t_k, x_k, h_k), h_k = t_{k+1} - t_k, with a net of the average velocity
    ``net(t, x, h)`` (MeanFlow, SplitMeanFlow; :mod:`flowprobe.objectives`). One step from 0 to 1 is one-step
    generation; if u is the exact average velocity, every grid gives the ODE's end point. nfe = steps."""
    grid = _checked_grid(grid, steps, t0, t1, schedule)
    states = [x] if return_trajectory else None
    for k in range(grid.numel() - 1):
        t, h = grid[k], grid[k + 1] - grid[k]
        tv, hv = _tvec(t, x), _tvec(h, x)
        x = x + h.to(x.dtype) * net(tv, x, hv)
        if states is not None:
            states.append(x)
    traj = torch.stack(states) if states is not None else None
    return SolveResult(x, grid, grid.numel() - 1, "average", traj)


# ----------------------------------------------------------------------------------------------------------
# Step schedules chosen by dynamic programming (Bellman-optimal step sizes)


@dataclass
class StepSchedule:
    """grid: the chosen K + 1 times; local_error: its summed one-step error along the reference trajectory (the
    quantity minimised); candidates: the fine grid it was chosen from; nfe: evaluations spent choosing it."""

    grid: Tensor
    local_error: float
    candidates: Tensor
    nfe: int


@torch.no_grad()
def local_error_matrix(field: Field, x: Tensor, candidates: Tensor, reference_steps_per_interval: int = 4,
                       chunk_size: int = 8192) -> tuple[Tensor, int]:
    """E[i, j] (i < j) = mean_b || X_j - X_i - (c_j - c_i) v(c_i, X_i) ||^2: the error of one Euler step from c_i to
    c_j started on the reference trajectory X (RK4 with ``reference_steps_per_interval`` steps per candidate
    interval, from x at c_0). Entries with i >= j are +inf. Returns (E (N+1, N+1) float64 on the CPU, nfe)."""
    candidates = _checked_grid(candidates, None, 0.0, 1.0, "uniform")
    n = candidates.numel()
    states, vs = [x], []
    nfe = 0
    for k in range(n - 1):
        vs.append(field(_tvec(candidates[k], x), x))
        nfe += 1
        sub = torch.linspace(float(candidates[k]), float(candidates[k + 1]), reference_steps_per_interval + 1,
                             dtype=torch.float64)
        res = integrate(field, x, "rk4", grid=sub)
        x = res.x
        nfe += res.nfe
        states.append(x)
    err = torch.full((n, n), float("inf"), dtype=torch.float64)
    flat = torch.stack([s.reshape(s.shape[0], -1) for s in states])  # (N+1, B, D)
    b = flat.shape[1]
    for i in range(n - 1):
        vi = vs[i].reshape(b, -1)
        h = (candidates[i + 1:] - candidates[i]).to(device=flat.device, dtype=flat.dtype)[:, None, None]
        total = torch.zeros(n - 1 - i, dtype=torch.float64, device=flat.device)
        for s in range(0, b, chunk_size):
            d = flat[i + 1:, s:s + chunk_size] - flat[i, s:s + chunk_size] - h * vi[s:s + chunk_size]
            total += d.double().pow(2).sum(dim=(1, 2))
        err[i, i + 1:] = total.cpu() / b
    return err, nfe


def best_path(cost: Tensor, steps: int) -> tuple[list[int], float]:
    """The path 0 = i_0 < i_1 < ... < i_K = N through a cost matrix (cost[i, j] for i < j) with exactly K = ``steps``
    edges and the least summed cost (dynamic programming, O(K N^2)). Returns (indices, summed cost)."""
    n = cost.shape[0]
    if not (isinstance(steps, int) and 1 <= steps <= n - 1):
        raise ValueError(f"steps must be an integer in [1, {n - 1}] for {n} candidate times, got {steps!r}")
    inf = float("inf")
    best = torch.full((steps + 1, n), inf, dtype=torch.float64)
    arg = torch.full((steps + 1, n), -1, dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        # best[k, j] = min_i best[k-1, i] + cost[i, j]
        total = best[k - 1][:, None] + cost
        best[k], arg[k] = total.min(dim=0)
    path = [n - 1]
    for k in range(steps, 0, -1):
        path.append(int(arg[k, path[-1]]))
    path.reverse()
    return path, float(best[steps, n - 1])


def optimal_schedule(field: Field, x: Tensor, steps: int, candidates: int | Tensor = 64, t0: float = 0.0,
                     t1: float = 1.0, reference_steps_per_interval: int = 4) -> StepSchedule:
    """A ``steps``-step Euler grid from t0 to t1 chosen among ``candidates`` (a number of uniform intervals, or an
    explicit grid) to minimise the summed one-step error along the reference trajectories of the samples ``x``
    (:func:`local_error_matrix`, :func:`best_path`), as in Bellman-optimal step-size straightening. The result
    is a grid for :func:`integrate` (``grid=``); a uniform grid whose points are candidates is among those
    searched, so the chosen grid's summed local error is never larger than the uniform one's."""
    if isinstance(candidates, int):
        if candidates < steps:
            raise ValueError(f"candidates ({candidates}) must be >= steps ({steps})")
        candidates = time_grid(candidates, t0, t1)
    cand = _checked_grid(candidates, None, t0, t1, "uniform")
    err, nfe = local_error_matrix(field, x, cand, reference_steps_per_interval)
    path, total = best_path(err, steps)
    return StepSchedule(cand[path], total, cand, nfe)


def push_forward(field, x0: Tensor, *, method: str = "euler", steps: int | None = 100, batch_size: int = 8192,
                 t0: float = 0.0, t1: float = 1.0, grid: Tensor | None = None, device: str | torch.device | None = None,
                 autocast_dtype: torch.dtype | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Phi_{t0 -> t1}(x0) for many rows: the one batched integrator of the library.

    Integrates dx/dt = field(t, x) (:func:`integrate`; ``method="average"`` jumps with an average-velocity net
    ``field(t, x, h)``, :func:`integrate_average`) for ``batch_size`` rows of ``x0`` at a time, on ``device``
    (default x0's), without building a graph, under ``autocast_dtype`` autocast on CUDA when given, and
    returns float32 end points on x0's device. ``progress(done, total)`` is called after each batch.
    """
    device = torch.device(device) if device is not None else x0.device
    if x0.shape[0] == 0:
        return x0.new_zeros(x0.shape, dtype=torch.float32)
    if autocast_dtype is not None and device.type == "cuda":
        def solve_field(*args):
            with torch.autocast("cuda", dtype=autocast_dtype):
                return field(*args).float()
    else:
        solve_field = field
    outs = []
    with torch.no_grad():
        for s in range(0, x0.shape[0], batch_size):
            xb = x0[s:s + batch_size].to(device, torch.float32)
            if method == "average":
                res = integrate_average(solve_field, xb, steps=steps, t0=t0, t1=t1, grid=grid)
            else:
                res = integrate(solve_field, xb, method=method, steps=steps, t0=t0, t1=t1, grid=grid)
            outs.append(res.x.float().to(x0.device))
            if progress is not None:
                progress(min(s + batch_size, x0.shape[0]), x0.shape[0])
    return torch.cat(outs)
