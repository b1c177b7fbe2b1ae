"""Solver-consistency probe: smooth fields agree across solvers, the singular antipodal field and a sharp-layer
field do not."""

import math

import pytest
import torch

from flowprobe.gaussian import LinearGaussianCoupling
from flowprobe.paths import StochasticPath
from flowprobe.probes.consistency import (agreement_fraction, endpoint_distance, endpoint_gaps, parse_solver,
                                          solver_agreement)

F64 = torch.float64
MU = torch.tensor([5.0, 5.0], dtype=F64)


def x0(n=500, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_parse_solver():
    assert parse_solver(("rk4", 11)) == ("rk4", 11)
    assert parse_solver("euler:3") == ("euler", 3)
    assert parse_solver("dopri5") == ("dopri5", None)
    for bad in ("rk5:3", ("rk4", 0), ("euler", None), "rk4", 7):
        with pytest.raises(ValueError):
            parse_solver(bad)


def test_endpoint_distance_and_fraction():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [float("nan"), 0.0], [0.0, 0.0]], dtype=F64)
    b = torch.tensor([[0.3, 0.4], [1.0, 0.6], [0.0, 0.0], [float("inf"), 0.0]], dtype=F64)
    d = endpoint_distance(a, b)
    torch.testing.assert_close(d[:2], torch.tensor([0.5, 0.6], dtype=F64))
    assert math.isinf(d[2]) and math.isinf(d[3])
    assert agreement_fraction(a, b, tol=0.55) == 0.25  # non-finite endpoints never agree
    assert agreement_fraction(a, b, tol=0.61) == 0.5
    with pytest.raises(ValueError):
        agreement_fraction(a, b, tol=0.0)


def test_smooth_field_agrees():
    """The noisy antipodal field is smooth: RK4-11 and RK4-101 both give (nearly) the OT map."""
    field = LinearGaussianCoupling.antipodal(MU).field(StochasticPath(0.2))
    assert solver_agreement(field, x0(), ("rk4", 11), ("rk4", 101), tol=0.5) == 1.0
    gap, xa, xb = endpoint_gaps(field, x0(), "rk4:11", "rk4:101")
    assert gap.max() < 0.5 and torch.isfinite(xa).all()
    # the rotation field of a linear coupling (straight lines) agrees to rounding error
    rot = LinearGaussianCoupling.rotated_ot(MU, torch.eye(2, dtype=F64), 120.0).field()
    gap, _, _ = endpoint_gaps(rot, x0(), ("euler", 3), ("rk4", 50))
    assert gap.max() < 1e-9


def test_singular_field_disagrees():
    """The exact sigma=0 antipodal field: Euler grids that skip t = 1/2 memorise; RK4 hits t = 1/2 and fails; a grid
    that lands just beside 1/2 (Euler 11 vs Euler on a shifted grid) still memorises, so these two agree."""
    field = LinearGaussianCoupling.antipodal(MU).field()
    assert solver_agreement(field, x0(), ("euler", 11), ("rk4", 101)) == 0.0
    assert solver_agreement(field, x0(), ("euler", 11), ("euler", 101)) == 1.0


def test_sharp_layer_field_depends_on_step_size():
    """A smoothed antipodal field with a thin layer (noise 0.02): Euler 3 memorises, RK4 500 gives OT; the probe
    sees the disagreement, and a smooth (sigma = 0.5) version of the same field does not show it."""
    sharp = LinearGaussianCoupling.antipodal(MU).field(StochasticPath(0.02))
    smooth = LinearGaussianCoupling.antipodal(MU).field(StochasticPath(0.5))
    assert solver_agreement(sharp, x0(), ("euler", 3), ("rk4", 500)) < 0.05
    assert solver_agreement(smooth, x0(), ("rk4", 5), ("rk4", 100)) == 1.0
