"""Straightness of a flow along its own ODE trajectories (Liu et al., 2022).

For a field v integrated from x0 at t = 0 to x1 = Phi(x0) at t = 1 (trajectory x_t):

    straightness    S  = E_x0 int_0^1 ||(x1 - x0) - v(t, x_t)||^2 dt     (0 iff every path is a straight,
                                                                          constant-speed line)
    transport cost  C  = E_x0 ||x1 - x0||^2
    kinetic energy  KE = E_x0 int_0^1 ||v(t, x_t)||^2 dt
    path length     L  = E_x0 int_0^1 ||v(t, x_t)|| dt

When the trajectory is exact, int_0^1 v dt = x1 - x0, so S = KE - C; the reported numbers use quadrature
on the solver grid and satisfy this only up to the solver and quadrature error. The integrals in t are
computed with the trapezoid rule on the grid of the solve (:func:`flowprobe.solvers.integrate` with
``return_trajectory=True``): ``steps`` sets both the solver and the quadrature resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..solvers import integrate

__all__ = ["StraightnessResult", "straightness", "straightness_from_trajectory"]


@dataclass
class StraightnessResult:
    """Means over the start points, the per-sample values and the endpoints.

    ``straightness``, ``transport_cost``, ``kinetic_energy``, ``path_length`` are means over x0;
    ``per_sample`` maps the same names to (B,) tensors; ``x1`` is the endpoint of each trajectory;
    ``nfe`` and ``method`` say which solve produced it."""

    straightness: float
    transport_cost: float
    kinetic_energy: float
    path_length: float
    per_sample: dict
    x1: Tensor
    nfe: int
    method: str
    steps: int

    def as_dict(self) -> dict:
        return {"straightness": self.straightness, "transport_cost": self.transport_cost,
                "kinetic_energy": self.kinetic_energy, "path_length": self.path_length,
                "method": self.method, "steps": self.steps, "nfe": self.nfe}


def _trapezoid(values: Tensor, times: Tensor) -> Tensor:
    """int f dt over the grid by the trapezoid rule; values (K + 1, B), times (K + 1,) -> (B,)."""
    dt = torch.diff(times).to(values.dtype)[:, None]
    return (0.5 * (values[1:] + values[:-1]) * dt).sum(0)


@torch.no_grad()
def straightness_from_trajectory(field, trajectory: Tensor, times: Tensor, nfe: int = 0,
                                 method: str = "given", chunk_size: int = 8192) -> StraightnessResult:
    """Straightness, transport cost, kinetic energy and path length of given trajectories.

    ``trajectory``: (K + 1, B, ...) states at ``times`` (K + 1,), running from t = times[0] to times[-1]
    (normally 0 -> 1). The field is evaluated at every (t_k, x_k) and the time integrals use the
    trapezoid rule on ``times``; x0 = trajectory[0] and x1 = trajectory[-1].
    """
    if trajectory.dim() < 3 or trajectory.shape[0] != times.numel():
        raise ValueError(f"trajectory must have shape (K + 1, B, ...) with K + 1 = {times.numel()} "
                         f"times, got {tuple(trajectory.shape)}")
    x0, x1 = trajectory[0], trajectory[-1]
    B = x0.shape[0]
    disp = (x1 - x0).reshape(B, -1)
    dev_sq, v_sq, v_norm = [], [], []
    for k in range(times.numel()):
        xk = trajectory[k]
        tk = times[k].to(device=xk.device, dtype=xk.dtype).expand(B)
        vs = []
        for s in range(0, B, chunk_size):
            vs.append(field(tk[s:s + chunk_size], xk[s:s + chunk_size]).reshape(-1, disp.shape[1]))
        v = torch.cat(vs).to(disp.dtype)
        dev_sq.append((disp - v).pow(2).sum(1))
        sq = v.pow(2).sum(1)
        v_sq.append(sq)
        v_norm.append(sq.sqrt())
    ts = times.to(device=x0.device, dtype=torch.float64)
    s = _trapezoid(torch.stack(dev_sq).double(), ts)
    ke = _trapezoid(torch.stack(v_sq).double(), ts)
    length = _trapezoid(torch.stack(v_norm).double(), ts)
    cost = disp.double().pow(2).sum(1)
    per = {"straightness": s, "transport_cost": cost, "kinetic_energy": ke, "path_length": length}
    return StraightnessResult(s.mean().item(), cost.mean().item(), ke.mean().item(), length.mean().item(),
                              per, x1, nfe, method, times.numel() - 1)


@torch.no_grad()
def straightness(field, x0: Tensor, method: str = "rk4", steps: int = 100, t0: float = 0.0,
                 t1: float = 1.0) -> StraightnessResult:
    """Integrate ``field`` from x0 over a uniform grid of ``steps`` steps (``method``: euler, midpoint,
    heun, rk4) and return the straightness measures of the resulting trajectories (module docstring).

    The reported ``nfe`` counts the solve plus the K + 1 evaluations on the grid for the quadrature.
    """
    if method == "dopri5":
        raise ValueError("straightness needs a fixed-step method (euler, midpoint, heun, rk4) so the "
                         "quadrature grid is the solver grid")
    sol = integrate(field, x0, method=method, steps=steps, t0=t0, t1=t1, return_trajectory=True)
    res = straightness_from_trajectory(field, sol.trajectory, sol.times, method=method)
    res.nfe = sol.nfe + sol.times.numel()
    return res
