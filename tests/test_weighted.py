"""Weighted CFM: Gibbs weights on the pairs, the closed-form tilted Gaussian coupling they train on, the weighted
batch loss in the objective and in fit, and a trained field against the tilted coupling's exact field."""

import pytest
import torch

from flowprobe.couplings import FixedPairs, IndependentCoupling, GaussianSampler, WeightedCoupling
from flowprobe.gaussian import IndependentGaussianCoupling, gibbs_tilted_coupling
from flowprobe.nets import MLP
from flowprobe.objectives import CFMObjective, MeanFlowObjective
from flowprobe.paths import LinearPath, StochasticPath
from flowprobe.solvers import integrate
from flowprobe.train import batch_functions, fit

F64 = torch.float64
M1 = torch.tensor([2.0, -1.0], dtype=F64)
S1 = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)


def test_weights_are_gibbs_weights_of_the_pairs():
    x0, x1 = torch.randn(6, 3, dtype=F64), torch.randn(6, 3, dtype=F64)
    p = WeightedCoupling(FixedPairs(x0, x1), 2.0).sample(6, torch.Generator().manual_seed(0))
    ratio = p.weights / torch.exp(-(p.x0 - p.x1).pow(2).sum(1) / 2.0)
    torch.testing.assert_close(ratio, ratio[0].expand(6))  # exp(-d^2/eps) up to one constant
    assert p.weights.max() == 1.0  # relative to the closest pair: never all zeros
    assert torch.equal(p.swapped().weights, p.weights)
    far = WeightedCoupling(FixedPairs(x0, x1 + 1e4), 1e-3).sample(6, torch.Generator().manual_seed(0))
    assert torch.isfinite(far.weights).all() and far.weights.max() == 1.0
    with pytest.raises(ValueError, match="epsilon"):
        WeightedCoupling(FixedPairs(x0, x1), 0.0)


@pytest.mark.parametrize("eps", [0.5, 4.0])
def test_weighted_moments_match_the_tilted_gaussian(eps):
    tilt = gibbs_tilted_coupling(torch.zeros(2), torch.eye(2), M1, S1, eps)
    p = WeightedCoupling(IndependentGaussianCoupling(M1, S1), eps).sample(400000, torch.Generator().manual_seed(1))
    w = p.weights / p.weights.sum()
    xy = torch.cat([p.x0, p.x1], 1)
    mean = (w[:, None] * xy).sum(0)
    cov = ((xy - mean) * w[:, None]).T @ (xy - mean)
    torch.testing.assert_close(mean, torch.cat([tilt.m0, tilt.m1]), atol=0.01, rtol=0)
    torch.testing.assert_close(cov[:2, 2:], tilt.S01, atol=0.01, rtol=0)
    torch.testing.assert_close(cov[:2, :2], tilt.S00, atol=0.01, rtol=0)
    torch.testing.assert_close(cov[2:, 2:], tilt.S11, atol=0.01, rtol=0)
    # and the tilt is real: the source marginal moved off N(0, I)
    assert tilt.m0.norm() > 0.1


def test_weighted_loss_in_the_objective_and_in_fit():
    torch.manual_seed(0)
    net = MLP(2, width=16, depth=2)
    coupling = WeightedCoupling(IndependentCoupling(GaussianSampler((2,)), GaussianSampler((2,), mean=3.0)), 2.0)
    for obj in (CFMObjective(StochasticPath(0.1)), MeanFlowObjective(LinearPath())):
        if isinstance(obj, MeanFlowObjective):
            net = MLP(2, width=16, depth=2, step_embed=True, time_scale=10.0)
        g = torch.Generator().manual_seed(5)
        pairing = coupling.sample(32, g)
        batch = obj.draw(pairing, g)
        manual = (pairing.weights * obj.losses(net, *batch)).sum() / pairing.weights.sum()
        g = torch.Generator().manual_seed(5)
        assert obj(net, coupling.sample(32, g), g).item() == pytest.approx(manual.item(), rel=1e-6)
        # fit's drawing and loss functions give the same number from the same generator state
        g = torch.Generator().manual_seed(5)
        next_batch, loss_fn = batch_functions(obj, coupling, g, 32, 0, 1)
        assert loss_fn(net, *next_batch()).item() == pytest.approx(manual.item(), rel=1e-6)
        # the weights matter: the unweighted mean differs
        assert abs(obj.losses(net, *batch).mean().item() - manual.item()) > 1e-3


def test_weighted_cfm_learns_the_tilted_transport():
    """Trained on weighted independent pairs, the flow from the tilted source ends where the tilted coupling's
    exact marginal field does, and differs from the plain (independent) flow."""
    eps = 2.0
    base = IndependentGaussianCoupling(M1, S1, dtype=torch.float32)
    tilt = gibbs_tilted_coupling(torch.zeros(2), torch.eye(2), M1, S1, eps)
    g = torch.Generator().manual_seed(2)
    x0 = (tilt.m0 + torch.randn(3000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(tilt.S00).T)
    exact = integrate(tilt.field(), x0, "rk4", steps=100).x
    plain = integrate(base.field(), x0.float(), "rk4", steps=100).x.double()
    torch.manual_seed(0)
    net = MLP(2, width=64, depth=3, time_embed_dim=0)
    state = fit(net, WeightedCoupling(base, eps), CFMObjective(LinearPath()), steps=1500, batch_size=512, lr=2e-3,
                seed=0, lr_schedule="cosine", warmup=50)
    learned = integrate(state.model, x0.float(), "rk4", steps=100).x.double()
    err = (learned - exact).norm(dim=1).mean().item()
    gap = (plain - exact).norm(dim=1).mean().item()
    assert err < 0.25 * gap, (err, gap)
