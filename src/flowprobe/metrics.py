"""Distances between sample sets: kernel MMD and the Wasserstein-2 distance.

- :func:`mmd2`: squared maximum mean discrepancy with the Gaussian kernel
  k(x, y) = exp(-||x - y||^2 / (2 h^2)),

      MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y),

  unbiased (U-statistic: diagonal terms left out of the within-sample means) or biased (V-statistic).
  The bandwidth h defaults to the median heuristic (:func:`median_bandwidth`).
- :func:`wasserstein2`: W2 between two empirical measures (uniform weights) by exact OT (POT's
  network simplex); O(n^2) memory, meant for n up to a few thousand.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["pairwise_sq_dists", "median_bandwidth", "gaussian_kernel", "mmd2", "wasserstein2", "energy_distance"]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def pairwise_sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """D[i, j] = ||x_i - y_j||^2 (float64, clamped at 0), for flattened samples."""
    a, b = _flat(x), _flat(y).to(x.device)
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def median_bandwidth(x: Tensor, y: Tensor, max_points: int = 2000) -> float:
    """Median heuristic: h = median of ||z_i - z_j|| over pairs i < j of the pooled sample z = [x; y].

    At most ``max_points`` pooled points are used (the first ones of each sample, in equal share), so the
    cost stays O(max_points^2).
    """
    half = max(1, max_points // 2)
    z = torch.cat([_flat(x)[:half], _flat(y)[:half].to(x.device)])
    d2 = pairwise_sq_dists(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    h = d2[iu[0], iu[1]].median().sqrt().item()
    if not h > 0:
        raise ValueError("median bandwidth is zero: the pooled samples are (almost all) identical")
    return h


def gaussian_kernel(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """K[i, j] = exp(-||x_i - y_j||^2 / (2 h^2)) with h = ``bandwidth``."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    return torch.exp(-pairwise_sq_dists(x, y) / (2 * bandwidth ** 2))


def mmd2(x: Tensor, y: Tensor, bandwidth: float | None = None, unbiased: bool = True,
         chunk_size: int = 4096) -> float:
    """Squared MMD between samples x (n, ...) and y (m, ...) with a Gaussian kernel.

    unbiased: (1/(n(n-1))) sum_{i != j} k(x_i, x_j) + (1/(m(m-1))) sum_{i != j} k(y_i, y_j)
              - (2/(n m)) sum_{i, j} k(x_i, y_j)   (can be slightly negative);
    biased:   the same with the diagonal included and 1/n^2, 1/m^2 (always >= 0).
    ``bandwidth`` None uses :func:`median_bandwidth` of the pooled sample.
    """
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd2 needs at least two samples on each side, got {n} and {m}")
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)

    def ksum(a: Tensor, b: Tensor) -> float:
        total = 0.0
        for s in range(0, a.shape[0], chunk_size):
            total += gaussian_kernel(a[s:s + chunk_size], b, h).sum().item()
        return total

    kxx, kyy, kxy = ksum(x, x), ksum(y, y), ksum(x, y.to(x.device))
    if unbiased:
        # k(z, z) = 1 on the diagonal
        return (kxx - n) / (n * (n - 1)) + (kyy - m) / (m * (m - 1)) - 2 * kxy / (n * m)
    return kxx / n ** 2 + kyy / m ** 2 - 2 * kxy / (n * m)


def wasserstein2(x: Tensor, y: Tensor, max_points: int = 10_000) -> float:
    """W2 between the empirical measures (1/n) sum delta_{x_i} and (1/m) sum delta_{y_j}:

        W2 = sqrt(min_P sum_ij P_ij ||x_i - y_j||^2),  P with marginals 1/n and 1/m,

    solved exactly with POT's ``ot.emd2`` (network simplex). Refuses n or m above ``max_points``.
    """
    import ot

    n, m = x.shape[0], y.shape[0]
    if n < 1 or m < 1:
        raise ValueError("wasserstein2 needs non-empty samples")
    if max(n, m) > max_points:
        raise ValueError(f"exact W2 is O(n m) in memory; got {n} x {m} points, above max_points={max_points}")
    C = pairwise_sq_dists(x, y).cpu().numpy()
    scale = max(float(C.max()), 1e-300)
    cost = ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), C / scale, numItermax=max(100_000, 50 * n * m))
    return math.sqrt(max(float(cost) * scale, 0.0))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Squared energy distance between two samples (V-statistic, in float64):

        D^2 = 2 mean_ij |x_i - y_j| - mean_ij |x_i - x_j| - mean_ij |y_i - y_j|  >= 0,

    which is zero in the population limit iff the two distributions are equal.
    """
    x = x.reshape(x.shape[0], -1).double().cpu()
    y = y.reshape(y.shape[0], -1).double().cpu()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)
