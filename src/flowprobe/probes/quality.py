"""Sample quality: how a generated set Y = {y_j} (M samples) compares with a real set X = {x_i} (N samples).

Every statistic here is a function of two sets of vectors (flattened samples, or features of them); which space
(pixels, a user's feature map, Inception) is the caller's choice (:mod:`flowprobe.runs.quality`).

k-NN manifolds (Kynkaenniemi et al., 2019, "Improved precision and recall"; Naeem et al., 2020, "Reliable
fidelity and diversity metrics"). r_k(x_i) is the distance from x_i to its k-th nearest neighbour in X other than
itself (the (k + 1)-th smallest distance from x_i to X, itself included, as the reference implementations compute
it); likewise r_k(y_j) within Y. With B(c, r) the closed ball,

    precision = (1/M) sum_j 1[ exists i: y_j in B(x_i, r_k(x_i)) ]     generated samples on the real manifold
    recall    = (1/N) sum_i 1[ exists j: x_i in B(y_j, r_k(y_j)) ]     real samples on the generated manifold
    density   = (1/(k M)) sum_j sum_i 1[ y_j in B(x_i, r_k(x_i)) ]     (can exceed 1; ~1 for Y ~ X)
    coverage  = (1/N) sum_i 1[ min_j ||x_i - y_j|| <= r_k(x_i) ]        real balls that hold a generated sample

The radii come from :func:`flowprobe.probes.neighbours.nearest_neighbours` (chunked, exact distances). Ball
membership is decided on a chunked float32 matmul of centred vectors, ||a||^2 + ||b||^2 - 2 a.b, and every pair
whose squared distance lies within the rounding bound of the squared radius is decided again on the distance
recomputed directly in float64, ||y - x|| = sqrt(sum (y - x)^2), the same function that recomputes the radii: so
rounding never decides a pair, and an exact copy is inside every ball (distance 0).

Gaussian and kernel statistics of two feature sets (a: generated, b: real; n_a, n_b rows, d features):

- :func:`frechet_distance`: the Frechet distance of the Gaussians fitted to the two sets (Heusel et al., 2017;
  FID when the features are Inception's 2048 pool features), i.e. the squared 2-Wasserstein (Bures-Wasserstein)
  distance between N(mu_a, S_a) and N(mu_b, S_b),

      FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2}),

  with the sample means and the unbiased covariances (1/(n - 1), as numpy's ``cov``), in float64, computed by
  :func:`flowprobe.gaussian.bures_wasserstein_squared` (symmetric eigendecompositions, no non-symmetric sqrtm).
- :func:`kernel_inception_distance`: KID (Binkowski et al., 2018), the unbiased estimate of MMD^2 with the cubic
  polynomial kernel k(u, v) = (u.v / d + 1)^3, averaged over ``subsets`` random subsets of ``subset_size`` rows of
  each set (drawn without replacement within a subset), with the standard deviation of the subset estimates
  (population std, as torch-fidelity reports). On subsets U, V of size m,

      MMD^2_u = sum_{i != j} k(u_i, u_j) / (m (m - 1)) + sum_{i != j} k(v_i, v_j) / (m (m - 1))
                - 2 sum_{i, j} k(u_i, v_j) / m^2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gaussian import bures_wasserstein_squared
from .neighbours import nearest_neighbours

__all__ = ["knn_radii", "ball_membership", "precision_recall_density_coverage", "feature_statistics",
           "frechet_distance", "polynomial_kernel", "kernel_inception_distance", "QUALITY_K"]

#: Default neighbourhood size of the k-NN manifolds (Naeem et al. recommend k = 5).
QUALITY_K = 5


def _flat64(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def _direct_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_r - b_r|| row by row (float64, direct differences: no cancellation)."""
    return torch.linalg.vector_norm(a - b, dim=1)


def knn_radii(x: Tensor, k: int = QUALITY_K, chunk_size: int = 4096) -> Tensor:
    """r_k(x_i): the distance from each row of ``x`` to its k-th nearest other row (float64, (N,)).

    Found with :func:`~flowprobe.probes.neighbours.nearest_neighbours` (k + 1 neighbours, the point itself
    among them) and recomputed directly in float64 for the (k + 1)-th."""
    flat = _flat64(x)
    if not 1 <= k < flat.shape[0]:
        raise ValueError(f"k must be in [1, {flat.shape[0] - 1}] (the set size - 1), got {k}")
    _, idx = nearest_neighbours(flat, flat, k + 1, chunk_size)
    return _direct_distances(flat, flat[idx[:, k]])


def ball_membership(queries: Tensor, centres: Tensor, radii: Tensor, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Which queries lie in which balls B(centres_i, radii_i) (closed): returns (per query: how many balls hold it,
    int64 (Q,); per centre: whether its ball holds at least one query, bool (C,)). Module docstring: float32
    matmul, pairs near a boundary decided on direct float64 distances."""
    q64, c64 = _flat64(queries), _flat64(centres).to(queries.device)
    r64 = radii.double().to(queries.device)
    if c64.shape[0] != r64.shape[0] or q64.shape[1] != c64.shape[1]:
        raise ValueError(f"shapes: {tuple(q64.shape)} queries, {tuple(c64.shape)} centres, {tuple(r64.shape)} radii")
    mean = c64.mean(0)
    q32, c32 = (q64 - mean).float(), (c64 - mean).float()
    q_norm, c_norm = torch.linalg.vector_norm(q32, dim=1), torch.linalg.vector_norm(c32, dim=1)
    c_sq, r_sq = c_norm.pow(2), r64.pow(2).float()
    # rounding of the centred rows and of r^2 to float32, and of the length-(d + 2) sums (Higham & Mary, 2019,
    # lambda = 8): |sq - ||q - c||^2| <= (8 sqrt(d + 2) + 4) u (||q|| + ||c||)^2, |r_sq - r^2| <= u r^2
    u = torch.finfo(torch.float32).eps / 2
    scale = (8 * math.sqrt(q64.shape[1] + 2) + 4) * u
    counts = torch.zeros(q64.shape[0], dtype=torch.int64, device=q64.device)
    hit = torch.zeros(c64.shape[0], dtype=torch.bool, device=q64.device)
    for s in range(0, q64.shape[0], chunk_size):
        qc = q32[s:s + chunk_size]
        sq = torch.addmm(c_sq[None, :] + q_norm[s:s + chunk_size, None].pow(2), qc, c32.T, alpha=-2)
        err = scale * (q_norm[s:s + chunk_size, None] + c_norm[None, :]).pow(2) + 2 * u * r_sq[None, :]
        inside = sq <= r_sq[None, :] - err
        rows, cols = ((sq - r_sq[None, :]).abs() <= err).nonzero(as_tuple=True)
        if rows.numel():
            exact = _direct_distances(q64[s + rows], c64[cols]) <= r64[cols]
            inside[rows, cols] = exact
        counts[s:s + chunk_size] = inside.sum(1)
        hit |= inside.any(0)
    return counts, hit


def precision_recall_density_coverage(generated: Tensor, real: Tensor, k: int = QUALITY_K,
                                      chunk_size: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkaenniemi et al., 2019), density and coverage (Naeem et al., 2020) of
    ``generated`` (M, ...) against ``real`` (N, ...), flattened, with k-NN balls (module docstring). Both sets need
    more than k samples."""
    gen, ref = _flat64(generated), _flat64(real).to(generated.device)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"generated and real samples differ in size: {gen.shape[1]} vs {ref.shape[1]} values")
    if min(gen.shape[0], ref.shape[0]) <= k:
        raise ValueError(f"need more than k = {k} samples in each set, got {gen.shape[0]} generated, "
                         f"{ref.shape[0]} real")
    r_real, r_gen = knn_radii(ref, k), knn_radii(gen, k)
    counts, covered = ball_membership(gen, ref, r_real, chunk_size)
    reached, _ = ball_membership(ref, gen, r_gen, chunk_size)
    return {"precision": (counts > 0).double().mean().item(), "recall": (reached > 0).double().mean().item(),
            "density": counts.double().sum().item() / (k * gen.shape[0]),
            "coverage": covered.double().mean().item()}


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, covariance) of the rows of ``features`` (n, d), float64; the covariance is the unbiased one,
    (F - mean)^T (F - mean) / (n - 1), numpy's ``cov(rowvar=False)``."""
    f = _flat64(features)
    if f.shape[0] < 2:
        raise ValueError(f"need at least two samples for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """The Frechet distance between the Gaussian fits of two feature sets (FID for Inception pool features):
    :func:`flowprobe.gaussian.bures_wasserstein_squared` of their :func:`feature_statistics` (module docstring)."""
    if _flat64(feat_a).shape[1] != _flat64(feat_b).shape[1]:
        raise ValueError(f"feature sizes differ: {tuple(feat_a.shape[1:])} vs {tuple(feat_b.shape[1:])}")
    mu_a, cov_a = feature_statistics(feat_a)
    mu_b, cov_b = feature_statistics(feat_b.to(feat_a.device))
    return float(bures_wasserstein_squared(mu_a, cov_a, mu_b, cov_b))


def polynomial_kernel(u: Tensor, v: Tensor) -> Tensor:
    """K[i, j] = (u_i . v_j / d + 1)^3, the KID kernel (d: the number of features)."""
    return (u @ v.T / u.shape[1] + 1).pow(3)


def _unbiased_mmd2(u: Tensor, v: Tensor) -> float:
    m = u.shape[0]
    kuu, kvv, kuv = polynomial_kernel(u, u), polynomial_kernel(v, v), polynomial_kernel(u, v)
    within = (kuu.sum() - kuu.diagonal().sum() + kvv.sum() - kvv.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kuv.sum() / (m * m))


def kernel_inception_distance(feat_a: Tensor, feat_b: Tensor, subsets: int = 100, subset_size: int = 1000,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID of two feature sets: (mean, std) over ``subsets`` subset estimates of the unbiased MMD^2 with the cubic
    polynomial kernel (module docstring). Each subset draws ``subset_size`` rows of each set without replacement
    (torch.randperm on ``generator``, a CPU generator); ``subset_size`` must not exceed either set."""
    a, b = _flat64(feat_a), _flat64(feat_b).to(feat_a.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1 or not 2 <= subset_size <= min(a.shape[0], b.shape[0]):
        raise ValueError(f"need subsets >= 1 and 2 <= subset_size <= {min(a.shape[0], b.shape[0])} (the smaller "
                         f"set), got subsets={subsets}, subset_size={subset_size}")
    estimates = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=generator)[:subset_size].to(a.device)
        ib = torch.randperm(b.shape[0], generator=generator)[:subset_size].to(a.device)
        estimates.append(_unbiased_mmd2(a[ia], b[ib]))
    values = torch.tensor(estimates, dtype=torch.float64)
    return values.mean().item(), values.std(correction=0).item()
