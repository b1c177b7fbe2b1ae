"""Couplings: exact OT equals brute force over permutations; pairings are permutations; draws are seeded."""

import itertools

import numpy as np
import pytest
import torch

from flowprobe.couplings import (FixedPairs, GaussianSampler, IndependentCoupling, MinibatchOTCoupling, Pairing,
                                 TensorSampler, ot_permutation, sinkhorn_pairing, squared_distances)


def brute_force_cost(C: np.ndarray) -> float:
    n = C.shape[0]
    return min(C[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("method", ["emd", "lsa"])
@pytest.mark.parametrize("seed", range(4))
def test_exact_ot_equals_brute_force(method, seed):
    g = torch.Generator().manual_seed(seed)
    n = 6
    x0, x1 = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g) + 1
    perm = ot_permutation(x0, x1, method)
    assert sorted(perm.tolist()) == list(range(n))  # a permutation: no duplicated pairs
    C = squared_distances(x0, x1).numpy()
    assert C[np.arange(n), perm.numpy()].sum() == pytest.approx(brute_force_cost(C), rel=1e-12)


def test_squared_distances_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    C = squared_distances(a, b)
    ref = torch.tensor([[((a[i] - b[j]) ** 2).sum().item() for j in range(4)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(C, ref)


def test_ot_pairs_sorted_1d_monotonically():
    # In 1-D the OT map between empirical measures is the monotone (sorted) matching.
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(64, 1, generator=g), torch.randn(64, 1, generator=g) * 2 + 5
    perm = ot_permutation(x0, x1, "emd")
    assert torch.equal(torch.argsort(x0[:, 0]).argsort(), torch.argsort(x1[perm, 0]).argsort())


def test_minibatch_ot_coupling_returns_consistent_indices():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(100, 2, generator=g) + 4
    c = MinibatchOTCoupling(GaussianSampler((2,)), TensorSampler(pool), method="exact")
    p = c.sample(32, torch.Generator().manual_seed(1))
    assert torch.equal(p.x1, pool[p.i1])
    assert len(set(p.i1.tolist())) == 32  # no target used twice
    # re-pairing lowers the total squared distance compared with the independent draw order
    q = IndependentCoupling(GaussianSampler((2,)), TensorSampler(pool)).sample(32, torch.Generator().manual_seed(1))
    assert torch.equal(q.x0, p.x0)
    assert ((p.x0 - p.x1) ** 2).sum() < ((q.x0 - q.x1) ** 2).sum()
    # same seed, same draw
    p2 = c.sample(32, torch.Generator().manual_seed(1))
    assert torch.equal(p.x1, p2.x1) and torch.equal(p.i1, p2.i1)


def test_sinkhorn_small_reg_recovers_exact_ot_and_large_reg_is_random():
    # Targets are a shuffled, slightly perturbed copy of the sources: the OT partner is unambiguous.
    g = torch.Generator().manual_seed(5)
    x0 = 3 * torch.randn(16, 2, generator=g)
    hidden = torch.randperm(16, generator=g)
    x1 = x0[hidden] + 0.01 * torch.randn(16, 2, generator=g)
    exact = ot_permutation(x0, x1, "lsa")
    assert torch.equal(hidden[exact], torch.arange(16))
    for s in range(5):
        j = sinkhorn_pairing(x0, x1, reg=1e-4, generator=torch.Generator().manual_seed(s))
        assert torch.equal(j, exact)
    # with a huge regulariser the plan is nearly uniform: partners look independent of the source
    hits = sum((sinkhorn_pairing(x0, x1, 1e3, torch.Generator().manual_seed(s)) == exact).sum().item()
               for s in range(20))
    assert hits / (20 * 16) < 0.2  # uniform would give 1/16


def test_fixed_pairs_and_swap():
    x0, x1 = torch.arange(10.0)[:, None], -torch.arange(10.0)[:, None]
    fp = FixedPairs(x0, x1)
    p = fp.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(p.x1, -p.x0) and torch.equal(p.i0, p.i1)
    s = p.swapped()
    assert torch.equal(s.x0, p.x1) and torch.equal(s.x1, p.x0)
    # the indices travel with their tensors: i0 names rows of the new source (the old target pool)
    q = Pairing(torch.zeros(3, 1), torch.ones(3, 1), torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9]))
    assert torch.equal(q.swapped().i0, torch.tensor([7, 8, 9])) and torch.equal(q.swapped().i1, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="rows"):
        FixedPairs(x0, x1[:3])
    with pytest.raises(ValueError, match="method"):
        MinibatchOTCoupling(GaussianSampler((1,)), GaussianSampler((1,)), method="greedy")
