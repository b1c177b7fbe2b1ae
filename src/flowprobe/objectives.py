"""Losses, written per sample so that torch.func can map them.

The conditional flow-matching (CFM) loss of one sample is

    l(theta; t, x_t, u_t) = || v_theta(t, x_t) - u_t ||^2

summed over dimensions (``reduction="sum"``, the paper's definition, used by the gradient-variance
probe) or averaged over them (``reduction="mean"``, torchcfm's training convention; only a rescaling
of the learning rate). The batch loss is the (optionally weighted) mean of per-sample losses.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .couplings import Pairing
from .paths import Path

__all__ = ["squared_error", "cfm_sample_loss", "cfm_losses", "CFMObjective", "sample_times"]

REDUCTIONS = ("sum", "mean")


def squared_error(v: Tensor, u: Tensor, reduction: str = "sum") -> Tensor:
    """Per-sample ||v - u||^2 over all non-batch dimensions: sum (or mean) of squares, shape (B,)."""
    d = (v - u).reshape(v.shape[0], -1).pow(2)
    if reduction == "sum":
        return d.sum(1)
    if reduction == "mean":
        return d.mean(1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cfm_sample_loss(net: Callable[[Tensor, Tensor], Tensor], t: Tensor, x_t: Tensor, u_t: Tensor,
                    reduction: str = "sum") -> Tensor:
    """Loss of a *single* sample (t scalar, x_t and u_t without a batch dimension).

    This is the function to put under ``torch.func.grad`` and ``vmap``: it adds the batch dimension
    of size one that ``net(t, x)`` expects and returns a scalar.
    """
    v = net(t.reshape(1), x_t.unsqueeze(0))
    return squared_error(v, u_t.unsqueeze(0), reduction)[0]


def cfm_losses(net: Callable[[Tensor, Tensor], Tensor], t: Tensor, x_t: Tensor, u_t: Tensor,
               reduction: str = "sum") -> Tensor:
    """Per-sample CFM losses of a batch, shape (B,)."""
    return squared_error(net(t, x_t), u_t, reduction)


def sample_times(n: int, generator: torch.Generator, device=None, dtype=torch.float32,
                 time_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """t ~ U[lo, hi], shape (n,), from an explicit generator."""
    lo, hi = time_range
    t = torch.rand(n, generator=generator, device=generator.device, dtype=dtype)
    return (lo + (hi - lo) * t).to(device if device is not None else t.device)


class CFMObjective:
    """The CFM objective for a path: draw t and z, build (x_t, u_t), regress net(t, x_t) on u_t.

    ``reduction`` is over dimensions ("sum" or "mean"); the batch is always averaged, with optional
    per-sample ``weights`` (normalised by their sum, so weights only set relative importance).
    """

    def __init__(self, path: Path, reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.path = path
        self.reduction = reduction

    def time_range(self) -> tuple[float, float]:
        return getattr(self.path, "time_range", (0.0, 1.0))

    def draw(self, pairing: Pairing, generator: torch.Generator, t: Tensor | None = None):
        """(t, x_t, u_t) for a pairing; t ~ U(time_range) unless given, z ~ N(0, I)."""
        x0, x1 = pairing.x0, pairing.x1
        if t is None:
            t = sample_times(x0.shape[0], generator, x0.device, x0.dtype, self.time_range())
        z = None
        if not self.path.deterministic:
            z = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        x_t, u_t = self.path.sample(x0, x1, t, z)
        return t, x_t, u_t

    def losses(self, net, t: Tensor, x_t: Tensor, u_t: Tensor) -> Tensor:
        return cfm_losses(net, t, x_t, u_t, self.reduction)

    def __call__(self, net, pairing: Pairing, generator: torch.Generator, weights: Tensor | None = None,
                 t: Tensor | None = None) -> Tensor:
        """Scalar batch loss: mean_i w_i l_i / mean_i w_i (plain mean without weights)."""
        t, x_t, u_t = self.draw(pairing, generator, t)
        losses = self.losses(net, t, x_t, u_t)
        if weights is None:
            return losses.mean()
        if weights.shape != losses.shape:
            raise ValueError(f"weights must have shape {tuple(losses.shape)}, got {tuple(weights.shape)}")
        return (weights * losses).sum() / weights.sum()
