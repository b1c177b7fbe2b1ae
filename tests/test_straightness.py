"""Straightness probe against closed forms (constant, rotation and exponential fields)."""

import math

import pytest
import torch

from flowprobe.probes.straightness import straightness, straightness_from_trajectory
from flowprobe.solvers import integrate


def test_constant_field_is_straight():
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x0 = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = straightness(lambda t, x: c.expand_as(x), x0, "euler", 7)
    assert res.straightness == pytest.approx(0.0, abs=1e-24)
    assert res.transport_cost == pytest.approx(c.pow(2).sum().item(), rel=1e-12)
    assert res.kinetic_energy == pytest.approx(c.pow(2).sum().item(), rel=1e-12)
    assert res.path_length == pytest.approx(c.norm().item(), rel=1e-12)
    assert torch.allclose(res.x1, x0 + c)
    assert res.nfe == 7 + 8 and res.steps == 7


@pytest.mark.parametrize("omega", [math.pi / 2, math.pi, 2.5])
def test_rotation_field_closed_form(omega):
    # v = omega J x: x_t = R(omega t) x0, ||x1 - x0||^2 = 2 (1 - cos omega) r^2, ||v||^2 = omega^2 r^2,
    # S = int ||x1 - x0 - v||^2 dt = omega^2 r^2 - 2 (1 - cos omega) r^2 (as int v dt = x1 - x0).
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    x0 = torch.randn(20, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r2 = x0.pow(2).sum(1)
    res = straightness(lambda t, x: omega * x @ J.T, x0, "rk4", 400)
    cost = 2 * (1 - math.cos(omega)) * r2
    ke = omega ** 2 * r2
    assert torch.allclose(res.per_sample["transport_cost"], cost, rtol=1e-9)
    assert torch.allclose(res.per_sample["kinetic_energy"], ke, rtol=1e-9)
    # the trapezoid rule on the solver grid is second order: error ~ h^2 (measured 1.1e-5 at h = 1/400)
    err400 = ((res.per_sample["straightness"] - (ke - cost)) / (ke - cost)).abs().max().item()
    assert err400 < 3e-5
    coarse = straightness(lambda t, x: omega * x @ J.T, x0, "rk4", 100)
    err100 = ((coarse.per_sample["straightness"] - (ke - cost)) / (ke - cost)).abs().max().item()
    assert 12 < err100 / err400 < 20  # ratio 16 for a second-order rule
    assert torch.allclose(res.per_sample["path_length"], omega * r2.sqrt(), rtol=1e-9)
    assert res.straightness == pytest.approx((ke - cost).mean().item(), rel=3e-5)


def test_exponential_field_closed_form():
    # v = a x: x_t = x0 e^{a t}; S = r^2 [a (e^{2a} - 1) / 2 - (e^a - 1)^2]
    a = 0.8
    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r2 = x0.pow(2).sum(1)
    res = straightness(lambda t, x: a * x, x0, "rk4", 1000)
    expect = r2 * (a * (math.exp(2 * a) - 1) / 2 - (math.exp(a) - 1) ** 2)
    assert torch.allclose(res.per_sample["straightness"], expect, rtol=1e-5)
    assert torch.allclose(res.x1, x0 * math.exp(a), rtol=1e-10)


def test_from_trajectory_agrees_and_checks_shapes():
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def field(t, x):
        return torch.sin(3 * t)[:, None] * x + 1.0

    sol = integrate(field, x0, "rk4", 50, return_trajectory=True)
    a = straightness_from_trajectory(field, sol.trajectory, sol.times, chunk_size=2)
    b = straightness(field, x0, "rk4", 50)
    assert a.straightness == pytest.approx(b.straightness, rel=1e-12)
    with pytest.raises(ValueError, match="trajectory"):
        straightness_from_trajectory(field, sol.trajectory[:-1], sol.times)
    with pytest.raises(ValueError, match="fixed-step"):
        straightness(field, x0, "dopri5", 10)
