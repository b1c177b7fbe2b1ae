"""The CFM loss: per-sample values, vmap-able per-sample gradients, weights and reductions."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

from flowprobe.couplings import FixedPairs
from flowprobe.nets import MLP
from flowprobe.objectives import CFMObjective, cfm_losses, cfm_sample_loss, squared_error
from flowprobe.paths import LinearPath, StochasticPath


def test_squared_error_reductions():
    v, u = torch.ones(2, 3, 2), torch.zeros(2, 3, 2)
    v[1] = 2
    assert squared_error(v, u, "sum").tolist() == [6.0, 24.0]
    assert squared_error(v, u, "mean").tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="reduction"):
        squared_error(v, u, "max")


def test_per_sample_gradients_under_vmap_equal_a_loop():
    torch.manual_seed(0)
    net = MLP(3, width=16, depth=2).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    t = torch.rand(5, dtype=torch.float64)
    x, u = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

    def loss(p, ti, xi, ui):
        return cfm_sample_loss(lambda tt, xx: functional_call(net, p, (tt, xx)), ti, xi, ui)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, t, x, u)
    for i in range(5):
        net.zero_grad()
        cfm_losses(net, t[i:i + 1], x[i:i + 1], u[i:i + 1]).sum().backward()
        for k, p in net.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad)


def test_objective_weights_and_reproducible_draws():
    torch.manual_seed(0)
    net = MLP(2, width=8, depth=1)
    pairs = FixedPairs(torch.randn(8, 2), torch.randn(8, 2))
    obj = CFMObjective(StochasticPath(0.1), reduction="sum")
    p = pairs.sample(8, torch.Generator().manual_seed(0))
    l1 = obj(net, p, torch.Generator().manual_seed(1))
    l2 = obj(net, p, torch.Generator().manual_seed(1))
    assert l1 == l2
    # weights that select one sample give that sample's loss
    t, x_t, u_t = obj.draw(p, torch.Generator().manual_seed(1))
    per = obj.losses(net, t, x_t, u_t)
    w = torch.zeros(8)
    w[3] = 5.0
    torch.testing.assert_close(obj(net, p, torch.Generator().manual_seed(1), weights=w), per[3])
    torch.testing.assert_close(l1, per.mean())
    with pytest.raises(ValueError, match="weights"):
        obj(net, p, torch.Generator(), weights=torch.ones(3))


def test_bridge_objective_draws_inside_time_range():
    obj = CFMObjective(StochasticPath(0.5, "bridge", t_clip=0.01))
    p = FixedPairs(torch.zeros(4096, 1), torch.ones(4096, 1)).sample(4096, torch.Generator().manual_seed(0))
    t, _, _ = obj.draw(p, torch.Generator().manual_seed(0))
    assert t.min() >= 0.01 and t.max() <= 0.99
    t, _, _ = CFMObjective(LinearPath()).draw(p, torch.Generator().manual_seed(0))
    assert t.min() < 0.01 and t.max() > 0.99


def test_meanflow_adaptive_weight_value_and_gradient():
    """MeanFlow's adaptive loss is sg(w) * ||u - sg(target)||^2 with w = 1 / (||u - target||^2 + eps)^p: its value
    is e / (e + eps)^p and its gradient is w times the plain gradient (the weight carries no gradient)."""
    from flowprobe.objectives import MeanFlowObjective

    torch.manual_seed(0)
    path = LinearPath()
    net = MLP(2, width=16, depth=1, time_embed_dim=4, step_embed=True, time_scale=10.0)
    plain = MeanFlowObjective(path, reduction="sum", adaptive_power=0.0)
    weighted = MeanFlowObjective(path, reduction="sum", adaptive_power=0.75, adaptive_eps=0.1)
    t, h = torch.full((5,), 0.2), torch.full((5,), 0.5)
    x_t, u_t = torch.randn(5, 2), torch.randn(5, 2)
    e = plain.losses(net, t, h, x_t, u_t)
    a = weighted.losses(net, t, h, x_t, u_t)
    w = 1.0 / (e.detach() + 0.1) ** 0.75
    torch.testing.assert_close(a, e * w)
    assert not torch.allclose(a, e * (e.detach() + 0.1) ** 0.75)  # the weight divides, it does not multiply
    g_plain = torch.autograd.grad((w * plain.losses(net, t, h, x_t, u_t)).sum(), list(net.parameters()))
    g_weighted = torch.autograd.grad(weighted.losses(net, t, h, x_t, u_t).sum(), list(net.parameters()))
    for gp, gw in zip(g_plain, g_weighted):
        torch.testing.assert_close(gw, gp, rtol=1e-5, atol=1e-7)
