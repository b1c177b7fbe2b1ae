"""The statistics the verdict rests on: proportions with intervals, the AUC of a score as a classifier, means.

- :func:`wilson_interval`: the Wilson score interval of a binomial proportion k / n (good down to small n and
  to proportions at 0 or 1, where the normal interval collapses to a point).
- :func:`newcombe_interval`: the interval of a difference of two independent proportions p1 - p2 from the two
  Wilson intervals (Newcombe 1998, method 10): [d - sqrt((p1 - l1)^2 + (u2 - p2)^2),
  d + sqrt((u1 - p1)^2 + (p2 - l2)^2)].
- :func:`auc`: the Mann-Whitney statistic U / (m n) = P(X > Y) + P(X = Y) / 2 for two samples x (m) and y (n),
  computed from mid-ranks, with the DeLong standard error (placements V10_i = P(x_i > Y) + P(x_i = Y) / 2,
  V01_j = P(X > y_j) + P(X = y_j) / 2; var = var(V10) / m + var(V01) / n).
- :func:`mean_se`: a mean and its standard error std / sqrt(n).
- :func:`normal_quantile`: z with P(N(0, 1) <= z) = p (for two-sided intervals at level 1 - alpha:
  z = normal_quantile(1 - alpha / 2), Bonferroni-corrected over K comparisons with alpha / K).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor

__all__ = ["wilson_interval", "newcombe_interval", "exact_greater_p", "auc", "auc_brute_force", "mean_se",
           "normal_quantile", "rms_norm", "Z95"]


def normal_quantile(p: float) -> float:
    """The standard normal quantile Phi^{-1}(p), 0 < p < 1."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    return NormalDist().inv_cdf(p)


#: z of a two-sided 95% interval
Z95 = normal_quantile(0.975)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k / n: (c -+ h) / (1 + z^2 / n) with c = p + z^2 / (2n) and
    h = z sqrt(p (1 - p) / n + z^2 / (4 n^2)). (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k}")
    p = k / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lower = 0.0 if k == 0 else max(0.0, (centre - half) / denom)  # exact at the ends (no rounding residue)
    upper = 1.0 if k == n else min(1.0, (centre + half) / denom)
    return lower, upper


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """(d, lower, upper) for d = k1 / n1 - k2 / n2, from the Wilson intervals of both proportions (Newcombe's
    hybrid score interval, method 10)."""
    p1 = k1 / n1 if n1 else 0.0
    p2 = k2 / n2 if n2 else 0.0
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, max(-1.0, lower), min(1.0, upper)


def rms_norm(x: Tensor) -> float:
    """The root-mean-square norm of the rows of ``x`` (N, ...): sqrt(mean_i ||x_i||^2), in float64 (the scale the
    transport and map checks' tolerances are fractions of)."""
    return math.sqrt(x.reshape(x.shape[0], -1).double().pow(2).sum(1).mean().item())


def exact_greater_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p-value of Fisher's exact test that the proportion k1 / n1 exceeds k2 / n2: P(X >= k1) for X
    hypergeometric (n1 draws from n1 + n2 items of which k1 + k2 are successes), in exact integer arithmetic."""
    if not (0 <= k1 <= n1 and 0 <= k2 <= n2) or n1 + n2 == 0:
        raise ValueError(f"need 0 <= k1 <= n1 and 0 <= k2 <= n2, got {k1}/{n1} and {k2}/{n2}")
    total, successes = n1 + n2, k1 + k2
    tail = sum(math.comb(successes, k) * math.comb(total - successes, n1 - k)
               for k in range(k1, min(n1, successes) + 1))
    return tail / math.comb(total, n1)


def _midranks(values: Tensor) -> Tensor:
    """Ranks 1..n of ``values`` (float64), ties sharing the mean of their ranks."""
    n = values.numel()
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    ranks_sorted = torch.arange(1, n + 1, dtype=torch.float64)
    # group equal values: each group gets the mean of its positions
    new_group = torch.ones(n, dtype=torch.bool)
    if n > 1:
        new_group[1:] = sorted_vals[1:] != sorted_vals[:-1]
    group = torch.cumsum(new_group.long(), 0) - 1
    n_groups = int(group[-1]) + 1 if n else 0
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, ranks_sorted)
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, torch.ones(n, dtype=torch.float64))
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (sums / counts)[group]
    return ranks


def auc(x: Tensor, y: Tensor) -> tuple[float, float]:
    """(AUC, DeLong standard error) of the score as a classifier of x against y:

        AUC = (1 / (m n)) sum_i sum_j [x_i > y_j] + [x_i = y_j] / 2 = U / (m n)       (Mann-Whitney)

    from mid-ranks of the pooled sample: U = R_x - m (m + 1) / 2 with R_x the rank sum of x. DeLong's
    placements V10_i = (R(x_i) - R_x(x_i)) / n (R: rank among all, R_x: rank among x) and
    V01_j = 1 - (R(y_j) - R_y(y_j)) / m give se^2 = var(V10) / m + var(V01) / n (0 when m or n is 1).
    Non-finite scores are not allowed (filter them first)."""
    x = torch.as_tensor(x).reshape(-1).double().cpu()
    y = torch.as_tensor(y).reshape(-1).double().cpu()
    m, n = x.numel(), y.numel()
    if m == 0 or n == 0:
        raise ValueError(f"auc needs both samples non-empty, got {m} and {n}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("auc: scores must be finite")
    ranks = _midranks(torch.cat([x, y]))
    r_x, r_y = ranks[:m], ranks[m:]
    u_stat = r_x.sum().item() - m * (m + 1) / 2
    value = u_stat / (m * n)
    v10 = (r_x - _midranks(x)) / n
    v01 = 1 - (r_y - _midranks(y)) / m
    var = (v10.var().item() / m if m > 1 else 0.0) + (v01.var().item() / n if n > 1 else 0.0)
    return value, math.sqrt(max(var, 0.0))


def auc_brute_force(x: Tensor, y: Tensor) -> float:
    """The AUC by its definition, over all m n pairs (the reference for :func:`auc` in the tests)."""
    x = torch.as_tensor(x).reshape(-1, 1).double()
    y = torch.as_tensor(y).reshape(1, -1).double()
    return ((x > y).double() + 0.5 * (x == y).double()).mean().item()


def mean_se(values: Tensor) -> tuple[float, float]:
    """(mean, standard error = std / sqrt(n)); the standard error is 0 for a single value."""
    v = torch.as_tensor(values).reshape(-1).double()
    if v.numel() == 0:
        return float("nan"), float("nan")
    se = v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else 0.0
    return v.mean().item(), se
