"""Interpolants: u_t is the time derivative of x_t, dtypes are kept, and x_t, u_t match torchcfm."""

import pytest
import torch

from flowprobe.paths import AffinePath, LinearPath, StochasticPath, make_path


def cosine_path():
    half_pi = torch.pi / 2
    return AffinePath(a=lambda t: torch.cos(half_pi * t), b=lambda t: torch.sin(half_pi * t),
                      da=lambda t: -half_pi * torch.sin(half_pi * t), db=lambda t: half_pi * torch.cos(half_pi * t),
                      name="cosine")


PATHS = [LinearPath(), StochasticPath(0.3, "constant"), StochasticPath(0.3, "bridge"), cosine_path(),
         AffinePath(a=lambda t: 1 - t, b=lambda t: t, da=lambda t: -torch.ones_like(t), db=lambda t: torch.ones_like(t),
                    g=lambda t: 0.2 * t * (1 - t), dg=lambda t: 0.2 * (1 - 2 * t))]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: str(p.describe()))
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3, 3)])
def test_target_is_time_derivative(path, shape):
    g = torch.Generator().manual_seed(0)
    x0, x1, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.9 + 0.05
    t.requires_grad_(True)
    x_t, u_t = path.sample(x0, x1, t, z)
    # d x_t[i] / d t[i] via autograd, one sample at a time (each x_t[i] depends on t[i] only).
    jac = torch.autograd.functional.jacobian(lambda tt: path.sample(x0, x1, tt, z)[0].sum(0), t.detach())
    # jac[..., i] = d sum_j x_t[j] / d t[i] = d x_t[i] / d t[i]
    dxdt = jac.movedim(-1, 0)
    assert x_t.dtype == torch.float64 and u_t.dtype == torch.float64
    torch.testing.assert_close(dxdt, u_t.detach(), rtol=1e-10, atol=1e-10)


def test_endpoints_and_dtype():
    x0, x1 = torch.randn(3, 4), torch.randn(3, 4)
    p = LinearPath()
    xt0, _ = p.sample(x0, x1, torch.zeros(3))
    xt1, u = p.sample(x0, x1, torch.ones(3))
    torch.testing.assert_close(xt0, x0)
    torch.testing.assert_close(xt1, x1)
    torch.testing.assert_close(u, x1 - x0)
    assert p.sample(x0.half(), x1.half(), torch.rand(3))[0].dtype == torch.float16


def test_bridge_vanishes_at_endpoints_and_clips_derivative():
    p = StochasticPath(0.5, "bridge", t_clip=1e-3)
    assert p.g(torch.tensor([0.0, 1.0])).abs().max() == 0
    dg = p.dg(torch.tensor([0.0, 1e-3]))
    assert torch.isfinite(dg).all() and dg[0] == dg[1]
    assert p.time_range == (1e-3, 1 - 1e-3)


def test_errors():
    with pytest.raises(ValueError, match="sigma"):
        StochasticPath(-1.0)
    with pytest.raises(ValueError, match="schedule"):
        StochasticPath(0.1, "cosine")
    with pytest.raises(ValueError, match="pass z"):
        StochasticPath(0.1).sample(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        LinearPath().sample(torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        LinearPath().sample(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3))
    assert isinstance(make_path(0.0), LinearPath)
    assert isinstance(make_path(0.1, "bridge"), StochasticPath)


@pytest.mark.parametrize("sigma", [0.0, 0.1, 0.5])
def test_constant_sigma_matches_torchcfm(sigma):
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    g = torch.Generator().manual_seed(1)
    x0, x1, z = (torch.randn(16, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.rand(16, generator=g)
    theirs = cfm.ConditionalFlowMatcher(sigma=sigma)
    xt_ref = theirs.sample_xt(x0, x1, t, z)
    ut_ref = theirs.compute_conditional_flow(x0, x1, t, xt_ref)
    xt, ut = make_path(sigma).sample(x0, x1, t, z)
    torch.testing.assert_close(xt, xt_ref)
    torch.testing.assert_close(ut, ut_ref)


@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_bridge_matches_torchcfm(sigma):
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    pytest.importorskip("ot")
    g = torch.Generator().manual_seed(2)
    x0, x1, z = (torch.randn(16, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.98 + 0.01
    theirs = cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=sigma)
    xt_ref = theirs.sample_xt(x0, x1, t, z)
    ut_ref = theirs.compute_conditional_flow(x0, x1, t, xt_ref)
    xt, ut = StochasticPath(sigma, "bridge").sample(x0, x1, t, z)
    torch.testing.assert_close(xt, xt_ref)
    # torchcfm divides by 2 t (1 - t) + 1e-8; that regulariser alone moves the noise term by a relative
    # 1e-8 / (2 t (1 - t)) <= 5.1e-7 for t in [0.01, 0.99]. Bound the difference by exactly that.
    noise_term = (ut_ref - (x1 - x0)).abs()
    tt = t[:, None]
    bound = noise_term * 1e-8 / (2 * tt * (1 - tt)) * 1.01 + 1e-12
    assert ((ut - ut_ref).abs() <= bound).all()
