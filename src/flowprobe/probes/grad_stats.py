"""Gradient statistics of one batch: the estimators of the gradient-variance probe.

For per-sample CFM gradients g_i = grad_theta l_i (see :mod:`flowprobe.probes.gradvar` for the quantities
GV = tr Cov(g), ||g_bar||^2 and their ratios), :func:`per_sample_grad_stats` computes them over a batch
(t, x_t, u_t) by one of ``ESTIMATORS``, in total and per parameter group (:func:`resolve_groups`).

Estimators (all estimate the same quantity; every one streams, so the n gradients are never stored):

- ``"exact"``: per-sample gradients with ``torch.func`` (``vmap(grad(functional_call))``), ``chunk_size``
  samples at a time; per chunk only sum_i g_i (float64) and the per-sample squared norms are kept.
- ``"naive"``: a loop of n single-sample backward passes (the reference implementation).
- ``"microbatch"``: from K = n / m micro-batch mean gradients G_k (m = ``micro_batch_size``). Since
  Cov(G_k) = Cov(g) / m and the K micro-batches are i.i.d., E[1/(K-1) sum_k ||G_k - G_bar||^2] = tr Cov(g)/m,
  so GV = m / (K-1) sum_k ||G_k - G_bar||^2 is unbiased (noisier than the per-sample estimate: it uses K
  vectors, not n).
- ``"ghost"``: exact per-sample squared norms without per-sample gradients, from one backward pass of the
  *summed* loss with hooks (see :mod:`flowprobe.probes.ghost`). Covers nn.Linear, nn.Conv1d/2d,
  nn.GroupNorm and nn.LayerNorm; parameters of other module types are computed with the exact method
  (a warning names those types).

The sum sum_i g_i comes with every estimator (it is the ordinary batch gradient of the summed loss), so
sum_i ||g_i||^2 is the only per-sample quantity needed: GV = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1).

Standard errors (delta method, i.e. the first-order term of the U-statistic variance): with
d_i = ||g_i - g_bar||^2 (per group, or per micro-batch scaled by m for ``"microbatch"``), GV is
n/(n-1) mean(d_i) and SE(GV) = sd(d_i) / sqrt(n). Checked against the spread over independent repetitions
(tests): the ratio SE / spread was 0.91-0.97 for 128 per-sample gradients and 0.80-0.86 for 16 micro-batches
(the first-order term slightly underestimates when the number of units is small).
The dots g_i . g_bar need g_bar before the per-sample pass: when the n samples fit in one chunk it comes
from that chunk, otherwise one ordinary chunked backward pass computes it first (about the cost of one
training step). The loss SE is sd(l_i)/sqrt(n).

The network is put in eval mode for the probe (and restored afterwards): dropout in train mode would
add its own noise to every g_i and change what is measured; BatchNorm in train mode would also couple
the samples of a batch, so per-sample gradients would not be defined. ``train_mode=True`` keeps train
mode (vmap then draws independent dropout masks per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from ..objectives import REDUCTIONS, squared_error
from .ghost import run_ghost
from .per_sample import Moments, batch_gradient, check_options, chunks, vmap_grads

__all__ = ["ESTIMATORS", "GradStats", "per_sample_grad_stats", "resolve_groups"]

#: The estimators of the gradient variance (``method=`` of :func:`per_sample_grad_stats`); not to be confused
#: with the ODE methods :data:`flowprobe.solvers.METHODS`.
ESTIMATORS = ("exact", "naive", "microbatch", "ghost")


# --------------------------------------------------------------------------------------------------------------
# Parameter groups

_GROUPS_ERROR = "groups must be 'layer', 'block', 'all' or a dict name -> parameter names, got {!r}"


def resolve_groups(net: nn.Module, groups="layer") -> tuple[list[str], list[tuple[str, nn.Parameter]], list[int]]:
    """Split the trainable parameters of ``net`` into named groups.

    ``groups``: ``"layer"`` (one group per parameter-owning module, named by its module path, "(root)"
    for parameters on ``net`` itself), ``"block"`` (one per top-level child), ``"all"`` (one group), or a
    dict name -> list of parameter names or module names (a module name takes all parameters under it);
    parameters in no listed group form "(other)".

    Returns (group names, [(param name, param)], group index of each param). Groups partition the
    parameters, so group variances add up to the total.
    """
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the network has no trainable parameters")
    names: list[str] = []
    index: list[int] = []

    def idx(group: str) -> int:
        if group not in names:
            names.append(group)
        return names.index(group)

    if isinstance(groups, str):
        if groups == "layer":
            index = [idx(n.rsplit(".", 1)[0] if "." in n else "(root)") for n, _ in params]
        elif groups == "block":
            index = [idx(n.split(".", 1)[0] if "." in n else "(root)") for n, _ in params]
        elif groups == "all":
            index = [idx("all") for _ in params]
        else:
            raise ValueError(_GROUPS_ERROR.format(groups))
        return names, params, index
    if not isinstance(groups, Mapping):
        raise ValueError(_GROUPS_ERROR.format(groups))
    owner: dict[str, str] = {}
    pnames = [n for n, _ in params]
    for gname, members in groups.items():
        if isinstance(members, str):
            members = [members]
        for m in members:
            hits = [n for n in pnames if n == m or n.startswith(m + ".")]
            if not hits:
                raise ValueError(f"group {gname!r}: {m!r} names no trainable parameter or module")
            for n in hits:
                if n in owner and owner[n] != gname:
                    raise ValueError(f"parameter {n!r} is in two groups: {owner[n]!r} and {gname!r}")
                owner[n] = gname
    for gname in groups:
        idx(gname)
    index = [idx(owner.get(n, "(other)")) for n in pnames]
    return names, params, index


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class GradStats:
    """Gradient statistics of one batch (see the module docstring for the formulas).

    ``sq_norms`` (U, G): per-unit squared norms ||g_u^G||^2 per group (units are samples, or micro-batch
    mean gradients for ``"microbatch"``). ``losses`` (n,): per-sample losses. Float64 throughout.
    """

    method: str
    n: int
    gv: float
    gv_se: float
    mean_grad_sq: float
    loss: float
    loss_se: float
    group_names: list[str]
    group_gv: Tensor
    group_gv_se: Tensor
    group_mean_grad_sq: Tensor
    sq_norms: Tensor
    losses: Tensor
    fallback_modules: list[str] = field(default_factory=list)

    @property
    def noise_to_signal(self) -> float:
        """GV / ||g_bar||^2 (inf when the mean gradient vanishes)."""
        return self.gv / self.mean_grad_sq if self.mean_grad_sq > 0 else math.inf

    @property
    def snr(self) -> float:
        """||g_bar||^2 / GV (inf when the variance vanishes)."""
        return self.mean_grad_sq / self.gv if self.gv > 0 else math.inf

    def groups_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"gv": float(self.group_gv[k]), "gv_se": float(self.group_gv_se[k]),
                       "mean_grad_sq": float(self.group_mean_grad_sq[k])}
                for k, name in enumerate(self.group_names)}


# --------------------------------------------------------------------------------------------------------------
# The per-estimator passes


def _run_exact(net, params, t, x, u, reduction, chunk_size, mom: Moments):
    n = x.shape[0]
    names = [nm for nm, _ in params]
    by_name = dict(params)
    if n <= chunk_size:  # one chunk: the mean gradient comes from the per-sample gradients themselves
        grads = vmap_grads(net, names, by_name, t, x, u, reduction)
        mom.ref = {nm: grads[nm].sum(0).double() / n for nm in names}
        mom.add_per_unit(grads)
        with torch.no_grad():
            losses = squared_error(net(t, x), u, reduction)
        return losses
    sums, losses = batch_gradient(net, params, t, x, u, reduction, chunk_size)
    mom.ref = {nm: s / n for nm, s in sums.items()}
    for a, b in chunks(n, chunk_size):
        mom.add_per_unit(vmap_grads(net, names, by_name, t[a:b], x[a:b], u[a:b], reduction))
    return losses


def _run_naive(net, params, t, x, u, reduction, chunk_size, mom: Moments):
    sums, losses = batch_gradient(net, params, t, x, u, reduction, chunk_size)
    n = x.shape[0]
    mom.ref = {nm: s / n for nm, s in sums.items()}
    plist = [p for _, p in params]
    for i in range(n):
        l = squared_error(net(t[i:i + 1], x[i:i + 1]), u[i:i + 1], reduction).sum()
        grads = torch.autograd.grad(l, plist, allow_unused=True)
        mom.add_per_unit({nm: (torch.zeros_like(p) if g is None else g).unsqueeze(0)
                          for (nm, p), g in zip(params, grads)})
    return losses


def _run_microbatch(net, params, t, x, u, reduction, chunk_size, micro_batch_size, mom: Moments):
    n = x.shape[0]
    m = micro_batch_size
    if m < 1 or n % m or n // m < 2:
        raise ValueError(f"microbatch needs n = K m with K >= 2 micro-batches; got n = {n}, micro_batch_size = {m}")
    sums, losses = batch_gradient(net, params, t, x, u, reduction, chunk_size)
    mom.ref = {nm: s / n for nm, s in sums.items()}
    plist = [p for _, p in params]
    for a, b in chunks(n, m):
        l = squared_error(net(t[a:b], x[a:b]), u[a:b], reduction).mean()
        grads = torch.autograd.grad(l, plist, allow_unused=True)
        mom.add_per_unit({nm: (torch.zeros_like(p) if g is None else g).unsqueeze(0)
                          for (nm, p), g in zip(params, grads)})
    return losses


# --------------------------------------------------------------------------------------------------------------
# Entry point


def per_sample_grad_stats(net: nn.Module, t: Tensor | float, x_t: Tensor, u_t: Tensor, method: str = "exact", *,
                          chunk_size: int = 64, reduction: str = "sum", groups="layer", micro_batch_size: int = 8,
                          train_mode: bool = False, ghost_conv: str = "auto") -> GradStats:
    """Gradient variance of the CFM loss over a batch the caller already has.

    ``t``: a scalar or a tensor of shape (n,) (per-sample times, e.g. t ~ U(0, 1)); ``x_t``, ``u_t``: (n, ...).
    Computes, for g_i = grad_theta ||net(t_i, x_t,i) - u_t,i||^2 (``reduction`` over dimensions),
    GV = tr Cov(g) = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1), ||g_bar||^2 and their SEs, in total and
    per group (see :func:`resolve_groups`), by ``method`` in ``ESTIMATORS`` (module docstring).
    The network is evaluated in eval mode unless ``train_mode`` (its mode is restored afterwards).
    ``ghost_conv``: how the ghost method forms per-sample convolution weight gradients: "grouped",
    "unfold", or "auto" (the faster of the two for each layer shape, timed once per process;
    :data:`flowprobe.probes.ghost.CONV_RULES`); the numbers agree to rounding, the speed is hardware-dependent.
    Since "auto" decides by timing, two processes may choose differently and differ in the last digits;
    name a rule for bitwise-repeatable numbers.
    """
    check_options(method=(method, ESTIMATORS), reduction=(reduction, REDUCTIONS), chunk_size=(chunk_size, 1))
    if x_t.shape != u_t.shape:
        raise ValueError(f"x_t and u_t must have the same shape, got {tuple(x_t.shape)} and {tuple(u_t.shape)}")
    n = x_t.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must be a scalar or have shape ({n},), got {tuple(t.shape)}")
    t, x_t, u_t = t.detach(), x_t.detach(), u_t.detach()

    group_names, params, index = resolve_groups(net, groups)
    mom = Moments([nm for nm, _ in params])
    was_training = net.training
    net.train(train_mode)
    fallback: list[str] = []
    try:
        scale = 1.0
        if method == "exact":
            losses = _run_exact(net, params, t, x_t, u_t, reduction, chunk_size, mom)
        elif method == "naive":
            losses = _run_naive(net, params, t, x_t, u_t, reduction, chunk_size, mom)
        elif method == "microbatch":
            losses = _run_microbatch(net, params, t, x_t, u_t, reduction, chunk_size, micro_batch_size, mom)
            scale = float(micro_batch_size)
        else:
            losses, fallback = run_ghost(net, params, t, x_t, u_t, reduction, chunk_size, mom, ghost_conv)
    finally:
        net.train(was_training)
    gv_g, se_g, msq_g, gv_se, sq_g = mom.finish(index, len(group_names), scale)
    losses = losses.detach().double().cpu()
    return GradStats(
        method=method, n=n, gv=float(gv_g.sum()), gv_se=gv_se, mean_grad_sq=float(msq_g.sum()),
        loss=float(losses.mean()), loss_se=float(losses.std(unbiased=True) / math.sqrt(n)),
        group_names=group_names, group_gv=gv_g, group_gv_se=se_g, group_mean_grad_sq=msq_g, sq_norms=sq_g,
        losses=losses, fallback_modules=fallback)
