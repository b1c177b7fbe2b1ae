"""Fields whose verdict is known in advance: the exact minimisers of the empirical CFM loss on a finite training set.

Both are ``net(t, x)`` modules (no trainable parameters) on the linear path x_t = (1 - t) x0 + t x1.

:class:`EmpiricalMarginalField`: source N(0, I), target the uniform distribution on N training samples y_j,
independent coupling. Given x_t = x, the posterior over j is w_j proportional to
exp(-||x - t y_j||^2 / (2 (1 - t)^2)) and the conditional target is (y_j - x) / (1 - t), so

    v(t, x) = sum_j w_j(t, x) (y_j - x) / (1 - t).

This is the field every net trained long enough on N samples converges to; its ODE carries every source point to
one of the y_j (a copy).

:class:`EmpiricalPairField`: a fixed finite set of pairs (x0_i, x1_i), the lines x_t^i = (1 - t) x0_i + t x1_i. For
the constant-noise path x_t = (1 - t) x0 + t x1 + s z with a small s (the "bandwidth") the minimiser is

    v(t, x) = sum_i w_i(t, x) (x1_i - x0_i),   w_i proportional to exp(-||x - x_t^i||^2 / (2 s^2)),

and as s -> 0 it is the deterministic pair field: started on line i it stays on it and ends at x1_i (the training
partner), as long as no other line comes within a few s of it. The weights are computed in float64 with a
log-sum-exp, so tiny bandwidths do not underflow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EmpiricalMarginalField", "EmpiricalPairField"]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


class EmpiricalMarginalField(nn.Module):
    """The exact CFM minimiser for N(0, I) -> uniform on ``targets`` (module docstring). ``t_max``: 1 - t is
    clamped to at least 1 - t_max, where the field is singular."""

    def __init__(self, targets: Tensor, t_max: float = 1 - 1e-4, chunk_size: int = 1024):
        super().__init__()
        targets = torch.as_tensor(targets)
        self.register_buffer("targets", _flat(targets).double().clone())
        self.shape = tuple(targets.shape[1:])
        self.t_max, self.chunk_size = float(t_max), int(chunk_size)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).double().reshape(-1).expand(x.shape[0])[:, None]
        xf = _flat(x).double()
        y = self.targets.to(x.device)
        rem = (1 - t.clamp(max=self.t_max))
        out = torch.empty_like(xf)
        for s in range(0, xf.shape[0], self.chunk_size):
            xs, ts, rs = xf[s:s + self.chunk_size], t[s:s + self.chunk_size], rem[s:s + self.chunk_size]
            # ||x - t y_j||^2 for every j, without forming the (B, N, D) differences
            d2 = xs.pow(2).sum(1, keepdim=True) - 2 * ts * (xs @ y.T) + ts ** 2 * y.pow(2).sum(1)[None, :]
            w = torch.softmax(-d2 / (2 * rs ** 2), dim=1)
            out[s:s + self.chunk_size] = (w @ y - xs) / rs
        return out.reshape(x.shape).to(x.dtype)


class EmpiricalPairField(nn.Module):
    """The exact pair field of the fixed pairs (``x0``, ``x1``) with bandwidth ``bandwidth`` (module docstring)."""

    def __init__(self, x0: Tensor, x1: Tensor, bandwidth: float = 1e-3, chunk_size: int = 1024):
        super().__init__()
        x0, x1 = torch.as_tensor(x0), torch.as_tensor(x1)
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        self.register_buffer("x0", _flat(x0).double().clone())
        self.register_buffer("x1", _flat(x1).double().clone())
        self.bandwidth, self.chunk_size = float(bandwidth), int(chunk_size)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).double().reshape(-1).expand(x.shape[0])[:, None]
        xf = _flat(x).double()
        a, b = self.x0.to(x.device), self.x1.to(x.device)
        u = b - a
        out = torch.empty_like(xf)
        for s in range(0, xf.shape[0], self.chunk_size):
            xs, ts = xf[s:s + self.chunk_size], t[s:s + self.chunk_size]
            # ||x - (a + t u)||^2 for every line, without forming the (B, N, D) differences
            r = xs.pow(2).sum(1, keepdim=True) - 2 * (xs @ a.T) + a.pow(2).sum(1)[None, :]
            cross = xs @ u.T - (a * u).sum(1)[None, :]
            d2 = r - 2 * ts * cross + ts ** 2 * u.pow(2).sum(1)[None, :]
            w = torch.softmax(-d2.clamp_min(0) / (2 * self.bandwidth ** 2), dim=1)
            out[s:s + self.chunk_size] = w @ u
        return out.reshape(x.shape).to(x.dtype)
