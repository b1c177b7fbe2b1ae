"""Straightness probe against closed forms (constant, rotation and exponential fields)."""

import math

import numpy as np
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


def _trapezoid_np(f, ts):
    """The trapezoid rule written out with numpy (independent of the probe's own quadrature)."""
    f, ts = np.asarray(f, dtype=np.float64), np.asarray(ts, dtype=np.float64)
    return float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(ts)))


@pytest.mark.parametrize("use_solver", [False, True])
def test_accelerating_straight_line_against_closed_form(use_solver):
    """x_t = x0 + t^2 d: straight in space but not at constant speed, v(t, x) = 2 t d. With r2 = ||d||^2,
    S = r2 int (1 - 2t)^2 dt = r2 / 3, KE = r2 int 4 t^2 dt = 4 r2 / 3, L = ||d|| int 2t dt = ||d||, C = r2; on the
    grid the trapezoid rule gives the numpy values below exactly (to rounding), the integrals to O(h^2).
    Given trajectories (with chunked field evaluation) and the RK4 solve (exact for this field) must agree."""
    d = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    r2 = float(d.pow(2).sum())
    x0 = torch.randn(7, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def field(t, x):
        return 2 * t[:, None] * d.expand_as(x)

    K = 40
    ts = torch.linspace(0, 1, K + 1, dtype=torch.float64)
    if use_solver:
        res = straightness(field, x0, "rk4", K)
        assert res.nfe == 4 * K + K + 1
    else:
        traj = x0[None] + ts[:, None, None] ** 2 * d
        res = straightness_from_trajectory(field, traj, ts, chunk_size=2)
    tn = ts.numpy()
    expect = {"straightness": r2 * _trapezoid_np((1 - 2 * tn) ** 2, tn),
              "kinetic_energy": r2 * _trapezoid_np(4 * tn ** 2, tn),
              "path_length": math.sqrt(r2) * _trapezoid_np(2 * tn, tn), "transport_cost": r2}
    for key, value in expect.items():
        torch.testing.assert_close(res.per_sample[key], torch.full((7,), value, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
        assert getattr(res, key) == pytest.approx(value, rel=1e-12)
    h2 = 1 / K ** 2
    assert res.straightness == pytest.approx(r2 / 3, abs=r2 * h2)
    assert res.kinetic_energy == pytest.approx(4 * r2 / 3, abs=r2 * h2)
    assert res.path_length == pytest.approx(math.sqrt(r2), rel=1e-12)  # linear integrand: trapezoid is exact
    torch.testing.assert_close(res.x1, x0 + d, rtol=1e-12, atol=1e-12)


def test_curved_trajectory_against_closed_form():
    """A circle at constant speed given as a trajectory (no solver): x_t = r (cos wt, sin wt), v = w J x.
    S = w^2 r^2 - 2 (1 - cos w) r^2, C = 2 (1 - cos w) r^2, KE = w^2 r^2, L = w r; the grid's trapezoid values are
    computed independently with numpy, and the closed forms hold to O(h^2)."""
    w, r = 2.0, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    K = 64
    ts = torch.linspace(0, 1, K + 1, dtype=torch.float64)
    traj = r[None, :, None] * torch.stack([torch.cos(w * ts), torch.sin(w * ts)], -1)[:, None, :]  # (K+1, 3, 2)
    res = straightness_from_trajectory(lambda t, x: w * x @ J.T, traj, ts, chunk_size=2)
    tn, rn = ts.numpy(), r.numpy()
    disp = np.array([np.cos(w) - 1, np.sin(w)])
    dev = np.stack([disp[0] + w * np.sin(w * tn), disp[1] - w * np.cos(w * tn)], 1)  # (x1 - x0) / r - v / r
    s_grid = np.array([ri ** 2 * _trapezoid_np((dev ** 2).sum(1), tn) for ri in rn])
    torch.testing.assert_close(res.per_sample["straightness"], torch.from_numpy(s_grid), rtol=1e-12, atol=0)
    closed = (w ** 2 - 2 * (1 - math.cos(w))) * r ** 2
    # quadrature error ~ h^2 (measured 1.6 h^2 relative)
    torch.testing.assert_close(res.per_sample["straightness"], closed, rtol=2 / K ** 2, atol=0)
    torch.testing.assert_close(res.per_sample["transport_cost"], 2 * (1 - math.cos(w)) * r ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.per_sample["kinetic_energy"], w ** 2 * r ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.per_sample["path_length"], w * r, rtol=1e-12, atol=0)
    assert res.straightness == pytest.approx(float(closed.mean()), rel=2 / K ** 2)


def test_shape_and_method_checks():
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def field(t, x):
        return torch.sin(3 * t)[:, None] * x + 1.0

    sol = integrate(field, x0, "rk4", 50, return_trajectory=True)
    with pytest.raises(ValueError, match="trajectory"):
        straightness_from_trajectory(field, sol.trajectory[:-1], sol.times)
    with pytest.raises(ValueError, match="fixed-step"):
        straightness(field, x0, "dopri5", 10)
