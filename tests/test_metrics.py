"""MMD^2 and W2 against brute force and closed forms."""

import math

import numpy as np
import pytest
import torch

from flowprobe.couplings import ot_permutation
from flowprobe.metrics import gaussian_kernel, median_bandwidth, mmd2, pairwise_sq_dists, wasserstein2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_mmd_matches_brute_force_sums():
    x = torch.randn(7, 3, generator=_gen(0), dtype=torch.float64)
    y = torch.randn(5, 3, generator=_gen(1), dtype=torch.float64) + 0.5
    h = 1.3

    def k(a, b):
        return math.exp(-((a - b) ** 2).sum().item() / (2 * h * h))

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    unb = kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)
    bia = (kxx + n) / n ** 2 + (kyy + m) / m ** 2 - 2 * kxy / (n * m)
    assert mmd2(x, y, h) == pytest.approx(unb, abs=1e-12)
    assert mmd2(x, y, h, unbiased=False) == pytest.approx(bia, abs=1e-12)
    assert mmd2(x, y, h, chunk_size=2) == pytest.approx(unb, abs=1e-12)  # chunking changes nothing


def test_mmd_gaussian_closed_form():
    # x ~ N(0, s^2 I), y ~ N(delta, s^2 I), kernel bandwidth h:
    # E k = (h^2 / (h^2 + 2 s^2))^(d/2) exp(-||mean diff||^2 / (2 (h^2 + 2 s^2)))
    d, s, h = 2, 1.0, 1.5
    delta = torch.tensor([1.0, 0.5], dtype=torch.float64)
    c = (h * h / (h * h + 2 * s * s)) ** (d / 2)
    expect = 2 * c * (1 - math.exp(-delta.pow(2).sum().item() / (2 * (h * h + 2 * s * s))))
    vals = []
    for seed in range(4):
        x = torch.randn(3000, d, generator=_gen(2 * seed), dtype=torch.float64)
        y = torch.randn(3000, d, generator=_gen(2 * seed + 1), dtype=torch.float64) + delta
        vals.append(mmd2(x, y, h))
    assert np.mean(vals) == pytest.approx(expect, rel=0.03)


def test_unbiased_mmd_is_centred_for_equal_distributions_and_biased_is_not():
    unb, bia = [], []
    for seed in range(40):
        x = torch.randn(60, 2, generator=_gen(100 + seed), dtype=torch.float64)
        y = torch.randn(60, 2, generator=_gen(200 + seed), dtype=torch.float64)
        unb.append(mmd2(x, y, 1.0))
        bia.append(mmd2(x, y, 1.0, unbiased=False))
    unb, bia = np.array(unb), np.array(bia)
    assert abs(unb.mean()) < 3 * unb.std() / math.sqrt(len(unb))
    assert (bia > 0).all() and bia.mean() > 5 * unb.std() / math.sqrt(len(unb))


def test_median_bandwidth_and_kernel():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0]])
    assert median_bandwidth(x, y) == pytest.approx(2.0)  # distances 1, 3, 2
    K = gaussian_kernel(x, y, 2.0)
    assert torch.allclose(K, torch.tensor([[math.exp(-9 / 8)], [math.exp(-4 / 8)]], dtype=torch.float64))
    with pytest.raises(ValueError, match="identical"):
        median_bandwidth(torch.zeros(3, 2), torch.zeros(3, 2))
    assert torch.allclose(pairwise_sq_dists(x, y), torch.tensor([[9.0], [4.0]], dtype=torch.float64))


def test_wasserstein2_closed_forms():
    # 1-D: the sorted (monotone) coupling is optimal
    x = torch.randn(50, 1, generator=_gen(0), dtype=torch.float64)
    y = torch.randn(50, 1, generator=_gen(1), dtype=torch.float64) * 2 + 1
    expect = (x.sort(0).values - y.sort(0).values).pow(2).mean().sqrt().item()
    assert wasserstein2(x, y) == pytest.approx(expect, rel=1e-9)
    # translation: W2(mu, mu + c) = ||c||
    z = torch.randn(40, 3, generator=_gen(2), dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert wasserstein2(z, z + c) == pytest.approx(c.norm().item(), rel=1e-9)
    # equal sizes: agrees with the exact assignment (scipy)
    a = torch.randn(64, 4, generator=_gen(3), dtype=torch.float64)
    b = torch.randn(64, 4, generator=_gen(4), dtype=torch.float64) + 1
    perm = ot_permutation(a, b, "lsa")
    assert wasserstein2(a, b) == pytest.approx((a - b[perm]).pow(2).sum(1).mean().sqrt().item(), rel=1e-9)
    # unequal sizes: one point against two
    assert wasserstein2(torch.zeros(1, 1), torch.tensor([[1.0], [3.0]])) == pytest.approx(math.sqrt(5.0))
    with pytest.raises(ValueError, match="max_points"):
        wasserstein2(a, b, max_points=10)
