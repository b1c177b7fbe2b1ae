"""Few-step objectives (MeanFlow, SplitMeanFlow): the closed-form Gaussian flow they should learn, their identities
on the exact average velocity (with controls that must fail), one-step sampling, and training on a Gaussian."""

import pytest
import torch

from flowprobe.gaussian import IndependentGaussianCoupling
from flowprobe.nets import MLP
from flowprobe.nets.unet import unet_preset
from flowprobe.objectives import CFMObjective, MeanFlowObjective, SplitMeanFlowObjective, sample_intervals
from flowprobe.paths import LinearPath, StochasticPath
from flowprobe.solvers import integrate, integrate_average
from flowprobe.train import fit

F64 = torch.float64
M1 = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
S1 = torch.tensor([[0.5, 0.2, 0.0], [0.2, 0.3, -0.05], [0.0, -0.05, 0.8]], dtype=F64)
PATHS = {"linear": LinearPath, "constant-0.3": lambda: StochasticPath(0.3),
         "bridge-0.5": lambda: StochasticPath(0.5, "bridge")}


def full(v, n=16):
    return torch.full((n,), v, dtype=F64)


@pytest.mark.parametrize("name", list(PATHS))
def test_closed_form_flow_map_matches_rk4(name):
    path = PATHS[name]()
    cpl = IndependentGaussianCoupling(M1, S1, S0=0.49 * torch.eye(3, dtype=F64))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    # the bridge's g'(t) is singular at both ends, where RK4 is inaccurate: check it inside
    spans = [(0.2, 0.7), (0.9, 0.3)] + ([(0.0, 1.0)] if name != "bridge-0.5" else [(0.05, 0.95)])
    for t, s in spans:
        ref = integrate(cpl.field(path), x, "rk4", steps=400, t0=t, t1=s).x
        torch.testing.assert_close(cpl.flow_map(full(t), x, full(s), path), ref, atol=1e-9, rtol=0)
    # h = 0 is the marginal field, and a tiny step approaches it
    tv = full(0.3)
    torch.testing.assert_close(cpl.average_velocity(tv, x, full(0.0), path), cpl.marginal_field(tv, x, path))
    torch.testing.assert_close(cpl.average_velocity(tv, x, full(1e-7), path), cpl.marginal_field(tv, x, path),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["linear", "constant-0.3"])
def test_identities_hold_for_the_exact_average_velocity(name):
    """With v the marginal field, u* the exact average velocity satisfies both targets to rounding; the
    instantaneous field (a net that ignores h) does not."""
    path = PATHS[name]()
    cpl = IndependentGaussianCoupling(M1, S1)
    g = torch.Generator().manual_seed(1)
    n = 64
    t = 0.8 * torch.rand(n, generator=g, dtype=F64)
    h = (1 - t) * torch.rand(n, generator=g, dtype=F64)
    x = torch.randn(n, 3, generator=g, dtype=F64) + t[:, None] * M1
    lam = torch.rand(n, generator=g, dtype=F64)
    v = cpl.marginal_field(t, x, path)

    def exact(tt, xx, hh):
        return cpl.average_velocity(tt, xx, hh, path)

    def instantaneous(tt, xx, hh):
        return cpl.marginal_field(tt, xx, path)

    for obj in (MeanFlowObjective(path), SplitMeanFlowObjective(path)):
        pred, tgt = obj.target(exact, t, h, x, v, lam)
        torch.testing.assert_close(pred, tgt, atol=1e-11, rtol=0)
        pred, tgt = obj.target(instantaneous, t, h, x, v, lam)
        assert (pred - tgt).abs().max() > 0.3, type(obj).__name__
    # h = 0: both reduce to the CFM target
    u_t = torch.randn(n, 3, generator=g, dtype=F64)
    for obj in (MeanFlowObjective(path), SplitMeanFlowObjective(path)):
        _, tgt = obj.target(exact, t, torch.zeros_like(h), x, u_t, lam)
        torch.testing.assert_close(tgt, u_t, atol=1e-12, rtol=0)


def test_jumps_with_the_exact_average_velocity_land_on_the_flow():
    cpl = IndependentGaussianCoupling(M1, S1)
    x0 = torch.randn(32, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = cpl.flow_map(full(0.0, 32), x0, full(1.0, 32))
    for steps in (1, 3):
        res = integrate_average(cpl.average_velocity, x0, steps=steps, return_trajectory=True)
        torch.testing.assert_close(res.x, ref, atol=1e-10, rtol=0)
        assert res.nfe == steps and res.trajectory.shape == (steps + 1, 32, 3)


def test_sample_intervals():
    t, h = sample_intervals(20000, torch.Generator().manual_seed(0), 0.25)
    assert (h >= 0).all() and (t >= 0).all() and (t + h <= 1).all()
    assert abs((h > 0).float().mean().item() - 0.25) < 0.02
    assert abs(h[h > 0].mean().item() - 1 / 3) < 0.01  # |U1 - U2| has mean 1/3
    with pytest.raises(ValueError, match="jump_fraction"):
        sample_intervals(4, torch.Generator(), 1.5)


def test_step_input_of_the_nets():
    torch.manual_seed(0)
    x, t = torch.randn(5, 2), torch.rand(5)
    mlp = MLP(2, width=16, depth=2, step_embed=True)
    # a fresh step net is a velocity field: h has no effect yet, and None means h = 0
    torch.testing.assert_close(mlp(t, x, torch.rand(5)), mlp(t, x))
    with pytest.raises(ValueError, match="step_embed"):
        MLP(2, width=16, depth=2)(t, x, torch.rand(5))
    unet = unet_preset("tiny", image_size=8, step_embed=True)
    with torch.no_grad():  # ADM starts its output convolutions at zero; give every layer but the step's last weights
        for name, p in unet.named_parameters():
            if not name.startswith("step_embed.2"):
                p.normal_(0, 0.1)
    xi, ti = torch.randn(2, 3, 8, 8), torch.rand(2)
    assert (unet(ti, xi) - unet(ti + 0.1, xi)).abs().mean() > 1e-4
    torch.testing.assert_close(unet(ti, xi, torch.rand(2)), unet(ti, xi))
    # the MeanFlow loss (a JVP through convolutions, GroupNorm and attention) backpropagates to the step embedding
    loss = MeanFlowObjective(LinearPath())(unet, _pairs(xi), torch.Generator().manual_seed(0),
                                          t=torch.full((2,), 0.2), h=torch.full((2,), 0.5))
    loss.backward()
    assert torch.isfinite(loss) and unet.step_embed[2].weight.grad.abs().sum() > 0


def _pairs(x1):
    from flowprobe.couplings import Pairing

    idx = torch.arange(x1.shape[0])
    return Pairing(torch.randn(x1.shape, generator=torch.Generator().manual_seed(3)), x1, idx, idx)


def test_few_step_objectives_learn_the_one_step_map():
    """2-D Gaussian target, same MLP and budget: one jump of a MeanFlow or SplitMeanFlow net lands near the exact
    flow map Phi_{0->1}; one Euler step of a CFM net cannot (it sends every point to about the target mean)."""
    m1, s1 = torch.tensor([2.0, -1.0]), torch.tensor([[0.5, 0.2], [0.2, 0.3]])
    cpl = IndependentGaussianCoupling(m1, s1, dtype=torch.float32)
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(9))
    ref = cpl.flow_map(torch.zeros(4000), x0, torch.ones(4000)).float()
    errors = {}
    for name, obj in (("cfm", CFMObjective(LinearPath())),
                      ("meanflow", MeanFlowObjective(LinearPath(), jump_fraction=0.5)),
                      ("split", SplitMeanFlowObjective(LinearPath(), jump_fraction=0.5))):
        torch.manual_seed(0)
        net = MLP(2, width=64, depth=3, step_embed=True, time_embed_dim=0)
        state = fit(net, cpl, obj, steps=1500, batch_size=256, lr=2e-3, seed=0, progress=False, lr_schedule="cosine",
                    warmup=50)
        errors[name] = (integrate_average(state.model, x0, steps=1).x - ref).norm(dim=1).mean().item()
    spread = (ref - ref.mean(0)).norm(dim=1).mean().item()  # about 0.8: what collapsing to the mean costs
    assert errors["cfm"] > spread, errors
    assert errors["meanflow"] < 0.3 * spread and errors["split"] < 0.4 * spread, (errors, spread)


@pytest.mark.parametrize("kind", ["meanflow", "splitmeanflow"])
def test_gradient_variance_of_a_few_step_objective(kind):
    """The probe's per-sample gradients of the few-step regression equal a loop of single-sample backward passes
    through the objective's own loss; at step 0 it is the CFM profile."""
    from flowprobe.objectives import make_objective
    from flowprobe.probes.gradvar import gradient_variance

    torch.manual_seed(0)
    net = MLP(2, width=16, depth=2, step_embed=True, time_scale=10.0)
    with torch.no_grad():
        net.net[0].weight.normal_(0, 0.5)  # make the net depend on h
    path = StochasticPath(0.1)
    obj = make_objective(kind, path, "sum")
    cpl = IndependentGaussianCoupling(M1[:2], S1[:2, :2], dtype=torch.float32)
    times, n, step = [0.2, 0.6, 0.9], 12, 0.3
    res = gradient_variance(net, path, cpl, times, n_samples=n, objective=obj, step=step,
                            generator=torch.Generator().manual_seed(4))
    assert res.extra["step"] == step and res.extra["objective"]["objective"] == kind

    g = torch.Generator().manual_seed(4)  # the same draws, by hand
    params = list(net.parameters())
    for k, t in enumerate(times):
        pairing = cpl.sample(n, g)
        tv = torch.full((n,), t)
        tv, x_t, u_t = CFMObjective(path).draw(pairing, g, tv)
        lam = torch.rand(n, generator=g)
        h = torch.clamp(1 - tv, max=step)
        grads = []
        for i in range(n):
            li = obj.losses(net, tv[i:i + 1], h[i:i + 1], x_t[i:i + 1], u_t[i:i + 1], lam[i:i + 1])[0]
            grads.append(torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(li, params)]))
        G = torch.stack(grads).double()
        gv = (G - G.mean(0)).pow(2).sum() / (n - 1)
        assert res.rows[k]["gv"] == pytest.approx(gv.item(), rel=1e-4), (t, res.rows[k]["gv"], gv.item())

    cfm = gradient_variance(net, path, cpl, times, n_samples=n, generator=torch.Generator().manual_seed(4))
    zero = gradient_variance(net, path, cpl, times, n_samples=n, objective=obj, step=0.0,
                             generator=torch.Generator().manual_seed(4))
    # the same draws (the probe also draws lam, after x_t, so the next time's draws shift: compare the first time)
    assert zero.rows[0]["gv"] == pytest.approx(cfm.rows[0]["gv"], rel=1e-5)
    assert abs(res.rows[0]["gv"] / cfm.rows[0]["gv"] - 1) > 0.05  # a step h > 0 does change the profile
    with pytest.raises(ValueError, match="path"):
        gradient_variance(net, LinearPath(), cpl, times, n_samples=n, objective=obj, step=step)
