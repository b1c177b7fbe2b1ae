"""Per-sample gradient machinery shared by the gradient-variance estimators (:mod:`.grad_stats`) and the
ghost-norm pass (:mod:`.ghost`): chunking, the ordinary batch gradient, ``torch.func`` per-sample gradients,
and the streaming accumulator of per-unit squared norms and dots (:class:`Moments`).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from ..objectives import cfm_sample_loss, squared_error

__all__ = ["chunks", "batch_gradient", "vmap_grads", "Moments", "check_options"]


def chunks(n: int, size: int):
    """(a, b) bounds of consecutive slices of at most ``size`` of range(n)."""
    for a in range(0, n, size):
        yield a, min(n, a + size)


def batch_gradient(net, params, t, x, u, reduction, chunk_size):
    """One ordinary (chunked) backward of sum_i l_i: returns {name: sum_i g_i} (float64), losses (n,)."""
    sums: dict[str, Tensor] = {}
    losses = []
    plist = [p for _, p in params]
    for a, b in chunks(x.shape[0], chunk_size):
        l = squared_error(net(t[a:b], x[a:b]), u[a:b], reduction)
        grads = torch.autograd.grad(l.sum(), plist, allow_unused=True)
        for (name, p), g in zip(params, grads):
            g = torch.zeros_like(p) if g is None else g
            sums[name] = g.double() if name not in sums else sums[name] + g.double()
        losses.append(l.detach())
    return sums, torch.cat(losses)


def vmap_grads(net, names, params_by_name, t, x, u, reduction):
    """Per-sample gradients {name: (m, *shape)} of the parameters ``names`` (others held fixed)."""
    from torch.func import functional_call, grad, vmap

    def loss(pv, ti, xi, ui):
        return cfm_sample_loss(lambda tt, xx: functional_call(net, pv, (tt, xx)), ti, xi, ui, reduction)

    pv = {n: params_by_name[n].detach() for n in names}
    return vmap(grad(loss), in_dims=(None, 0, 0, 0), randomness="different")(pv, t, x, u)


class Moments:
    """Accumulates, per unit (sample or micro-batch) and per parameter, ||g_u^p||^2 and g_u^p . ref^p,
    and per parameter sum_u g_u^p (float64). ``ref`` is the mean gradient used for the SE (per param)."""

    def __init__(self, pnames: list[str]):
        self.pnames = pnames
        self.sq: list[Tensor] = []
        self.dot: list[Tensor] = []
        self.sums: dict[str, Tensor] = {}
        self.ref: dict[str, Tensor] | None = None

    def add_sum(self, name: str, s: Tensor) -> None:
        s = s.detach().double()
        self.sums[name] = s if name not in self.sums else self.sums[name] + s

    def add_per_unit(self, grads: Mapping[str, Tensor], add_sums: bool = True) -> None:
        """grads: name -> (m, *shape) per-unit gradients for every param (in ``pnames`` order)."""
        sq, dot = [], []
        for name in self.pnames:
            # reductions over one chunk in the gradients' dtype (a float64 copy of n x P would cost more
            # than the gradients themselves); accumulation across chunks in float64
            g = grads[name].detach().reshape(grads[name].shape[0], -1)  # 0-dim parameters too
            sq.append(g.pow(2).sum(1).double())
            dot.append((g @ self.ref[name].flatten().to(device=g.device, dtype=g.dtype)).double())
            if add_sums:
                self.add_sum(name, g.sum(0))
        self.sq.append(torch.stack(sq, 1).cpu())
        self.dot.append(torch.stack(dot, 1).cpu())

    def add_norms(self, sq: Tensor, dot: Tensor) -> None:
        """Precomputed (m, P) squared norms and dots (the ghost path)."""
        self.sq.append(sq.detach().double().cpu())
        self.dot.append(dot.detach().double().cpu())

    def finish(self, index: list[int], n_groups: int, scale: float = 1.0):
        """Per-group (gv, gv_se, mean_grad_sq), the total gv_se and the per-unit squared norms (U, G), all
        float64.

        d_uG = ||g_u^G - ref^G||^2 = ||g_u^G||^2 - 2 g_u^G . ref^G + ||ref^G||^2;
        gv_G = scale (sum_u d_uG - U ||g_bar^G - ref^G||^2) / (U - 1);
        gv_se_G = scale sd_u(d_uG) / sqrt(U).

        gv_G equals scale (sum_u ||g_u^G||^2 - U ||g_bar^G||^2) / (U - 1) exactly (expand the squares), but it
        is centred on ref, so it does not subtract two nearly equal numbers when the mean gradient dominates
        (||g_bar||^2 >> tr Cov, as for an untrained network), and it is insensitive to first order to an error
        in ref. That matters for the ghost path, where g_bar = ref is the batch gradient of an ordinary
        backward pass while the norms and dots come from separate per-sample kernels: a relative mismatch
        eps between the two moves the uncentred formula by about 2 eps ||g_bar||^2 / tr Cov, the centred one
        by eps^2 ||g_bar||^2 / tr Cov.
        """
        sq = torch.cat(self.sq, 0)
        dot = torch.cat(self.dot, 0)
        U = sq.shape[0]
        if U < 2:
            raise ValueError("need at least 2 samples (or micro-batches) to estimate a variance")
        A = torch.zeros(len(self.pnames), n_groups, dtype=torch.float64)
        A[torch.arange(len(self.pnames)), torch.tensor(index)] = 1.0
        msq_p = torch.stack([(self.sums[n] / U).pow(2).sum().cpu() for n in self.pnames])
        refsq_p = torch.stack([self.ref[n].double().pow(2).sum().cpu() for n in self.pnames])
        off_p = torch.stack([(self.sums[n].flatten() / U - self.ref[n].flatten().to(self.sums[n])).pow(2).sum().cpu()
                             for n in self.pnames])
        sq_g, dot_g = sq @ A, dot @ A
        msq_g, refsq_g, off_g = msq_p @ A, refsq_p @ A, off_p @ A
        d = scale * (sq_g - 2 * dot_g + refsq_g)
        gv_g = (d.sum(0) - scale * U * off_g) / (U - 1)
        se_g = d.std(0, unbiased=True) / math.sqrt(U)
        gv_se = d.sum(1).std(unbiased=True).item() / math.sqrt(U)
        return gv_g, se_g, msq_g, gv_se, sq_g


def check_options(**named) -> None:
    """Validate a probe's options in one place: each keyword is ``name=(value, allowed)`` with ``allowed`` a tuple
    of choices or an int minimum; a ValueError names the first option that does not fit."""
    for name, (value, allowed) in named.items():
        if isinstance(allowed, tuple) and value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if isinstance(allowed, int) and value < allowed:
            raise ValueError(f"{name} must be >= {allowed}, got {value}")
