"""Couplings: how (x0, x1) training pairs are drawn.

A coupling returns a :class:`Pairing`: the paired tensors *and* who was paired with whom (indices into
the source and target pools), because the memorisation and gradient-variance probes need the pairing
itself. Every draw takes an explicit ``torch.Generator``.

- :class:`IndependentCoupling`: x0 ~ p0 and x1 ~ p1 drawn independently.
- :class:`FixedPairs`: a finite dataset of (x0, x1) rows (paired, shuffled or reflow training: the pairs
  (x0_i, Phi(x0_i)) of a trained flow Phi, generated once).
- :class:`MappedCoupling`: a deterministic coupling x1 = f(x0) with fresh x0 at every draw (e.g. the
  all-lines-intersect pairing x1 = mu - x0 of the reflow experiment).
- :class:`MinibatchOTCoupling`: independent minibatches re-paired by exact OT (a permutation, no
  duplicate pairs) or entropic OT (POT's Sinkhorn; each source row draws one partner from its row of
  the plan).
- :class:`WeightedCoupling`: the pairs of another coupling with Gibbs weights exp(-||x0 - x1||^2 / eps)
  (weighted CFM, W-CFM): the objectives weight each pair's loss by them.

``ot_permutation`` and ``sinkhorn_pairing`` are the functional forms of the minibatch solvers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Pairing", "Sampler", "GaussianSampler", "TensorSampler", "IndependentCoupling", "FixedPairs", "MappedCoupling",
    "MinibatchOTCoupling", "SwappedCoupling", "WeightedCoupling", "ot_permutation", "sinkhorn_pairing",
    "squared_distances",
]


@dataclass
class Pairing:
    """A batch of pairs. ``x0[k]`` is paired with ``x1[k]``; ``i0[k]`` and ``i1[k]`` index the pools
    they came from (for a fresh Gaussian draw, i0 is the position in that draw). ``weights`` (optional,
    positive, any scale): how much each pair counts in the loss (:class:`WeightedCoupling`). ``y`` (optional,
    int64): the class label of each pair, the null label (``num_classes``) where it was dropped; the objectives
    then call ``net(t, x, y=y)`` (:class:`flowprobe.guidance.LabelledCoupling`)."""

    x0: Tensor
    x1: Tensor
    i0: Tensor
    i1: Tensor
    weights: Tensor | None = None
    y: Tensor | None = None

    def swapped(self) -> "Pairing":
        """The same pairs with source and target exchanged (for a backward, target->source field)."""
        return Pairing(self.x1, self.x0, self.i1, self.i0, self.weights, self.y)


class Sampler(Protocol):
    """Anything that draws n samples (and their pool indices) with a generator."""

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]: ...


class GaussianSampler:
    """x ~ N(mean, std^2 I) of a given shape; indices are positions in the draw."""

    def __init__(self, shape: tuple[int, ...], mean: Tensor | float = 0.0, std: float = 1.0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.shape = tuple(shape)
        self.mean, self.std = mean, std
        self.device, self.dtype = torch.device(device), dtype

    def sample(self, n, generator):
        z = torch.randn((n, *self.shape), generator=generator, device=self.device, dtype=self.dtype)
        return self.mean + self.std * z, torch.arange(n, device=self.device)


class TensorSampler:
    """Uniform draws (with replacement across draws, without within one draw when n <= N) from a
    fixed pool of samples, e.g. a dataset held in memory."""

    def __init__(self, data: Tensor):
        if data.dim() < 2:
            raise ValueError("data must be batch-first with at least one feature dimension")
        self.data = data

    def sample(self, n, generator):
        N = self.data.shape[0]
        if n <= N:
            idx = torch.randperm(N, generator=generator, device=generator.device)[:n]
        else:
            idx = torch.randint(N, (n,), generator=generator, device=generator.device)
        idx = idx.to(self.data.device)
        return self.data[idx], idx


class IndependentCoupling:
    """pi = p0 x p1: independent draws from the source and target samplers."""

    def __init__(self, source: Sampler, target: Sampler):
        self.source, self.target = source, target

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        x0, i0 = self.source.sample(n, generator)
        x1, i1 = self.target.sample(n, generator)
        return Pairing(x0, x1, i0, i1)

    def describe(self) -> dict:
        return {"coupling": "independent"}


class FixedPairs:
    """A finite set of pairs (x0[i], x1[i]); a draw picks rows uniformly at random.

    Used for paired training, adversarial (shuffled) pairings and reflow. ``i0`` and ``i1`` of a draw
    are both the row index, unless ``partner`` maps rows to the index of x1 in an outside pool.
    """

    def __init__(self, x0: Tensor, x1: Tensor, partner: Tensor | None = None):
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"x0 and x1 must have the same number of rows, got {x0.shape[0]} and {x1.shape[0]}")
        self.x0, self.x1 = x0, x1
        self.partner = partner

    def __len__(self) -> int:
        return self.x0.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        N = len(self)
        idx = (torch.randperm(N, generator=generator, device=generator.device)[:n] if n <= N
               else torch.randint(N, (n,), generator=generator, device=generator.device))
        idx = idx.to(self.x0.device)
        i1 = idx if self.partner is None else self.partner.to(idx.device)[idx]
        return Pairing(self.x0[idx], self.x1[idx], idx, i1)

    def describe(self) -> dict:
        return {"coupling": "fixed_pairs", "n_pairs": len(self)}


class MappedCoupling:
    """A deterministic coupling x1 = f(x0) with fresh x0 from ``source`` at every draw (i1 = i0). With a trained
    flow as ``fn`` this is reflow on fresh sources; :class:`FixedPairs` holds a finite set of such pairs."""

    def __init__(self, source: Sampler, fn):
        self.source, self.fn = source, fn

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        x0, i0 = self.source.sample(n, generator)
        return Pairing(x0, self.fn(x0), i0, i0)

    def describe(self) -> dict:
        return {"coupling": "mapped"}


def squared_distances(x0: Tensor, x1: Tensor) -> Tensor:
    """C[i, j] = ||x0_i - x1_j||^2 over flattened samples, computed in float64 for exact ties."""
    a = x0.reshape(x0.shape[0], -1).double()
    b = x1.reshape(x1.shape[0], -1).double()
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def ot_permutation(x0: Tensor, x1: Tensor, method: str = "emd") -> Tensor:
    """Exact OT between two equal-size uniform empirical measures with cost ||x0_i - x1_j||^2.

    Returns ``perm`` with x0[i] paired to x1[perm[i]]: a permutation, so no pair is duplicated.
    ``method="emd"`` uses POT's network simplex (whose plan between uniform measures is a vertex of
    the Birkhoff polytope, i.e. a permutation matrix); ``"lsa"`` uses scipy's linear_sum_assignment.
    """
    n = x0.shape[0]
    if x1.shape[0] != n:
        raise ValueError(f"exact OT needs equal batch sizes, got {n} and {x1.shape[0]}")
    C = squared_distances(x0, x1).cpu().numpy()
    if method == "lsa":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(C)
        perm = np.empty(n, dtype=np.int64)
        perm[rows] = cols
    elif method == "emd":
        import ot

        w = np.full(n, 1.0 / n)
        plan = ot.emd(w, w, C / max(C.max(), 1e-300), numItermax=max(100_000, 50 * n * n))
        perm = plan.argmax(axis=1).astype(np.int64)
        if len(np.unique(perm)) != n:  # degenerate plan (should not happen for uniform weights)
            raise RuntimeError("POT returned a plan that is not a permutation")
    else:
        raise ValueError(f"method must be 'emd' or 'lsa', got {method!r}")
    return torch.from_numpy(perm).to(x0.device)


def sinkhorn_pairing(x0: Tensor, x1: Tensor, reg: float, generator: torch.Generator) -> Tensor:
    """Entropic OT (POT's Sinkhorn on the cost normalised by its mean, regularisation ``reg``): each
    source row i draws one partner j with probability plan[i, j] / sum_j plan[i, j]."""
    import ot

    n, m = x0.shape[0], x1.shape[0]
    C = squared_distances(x0, x1).cpu().numpy()
    C = C / max(C.mean(), 1e-300)
    plan = ot.sinkhorn(np.full(n, 1.0 / n), np.full(m, 1.0 / m), C, reg, method="sinkhorn_log", numItermax=10_000)
    p = torch.from_numpy(plan).clamp_min(0)
    p = p / p.sum(1, keepdim=True)
    j = torch.multinomial(p.to(generator.device), 1, generator=generator).squeeze(1)
    return j.to(x0.device)


class MinibatchOTCoupling:
    """Independent minibatches re-paired by OT within the batch (OT-CFM).

    ``method``: ``"exact"`` (POT emd, a permutation), ``"lsa"`` (scipy, a permutation) or
    ``"sinkhorn"`` (entropic, regularisation ``reg`` on the mean-normalised cost).
    """

    def __init__(self, source: Sampler, target: Sampler, method: str = "exact", reg: float = 0.05):
        if method not in ("exact", "lsa", "sinkhorn"):
            raise ValueError(f"method must be 'exact', 'lsa' or 'sinkhorn', got {method!r}")
        if method == "sinkhorn" and not reg > 0:
            raise ValueError(f"reg must be > 0 for sinkhorn, got {reg}")
        self.source, self.target = source, target
        self.method, self.reg = method, reg

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        x0, i0 = self.source.sample(n, generator)
        x1, i1 = self.target.sample(n, generator)
        if self.method == "sinkhorn":
            j = sinkhorn_pairing(x0, x1, self.reg, generator)
        else:
            j = ot_permutation(x0, x1, "emd" if self.method == "exact" else "lsa")
        return Pairing(x0, x1[j], i0, i1[j.to(i1.device)])

    def describe(self) -> dict:
        return {"coupling": "minibatch_ot", "method": self.method, "reg": self.reg}


class SwappedCoupling:
    """The coupling ``base`` with source and target exchanged: trains the backward (target -> source)
    field with the same paths and solvers (time still runs from the new source at t = 0)."""

    def __init__(self, base):
        self.base = base

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        return self.base.sample(n, generator).swapped()

    def describe(self) -> dict:
        inner = self.base.describe() if hasattr(self.base, "describe") else {}
        return {"coupling": "swapped", "base": inner}


class WeightedCoupling:
    """Weighted CFM (W-CFM): the pairs of ``base`` (usually independent) with Gibbs weights

        w(x0, x1) = exp(-||x0 - x1||^2 / epsilon),

    which the objectives use as per-pair loss weights (normalised by their sum over the batch). Minimising
    the weighted loss is minimising the plain loss under the coupling pi_eps(x0, x1) proportional to
    base(x0, x1) w(x0, x1): an entropic-OT-like coupling whose marginals are tilted away from the base's
    (for Gaussians in closed form: :func:`flowprobe.gaussian.gibbs_tilted_coupling`). ||x0 - x1||^2 is summed over
    all dimensions, so ``epsilon`` should grow with the dimension. Weights are computed relative to the
    batch's smallest distance, so they never underflow to all zeros.
    """

    weighted = True

    def __init__(self, base, epsilon: float):
        if not (isinstance(epsilon, (int, float)) and np.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        self.base, self.epsilon = base, float(epsilon)

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        p = self.base.sample(n, generator)
        d2 = (p.x0 - p.x1).reshape(p.x0.shape[0], -1).pow(2).sum(1)
        w = torch.exp(-(d2 - d2.min()) / self.epsilon)
        return Pairing(p.x0, p.x1, p.i0, p.i1, w, p.y)

    def describe(self) -> dict:
        inner = self.base.describe() if hasattr(self.base, "describe") else {}
        return {"coupling": "weighted", "epsilon": self.epsilon, "base": inner}
