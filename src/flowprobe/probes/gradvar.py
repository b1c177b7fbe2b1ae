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

The estimators (``ESTIMATORS``: exact, naive, microbatch, ghost), their standard errors and the parameter
groups are described in :mod:`flowprobe.probes.grad_stats`; the per-sample machinery they share is in
:mod:`flowprobe.probes.per_sample`; :func:`residual_gain` and :func:`matched_residuals` live in
:mod:`flowprobe.probes.residual`. All are re-exported here.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..couplings import Pairing
from ..objectives import AverageVelocityObjective, CFMObjective
from ..paths import ProbabilityPath
from .ghost import CONV_RULES, conv_rule_choices
from .grad_stats import ESTIMATORS, GradStats, per_sample_grad_stats, resolve_groups
from .per_sample import check_options
from .residual import matched_residuals, residual_gain

__all__ = [
    "ESTIMATORS", "DIRECTIONS", "ENDPOINT_MARGIN", "GradStats", "GradVarResult", "gradient_variance",
    "per_sample_grad_stats", "parse_times", "resolve_groups", "sampler_device", "describe_path", "residual_gain",
    "matched_residuals", "StepBound", "PER_SAMPLE_ERRORS",
]

DIRECTIONS = ("forward", "backward")
#: The errors a net's per-sample gradients can fail with (a module torch.func or the ghost hooks cannot map, shapes
#: they do not expect): callers that measure any user's net catch these and say why instead of stopping.
PER_SAMPLE_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError)
#: The CLI's time grid "a:b:K" is clipped to [ENDPOINT_MARGIN, 1 - ENDPOINT_MARGIN] (the paper's grid ends).
ENDPOINT_MARGIN = 0.01


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

    def column(self, key: str):
        """The column ``key`` over the rows as a float array (None becomes NaN)."""
        import numpy as np

        return np.array([r[key] if r[key] is not None else np.nan for r in self.rows], dtype=float)

    @property
    def times(self):
        return self.column("t")

    @property
    def gv(self):
        return self.column("gv")

    @property
    def gv_se(self):
        return self.column("gv_se")

    @property
    def loss(self):
        return self.column("loss")

    @property
    def mean_grad_sq(self):
        return self.column("mean_grad_sq")

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
                if K < 1 or not (math.isfinite(a) and math.isfinite(b)):
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
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"times must be finite numbers, got {vals}")
    return [min(max(v, lo), hi) for v in vals], None


def sampler_device(sampler) -> torch.device:
    """The device a pair sampler draws on (its own ``device``, ``x0`` or ``data``, or its source's); CPU when
    it names none. Generators for :func:`gradient_variance` live there."""
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


def describe_path(path) -> dict:
    """``path.describe()``, or the path's class name when it has no description."""
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
# Profiles over t


def gradient_variance(net: nn.Module, path: ProbabilityPath, sampler, times, n_samples: int = 256,
                      method: str = "exact",
                      chunk_size: int = 64, generator: torch.Generator | None = None, reduction: str = "sum",
                      groups="layer", direction: str = "forward", oracle_loss: Callable[[float], float] | None = None,
                      device=None, progress: bool = False, *, micro_batch_size: int = 8,
                      train_mode: bool = False, ghost_conv: str = "auto",
                      objective: AverageVelocityObjective | None = None, step: float | str = 0.0) -> GradVarResult:
    """Gradient variance of the CFM loss as a function of t.

    At each time t of ``times`` (see :func:`parse_times`), draw n = ``n_samples`` pairs from ``sampler``
    (anything with ``sample(n, generator) -> Pairing``; swapped when ``direction="backward"``), z ~ N(0, I)
    for a stochastic path, set t_i = t, build (x_t, u_t) = ``path.sample(x0, x1, t, z)``, and compute
    :func:`per_sample_grad_stats` (``method`` in ``ESTIMATORS``). With ``times="uniform:K"`` each sample's t is
    drawn uniformly in its bin.

    ``ghost_conv``: see :func:`per_sample_grad_stats`.
    ``oracle_loss(t)`` (optional): an irreducible loss to report beside the measured one. ``generator``
    defaults to one seeded with 0 on the sampler's device. ``device`` defaults to the network's.

    Few-step nets: with ``objective`` a :class:`~flowprobe.objectives.MeanFlowObjective` or
    :class:`~flowprobe.objectives.SplitMeanFlowObjective` (on this ``path``), the loss is that objective's
    regression ||u(t, x_t, h) - sg(target)||^2 at the step h = min(``step``, 1 - t) (``step="to_end"``: h = 1 - t,
    the one jump to the target); its target is computed once per batch, then the same per-sample machinery
    measures the gradients (:class:`StepBound`). The adaptive loss weight is not applied. h = 0 is the CFM loss.
    """
    _check_profile_args(direction, method, n_samples, ghost_conv)
    if device is None:
        p = next(net.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is None:
        generator = torch.Generator(device=sampler_device(sampler)).manual_seed(0)
    ts, bins = parse_times(times, tuple(getattr(path, "time_range", (0.0, 1.0))))
    probe_net = _probe_net(net, path, objective, step)
    draw = _BatchDraw(sampler, CFMObjective(path, reduction), n_samples, generator, device, direction, net,
                      objective, probe_net)
    rows = []
    with _progress_bar(progress, f"gradient variance ({method})", len(ts)) as advance:
        for k, t in enumerate(ts):
            tv, x_t, u_t = draw(t, None if bins is None else bins[k])
            st = per_sample_grad_stats(probe_net, tv, x_t, u_t, method, chunk_size=chunk_size, reduction=reduction,
                                       groups=groups, micro_batch_size=micro_batch_size, train_mode=train_mode,
                                       ghost_conv=ghost_conv)
            rows.append(_profile_row(t, st, n_samples, method, oracle_loss, None if bins is None else bins[k]))
            advance()
    extra = _profile_extra(sampler, method, micro_batch_size, ghost_conv, times if bins is not None else None,
                           objective, step)
    return GradVarResult(rows=rows, method=method, reduction=reduction, path=describe_path(path), n_samples=n_samples,
                         direction=direction, groups=groups if isinstance(groups, str) else dict(groups),
                         extra=extra)


def _check_profile_args(direction: str, method: str, n_samples: int, ghost_conv: str) -> None:
    check_options(direction=(direction, DIRECTIONS), method=(method, ESTIMATORS), n_samples=(n_samples, 2),
                  ghost_conv=(ghost_conv, CONV_RULES))


def _probe_net(net: nn.Module, path: ProbabilityPath, objective: AverageVelocityObjective | None, step) -> nn.Module:
    """The net whose per-sample gradients are measured: ``net`` itself, or a few-step net bound to its step."""
    if objective is None:
        return net
    if not isinstance(objective, AverageVelocityObjective):
        raise ValueError("objective must be a few-step objective (MeanFlowObjective or SplitMeanFlowObjective)")
    if describe_path(objective.path) != describe_path(path):
        raise ValueError(f"the objective's path {describe_path(objective.path)} is not {describe_path(path)}")
    return StepBound(net, step)


@dataclass
class _BatchDraw:
    """Draws the batch (t, x_t, u_t) of one time (or time bin) of a profile, in a fixed order of generator draws:
    the pairs, the per-sample times of a bin, the path noise, the few-step split point."""

    sampler: object
    cfm: CFMObjective
    n: int
    generator: torch.Generator
    device: torch.device
    direction: str
    net: nn.Module
    objective: AverageVelocityObjective | None
    probe_net: nn.Module

    def __call__(self, t: float, edges: tuple[float, float] | None) -> tuple[Tensor, Tensor, Tensor]:
        gen, device, n = self.generator, self.device, self.n
        pairing: Pairing = self.sampler.sample(n, gen)
        if self.direction == "backward":
            pairing = pairing.swapped()
        pairing = Pairing(pairing.x0.to(device), pairing.x1.to(device), pairing.i0, pairing.i1)
        dtype = pairing.x0.dtype
        if edges is None:
            tv = torch.full((n,), t, dtype=dtype, device=device)
        else:
            a, b = edges
            r = torch.rand(n, generator=gen, device=gen.device, dtype=dtype).to(device)
            tv = a + (b - a) * r
        tv, x_t, u_t = self.cfm.draw(pairing, gen, tv)
        if self.objective is not None:
            lam = torch.rand(n, generator=gen, device=gen.device, dtype=dtype).to(device)
            with torch.no_grad():
                _, u_t = self.objective.target(self.net, tv, self.probe_net.steps(tv), x_t, u_t, lam)
        return tv, x_t, u_t


@contextmanager
def _progress_bar(enabled: bool, description: str, total: int):
    """Yields ``advance()``: a transient rich progress bar when ``enabled``, else a no-op."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    try:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
    finally:
        bar.stop()


def _profile_row(t: float, st: GradStats, n_samples: int, method: str, oracle_loss, edges) -> dict:
    row = {"t": t, "gv": st.gv, "gv_se": st.gv_se, "mean_grad_sq": st.mean_grad_sq,
           "noise_to_signal": st.noise_to_signal, "snr": st.snr, "loss": st.loss, "loss_se": st.loss_se,
           "oracle_loss": None if oracle_loss is None else float(oracle_loss(t)),
           "n": n_samples, "method": method, "groups": st.groups_dict()}
    if edges is not None:
        row["t_lo"], row["t_hi"] = edges
    if st.fallback_modules:
        row["exact_fallback"] = st.fallback_modules
    return row


def _profile_extra(sampler, method: str, micro_batch_size: int, ghost_conv: str, binned_times, objective,
                   step) -> dict:
    extra = {}
    if hasattr(sampler, "describe"):
        extra["sampler"] = sampler.describe()
    if method == "microbatch":
        extra["micro_batch_size"] = micro_batch_size
    if method == "ghost":
        extra["ghost_conv"] = ghost_conv
        if ghost_conv == "auto":
            extra["ghost_conv_choices"] = conv_rule_choices()
    if binned_times is not None:
        extra["times"] = binned_times
    if objective is not None:
        extra["objective"] = objective.describe()
        extra["step"] = step
    return extra
