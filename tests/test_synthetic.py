"""Synthetic samplers: shapes, reproducibility, moments against closed forms, log density by brute force."""

import math

import pytest
import torch

from flowprobe.couplings import IndependentCoupling, GaussianSampler
from flowprobe.data.synthetic import GaussianMixture, low_variance_mixture, random_gmm, shifted_gaussian


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sample_protocol_and_reproducibility():
    gmm = random_gmm(5, 8, 3.0, 0.3, generator=_gen(1))
    x, idx = gmm.sample(100, _gen(2))
    assert x.shape == (100, 5) and x.dtype == torch.float32
    assert torch.equal(idx, torch.arange(100))
    x2, _ = gmm.sample(100, _gen(2))
    assert torch.equal(x, x2)
    x3, _ = gmm.sample(100, _gen(3))
    assert not torch.equal(x, x3)
    xl, k = gmm.sample_labeled(100, _gen(2))
    assert torch.equal(xl, x) and k.min() >= 0 and k.max() < 8
    # usable inside a coupling
    p = IndependentCoupling(GaussianSampler((5,)), gmm).sample(16, _gen(0))
    assert p.x0.shape == p.x1.shape == (16, 5)


def test_components_have_the_stated_std_and_weights():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, -10.0]])
    gmm = GaussianMixture(means, std=torch.tensor([0.5, 1.0, 2.0]), weights=torch.tensor([1.0, 2.0, 1.0]))
    x, k = gmm.sample_labeled(40_000, _gen(0))
    freq = torch.bincount(k, minlength=3).double() / k.numel()
    assert torch.allclose(freq, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64), atol=0.015)
    for j, s in enumerate([0.5, 1.0, 2.0]):
        r = x[k == j] - means[j]
        assert abs(r.std().item() / s - 1) < 0.03
        assert r.mean(0).abs().max().item() < 4 * s / math.sqrt(r.shape[0])


def test_mean_and_covariance_match_samples():
    gmm = random_gmm(3, 4, 2.0, 0.5, generator=_gen(5))
    x, _ = gmm.sample(200_000, _gen(6))
    x = x.double()
    assert torch.allclose(x.mean(0), gmm.mean().double(), atol=0.03)
    emp = torch.cov(x.T)
    assert torch.allclose(emp, gmm.covariance().double(), atol=0.05 * gmm.covariance().abs().max().item())


def test_log_prob_matches_brute_force_mixture_density():
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    gmm = GaussianMixture(means, std=torch.tensor([0.7, 1.3]), weights=torch.tensor([0.3, 0.7]),
                          dtype=torch.float64)
    x = torch.tensor([[0.1, 0.2], [3.0, -2.0], [-1.0, 5.0]], dtype=torch.float64)
    expect = []
    for xi in x:
        p = 0.0
        for w, m, s in ((0.3, means[0], 0.7), (0.7, means[1], 1.3)):
            p += w * math.exp(-((xi - m) ** 2).sum().item() / (2 * s * s)) / (2 * math.pi * s * s)
        expect.append(math.log(p))
    assert torch.allclose(gmm.log_prob(x), torch.tensor(expect, dtype=torch.float64), atol=1e-12)


def test_low_variance_mixture_per_dimension_variance():
    # E over C of the per-dimension variance: scale^2 (1 - 1/K) + noise^2
    for scale, noise, expect in ((0.3, 0.1, 0.09 * 7 / 8 + 0.01), (0.5, 0.3, 0.25 * 7 / 8 + 0.09)):
        vals = [low_variance_mixture(16, 8, scale, noise, generator=_gen(s)).covariance().trace().item() / 16
                for s in range(40)]
        assert abs(sum(vals) / len(vals) - expect) < 0.1 * expect


def test_shifted_gaussian_moments():
    s = shifted_gaussian(4, mean=3.0, std=2.0)
    x, _ = s.sample(50_000, _gen(0))
    assert torch.allclose(x.mean(0), torch.full((4,), 3.0), atol=0.05)
    assert torch.allclose(x.std(0), torch.full((4,), 2.0), atol=0.05)


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3))
    with pytest.raises(ValueError, match="std"):
        GaussianMixture(torch.zeros(2, 2), std=-1.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), weights=torch.tensor([1.0, -1.0]))
