"""Losses, written per sample so that torch.func can map them.

The conditional flow-matching (CFM) loss of one sample is

    l(theta; t, x_t, u_t) = || v_theta(t, x_t) - u_t ||^2

summed over dimensions (``reduction="sum"``, the paper's definition, used by the gradient-variance
probe) or averaged over them (``reduction="mean"``, torchcfm's training convention; only a rescaling
of the learning rate). The batch loss is the (optionally weighted) mean of per-sample losses.

Few-step objectives learn the *average* velocity u(t, x, h) = (1/h) int_t^{t+h} v(tau, x_tau) dtau along
the ODE through x at time t (a net built with ``step_embed=True``, called ``net(t, x, h)``), so that one
jump x_{t+h} = x_t + h u(t, x_t, h) follows the flow (:func:`flowprobe.solvers.integrate_average`):
:class:`MeanFlowObjective` (a JVP of the net) and :class:`SplitMeanFlowObjective` (interval splitting, no
JVP). Both keep time running from the source (t = 0) to the target (t = 1).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .couplings import Pairing
from .guidance import conditioned
from .paths import ProbabilityPath, expand_like
from .timesampling import TimeSampler

__all__ = ["squared_error", "cfm_sample_loss", "cfm_losses", "CFMObjective", "weighted_mean", "sample_times",
           "sample_intervals", "AverageVelocityObjective", "MeanFlowObjective", "SplitMeanFlowObjective", "OBJECTIVES",
           "make_objective"]

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


def weighted_mean(losses: Tensor, weights: Tensor | None) -> Tensor:
    """sum_i w_i l_i / sum_i w_i, or the plain mean when ``weights`` is None."""
    if weights is None:
        return losses.mean()
    if weights.shape != losses.shape:
        raise ValueError(f"weights must have shape {tuple(losses.shape)}, got {tuple(weights.shape)}")
    return (weights * losses).sum() / weights.sum()


def sample_times(n: int, generator: torch.Generator, device=None, dtype=torch.float32,
                 time_range: tuple[float, float] = (0.0, 1.0), sampler: TimeSampler | None = None) -> Tensor:
    """t ~ U[lo, hi], shape (n,), from an explicit generator; or t from ``sampler``'s density mapped into
    [lo, hi] (:class:`flowprobe.timesampling.TimeSampler`)."""
    if sampler is not None:
        return sampler.sample(n, generator, device, dtype, time_range)
    lo, hi = time_range
    t = torch.rand(n, generator=generator, device=generator.device, dtype=dtype)
    return (lo + (hi - lo) * t).to(device if device is not None else t.device)


class CFMObjective:
    """The CFM objective for a path: draw t and z, build (x_t, u_t), regress net(t, x_t) on u_t.

    ``reduction`` is over dimensions ("sum" or "mean"); the batch is always averaged, with optional
    per-sample ``weights`` (normalised by their sum, so weights only set relative importance). ``time_sampler``:
    the density of t (:class:`~flowprobe.timesampling.TimeSampler`; None is uniform) on the path's time range.
    """

    def __init__(self, path: ProbabilityPath, reduction: str = "mean", time_sampler: TimeSampler | None = None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.path = path
        self.reduction = reduction
        self.time_sampler = time_sampler if time_sampler is not None else TimeSampler()

    def time_range(self) -> tuple[float, float]:
        return getattr(self.path, "time_range", (0.0, 1.0))

    def draw(self, pairing: Pairing, generator: torch.Generator, t: Tensor | None = None):
        """(t, x_t, u_t) for a pairing; t from the time sampler on time_range unless given, z ~ N(0, I)."""
        x0, x1 = pairing.x0, pairing.x1
        if t is None:
            t = sample_times(x0.shape[0], generator, x0.device, x0.dtype, self.time_range(), self.time_sampler)
        z = None
        if not self.path.deterministic:
            z = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        x_t, u_t = self.path.sample(x0, x1, t, z)
        return t, x_t, u_t

    def losses(self, net, t: Tensor, x_t: Tensor, u_t: Tensor) -> Tensor:
        return cfm_losses(net, t, x_t, u_t, self.reduction)

    def describe(self) -> dict:
        """The run record's objective entry; the time density only when it is not uniform (older records stand)."""
        return {"objective": "cfm", "reduction": self.reduction,
                **({} if self.time_sampler.uniform else self.time_sampler.describe())}

    def __call__(self, net, pairing: Pairing, generator: torch.Generator, weights: Tensor | None = None,
                 t: Tensor | None = None) -> Tensor:
        """Scalar batch loss: mean_i w_i l_i / mean_i w_i (plain mean without weights); ``weights`` default to
        the pairing's own (:class:`~flowprobe.couplings.WeightedCoupling`); a labelled pairing calls
        ``net(t, x, y=pairing.y)`` (:func:`flowprobe.guidance.conditioned`)."""
        t, x_t, u_t = self.draw(pairing, generator, t)
        losses = self.losses(conditioned(net, pairing.y), t, x_t, u_t)
        return weighted_mean(losses, pairing.weights if weights is None else weights)


# ----------------------------------------------------------------------------------------------------------
# Few-step objectives: the average velocity u(t, x, h)


def sample_intervals(n: int, generator: torch.Generator, jump_fraction: float, device=None,
                     dtype=torch.float32, time_range: tuple[float, float] = (0.0, 1.0),
                     sampler: TimeSampler | None = None) -> tuple[Tensor, Tensor]:
    """Intervals [t, t + h] inside ``time_range``: two independent draws (uniform, or from ``sampler``'s density,
    as MeanFlow draws both ends from a logit-normal), t the smaller and t + h the larger; then h is set to 0 for a
    random ``1 - jump_fraction`` of the batch (those samples train the instantaneous velocity, the plain CFM
    loss). Returns (t, h), each of shape (n,)."""
    if not 0.0 <= jump_fraction <= 1.0:
        raise ValueError(f"jump_fraction must be in [0, 1], got {jump_fraction!r}")
    lo, hi = time_range
    r = torch.rand(3, n, generator=generator, device=generator.device, dtype=dtype)
    q = (lambda u: u) if sampler is None else sampler.quantile
    a, b = lo + (hi - lo) * q(r[0]), lo + (hi - lo) * q(r[1])
    t, s = torch.minimum(a, b), torch.maximum(a, b)
    h = torch.where(r[2] < jump_fraction, s - t, torch.zeros_like(t))
    dev = device if device is not None else t.device
    return t.to(dev), h.to(dev)


class AverageVelocityObjective:
    """Shared parts of the few-step objectives: drawing (t, h, x_t, u_t), the weighted batch mean, describe()."""

    name = "average"

    def __init__(self, path: ProbabilityPath, reduction: str = "mean", jump_fraction: float = 0.25,
                 adaptive_power: float = 0.0,
                 adaptive_eps: float = 1e-3, time_sampler: TimeSampler | None = None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= jump_fraction <= 1.0:
            raise ValueError(f"jump_fraction must be in [0, 1], got {jump_fraction!r}")
        if adaptive_power < 0 or adaptive_eps <= 0:
            raise ValueError("adaptive_power must be >= 0 and adaptive_eps > 0")
        self.path, self.reduction = path, reduction
        self.jump_fraction = float(jump_fraction)
        self.adaptive_power, self.adaptive_eps = float(adaptive_power), float(adaptive_eps)
        self.time_sampler = time_sampler if time_sampler is not None else TimeSampler()

    def time_range(self) -> tuple[float, float]:
        return getattr(self.path, "time_range", (0.0, 1.0))

    def draw(self, pairing: Pairing, generator: torch.Generator, t: Tensor | None = None, h: Tensor | None = None):
        """(t, h, x_t, u_t, lam): intervals from :func:`sample_intervals` unless given, z ~ N(0, I), and a split
        point lam ~ U[0, 1] (used by :class:`SplitMeanFlowObjective`; drawn always, so both objectives see the
        same (t, h, x_t) for the same generator state)."""
        x0, x1 = pairing.x0, pairing.x1
        if t is None or h is None:
            t_draw, h_draw = sample_intervals(x0.shape[0], generator, self.jump_fraction, x0.device, x0.dtype,
                                              self.time_range(), self.time_sampler)
            t = t_draw if t is None else t
            h = h_draw if h is None else h
        z = None
        if not self.path.deterministic:
            z = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        x_t, u_t = self.path.sample(x0, x1, t, z)
        lam = torch.rand(x0.shape[0], generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        return t, h, x_t, u_t, lam

    def target(self, net, t: Tensor, h: Tensor, x_t: Tensor, u_t: Tensor, lam: Tensor | None) -> tuple[Tensor, Tensor]:
        """(prediction u(t, x_t, h) with its graph, regression target without one)."""
        raise NotImplementedError

    def losses(self, net, t: Tensor, h: Tensor, x_t: Tensor, u_t: Tensor, lam: Tensor | None = None) -> Tensor:
        """Per-sample || u - sg(target) ||^2, times sg(1 / (||u - target||^2 + adaptive_eps)^adaptive_power)
        (MeanFlow's adaptive weight; power 0 is the plain squared error)."""
        pred, tgt = self.target(net, t, h, x_t, u_t, lam)
        loss = squared_error(pred, tgt, self.reduction)
        if self.adaptive_power:
            loss = loss / (loss.detach() + self.adaptive_eps) ** self.adaptive_power
        return loss

    def __call__(self, net, pairing: Pairing, generator: torch.Generator, weights: Tensor | None = None,
                 t: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        losses = self.losses(conditioned(net, pairing.y), *self.draw(pairing, generator, t, h))
        return weighted_mean(losses, pairing.weights if weights is None else weights)

    def describe(self) -> dict:
        return {"objective": self.name, "reduction": self.reduction, "jump_fraction": self.jump_fraction,
                "adaptive_power": self.adaptive_power, "adaptive_eps": self.adaptive_eps,
                **({} if self.time_sampler.uniform else self.time_sampler.describe())}


class MeanFlowObjective(AverageVelocityObjective):
    """MeanFlow: regress u(t, x_t, h) on sg(u_t + h du/dt), the MeanFlow identity in forward time.

    With s = t + h fixed, h u(t, x_t, h) = int_t^s v d tau; differentiating in t along the flow,
    -u + h du/dt = -v, so u = v + h du/dt with the total derivative du/dt = (d_x u) v + d_t u - d_h u. The
    conditional target u_t replaces v (the regression is linear in it, so its minimiser is unchanged), and
    du/dt is one Jacobian-vector product of the net with tangents (u_t, 1, -1) in (x, t, h)
    (``torch.func.jvp``, which also returns u for the loss: one forward and one forward-mode pass; under
    DistributedDataParallel the JVP runs on the inner module without a graph and u through DDP, one forward
    more). At h = 0 this is the CFM loss.
    """

    name = "meanflow"

    def target(self, net, t, h, x_t, u_t, lam=None):
        from torch.func import jvp

        ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
        inner = net.module if ddp else net  # torch.func transforms do not pass through DDP's forward

        def f(x, tt, hh):
            return inner(tt, x, hh)

        ones = torch.ones_like(t)
        if ddp:  # the tangent without a graph, the prediction through DDP (so its gradients are all-reduced)
            with torch.no_grad():
                _, dudt = jvp(f, (x_t, t, h), (u_t, ones, -ones))
            pred = net(t, x_t, h)
        else:
            pred, dudt = jvp(f, (x_t, t, h), (u_t, ones, -ones))
        tgt = u_t + expand_like(h, x_t) * dudt
        return pred, tgt.detach()


class SplitMeanFlowObjective(AverageVelocityObjective):
    """SplitMeanFlow: interval splitting consistency, no JVP.

    For t <= m <= s = t + h with m = t + lam h (lam ~ U[0, 1]) the average velocity is additive:

        h u(t, x_t, h) = lam h u(t, x_t, lam h) + (1 - lam) h u(m, x_m, (1 - lam) h),
        x_m = x_t + lam h u(t, x_t, lam h),

    so the target of u(t, x_t, h) is sg(lam u(t, x_t, lam h) + (1 - lam) u(m, x_m, (1 - lam) h)) (two more
    forward passes without a graph). Samples with h = 0 take the boundary condition u(t, x, 0) = v: the CFM
    target u_t.
    """

    name = "splitmeanflow"

    def target(self, net, t, h, x_t, u_t, lam=None):
        if lam is None:
            raise ValueError("SplitMeanFlowObjective needs the split points lam (from draw())")
        pred = net(t, x_t, h)
        with torch.no_grad():
            h1, h2 = lam * h, (1 - lam) * h
            u1 = net(t, x_t, h1)
            x_m = x_t + expand_like(h1, x_t) * u1
            u2 = net(t + h1, x_m, h2)
            split = expand_like(lam, x_t) * u1 + expand_like(1 - lam, x_t) * u2
            tgt = torch.where(expand_like(h == 0, x_t).bool(), u_t, split)
        return pred, tgt


OBJECTIVES = ("cfm", "meanflow", "splitmeanflow")


def make_objective(kind: str, path: ProbabilityPath, reduction: str = "mean", time_sampler: TimeSampler | None = None,
                   **options):
    """The objective named ``kind`` (one of OBJECTIVES) on ``path``, drawing t from ``time_sampler`` (None:
    uniform); ``options`` (jump_fraction, adaptive_power, adaptive_eps) go to the few-step objectives."""
    if kind == "cfm":
        return CFMObjective(path, reduction, time_sampler)
    if kind == "meanflow":
        return MeanFlowObjective(path, reduction, time_sampler=time_sampler, **options)
    if kind == "splitmeanflow":
        return SplitMeanFlowObjective(path, reduction, time_sampler=time_sampler, **options)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {kind!r}")
