"""SDE sampling: the velocity-derived score against the Gaussian closed form, and Euler-Maruyama keeping the
ODE's marginals (checked against the closed-form moments of x_t, with a wrong-sign control that must fail)."""

import math

import pytest
import torch

from flowprobe.gaussian import IndependentGaussianCoupling, LinearGaussianCoupling
from flowprobe.paths import AffinePath, LinearPath, StochasticPath
from flowprobe.solvers import diffusion_schedule, integrate, integrate_sde, score_from_velocity, velocity_to_score

M1 = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
S1 = torch.tensor([[0.5, 0.2, 0.0], [0.2, 0.3, -0.05], [0.0, -0.05, 0.8]], dtype=torch.float64)


def cosine_path():
    h = math.pi / 2
    return AffinePath(lambda t: torch.cos(h * t), lambda t: torch.sin(h * t),
                      lambda t: -h * torch.sin(h * t), lambda t: h * torch.cos(h * t), name="cosine")


PATHS = {
    "linear": LinearPath,
    "constant-0.3": lambda: StochasticPath(0.3),
    "bridge-0.5": lambda: StochasticPath(0.5, "bridge"),
    "cosine": cosine_path,
}


@pytest.mark.parametrize("name", list(PATHS))
@pytest.mark.parametrize("source_std", [1.0, 0.7])
def test_velocity_score_equals_gaussian_score(name, source_std):
    """Tweedie through the velocity (independent Gaussian source) equals -C_xx^{-1}(x - E x_t) computed from the
    joint moments, at the source end, inside, and near the target end."""
    path = PATHS[name]()
    cpl = IndependentGaussianCoupling(M1, S1, S0=source_std ** 2 * torch.eye(3, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    for t in (0.0, 0.1, 0.5, 0.9, 0.99):
        x = 1.5 * torch.randn(64, 3, generator=g, dtype=torch.float64)
        tv = torch.full((64,), t, dtype=torch.float64)
        v = cpl.marginal_field(tv, x, path)
        got = velocity_to_score(v, tv, x, path, source_std)
        ref = cpl.marginal_score(tv, x, path)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=f"{name} t={t}")
    # the callable form evaluates the field once and gives the same numbers
    tv = torch.full((64,), 0.3, dtype=torch.float64)
    torch.testing.assert_close(score_from_velocity(cpl.field(path), path, source_std)(tv, x),
                               cpl.marginal_score(tv, x, path))


def test_velocity_score_needs_an_independent_source():
    """For a deterministic coupling (x1 = OT map of x0), x0 is not independent of x1 and the identity fails: the
    function documents this restriction, and this test shows it is a real one."""
    cpl = LinearGaussianCoupling.ot(M1, S1)
    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tv = torch.full((256,), 0.5, dtype=torch.float64)
    got = velocity_to_score(cpl.marginal_field(tv, x), tv, x)
    ref = cpl.marginal_score(tv, x)
    assert (got - ref).norm() / ref.norm() > 0.05


def _moments(x):
    m = x.mean(0)
    c = (x - m).T @ (x - m) / (x.shape[0] - 1)
    return m, c


def _source(n, seed, std=1.0):
    return std * torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sde_reaches_the_target_and_a_wrong_sign_does_not():
    """Linear path, exact marginal field and score, eps(t) = (1 - t): samples at t = 1 have the target's mean and
    covariance. Flipping the sign of the score correction (drift v - eps s) inflates the covariance."""
    cpl = IndependentGaussianCoupling(M1, S1)
    path = LinearPath()
    n, steps = 40000, 400
    eps = diffusion_schedule(1.0, "decay")
    res = integrate_sde(cpl.field(path), _source(n, 2), eps, torch.Generator().manual_seed(3), steps=steps,
                        path=path)
    m, c = _moments(res.x)
    assert (m - M1).abs().max() < 0.02, m
    assert (c - S1).abs().max() < 0.03, c
    assert res.nfe == steps and res.method == "euler_maruyama"

    def wrong(t, x):
        return -cpl.marginal_score(t, x, path)

    bad = integrate_sde(cpl.field(path), _source(n, 2), eps, torch.Generator().manual_seed(3), steps=steps,
                        score=wrong)
    _, cb = _moments(bad.x)
    assert (cb - S1).abs().max() > 0.2, cb
    assert bad.nfe == 2 * steps


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_sde_keeps_intermediate_marginals_on_a_noisy_path(direction):
    """Constant-noise path (sigma = 0.3), score derived from the velocity (no score callable), constant eps = 0.5:
    the distribution at the end time matches the closed-form C_xx there, in both directions of travel."""
    path = StochasticPath(0.3)
    cpl = IndependentGaussianCoupling(M1, S1)
    n = 40000
    t0, t1 = (0.0, 0.6) if direction == "forward" else (1.0, 0.2)
    start = cpl.moments(torch.tensor([t0]), path)
    x = start["mean_x"][0] + _source(n, 4) @ torch.linalg.cholesky(start["C_xx"][0]).T
    res = integrate_sde(cpl.field(path), x, 0.5, torch.Generator().manual_seed(5), steps=300, t0=t0, t1=t1,
                        path=path)
    end = cpl.moments(torch.tensor([t1]), path)
    m, c = _moments(res.x)
    assert (m - end["mean_x"][0]).abs().max() < 0.02
    assert (c - end["C_xx"][0]).abs().max() < 0.03, (c, end["C_xx"][0])
    # the noise changed the paths: the ODE from the same start ends elsewhere sample by sample
    ode = integrate(cpl.field(path), x, "euler", steps=300, t0=t0, t1=t1).x
    assert (ode - res.x).norm(dim=1).mean() > 0.3


def test_zero_diffusion_is_euler_and_seeds_repeat():
    cpl = IndependentGaussianCoupling(M1, S1)
    x = _source(100, 6)
    ode = integrate(cpl.field(), x, "euler", steps=20)
    sde = integrate_sde(cpl.field(), x, 0.0, torch.Generator().manual_seed(0), steps=20, return_trajectory=True)
    assert torch.equal(ode.x, sde.x) and sde.nfe == 20 and sde.trajectory.shape == (21, 100, 3)
    a = integrate_sde(cpl.field(), x, 0.3, torch.Generator().manual_seed(7), steps=20).x
    b = integrate_sde(cpl.field(), x, 0.3, torch.Generator().manual_seed(7), steps=20).x
    c = integrate_sde(cpl.field(), x, 0.3, torch.Generator().manual_seed(8), steps=20).x
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_score_skipped_where_diffusion_is_off():
    """Backward from t = 1 with eps (1 - t): eps = 0 at the first step, so the (singular) score is not called."""
    calls = []

    def score(t, x):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    res = integrate_sde(lambda t, x: torch.zeros_like(x), torch.zeros(4, 2), diffusion_schedule(0.5, "decay"),
                        torch.Generator().manual_seed(0), steps=4, t0=1.0, t1=0.0, score=score)
    assert calls == [0.75, 0.5, 0.25] and res.nfe == 4 + 3


def test_bad_arguments():
    g = torch.Generator().manual_seed(0)
    f = lambda t, x: x  # noqa: E731
    with pytest.raises(ValueError, match="diffusion"):
        diffusion_schedule(-1.0)
    with pytest.raises(ValueError, match="schedule"):
        diffusion_schedule(1.0, "cosine")
    with pytest.raises(ValueError, match="eps"):
        integrate_sde(f, torch.zeros(2, 2), lambda t: -1.0, g, steps=3)
    with pytest.raises(ValueError, match="steps or grid"):
        integrate_sde(f, torch.zeros(2, 2), 0.1, g)
    with pytest.raises(ValueError, match="source_std"):
        velocity_to_score(torch.zeros(2, 2), torch.zeros(2), torch.zeros(2, 2), source_std=0.0)
