"""Solvers: measured convergence orders, NFE counts, backward integration, trajectories, dopri5."""

import math

import pytest
import torch

from flowprobe.solvers import ORDERS, integrate, time_grid


def field(t, x):
    """dx/dt = cos(t) x + t: a non-autonomous linear ODE."""
    return torch.cos(t)[:, None] * x + t[:, None]


def exact(x0, t0, t1, n=20001):
    # x(t) = e^{sin t} (x0 e^{-sin t0} + int_{t0}^{t} s e^{-sin s} ds); the integral by a fine Simpson rule.
    s = torch.linspace(t0, t1, n, dtype=torch.float64)
    f = s * torch.exp(-torch.sin(s))
    h = (t1 - t0) / (n - 1)
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return math.exp(math.sin(t1)) * (x0 * math.exp(-math.sin(t0)) + integral)


@pytest.mark.parametrize("method", list(ORDERS))
@pytest.mark.parametrize("direction", [(0.0, 2.0), (2.0, 0.0)])
def test_convergence_order(method, direction):
    t0, t1 = direction
    x0 = torch.tensor([[0.7], [-1.3]], dtype=torch.float64)
    ref = torch.stack([exact(x.item(), t0, t1) for x in x0[:, 0]])[:, None]
    errs = [(integrate(field, x0, method, steps=n, t0=t0, t1=t1).x - ref).abs().max().item() for n in (16, 32, 64)]
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    for o in orders:
        assert abs(o - ORDERS[method]) < 0.25, (method, errs, orders)


def test_nfe_and_trajectory():
    x0 = torch.zeros(3, 2)
    r = integrate(lambda t, x: torch.ones_like(x), x0, "rk4", steps=5, return_trajectory=True)
    assert r.nfe == 20 and r.trajectory.shape == (6, 3, 2)
    torch.testing.assert_close(r.trajectory[:, 0, 0], torch.linspace(0, 1, 6))
    assert integrate(lambda t, x: x, x0, "heun", steps=7).nfe == 14
    assert integrate(lambda t, x: x, x0, "euler", steps=7).nfe == 7


def test_forward_then_backward_returns_start():
    x0 = torch.randn(4, 2, dtype=torch.float64)
    x1 = integrate(field, x0, "rk4", steps=200).x
    back = integrate(field, x1, "rk4", steps=200, t0=1.0, t1=0.0).x
    torch.testing.assert_close(back, x0, atol=1e-9, rtol=0)


def test_dopri5_accuracy_and_counted_nfe():
    x0 = torch.tensor([[0.5]], dtype=torch.float64)
    r = integrate(field, x0, "dopri5", t0=0.0, t1=2.0, atol=1e-10, rtol=1e-10)
    assert abs(r.x.item() - exact(0.5, 0.0, 2.0).item()) < 1e-7
    assert r.nfe > 6


def test_grids_and_errors():
    g = time_grid(4, schedule="cosine")
    assert g[0] == 0 and g[-1] == 1 and (g[1] - g[0]) < (g[2] - g[1])
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="method"):
        integrate(field, torch.zeros(1, 1), "rk45", steps=3)
    with pytest.raises(ValueError, match="monotone"):
        integrate(field, torch.zeros(1, 1), "euler", grid=torch.tensor([0.0, 0.5, 0.2]))
    # an explicit non-uniform grid that skips t = 1/2 is honoured exactly
    seen = []
    integrate(lambda t, x: (seen.append(t[0].item()), x)[1], torch.zeros(1, 1), "euler",
              grid=torch.tensor([0.0, 0.3, 0.7, 1.0]))
    assert seen == pytest.approx([0.0, 0.3, 0.7])
