"""Class conditioning and classifier-free guidance: labels on the pairs, label dropout, conditional nets, the guided
field (1 + w) v(t, x | c) - w v(t, x | null) against the exact fields of a two-component Gaussian mixture, and the
``flowprobe train`` / ``flowprobe sample --label K --guidance W`` path."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from flowprobe.cli import main
from flowprobe.couplings import FixedPairs
from flowprobe.gaussian import IndependentGaussianCoupling
from flowprobe.guidance import GuidedField, LabelledCoupling, diffusers_guidance_scale
from flowprobe.nets import MLP, unet_preset
from flowprobe.solvers import integrate


def test_labelled_pairs_carry_their_target_labels_and_drop_them_at_rate_p():
    x1 = torch.randn(50, 2)
    labels = torch.arange(50) % 3
    base = FixedPairs(torch.randn(50, 2), x1)
    p = LabelledCoupling(base, labels, 3, dropout=0.0).sample(40, torch.Generator().manual_seed(0))
    assert torch.equal(p.y, labels[p.i1])
    assert (LabelledCoupling(base, labels, 3, dropout=1.0).sample(40, torch.Generator()).y == 3).all()
    n, rate = 20000, 0.3
    big = FixedPairs(torch.zeros(n, 1), torch.zeros(n, 1))
    y = LabelledCoupling(big, torch.zeros(n, dtype=torch.long), 1, rate).sample(n, torch.Generator().manual_seed(1)).y
    dropped = float((y == 1).float().mean())
    assert abs(dropped - rate) < 5 * math.sqrt(rate * (1 - rate) / n)  # binomial: 5 standard errors
    again = LabelledCoupling(big, torch.zeros(n, dtype=torch.long), 1, rate).sample(n, torch.Generator().manual_seed(1))
    assert torch.equal(again.y, y)  # the dropout comes from the caller's generator
    with pytest.raises(ValueError, match="0..2"):
        LabelledCoupling(base, labels + 1, 3)


def test_conditional_nets_take_labels_and_the_null_label_is_the_default(one_thread):
    torch.manual_seed(0)
    t, x = torch.rand(6), torch.randn(6, 2)
    net = MLP(2, width=16, depth=2, time_embed_dim=8, num_classes=3)
    null = torch.full((6,), 3)
    assert torch.equal(net(t, x), net(t, x, y=null))
    zeros, ones = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    assert not torch.allclose(net(t, x, y=zeros), net(t, x, y=ones))
    with pytest.raises(ValueError, match="not class-conditional"):
        MLP(2, width=8, depth=1)(t, x, y=null)
    unet = unet_preset("tiny", image_size=8, num_classes=2)
    with torch.no_grad():  # zero-initialised output layers would hide the embedding at initialisation
        for prm in unet.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    img = torch.randn(6, 3, 8, 8)
    assert torch.equal(unet(t, img), unet(t, img, y=torch.full((6,), 2)))
    assert not torch.allclose(unet(t, img, y=zeros), unet(t, img, y=ones))


@pytest.mark.parametrize("w", [0.0, 1.5, 4.0])
def test_guided_field_is_one_plus_w_conditional_minus_w_null(w, one_thread):
    torch.manual_seed(0)
    net = MLP(2, width=16, depth=2, time_embed_dim=8, num_classes=3).double()
    t, x = torch.rand(5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    c, null = torch.full((5,), 1), torch.full((5,), 3)
    cond, uncond = net(t, x, y=c), net(t, x, y=null)
    guided = GuidedField(net, 1, w, 3)(t, x)
    assert torch.allclose(guided, (1 + w) * cond - w * uncond, rtol=1e-12, atol=1e-12)
    # FAIR flow_matching's CFGScaledModel: (1.0 + cfg_scale) * conditional - cfg_scale * condition_free (w = cfg_scale);
    # diffusers: noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond), guidance_scale = 1 + w
    s = diffusers_guidance_scale(w)
    assert torch.allclose(guided, uncond + s * (cond - uncond), rtol=1e-12, atol=1e-12)
    assert torch.allclose(GuidedField(net, 1, w, 3)(0.3, x), GuidedField(net, 1, w, 3)(torch.full((5,), 0.3), x))


class MixtureFields(nn.Module):
    """The exact fields of N(0, I) -> pi_0 N(m_0, s^2 I) + pi_1 N(m_1, s^2 I) on the linear path, x_t ~ N(t m_k,
    var_t I) with var_t = (1 - t)^2 + t^2 s^2 given class k: v(t, x | k) = m_k + (t s^2 - (1 - t)) / var_t
    (x - t m_k) (checked against flowprobe.gaussian below) and, for the null label, the mixture's marginal field
    sum_k P(k | x_t) v(t, x | k) with P(k | x_t) proportional to pi_k N(x; t m_k, var_t I)."""

    def __init__(self, means, s, weights):
        super().__init__()
        self.means, self.s, self.log_pi = torch.stack(means), s, torch.tensor(weights, dtype=torch.float64).log()
        self.num_classes = len(means)

    def parts(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).expand(x.shape[0])[None, :, None]  # (1, B, 1)
        var = (1 - t) ** 2 + t ** 2 * self.s ** 2
        centred = x[None] - t * self.means[:, None, :]  # (K, B, d)
        v = self.means[:, None, :] + (t * self.s ** 2 - (1 - t)) / var * centred
        logp = -(centred ** 2).sum(-1) / (2 * var[..., 0]) + self.log_pi[:, None]
        return v, logp.softmax(0)

    def forward(self, t, x, y=None):
        v, post = self.parts(t, x)
        v_null = (post[..., None] * v).sum(0)
        y = torch.full((x.shape[0],), self.num_classes) if y is None else y
        own = v[y.clamp(max=self.num_classes - 1), torch.arange(x.shape[0])]
        return torch.where((y == self.num_classes)[:, None], v_null, own)


def test_the_component_fields_are_the_gaussian_closed_form():
    means = [torch.tensor([-3.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64)]
    field = MixtureFields(means, 0.5, [0.3, 0.7])
    t, x = torch.rand(7, dtype=torch.float64), 3 * torch.randn(7, 2, dtype=torch.float64)
    for k, m in enumerate(means):
        exact = IndependentGaussianCoupling(m, 0.25 * torch.eye(2, dtype=torch.float64)).marginal_field(t, x)
        assert torch.allclose(field(t, x, y=torch.full((7,), k)), exact, rtol=1e-10, atol=1e-10)


def test_guided_samples_land_in_their_own_component(one_thread):
    means = [torch.tensor([-3.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64)]
    s, n = 0.5, 2000
    field = MixtureFields(means, s, [0.3, 0.7])
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def side(x):  # which mean each sample is nearer to
        return ((x[:, None, :] - torch.stack(means)[None]) ** 2).sum(-1).argmin(1)

    for k in (0, 1):
        x = integrate(GuidedField(field, k, 0.0, 2), x0, method="rk4", steps=40).x
        # w = 0 integrates the exact conditional field: the samples are N(m_k, s^2 I)
        assert torch.allclose(x.mean(0), means[k], atol=5 * s / math.sqrt(n))
        assert torch.allclose(x.var(0), torch.full((2,), s * s, dtype=torch.float64), rtol=0.15)
        assert float((side(x) == k).double().mean()) > 0.995
        for w in (1.0, 3.0):
            xg = integrate(GuidedField(field, k, w, 2), x0, method="rk4", steps=40).x
            assert float((side(xg) == k).double().mean()) > 0.995, (k, w)
    # the null label is the mixture: 30 % / 70 % of the samples in the two components (binomial, 5 s.e.)
    x = integrate(field, x0, method="rk4", steps=40).x
    share = float((side(x) == 0).double().mean())
    assert abs(share - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)


TINY = ["--no-progress", "--device", "cpu", "--set", "model.width=32", "--set", "model.depth=2",
        "--set", "model.time_embed_dim=8", "--set", "sample.n=64", "--set", "sample.steps=4", "--set", "log_every=50",
        "--set", "sample.plot=false"]


def test_train_and_sample_a_class_conditional_model(tmp_path, capsys, one_thread):
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = (rng.normal(scale=0.3, size=(200, 2)) + np.where(y[:, None] == 1, 3.0, -3.0) * np.array([1.0, 0.0]))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "y.npy", y)
    run = tmp_path / "run"
    sets = ["data.kind=array", f"data.target_path={tmp_path / 'x.npy'}", f"data.labels={tmp_path / 'y.npy'}",
            "model.num_classes=2", "model.label_dropout=0.2", "steps=300", "batch_size=64", "optim.lr=3e-3"]
    assert main(["train", "--out", str(run), *TINY, *[a for s in sets for a in ("--set", s)]]) == 0, \
        capsys.readouterr().err
    for k in (0, 1):  # measured (seeds 0, 1, 2): w = 0 puts 75-93 % on the class's side, w = 2 97.5-100 %
        share = {}
        for w in (0, 2):
            out = tmp_path / f"s{k}_{w}.npy"
            assert main(["sample", str(run), "--n", "200", "--steps", "20", "--label", str(k), "--guidance", str(w),
                         "--out", str(out)]) == 0, capsys.readouterr().err
            share[w] = float(((np.load(out)[:, 0] > 0) == bool(k)).mean())
        assert share[2] > 0.95 and share[2] > share[0], share
        rec = json.loads(out.with_suffix(".json").read_text())
        assert rec["label"] == k and rec["guidance"] == 2.0 and rec["diffusers_guidance_scale"] == 3.0
    errors = [["sample", str(run), "--n", "4", "--label", "2", "--out", str(tmp_path / "e.npy")],
              ["sample", str(run), "--n", "4", "--guidance", "2", "--out", str(tmp_path / "e.npy")],
              ["train", "--out", str(tmp_path / "toy"), *TINY, "--set", "model.num_classes=2"],
              ["train", "--out", str(tmp_path / "few"), *TINY, *[a for s in sets[:3] + ["model.num_classes=1"]
                                                                  for a in ("--set", s)]]]
    capsys.readouterr()
    for args in errors:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("--label" in err[0] or "--guidance" in err[0] or "model.num_classes" in err[0]), err
