"""How strongly the parameter gradient responds to a residual of a given shape.

:func:`residual_gain` measures the gradient variance produced by prescribed residuals r at fixed inputs;
:func:`matched_residuals` rescales residual shapes to the per-sample norms of an actual residual, so that
residuals differ only in direction.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .grad_stats import per_sample_grad_stats

__all__ = ["residual_gain", "matched_residuals"]


def residual_gain(net: nn.Module, t: Tensor | float, x_t: Tensor, residuals: Mapping[str, Tensor],
                  method: str = "exact", **options) -> dict[str, dict]:
    """Gradient variance produced by prescribed residuals r at fixed inputs (t, x_t).

    With the target u_i = v(t_i, x_t,i) - r_i, the per-sample loss ||v - u||^2 (sum over dimensions) has
    gradient g_i = 2 J_i^T r_i, J_i the Jacobian of the net's output with respect to its parameters. So
    GV(r) = tr Cov(2 J^T r) says how much gradient noise residuals shaped like r cause, and the gain
    GV / mean_i ||r_i||^2 separates that from their size. Feeding residuals of equal per-sample norms but
    different shape (the actual v - u, white noise, image differences: :func:`matched_residuals`) tells
    whether a gradient-variance profile follows the loss or the residual's shape.

    Returns {name: {"gv", "gv_se", "sq_norm" (mean ||r_i||^2), "gain"}}; ``options`` go to
    :func:`per_sample_grad_stats` (its ``reduction`` must stay "sum" for g_i = 2 J_i^T r_i).
    """
    if options.get("reduction", "sum") != "sum":
        raise ValueError("residual_gain needs reduction='sum'")
    n = x_t.shape[0]
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    t = t.expand(n) if t.dim() == 0 else t
    was_training = net.training
    net.train(bool(options.get("train_mode", False)))
    try:
        with torch.no_grad():
            v = net(t, x_t)
    finally:
        net.train(was_training)
    out = {}
    for name, r in residuals.items():
        if r.shape != x_t.shape:
            raise ValueError(f"residual {name!r} has shape {tuple(r.shape)}, x_t {tuple(x_t.shape)}")
        st = per_sample_grad_stats(net, t, x_t, v - r.to(v.dtype), method, **options)
        sq = float(r.detach().flatten(1).double().pow(2).sum(1).mean())
        out[name] = {"gv": st.gv, "gv_se": st.gv_se, "sq_norm": sq, "gain": st.gv / sq if sq > 0 else float("nan")}
    return out


def matched_residuals(actual: Tensor, shapes: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{"actual": actual, name: shape_i * ||actual_i|| / ||shape_i||}``: each shape rescaled, sample by sample,
    to the norm of the actual residual, so residuals differ only in direction."""
    norms = actual.flatten(1).norm(dim=1)
    out = {"actual": actual}
    for name, z in shapes.items():
        zn = z.flatten(1).norm(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
        out[name] = z * (norms / zn).reshape(-1, *([1] * (z.dim() - 1)))
    return out
