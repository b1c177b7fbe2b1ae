"""Bellman-optimal step schedules: the dynamic programme against brute force, and what the chosen grid buys on a
Gaussian flow whose end point is known in closed form."""

import itertools

import pytest
import torch

from flowprobe.gaussian import IndependentGaussianCoupling
from flowprobe.solvers import best_path, integrate, local_error_matrix, optimal_schedule, time_grid

F64 = torch.float64
# a narrow target: the marginal field bends the paths late, so where the steps go matters
CPL = IndependentGaussianCoupling(torch.tensor([2.0, -1.0], dtype=F64),
                                  torch.tensor([[0.05, 0.02], [0.02, 0.03]], dtype=F64))


def _x(n, seed):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_local_errors_match_a_direct_computation():
    x = _x(16, 0)
    cand = time_grid(4)
    err, nfe = local_error_matrix(CPL.field(), x, cand, reference_steps_per_interval=32)
    assert nfe == 4 + 4 * 32 * 4  # one field evaluation per candidate, RK4 in between
    zeros = torch.zeros(16, dtype=F64)
    for i, j in ((0, 1), (0, 4), (1, 3), (2, 4)):
        xi = CPL.flow_map(zeros, x, torch.full((16,), float(cand[i]), dtype=F64))
        xj = CPL.flow_map(zeros, x, torch.full((16,), float(cand[j]), dtype=F64))
        h = float(cand[j] - cand[i])
        step = xi + h * CPL.marginal_field(torch.full((16,), float(cand[i]), dtype=F64), xi)
        assert err[i, j].item() == pytest.approx((xj - step).pow(2).sum(1).mean().item(), rel=1e-6)
    assert torch.isinf(err[2, 1]) and torch.isinf(err[3, 3])


def test_dynamic_programme_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    n = 9
    cost = torch.rand(n, n, generator=g, dtype=F64)
    cost = torch.where(torch.ones(n, n, dtype=torch.bool).triu(1), cost, torch.full_like(cost, float("inf")))
    for k in range(1, n):
        path, total = best_path(cost, k)
        assert path[0] == 0 and path[-1] == n - 1 and len(path) == k + 1 and path == sorted(set(path))
        assert total == pytest.approx(sum(cost[a, b].item() for a, b in zip(path, path[1:])))
        brute = min(sum(cost[a, b].item() for a, b in zip((0,) + c, c + (n - 1,)))
                    for c in itertools.combinations(range(1, n - 1), k - 1))
        assert total == pytest.approx(brute)
    with pytest.raises(ValueError, match="steps"):
        best_path(cost, n)


def test_optimal_schedule_beats_uniform_on_a_gaussian_flow():
    """Chosen on 512 samples, checked on 2000 others against the exact end point Phi_{0->1}."""
    x_fit, x_eval = _x(512, 2), _x(2000, 3)
    exact = CPL.flow_map(torch.zeros(2000, dtype=F64), x_eval, torch.ones(2000, dtype=F64))
    for k in (2, 4, 8):
        sched = optimal_schedule(CPL.field(), x_fit, k, candidates=64)
        assert sched.grid.shape == (k + 1,) and sched.grid[0] == 0 and sched.grid[-1] == 1

        def error(grid):
            return (integrate(CPL.field(), x_eval, "euler", grid=grid).x - exact).norm(dim=1).mean().item()

        uniform = error(time_grid(k))
        # the summed local error it minimises is at most the uniform grid's (a candidate path) ...
        err, _ = local_error_matrix(CPL.field(), x_fit, sched.candidates)
        idx = [round(v * 64) for v in time_grid(k).tolist()]
        assert sched.local_error <= sum(err[a, b].item() for a, b in zip(idx, idx[1:])) + 1e-12
        # ... and on held-out samples the end point error drops by at least a quarter
        assert error(sched.grid) < 0.75 * uniform, (k, error(sched.grid), uniform)
