"""The gradient-variance probe: methods agree, closed forms, unbiasedness, honest standard errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowprobe.couplings import FixedPairs, GaussianSampler, IndependentCoupling, Pairing
from flowprobe.nets import MLP
from flowprobe.paths import LinearPath, StochasticPath
from flowprobe.probes.gradvar import gradient_variance, parse_times, per_sample_grad_stats, resolve_groups

D = 2
MU = torch.tensor([5.0, 5.0], dtype=torch.float64)


class LemmaOneField(nn.Module):
    """v(t, x) = theta + Theta (I + t Theta)^{-1} (x - t theta) (the Gaussian family of Lemma 1)."""

    def __init__(self, theta: torch.Tensor, Theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.Theta = nn.Parameter(Theta.clone())

    def forward(self, t, x):
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        M = eye + t[:, None, None] * self.Theta  # (B, d, d)
        y = torch.linalg.solve(M, (x - t[:, None] * self.theta).unsqueeze(-1)).squeeze(-1)
        return self.theta + y @ self.Theta.T


def ot_field():
    return LemmaOneField(MU, torch.zeros(D, D, dtype=torch.float64))


class AntipodalPairs:
    """x0 ~ N(0, I), x1 = mu - x0 (every line passes mu/2 at t = 1/2)."""

    def sample(self, n, generator):
        x0 = torch.randn(n, D, generator=generator, dtype=torch.float64)
        i = torch.arange(n)
        return Pairing(x0, MU - x0, i, i)


def independent():
    return IndependentCoupling(GaussianSampler((D,), dtype=torch.float64),
                               GaussianSampler((D,), mean=MU, dtype=torch.float64))


# Closed forms at the OT parameters (theta = mu, Theta = 0): g_theta = -2 r, g_Theta = -2 r w^T with
# r = u - v, w = x_t - t mu. Independent coupling, x1 = mu + y: r = y - x0 ~ N(0, 2I), w = (1-t) x0 + t y,
# Cov(r, w) = (2t - 1) I, so E||g||^2 = 8d + 4 [2 d^2 s + 2 d (2t-1)^2] (s = (1-t)^2 + t^2) and
# E g = (0, -2 (2t - 1) I): GV(t) = 8d + 8 d^2 s + 4 d (2t-1)^2 and ||E g||^2 = 4 d (2t-1)^2.
# Antipodal: r = -2 x0, w = (1 - 2t) x0: GV(t) = 16 d + 16 (1-2t)^2 (d^2 + d), ||E g||^2 = 16 d (1-2t)^2.
def gv_independent(t, d=D):
    return 8 * d + 8 * d * d * ((1 - t) ** 2 + t ** 2) + 4 * d * (2 * t - 1) ** 2


def gv_antipodal(t, d=D):
    return 16 * d + 16 * (1 - 2 * t) ** 2 * (d * d + d)


def small_mlp():
    torch.manual_seed(0)
    return MLP(2, width=24, depth=2, time_embed_dim=8).double()


def batch(n=40, seed=1, shape=(2,)):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64), torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randn(n, *shape, generator=g, dtype=torch.float64))


def brute_force(net, t, x, u, reduction="sum"):
    """Per-sample gradients by hand, stacked (n, P), and the unbiased trace of their covariance."""
    rows = []
    for i in range(x.shape[0]):
        net.zero_grad()
        v = net(t[i:i + 1], x[i:i + 1])
        d = (v - u[i:i + 1]).pow(2)
        (d.sum() if reduction == "sum" else d.mean()).backward()
        rows.append(torch.cat([p.grad.flatten() for p in net.parameters()]).clone())
    G = torch.stack(rows)
    return G, (G - G.mean(0)).pow(2).sum() / (G.shape[0] - 1)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_exact_naive_and_brute_force_agree(reduction):
    net = small_mlp()
    t, x, u = batch()
    G, gv = brute_force(net, t, x, u, reduction)
    for method, chunk in [("exact", 64), ("exact", 7), ("naive", 16)]:
        st = per_sample_grad_stats(net, t, x, u, method, chunk_size=chunk, reduction=reduction)
        assert st.gv == pytest.approx(gv.item(), rel=1e-12)
        assert st.mean_grad_sq == pytest.approx(G.mean(0).pow(2).sum().item(), rel=1e-12)
        torch.testing.assert_close(st.sq_norms.sum(1), G.pow(2).sum(1), rtol=1e-12, atol=0)
        d = (G - G.mean(0)).pow(2).sum(1)
        assert st.gv_se == pytest.approx((d.std() / math.sqrt(len(d))).item(), rel=1e-9)


def test_groups_partition_and_sum_to_total():
    net = small_mlp()
    t, x, u = batch()
    names, params, index = resolve_groups(net, "layer")
    assert names == ["net.0", "net.2", "net.4"]
    st = per_sample_grad_stats(net, t, x, u, "exact", groups="layer")
    assert st.group_gv.sum().item() == pytest.approx(st.gv, rel=1e-12)
    assert st.group_mean_grad_sq.sum().item() == pytest.approx(st.mean_grad_sq, rel=1e-12)
    # each layer's share, brute force on that layer's slice of the gradient
    G, _ = brute_force(net, t, x, u)
    sizes = [p.numel() for _, p in params]
    start = 0
    per_layer = torch.zeros(len(names), dtype=torch.float64)
    for k, s in zip(index, sizes):
        sl = G[:, start:start + s]
        per_layer[k] += (sl - sl.mean(0)).pow(2).sum() / (G.shape[0] - 1)
        start += s
    torch.testing.assert_close(st.group_gv, per_layer, rtol=1e-12, atol=0)
    # per-group SE = sd_i(||g_i^G - g_bar^G||^2) / sqrt(n), from the brute-force slices
    torch.testing.assert_close(st.group_gv_se, _group_se(G, index, sizes, len(names)), rtol=1e-9, atol=0)
    custom = per_sample_grad_stats(net, t, x, u, "exact", groups={"first": ["net.0"], "last_w": ["net.4.weight"]})
    assert custom.group_names == ["first", "last_w", "(other)"]
    assert custom.group_gv[0].item() == pytest.approx(per_layer[0].item(), rel=1e-12)
    assert custom.group_gv.sum().item() == pytest.approx(st.gv, rel=1e-12)
    assert per_sample_grad_stats(net, t, x, u, "exact", groups="block").group_names == ["net"]
    with pytest.raises(ValueError, match="two groups"):
        resolve_groups(net, {"a": ["net.0"], "b": ["net.0.weight"]})
    with pytest.raises(ValueError, match="names no trainable"):
        resolve_groups(net, {"a": ["nope"]})


def _group_se(G, index, sizes, n_groups, scale=1.0):
    """Per-group standard error scale * sd_u(||g_u^G - g_bar^G||^2) / sqrt(U) of the rows of G (U, P), written out
    with plain loops over groups and units (independent of the probe's matrix formulation)."""
    U = G.shape[0]
    d = torch.zeros(U, n_groups, dtype=torch.float64)
    start = 0
    for k, s in zip(index, sizes):
        sl = G[:, start:start + s]
        d[:, k] += (sl - sl.mean(0)).pow(2).sum(1)
        start += s
    out = []
    for k in range(n_groups):
        col = scale * d[:, k]
        mean = col.sum() / U
        sd = math.sqrt(float(((col - mean) ** 2).sum()) / (U - 1))
        out.append(sd / math.sqrt(U))
    return torch.tensor(out, dtype=torch.float64)


def test_group_standard_errors_match_the_formula_for_samples_and_micro_batches():
    """group_gv_se against a direct computation on brute-force gradients: per-sample units (exact, naive, ghost),
    and micro-batch units (the mean gradient of each micro-batch of m samples, scaled by m)."""
    net = small_mlp()
    t, x, u = batch(n=24)
    names, params, index = resolve_groups(net, "layer")
    sizes = [p.numel() for _, p in params]
    G, _ = brute_force(net, t, x, u)
    expected = _group_se(G, index, sizes, len(names))
    for method in ("exact", "naive", "ghost"):
        st = per_sample_grad_stats(net, t, x, u, method, chunk_size=7)
        torch.testing.assert_close(st.group_gv_se, expected, rtol=1e-9, atol=0)
    m = 4
    Gm = G.reshape(-1, m, G.shape[1]).mean(1)  # (K, P) micro-batch mean gradients
    st = per_sample_grad_stats(net, t, x, u, "microbatch", micro_batch_size=m)
    torch.testing.assert_close(st.group_gv_se, _group_se(Gm, index, sizes, len(names), scale=m), rtol=1e-9, atol=0)


class SmallConvNet(nn.Module):
    """Conv2d with stride and padding, grouped conv, GroupNorm, Conv1d ('same'), LayerNorm, a Linear used
    twice (positions concatenated) and a bare Parameter (not covered: exact fallback)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv1d(8, 4, 3, padding="same")
        self.ln = nn.LayerNorm(16)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(64, 3 * 8 * 8)
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, t, x):
        h = torch.tanh(self.gn(self.c1(x)))  # (B, 8, 4, 4)
        h = self.c2(h) + t[:, None, None, None]
        h = self.ln(self.c3(h.flatten(2)))  # (B, 4, 16)
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h.flatten(1)).reshape(x.shape) * self.gain[:, None, None]


@pytest.mark.parametrize("chunk", [64, 3])
def test_ghost_equals_exact_mlp(chunk):
    net = small_mlp()
    t, x, u = batch(n=20)
    e = per_sample_grad_stats(net, t, x, u, "exact", chunk_size=chunk)
    g = per_sample_grad_stats(net, t, x, u, "ghost", chunk_size=chunk)
    torch.testing.assert_close(g.sq_norms, e.sq_norms, rtol=1e-10, atol=1e-12)
    assert g.gv == pytest.approx(e.gv, rel=1e-10)
    assert g.gv_se == pytest.approx(e.gv_se, rel=1e-8)
    assert g.fallback_modules == []


@pytest.mark.parametrize("conv", ["grouped", "unfold", "auto"])
def test_ghost_equals_exact_convnet(conv):
    torch.manual_seed(0)
    net = SmallConvNet().double()
    t, x, u = batch(n=9, shape=(3, 8, 8))
    e = per_sample_grad_stats(net, t, x, u, "exact")
    with pytest.warns(UserWarning, match="SmallConvNet"):
        g = per_sample_grad_stats(net, t, x, u, "ghost", chunk_size=4, ghost_conv=conv)
    assert g.fallback_modules == ["SmallConvNet"]
    assert len(e.group_names) == 8
    torch.testing.assert_close(g.sq_norms, e.sq_norms, rtol=1e-10, atol=1e-10)
    assert g.gv == pytest.approx(e.gv, rel=1e-10)
    torch.testing.assert_close(g.group_gv, e.group_gv, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("conv", ["grouped", "unfold", "auto"])
def test_ghost_equals_exact_tiny_unet(conv):
    unet = pytest.importorskip("flowprobe.nets.unet")
    torch.manual_seed(0)
    net = unet.unet_preset("tiny").double()
    with torch.no_grad():  # move off the zero-initialised output convs so every layer has gradient
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    t, x, u = batch(n=4, shape=(3, 16, 16))
    e = per_sample_grad_stats(net, t, x, u, "exact")
    g = per_sample_grad_stats(net, t, x, u, "ghost", ghost_conv=conv)
    assert g.fallback_modules == []
    torch.testing.assert_close(g.sq_norms, e.sq_norms, rtol=1e-9, atol=1e-9)
    assert g.gv == pytest.approx(e.gv, rel=1e-9)


def test_ghost_conv_rule_is_checked():
    net = small_mlp()
    t, x, u = batch(n=4)
    with pytest.raises(ValueError, match="grouped"):
        per_sample_grad_stats(net, t, x, u, "ghost", ghost_conv="fft")


@pytest.mark.parametrize("slow", ["grouped", "unfold"])
def test_auto_conv_rule_keeps_the_faster_rule_per_layer_shape(monkeypatch, slow):
    """"auto" times both rules on the first pass and keeps the faster: slowing one rule down by 20 ms per call
    must make every convolution layer shape choose the other, and the numbers stay those of exact."""
    import time

    from flowprobe.probes import ghost

    real = ghost._CONV_FNS[slow]

    def slowed(*args):
        time.sleep(0.02)
        return real(*args)

    monkeypatch.setitem(ghost._CONV_FNS, slow, slowed)
    monkeypatch.setattr(ghost, "_CHOICES", {})
    torch.manual_seed(0)
    net = SmallConvNet().double()
    t, x, u = batch(n=6, shape=(3, 8, 8))
    with pytest.warns(UserWarning, match="SmallConvNet"):
        g = per_sample_grad_stats(net, t, x, u, "ghost", ghost_conv="auto")
    choices = ghost.conv_rule_choices()
    n_conv = sum(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in net.modules())
    assert 1 <= len(choices) <= n_conv
    other = "unfold" if slow == "grouped" else "grouped"
    assert set(choices.values()) == {other}
    e = per_sample_grad_stats(net, t, x, u, "exact")
    torch.testing.assert_close(g.sq_norms, e.sq_norms, rtol=1e-10, atol=1e-10)
    # a second pass reuses the choices: no new timing, so the slowed rule is never called again
    calls = []
    monkeypatch.setitem(ghost._CONV_FNS, slow, lambda *a: calls.append(1) or real(*a))
    with pytest.warns(UserWarning):
        per_sample_grad_stats(net, t, x, u, "ghost", ghost_conv="auto")
    assert calls == []


def test_variance_is_centred_and_robust_to_a_mismatched_mean_gradient():
    """The ghost path takes g_bar from an ordinary backward pass and the per-sample norms from other kernels.
    A relative mismatch eps between the two (e.g. reduced-precision convolutions on a GPU) must not move the
    variance by ~2 eps ||g_bar||^2 / tr Cov, which is 10% here (the mean gradient dominates, as for an
    untrained network); the centred formula moves it by ~eps^2 ||g_bar||^2 / tr Cov."""
    from flowprobe.probes.per_sample import Moments

    gen = torch.Generator().manual_seed(0)
    U, P = 256, 2000
    mean = torch.randn(P, generator=gen, dtype=torch.float64)
    noise = torch.randn(U, P, generator=gen, dtype=torch.float64) * (mean.pow(2).sum() / 50 / P).sqrt()
    g = mean + noise
    truth = (g - g.mean(0)).pow(2).sum() / (U - 1)
    assert g.mean(0).pow(2).sum() / truth > 40  # the regime where the uncentred formula cancels
    eps = 1e-3
    ref = (1 + eps) * g.mean(0)  # the batch gradient as the ghost path sees it
    mom = Moments(["w"])
    mom.ref = {"w": ref}
    mom.add_sum("w", U * ref)
    mom.add_norms(g.pow(2).sum(1, keepdim=True), (g @ ref).unsqueeze(1))
    gv, _, _, _, _ = mom.finish([0], 1)
    uncentred = (g.pow(2).sum() - U * ref.pow(2).sum()) / (U - 1)
    assert abs(uncentred / truth - 1) > 0.05  # the failure this guards against is real at this eps
    assert abs(gv.item() / truth - 1) < 1e-3
    # consistent inputs (exact path: sums are the per-sample gradients' sum): the identity holds to rounding
    mom = Moments(["w"])
    mom.ref = {"w": ref}
    mom.add_sum("w", g.sum(0))
    mom.add_norms(g.pow(2).sum(1, keepdim=True), (g @ ref).unsqueeze(1))
    gv, _, _, _, _ = mom.finish([0], 1)
    assert abs(gv.item() / truth - 1) < 1e-10


@pytest.mark.filterwarnings("ignore:ghost norms do not cover module types")  # LemmaOneField: exact fallback
@pytest.mark.parametrize("method", ["exact", "ghost"])
def test_closed_form_fixed_t_independent_and_antipodal(method):
    path = LinearPath()
    for sampler, closed in [(independent(), gv_independent), (AntipodalPairs(), gv_antipodal)]:
        res = gradient_variance(ot_field(), path, sampler, [0.1, 0.5, 0.8], n_samples=3000, method=method,
                                chunk_size=1024, generator=torch.Generator().manual_seed(3))
        for row in res.rows:
            t = row["t"]
            assert abs(row["gv"] - closed(t)) < 4 * row["gv_se"], (t, row["gv"], closed(t), row["gv_se"])
            assert row["gv_se"] < 0.05 * closed(t)
        # the mean gradient: ||E g||^2 + GV/n in expectation
        r = res.rows[0]
        signal = (4 * D if closed is gv_independent else 16 * D) * (1 - 2 * 0.1) ** 2
        assert r["mean_grad_sq"] - r["gv"] / 3000 == pytest.approx(signal, rel=0.1)


def test_paper_r1_independent_coupling_uniform_t():
    """PAPER.md R1: independent coupling at the OT parameters, t ~ U(0, 1): GV = 16 + 80/3 = 42.67."""
    gen = torch.Generator().manual_seed(0)
    n = 20000
    p = independent().sample(n, gen)
    t = torch.rand(n, generator=gen, dtype=torch.float64)
    x_t, u_t = LinearPath().sample(p.x0, p.x1, t)
    st = per_sample_grad_stats(ot_field(), t, x_t, u_t, "exact", chunk_size=4096)
    assert abs(st.gv - (16 + 80 / 3)) < 4 * st.gv_se
    assert st.gv_se < 0.02 * 42.67
    assert st.loss == pytest.approx(2 * D, abs=4 * st.loss_se)
    theta = st.groups_dict()["(root)"]
    assert theta["gv"] == pytest.approx(st.gv)  # both parameters live on the root module


def test_se_is_honest_and_microbatch_unbiased():
    """Over independent repetitions: the reported SE matches the spread of the estimates (factor 1.5),
    and the micro-batch estimator averages to the closed form (and has an honest SE too)."""
    path, sampler, t = LinearPath(), independent(), 0.3
    truth = gv_independent(t)
    gen = torch.Generator().manual_seed(11)
    net = ot_field()
    groups = {"theta": ["theta"], "Theta": ["Theta"]}
    est = {"exact": [], "microbatch": []}
    ses = {"exact": [], "microbatch": []}
    group_est = {"exact": [], "microbatch": []}
    group_ses = {"exact": [], "microbatch": []}
    for _ in range(150):
        p = sampler.sample(128, gen)
        x_t, u_t = path.sample(p.x0, p.x1, torch.full((128,), t, dtype=torch.float64))
        for m in est:
            st = per_sample_grad_stats(net, t, x_t, u_t, m, chunk_size=256, micro_batch_size=8, groups=groups)
            est[m].append(st.gv)
            ses[m].append(st.gv_se)
            group_est[m].append(st.group_gv)
            group_ses[m].append(st.group_gv_se)
    for m in est:
        v = torch.tensor(est[m])
        spread, mean_se = v.std().item(), torch.tensor(ses[m]).mean().item()
        assert 1 / 1.5 < mean_se / spread < 1.5, (m, mean_se, spread)
        assert abs(v.mean().item() - truth) < 4 * spread / math.sqrt(len(v)), (m, v.mean().item(), truth)
        # per group: the reported SE matches the spread of that group's estimates over the repetitions
        g_spread = torch.stack(group_est[m]).std(0)
        g_mean_se = torch.stack(group_ses[m]).mean(0)
        ratio = g_mean_se / g_spread
        assert ((1 / 1.5 < ratio) & (ratio < 1.5)).all(), (m, ratio.tolist())
    # micro-batch uses 16 units, not 128 samples: noisier
    assert torch.tensor(est["microbatch"]).std() > 1.5 * torch.tensor(est["exact"]).std()


def test_forward_backward_swap():
    """A backward probe is a forward probe on swapped pairs: same draws, same numbers."""
    net = small_mlp()
    x0 = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x1 = x0 * 0.3 + 4.0
    fwd = gradient_variance(net, LinearPath(), FixedPairs(x1, x0), [0.2, 0.9], n_samples=16,
                            generator=torch.Generator().manual_seed(5))
    bwd = gradient_variance(net, LinearPath(), FixedPairs(x0, x1), [0.2, 0.9], n_samples=16,
                            generator=torch.Generator().manual_seed(5), direction="backward")
    assert bwd.direction == "backward"
    for a, b in zip(fwd.rows, bwd.rows):
        assert a["gv"] == b["gv"] and a["loss"] == b["loss"]
    other = gradient_variance(net, LinearPath(), FixedPairs(x0, x1), [0.2, 0.9], n_samples=16,
                              generator=torch.Generator().manual_seed(5))
    assert other.rows[0]["gv"] != fwd.rows[0]["gv"]


def test_profile_result_fields_and_json(tmp_path):
    import json

    net = MLP(2, width=16, depth=1, time_embed_dim=4)
    sampler = IndependentCoupling(GaussianSampler((2,)), GaussianSampler((2,), mean=2.0))
    res = gradient_variance(net, StochasticPath(0.1, "bridge"), sampler, "0:1:5", n_samples=8,
                            oracle_loss=lambda t: 1.0 + t, method="ghost")
    assert res.times.tolist() == pytest.approx([0.01, 0.25, 0.5, 0.75, 0.99])
    row = res.rows[1]
    assert set(row) >= {"t", "gv", "gv_se", "mean_grad_sq", "noise_to_signal", "snr", "loss", "loss_se",
                        "oracle_loss", "n", "method", "groups"}
    assert row["oracle_loss"] == pytest.approx(1.25)
    assert row["noise_to_signal"] == pytest.approx(row["gv"] / row["mean_grad_sq"])
    assert row["snr"] == pytest.approx(1 / row["noise_to_signal"])
    assert sum(g["gv"] for g in row["groups"].values()) == pytest.approx(row["gv"], rel=1e-9)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["path"] == {"path": "stochastic", "sigma": 0.1, "schedule": "bridge", "t_clip": 1e-4}
    assert d["method"] == "ghost" and d["n_samples"] == 8 and len(d["rows"]) == 5
    binned = gradient_variance(net, LinearPath(), sampler, "uniform:4", n_samples=8)
    assert [r["t"] for r in binned.rows] == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert binned.rows[0]["t_lo"] == 0.0 and binned.rows[0]["t_hi"] == 0.25


def test_uniform_bins_draw_per_sample_times():
    """Within a bin each sample has its own t: the binned profile of the antipodal pairs at the OT field
    matches the closed form averaged over the bin, E_t[16 d + 16 (1-2t)^2 (d^2+d)] - ||E g||^2 corrections."""
    res = gradient_variance(ot_field(), LinearPath(), AntipodalPairs(), "uniform:2", n_samples=4000,
                            chunk_size=4096, generator=torch.Generator().manual_seed(2))
    # t ~ U(0, 1/2): E(1-2t)^2 = 1/3, E(1-2t) = 1/2 -> GV = 16d + 16 d(d+2)/3 - 16 d (1/2)^2
    expected = 16 * D + 16 * D * (D + 2) / 3 - 16 * D / 4
    row = res.rows[0]
    assert abs(row["gv"] - expected) < 4 * row["gv_se"]


def test_parse_times_and_errors():
    assert parse_times("0:1:3", (0.0, 1.0))[0] == [0.01, 0.5, 0.99]
    assert parse_times([0.0, 2.0], (0.1, 0.9))[0] == [0.1, 0.9]
    for bad in ["0:1", "a:b:c", "uniform:0", "uniform:x"]:
        with pytest.raises(ValueError, match="times must be"):
            parse_times(bad)
    net = small_mlp()
    t, x, u = batch(n=8)
    with pytest.raises(ValueError, match="method must be"):
        per_sample_grad_stats(net, t, x, u, "fast")
    with pytest.raises(ValueError, match="micro-batches"):
        per_sample_grad_stats(net, t, x, u, "microbatch", micro_batch_size=3)
    with pytest.raises(ValueError, match="shape"):
        per_sample_grad_stats(net, t[:3], x, u)


def test_eval_mode_during_probe_and_restored():
    class Dropper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.drop = nn.Dropout(0.5)

        def forward(self, t, x):
            return self.drop(self.lin(torch.cat([x, t[:, None]], 1)))

    net = Dropper().double().train()
    t, x, u = batch(n=12)
    a = per_sample_grad_stats(net, t, x, u, "exact")
    b = per_sample_grad_stats(net, t, x, u, "naive")
    assert net.training
    assert a.gv == pytest.approx(b.gv, rel=1e-12)  # eval mode: deterministic, so both agree
    torch.manual_seed(0)
    c = per_sample_grad_stats(net, t, x, u, "exact", train_mode=True)
    assert c.gv != pytest.approx(a.gv, rel=1e-6)  # dropout noise changes the gradients


def test_cli_function_on_in_memory_models(tmp_path):
    from flowprobe.io import read_json
    from flowprobe.cli.probe import ProbeTarget, probe_gradvar_cli

    sampler = IndependentCoupling(GaussianSampler((2,)), GaussianSampler((2,), mean=2.0))
    torch.manual_seed(0)
    a, b = MLP(2, width=8, depth=1, time_embed_dim=4), MLP(2, width=8, depth=1, time_embed_dim=4)
    targets = [ProbeTarget("a", a, LinearPath(), sampler), ProbeTarget("b", b, LinearPath(), sampler)]
    doc = probe_gradvar_cli(targets, tmp_path, times="0:1:3", samples=8, directions=("forward", "backward"),
                            sigma=0.2, schedule="bridge", progress=False)
    assert (tmp_path / "gradvar.png").stat().st_size > 0
    saved = read_json(tmp_path / "gradvar.json")
    assert [p["label"] for p in saved["profiles"]] == ["a (forward)", "a (backward)", "b (forward)", "b (backward)"]
    assert saved["profiles"][0]["path"]["schedule"] == "bridge" and saved["profiles"][0]["path"]["sigma"] == 0.2
    assert [r["t"] for r in doc["profiles"][0]["rows"]] == pytest.approx([0.01, 0.5, 0.99])
    # same seed per profile: the two models see the same draws, so the per-t losses differ only by the model
    assert doc["profiles"][0]["rows"][0]["loss"] != doc["profiles"][2]["rows"][0]["loss"]


def test_cli_from_a_training_checkpoint(tmp_path):
    pytest.importorskip("flowprobe.checkpoint")
    from flowprobe.cli import main
    from flowprobe.io import read_json

    run = tmp_path / "run"
    code = main(["train", "--set", "steps=5", "--set", "model.width=8", "--set", "model.depth=1",
                 "--set", "sample.n=16", "--set", "sample.plot=false", "--set", "ckpt_every=5",
                 "--out", str(run), "--device", "cpu", "--no-progress"])
    assert code == 0
    out = tmp_path / "probe"
    assert main(["probe", "gradvar", str(run), "--times", "0:1:3", "--samples", "8", "--method", "ghost",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    doc = read_json(out / "gradvar.json")
    assert doc["profiles"][0]["step"] == 5 and doc["profiles"][0]["method"] == "ghost"
    assert main(["probe", "gradvar", str(run), "--times", "nonsense", "--out", str(out), "--device", "cpu"]) == 2


class _LinearField(nn.Module):
    """v(t, x) = W x: per-sample gradients of ||W x - u||^2 are 2 (W x - u) x^T in closed form."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, t, x):
        return self.lin(x)


def test_residual_gain_matches_the_closed_form_of_a_linear_field():
    from flowprobe.probes.gradvar import matched_residuals, residual_gain

    torch.manual_seed(0)
    d, n = 5, 12
    net = _LinearField(d).double()
    x = torch.randn(n, d, dtype=torch.float64)
    actual = torch.randn(n, d, dtype=torch.float64) * torch.linspace(0.5, 2, n, dtype=torch.float64)[:, None]
    white = torch.randn(n, d, dtype=torch.float64)
    res = matched_residuals(actual, {"white": white})
    torch.testing.assert_close(res["white"].norm(dim=1), actual.norm(dim=1))
    out = residual_gain(net, 0.3, x, res, method="exact")
    for name, r in res.items():
        g = 2 * r[:, :, None] * x[:, None, :]  # (n, d_out, d_in): 2 r_i x_i^T
        g = g.flatten(1)
        gv = ((g - g.mean(0)).pow(2).sum(1)).sum() / (n - 1)
        assert out[name]["gv"] == pytest.approx(float(gv), rel=1e-10)
        assert out[name]["sq_norm"] == pytest.approx(float(r.pow(2).sum(1).mean()), rel=1e-12)
        assert out[name]["gain"] == pytest.approx(float(gv) / float(r.pow(2).sum(1).mean()), rel=1e-10)
    assert out["white"]["gv"] != pytest.approx(out["actual"]["gv"], rel=1e-3)  # direction matters, not only size
    with pytest.raises(ValueError, match="reduction"):
        residual_gain(net, 0.3, x, res, reduction="mean")


def test_a_zero_dim_parameter_is_measured_alike_by_every_estimator():
    """A net with a scalar parameter (a learnable output scale): the ghost path's torch.func fallback and the exact
    path give the brute-force (naive, one backward per sample) gradient variance."""
    import warnings

    from torch import nn

    from flowprobe.couplings import GaussianSampler, IndependentCoupling, TensorSampler
    from flowprobe.paths import LinearPath
    from flowprobe.probes.gradvar import gradient_variance

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, t, x):
            t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).expand(x.shape[0])[:, None]
            return self.scale * self.lin(torch.cat([x, t], 1))

    torch.manual_seed(0)
    net = Scaled()
    coupling = IndependentCoupling(GaussianSampler((2,)), TensorSampler(torch.randn(64, 2)))
    gv = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the ghost path says which parameters fall back
        for method in ("ghost", "exact", "naive"):
            r = gradient_variance(net, LinearPath(), coupling, [0.3, 0.7], n_samples=32, method=method,
                                  generator=torch.Generator().manual_seed(1))
            gv[method] = torch.tensor([row["gv"] for row in r.rows], dtype=torch.float64)
    torch.testing.assert_close(gv["ghost"], gv["naive"], rtol=1e-6, atol=0)
    torch.testing.assert_close(gv["exact"], gv["naive"], rtol=1e-6, atol=0)
