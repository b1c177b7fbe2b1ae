"""The gradient-variance probe: how noisy is the CFM gradient at time t?

For a velocity network v_theta(t, x), a path and a pair sampler, the per-sample CFM loss is

    l_i(theta) = || v_theta(t_i, x_t,i) - u_t,i ||^2          (sum over dimensions; "mean" optional)

and its per-sample gradient g_i = grad_theta l_i in R^P. From n i.i.d. samples the probe reports

    GV          = tr Cov(g) = 1/(n-1) sum_i ||g_i - g_bar||^2      (unbiased; a minibatch gradient of
                                                                   batch size B has variance GV / B)
    mean_grad_sq = ||g_bar||^2                                    (the signal; E = ||E g||^2 + GV / n)
    noise_to_signal = GV / ||g_bar||^2,  snr = ||g_bar||^2 / GV

in total and per parameter group, with standard errors, together with the mean per-sample loss.
``gradient_variance`` does this on a grid of times t (t_i = t for every sample) or on uniform time bins;
``per_sample_grad_stats`` does it for a batch (t, x_t, u_t) the caller already has, with t of shape (n,)
(per-sample times are allowed, e.g. t ~ U(0, 1)).

Methods (all estimate the same quantity; every one streams, so the n gradients are never stored):

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

The sum sum_i g_i comes with every method (it is the ordinary batch gradient of the summed loss), so
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
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..couplings import Pairing
from ..objectives import REDUCTIONS, AverageVelocityObjective, CFMObjective, cfm_sample_loss, squared_error
from ..paths import Path
from .ghost import CONV_RULES, conv_rule_choices

__all__ = [
    "METHODS", "GradStats", "GradVarResult", "gradient_variance", "per_sample_grad_stats", "parse_times",
    "resolve_groups", "register_cli", "probe_gradvar_cli", "plot_profiles", "ProbeTarget", "load_probe_target",
    "residual_gain", "matched_residuals", "StepBound",
]

METHODS = ("exact", "naive", "microbatch", "ghost")
DIRECTIONS = ("forward", "backward")
#: The CLI's time grid "a:b:K" is clipped to [ENDPOINT_MARGIN, 1 - ENDPOINT_MARGIN] (the paper's grid ends).
ENDPOINT_MARGIN = 0.01


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
# Streaming accumulation of per-unit squared norms and dots


class _Moments:
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
            g = grads[name].detach().flatten(1)
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
        """Per-group (gv, gv_se, mean_grad_sq) and the per-unit squared norms (U, G), all float64.

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


@dataclass
class GradVarResult:
    """A gradient-variance profile: one row per time (or time bin).

    Each row: t, gv, gv_se, mean_grad_sq, noise_to_signal, snr, loss, loss_se, oracle_loss, n, method,
    groups ({name: {gv, gv_se, mean_grad_sq}}); binned profiles add t_lo and t_hi.
    """

    rows: list[dict]
    method: str
    reduction: str
    path: dict
    n_samples: int
    direction: str
    groups: str | dict = "layer"
    extra: dict = field(default_factory=dict)

    def _col(self, key: str):
        import numpy as np

        return np.array([r[key] if r[key] is not None else np.nan for r in self.rows], dtype=float)

    @property
    def times(self):
        return self._col("t")

    @property
    def gv(self):
        return self._col("gv")

    @property
    def gv_se(self):
        return self._col("gv_se")

    @property
    def loss(self):
        return self._col("loss")

    @property
    def mean_grad_sq(self):
        return self._col("mean_grad_sq")

    def to_dict(self) -> dict:
        """JSON-able (infinities become None)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean({"probe": "gradvar", "method": self.method, "reduction": self.reduction, "path": self.path,
                      "n_samples": self.n_samples, "direction": self.direction,
                      "groups": self.groups if isinstance(self.groups, str) else dict(self.groups),
                      **self.extra, "rows": self.rows})


# --------------------------------------------------------------------------------------------------------------
# The per-method passes


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _batch_gradient(net, params, t, x, u, reduction, chunk_size):
    """One ordinary (chunked) backward of sum_i l_i: returns {name: sum_i g_i} (float64), losses (n,)."""
    sums: dict[str, Tensor] = {}
    losses = []
    plist = [p for _, p in params]
    for a, b in _chunks(x.shape[0], chunk_size):
        l = squared_error(net(t[a:b], x[a:b]), u[a:b], reduction)
        grads = torch.autograd.grad(l.sum(), plist, allow_unused=True)
        for (name, p), g in zip(params, grads):
            g = torch.zeros_like(p) if g is None else g
            sums[name] = g.double() if name not in sums else sums[name] + g.double()
        losses.append(l.detach())
    return sums, torch.cat(losses)


def _vmap_grads(net, names, params_by_name, t, x, u, reduction):
    """Per-sample gradients {name: (m, *shape)} of the parameters ``names`` (others held fixed)."""
    from torch.func import functional_call, grad, vmap

    def loss(pv, ti, xi, ui):
        return cfm_sample_loss(lambda tt, xx: functional_call(net, pv, (tt, xx)), ti, xi, ui, reduction)

    pv = {n: params_by_name[n].detach() for n in names}
    return vmap(grad(loss), in_dims=(None, 0, 0, 0), randomness="different")(pv, t, x, u)


def _run_exact(net, params, t, x, u, reduction, chunk_size, mom: _Moments):
    n = x.shape[0]
    names = [nm for nm, _ in params]
    by_name = dict(params)
    if n <= chunk_size:  # one chunk: the mean gradient comes from the per-sample gradients themselves
        grads = _vmap_grads(net, names, by_name, t, x, u, reduction)
        mom.ref = {nm: grads[nm].sum(0).double() / n for nm in names}
        mom.add_per_unit(grads)
        with torch.no_grad():
            losses = squared_error(net(t, x), u, reduction)
        return losses
    sums, losses = _batch_gradient(net, params, t, x, u, reduction, chunk_size)
    mom.ref = {nm: s / n for nm, s in sums.items()}
    for a, b in _chunks(n, chunk_size):
        mom.add_per_unit(_vmap_grads(net, names, by_name, t[a:b], x[a:b], u[a:b], reduction))
    return losses


def _run_naive(net, params, t, x, u, reduction, chunk_size, mom: _Moments):
    sums, losses = _batch_gradient(net, params, t, x, u, reduction, chunk_size)
    n = x.shape[0]
    mom.ref = {nm: s / n for nm, s in sums.items()}
    plist = [p for _, p in params]
    for i in range(n):
        l = squared_error(net(t[i:i + 1], x[i:i + 1]), u[i:i + 1], reduction).sum()
        grads = torch.autograd.grad(l, plist, allow_unused=True)
        mom.add_per_unit({nm: (torch.zeros_like(p) if g is None else g).unsqueeze(0)
                          for (nm, p), g in zip(params, grads)})
    return losses


def _run_microbatch(net, params, t, x, u, reduction, chunk_size, micro_batch_size, mom: _Moments):
    n = x.shape[0]
    m = micro_batch_size
    if m < 1 or n % m or n // m < 2:
        raise ValueError(f"microbatch needs n = K m with K >= 2 micro-batches; got n = {n}, micro_batch_size = {m}")
    sums, losses = _batch_gradient(net, params, t, x, u, reduction, chunk_size)
    mom.ref = {nm: s / n for nm, s in sums.items()}
    plist = [p for _, p in params]
    for a, b in _chunks(n, m):
        l = squared_error(net(t[a:b], x[a:b]), u[a:b], reduction).mean()
        grads = torch.autograd.grad(l, plist, allow_unused=True)
        mom.add_per_unit({nm: (torch.zeros_like(p) if g is None else g).unsqueeze(0)
                          for (nm, p), g in zip(params, grads)})
    return losses


# --------------------------------------------------------------------------------------------------------------
# Low-level entry point


def per_sample_grad_stats(net: nn.Module, t: Tensor | float, x_t: Tensor, u_t: Tensor, method: str = "exact", *,
                          chunk_size: int = 64, reduction: str = "sum", groups="layer", micro_batch_size: int = 8,
                          train_mode: bool = False, ghost_conv: str = "auto") -> GradStats:
    """Gradient variance of the CFM loss over a batch the caller already has.

    ``t``: a scalar or a tensor of shape (n,) (per-sample times, e.g. t ~ U(0, 1)); ``x_t``, ``u_t``: (n, ...).
    Computes, for g_i = grad_theta ||net(t_i, x_t,i) - u_t,i||^2 (``reduction`` over dimensions),
    GV = tr Cov(g) = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1), ||g_bar||^2 and their SEs, in total and
    per group (see :func:`resolve_groups`), by ``method`` in ``METHODS`` (module docstring).
    The network is evaluated in eval mode unless ``train_mode`` (its mode is restored afterwards).
    ``ghost_conv``: how the ghost method forms per-sample convolution weight gradients: "grouped",
    "unfold", or "auto" (the faster of the two for each layer shape, timed once per process;
    :data:`flowprobe.probes.ghost.CONV_RULES`); the numbers agree to rounding, the speed is hardware-dependent.
    Since "auto" decides by timing, two processes may choose differently and differ in the last digits;
    name a rule for bitwise-repeatable numbers.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
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
    mom = _Moments([nm for nm, _ in params])
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
            from .ghost import run_ghost

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


# --------------------------------------------------------------------------------------------------------------
# How strongly the parameter gradient responds to a residual of a given shape


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


# --------------------------------------------------------------------------------------------------------------
# Profiles over t


def parse_times(times, time_range: tuple[float, float] = (0.0, 1.0),
                margin: float = ENDPOINT_MARGIN) -> tuple[list[float], list[tuple[float, float]] | None]:
    """Resolve a time specification into (times, bins).

    - a sequence or tensor of floats: used as given, clipped to ``time_range`` (bins None);
    - ``"a:b:K"``: K evenly spaced points from a to b, clipped to [max(lo, margin), min(hi, 1 - margin)]
      so that the grid 0:1:21 becomes 0.01, 0.05, ..., 0.95, 0.99 (the paper's grid ends);
    - ``"uniform:K"``: K equal bins of ``time_range``; each sample then gets its own t ~ U(bin), and the
      reported t is the bin centre (bins: the (lo, hi) edges).
    """
    lo, hi = time_range
    if isinstance(times, str):
        parts = times.split(":")
        try:
            if len(parts) == 2 and parts[0] == "uniform":
                K = int(parts[1])
                if K < 1:
                    raise ValueError
                edges = [lo + (hi - lo) * k / K for k in range(K + 1)]
                bins = list(zip(edges[:-1], edges[1:]))
                return [(a + b) / 2 for a, b in bins], bins
            if len(parts) == 3:
                a, b, K = float(parts[0]), float(parts[1]), int(parts[2])
                if K < 1:
                    raise ValueError
                pts = [a] if K == 1 else [a + (b - a) * k / (K - 1) for k in range(K)]
                clo, chi = max(lo, margin), min(hi, 1 - margin)
                return [min(max(p, clo), chi) for p in pts], None
        except ValueError:
            pass
        raise ValueError(f"times must be 'a:b:K', 'uniform:K' or a list of floats, got {times!r}")
    vals = [float(v) for v in (times.tolist() if isinstance(times, Tensor) else times)]
    if not vals:
        raise ValueError("times is empty")
    return [min(max(v, lo), hi) for v in vals], None


def _infer_device(sampler) -> torch.device:
    for obj in (sampler, getattr(sampler, "source", None)):
        if obj is None:
            continue
        for attr in ("device", "x0", "data"):
            v = getattr(obj, attr, None)
            if isinstance(v, torch.device):
                return v
            if isinstance(v, Tensor):
                return v.device
    return torch.device("cpu")


def gradient_variance(net: nn.Module, path: Path, sampler, times, n_samples: int = 256, method: str = "exact",
                      chunk_size: int = 64, generator: torch.Generator | None = None, reduction: str = "sum",
                      groups="layer", direction: str = "forward", oracle_loss: Callable[[float], float] | None = None,
                      device=None, progress: bool = False, *, micro_batch_size: int = 8,
                      train_mode: bool = False, ghost_conv: str = "auto",
                      objective: AverageVelocityObjective | None = None, step: float | str = 0.0) -> GradVarResult:
    """Gradient variance of the CFM loss as a function of t.

    At each time t of ``times`` (see :func:`parse_times`), draw n = ``n_samples`` pairs from ``sampler``
    (anything with ``sample(n, generator) -> Pairing``; swapped when ``direction="backward"``), z ~ N(0, I)
    for a stochastic path, set t_i = t, build (x_t, u_t) = ``path.sample(x0, x1, t, z)``, and compute
    :func:`per_sample_grad_stats`. With ``times="uniform:K"`` each sample's t is drawn uniformly in its bin.

    ``ghost_conv``: see :func:`per_sample_grad_stats`.
    ``oracle_loss(t)`` (optional): an irreducible loss to report beside the measured one. ``generator``
    defaults to one seeded with 0 on the sampler's device. ``device`` defaults to the network's.

    Few-step nets: with ``objective`` a :class:`~flowprobe.objectives.MeanFlowObjective` or
    :class:`~flowprobe.objectives.SplitMeanFlowObjective` (on this ``path``), the loss is that objective's
    regression ||u(t, x_t, h) - sg(target)||^2 at the step h = min(``step``, 1 - t) (``step="to_end"``: h = 1 - t,
    the one jump to the target); its target is computed once per batch, then the same per-sample machinery
    measures the gradients (:class:`StepBound`). The adaptive loss weight is not applied. h = 0 is the CFM loss.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2, got {n_samples}")
    if ghost_conv not in CONV_RULES:
        raise ValueError(f"ghost_conv must be one of {CONV_RULES}, got {ghost_conv!r}")
    if device is None:
        p = next(net.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is None:
        generator = torch.Generator(device=_infer_device(sampler)).manual_seed(0)
    time_range = tuple(getattr(path, "time_range", (0.0, 1.0)))
    ts, bins = parse_times(times, time_range)
    few_step = objective is not None
    if few_step:
        if not isinstance(objective, AverageVelocityObjective):
            raise ValueError("objective must be a few-step objective (MeanFlowObjective or SplitMeanFlowObjective)")
        if _describe_path(objective.path) != _describe_path(path):
            raise ValueError(f"the objective's path {_describe_path(objective.path)} is not {_describe_path(path)}")
        probe_net = StepBound(net, step)
    else:
        probe_net = net
    cfm = CFMObjective(path, reduction)
    rows = []
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(f"gradient variance ({method})", total=len(ts))
    try:
        for k, t in enumerate(ts):
            pairing: Pairing = sampler.sample(n_samples, generator)
            if direction == "backward":
                pairing = pairing.swapped()
            pairing = Pairing(pairing.x0.to(device), pairing.x1.to(device), pairing.i0, pairing.i1)
            dtype = pairing.x0.dtype
            if bins is None:
                tv = torch.full((n_samples,), t, dtype=dtype, device=device)
            else:
                a, b = bins[k]
                r = torch.rand(n_samples, generator=generator, device=generator.device, dtype=dtype).to(device)
                tv = a + (b - a) * r
            tv, x_t, u_t = cfm.draw(pairing, generator, tv)
            if few_step:
                lam = torch.rand(n_samples, generator=generator, device=generator.device, dtype=dtype).to(device)
                with torch.no_grad():
                    _, u_t = objective.target(net, tv, probe_net.steps(tv), x_t, u_t, lam)
            st = per_sample_grad_stats(probe_net, tv, x_t, u_t, method, chunk_size=chunk_size, reduction=reduction,
                                       groups=groups, micro_batch_size=micro_batch_size, train_mode=train_mode,
                                       ghost_conv=ghost_conv)
            row = {"t": t, "gv": st.gv, "gv_se": st.gv_se, "mean_grad_sq": st.mean_grad_sq,
                   "noise_to_signal": st.noise_to_signal, "snr": st.snr, "loss": st.loss, "loss_se": st.loss_se,
                   "oracle_loss": None if oracle_loss is None else float(oracle_loss(t)),
                   "n": n_samples, "method": method, "groups": st.groups_dict()}
            if bins is not None:
                row["t_lo"], row["t_hi"] = bins[k]
            if st.fallback_modules:
                row["exact_fallback"] = st.fallback_modules
            rows.append(row)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    desc = _describe_path(path)
    extra = {}
    if hasattr(sampler, "describe"):
        extra["sampler"] = sampler.describe()
    if method == "microbatch":
        extra["micro_batch_size"] = micro_batch_size
    if method == "ghost":
        extra["ghost_conv"] = ghost_conv
        if ghost_conv == "auto":
            extra["ghost_conv_choices"] = conv_rule_choices()
    if bins is not None:
        extra["times"] = times
    if few_step:
        extra["objective"] = objective.describe()
        extra["step"] = step
    return GradVarResult(rows=rows, method=method, reduction=reduction, path=desc, n_samples=n_samples,
                         direction=direction, groups=groups if isinstance(groups, str) else dict(groups),
                         extra=extra)


def _describe_path(path) -> dict:
    return path.describe() if hasattr(path, "describe") else {"path": type(path).__name__}


class StepBound(nn.Module):
    """An average-velocity net u(t, x, h) seen as a net of (t, x) at a step rule h(t): h = min(step, 1 - t), or
    h = 1 - t for ``step="to_end"``. Its parameters are the inner net's (names prefixed ``net.``)."""

    def __init__(self, net: nn.Module, step: float | str = 0.0):
        super().__init__()
        if not (step == "to_end" or (isinstance(step, (int, float)) and step >= 0)):
            raise ValueError(f"step must be a number >= 0 or 'to_end', got {step!r}")
        self.net, self.step = net, step

    def steps(self, t: Tensor) -> Tensor:
        if self.step == "to_end":
            return 1 - t
        return torch.clamp(1 - t, max=float(self.step))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.net(t, x, self.steps(t))


# --------------------------------------------------------------------------------------------------------------
# Plot and CLI


def plot_profiles(profiles: Sequence[tuple[str, GradVarResult]], path, title: str = "gradient variance"):
    """GV(t) on a log scale with +-1 SE error bars, one line per (label, result); saved atomically as PNG."""
    import numpy as np

    from ..report import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, res in profiles:
        t, gv, se = res.times, res.gv, res.gv_se
        lo = np.minimum(se, gv * (1 - 1e-9))  # keep the lower bar above 0 on a log axis
        axes[0].errorbar(t, gv, yerr=[lo, se], marker="o", ms=3, capsize=2, label=label)
        line = axes[1].errorbar(t, res.loss, yerr=res._col("loss_se"), marker="o", ms=3, capsize=2, label=label)
        oracle = res._col("oracle_loss")
        if np.isfinite(oracle).any():
            axes[1].plot(t, oracle, ls="--", color=line[0].get_color(), label=f"{label}: oracle")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("tr Cov(per-sample gradient)")
    axes[0].set_title(title)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("mean per-sample loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)



@dataclass
class ProbeTarget:
    """A model to probe: the network, its training path and pair sampler, and where it came from."""

    label: str
    net: nn.Module
    path: Path
    sampler: object
    info: dict = field(default_factory=dict)
    objective: AverageVelocityObjective | None = None  #: the few-step objective the net was trained with, if any


def load_probe_target(checkpoint, device="cpu", use_ema: bool = True) -> ProbeTarget:
    """Rebuild the network, path and coupling of a ``flowprobe train`` checkpoint (safetensors + JSON
    sidecar holding the training config) and load its weights (the EMA copy when there is one), through
    :func:`flowprobe.train.load_run` (2-D toys and image runs alike)."""
    from ..train import load_run

    run = load_run(checkpoint, device, use_ema)
    ck = run.checkpoint
    label = ck.path.parent.parent.name if ck.path.parent.name == "checkpoints" else ck.path.parent.name
    few = run.objective if isinstance(run.objective, AverageVelocityObjective) else None
    return ProbeTarget(label=f"{label}/step{ck.step}", net=run.net, path=run.objective.path, sampler=run.coupling,
                       info={"checkpoint": str(ck.path), "step": ck.step, "weights": run.weights}, objective=few)


def _override_path(path: Path, sigma: float | None, schedule: str | None) -> Path:
    if sigma is None and schedule is None:
        return path
    from ..paths import make_path

    base_sigma = float(getattr(path, "sigma", 0.0))
    base_schedule = getattr(path, "schedule", "constant")
    return make_path(base_sigma if sigma is None else sigma, base_schedule if schedule is None else schedule)


def probe_gradvar_cli(targets: Sequence[ProbeTarget], out, *, times="0:1:21", samples: int = 256,
                      method: str = "exact", directions: Sequence[str] = ("forward",), sigma: float | None = None,
                      schedule: str | None = None, chunk_size: int = 64, micro_batch_size: int = 8,
                      groups="layer", reduction: str = "sum", seed: int = 0, progress: bool = True,
                      ghost_conv: str = "auto", step: float | str | None = None) -> dict:
    """Profile every target in every direction and write ``out/gradvar.json`` and ``out/gradvar.png``.

    Every profile uses a generator seeded with ``seed`` (on the sampler's device), so several
    checkpoints are compared on the same draws (common random numbers). ``sigma``/``schedule``
    override the checkpoint's path. ``step`` (few-step checkpoints): probe the loss of the objective they were
    trained with at step h = min(step, 1 - t), or h = 1 - t for "to_end" (:func:`gradient_variance`).
    Returns the JSON document.
    """
    from pathlib import Path as FsPath

    from ..config import ConfigError
    from ..io import write_json

    out = FsPath(out)
    if samples < 2:
        raise ConfigError(f"--samples must be >= 2, got {samples}")
    try:
        parse_times(times)
    except ValueError as e:
        raise ConfigError(f"--times: {e}") from None
    profiles, docs = [], []
    for target in targets:
        path = _override_path(target.path, sigma, schedule)
        objective = None
        if step is not None:
            if target.objective is None:
                raise ConfigError(f"--step: {target.label} was trained with the CFM objective; --step probes "
                                  f"few-step (meanflow, splitmeanflow) checkpoints")
            from ..objectives import make_objective

            objective = make_objective(target.objective.name, path, reduction)
        for direction in directions:
            gen = torch.Generator(device=_infer_device(target.sampler)).manual_seed(seed)
            res = gradient_variance(target.net, path, target.sampler, times, n_samples=samples, method=method,
                                    chunk_size=chunk_size, generator=gen, reduction=reduction, groups=groups,
                                    direction=direction, progress=progress, micro_batch_size=micro_batch_size,
                                    ghost_conv=ghost_conv, objective=objective, step=0.0 if step is None else step)
            label = target.label if len(directions) == 1 else f"{target.label} ({direction})"
            taken = {lab for lab, _ in profiles}
            if label in taken:
                label = next(f"{label} #{k}" for k in range(2, len(taken) + 2) if f"{label} #{k}" not in taken)
            profiles.append((label, res))
            docs.append({"label": label, **target.info, **res.to_dict()})
    doc = {"probe": "gradvar", "seed": seed, "profiles": docs}
    write_json(out / "gradvar.json", doc)
    plot_profiles(profiles, out / "gradvar.png", title=f"gradient variance ({method}, n = {samples})")
    return doc


def _parse_step(text: str | None) -> float | str | None:
    from ..config import ConfigError

    if text is None or text == "to_end":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"--step: {text!r} is neither a number >= 0 nor to_end")
    return value


def _cli(args) -> int:
    from ..config import ConfigError
    from ..train import _resolve_device

    device = _resolve_device(args.device)
    directions = ("forward", "backward") if args.direction == "both" else (args.direction,)
    if args.sigma is not None and args.sigma < 0:
        raise ConfigError(f"--sigma must be >= 0, got {args.sigma}")
    targets = [load_probe_target(c, device, use_ema=not args.no_ema) for c in args.checkpoints]
    doc = probe_gradvar_cli(targets, args.out, times=args.times, samples=args.samples, method=args.method,
                            directions=directions, sigma=args.sigma, schedule=args.schedule,
                            chunk_size=args.chunk_size, micro_batch_size=args.micro_batch_size, groups=args.groups,
                            reduction=args.reduction, seed=args.seed, progress=not args.no_progress,
                            ghost_conv=args.ghost_conv, step=_parse_step(args.step))
    for p in doc["profiles"]:
        peak = max(p["rows"], key=lambda r: r["gv"] or 0.0)
        print(f"{p['label']}: GV peaks at t = {peak['t']:.3g} ({peak['gv']:.4g} +- {peak['gv_se']:.2g})")
    print(f"wrote {args.out}/gradvar.json and {args.out}/gradvar.png")
    return 0


def register_cli(subparsers) -> None:
    """Add ``flowprobe probe gradvar``."""
    p = subparsers.add_parser(
        "gradvar", help="gradient variance of the CFM loss versus t for trained checkpoints",
        description="Per-sample gradient variance tr Cov(grad l_i) of the CFM loss on a grid of times, for one or "
                    "more checkpoints (overlaid in one plot). Writes OUT/gradvar.json and OUT/gradvar.png.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="step_*.safetensors checkpoints (with their .json), checkpoint folders or run folders")
    p.add_argument("--times", default="0:1:21",
                   help=f"'a:b:K' (K points from a to b, clipped to [{ENDPOINT_MARGIN}, {1 - ENDPOINT_MARGIN}] and to "
                        "the path's range) or 'uniform:K' (K bins, per-sample t uniform in each); default 0:1:21")
    p.add_argument("--samples", type=int, default=256, help="samples per time (default 256)")
    p.add_argument("--method", default="exact", choices=METHODS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--direction", default="forward", choices=("forward", "backward", "both"),
                   help="backward swaps every pair (source <-> target); both overlays the two")
    p.add_argument("--sigma", type=float, default=None, help="override the checkpoint's path noise level")
    p.add_argument("--schedule", default=None, choices=("constant", "bridge"), help="override the noise schedule")
    p.add_argument("--chunk-size", type=int, default=64, help="samples per vmap / backward chunk (memory)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="micro-batch size m for --method microbatch")
    p.add_argument("--ghost-conv", default="auto", choices=CONV_RULES,
                   help="--method ghost: per-sample conv weight gradients by grouped convolution, im2col matmuls, "
                        "or the faster of the two per layer shape (auto, the default)")
    p.add_argument("--step", default=None, metavar="H|to_end",
                   help="few-step checkpoints (objective meanflow / splitmeanflow): probe their own loss at the step "
                        "h = min(H, 1 - t), or the jump to the end (to_end); default: the CFM loss (h = 0)")
    p.add_argument("--groups", default="layer", choices=("layer", "block", "all"), help="per-group breakdown")
    p.add_argument("--reduction", default="sum", choices=REDUCTIONS, help="loss over dimensions (default sum)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-ema", action="store_true", help="probe the raw weights even when an EMA copy exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)
