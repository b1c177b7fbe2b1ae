"""Affine path kinds, the conversions between parameterisations, and the training-time densities.

Peers: FAIR flow_matching's schedulers and AffineProbPath (x_t = sigma_t x0 + alpha_t x1 in flowprobe's time
direction, so a = sigma_t, b = alpha_t; its "epsilon" is flowprobe's noise x0, its "target" the data x1); the
closed-form CDFs of the time densities through scipy; the exact score of a Gaussian target.
"""

import json
import math

import numpy as np
import pytest
import torch
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import (CondOTScheduler, CosineScheduler, LinearVPScheduler,
                                          PolynomialConvexScheduler, VPScheduler)
from scipy import special, stats

from flowprobe.affine_paths import PARAMETERISATIONS, ScheduledPath, convert, make_scheduled_path
from flowprobe.cli import main
from flowprobe.couplings import IndependentCoupling
from flowprobe.data.toy import EightGaussians, StandardGaussian
from flowprobe.nets import MLP
from flowprobe.objectives import CFMObjective, make_objective, sample_intervals, sample_times
from flowprobe.paths import LinearPath
from flowprobe.solvers import velocity_to_score
from flowprobe.timesampling import TimeSampler
from flowprobe.train import fit

KINDS = [("linear", {}, CondOTScheduler()), ("cosine", {}, CosineScheduler()),
         ("polynomial", {"n": 3}, PolynomialConvexScheduler(3)),
         ("polynomial", {"n": 0.5}, PolynomialConvexScheduler(0.5)),
         ("vp", {}, VPScheduler()), ("vp", {"beta_min": 0.5, "beta_max": 5.0}, VPScheduler(0.5, 5.0)),
         ("linear_vp", {}, LinearVPScheduler())]
IDS = ["linear", "cosine", "poly3", "poly0.5", "vp", "vp_0.5_5", "linear_vp"]
#: flowprobe name -> flow_matching's AffineProbPath method (noise = "epsilon", data = "target")
FM_NAME = {"noise": "epsilon", "data": "target", "velocity": "velocity"}


def _grid(path, n=201):
    """t over the path's training range, ends included (float64)."""
    lo, hi = path.time_range
    return torch.linspace(lo, hi, n, dtype=torch.float64)


@pytest.mark.parametrize("kind, params, scheduler", KINDS, ids=IDS)
def test_coefficients_equal_flow_matching_scheduler(kind, params, scheduler):
    path = ScheduledPath(kind, params)
    t = _grid(path)
    fm = scheduler(t)
    a, b, da, db = path.coefficients(t)
    # vp: 1 - e^{-T} is computed as -expm1(-T) here (flow_matching subtracts), which differs by rounding only
    tol = {"rtol": 1e-12, "atol": 1e-15} if kind == "vp" else {"rtol": 0, "atol": 0}
    for mine, theirs in ((a, fm.sigma_t), (b, fm.alpha_t), (da, fm.d_sigma_t), (db, fm.d_alpha_t)):
        torch.testing.assert_close(mine, theirs, **tol)
    for name, f, df in (("a", path.a, path.da), ("b", path.b, path.db)):  # derivatives are derivatives
        inner = t[(t > t[0] + 1e-3) & (t < t[-1] - 1e-3)]
        fd = (f(inner + 1e-6) - f(inner - 1e-6)) / 2e-6
        assert torch.allclose(df(inner), fd, rtol=1e-6, atol=1e-6), name


def test_variance_preserving_kinds_preserve_variance_and_linear_is_the_old_path():
    for kind in ("vp", "cosine", "linear_vp"):
        t = _grid(ScheduledPath(kind))
        a, b, _, _ = ScheduledPath(kind).coefficients(t)
        assert torch.allclose(a * a + b * b, torch.ones_like(t), atol=1e-12), kind
    assert isinstance(make_scheduled_path("linear"), LinearPath)
    g = torch.Generator().manual_seed(0)
    x0, x1, t = torch.randn(9, 3, generator=g), torch.randn(9, 3, generator=g), torch.rand(9, generator=g)
    for mine, old in zip(ScheduledPath("linear").sample(x0, x1, t), LinearPath().sample(x0, x1, t)):
        assert torch.allclose(mine, old, atol=1e-6)


@pytest.mark.parametrize("kind, params, scheduler", KINDS, ids=IDS)
def test_sample_and_target_equal_affine_prob_path(kind, params, scheduler):
    path = ScheduledPath(kind, params)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 2, 3, dtype=torch.float64, generator=g)
    x1 = torch.randn(64, 2, 3, dtype=torch.float64, generator=g)
    lo, hi = path.time_range
    t = lo + (hi - lo) * torch.rand(64, dtype=torch.float64, generator=g)
    ref = AffineProbPath(scheduler).sample(x_0=x0, x_1=x1, t=t)
    x_t, u_t = path.sample(x0, x1, t)
    tol = {"rtol": 1e-12, "atol": 1e-12} if kind == "vp" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(x_t, ref.x_t, **tol)
    torch.testing.assert_close(u_t, ref.dx_t, **tol)
    # the objective draws the same (x_t, u_t) for the same t
    pairing = IndependentCoupling(StandardGaussian(dtype=torch.float64), StandardGaussian(dtype=torch.float64))
    pr = pairing.sample(64, torch.Generator().manual_seed(2))
    _, xo, uo = CFMObjective(path).draw(pr, torch.Generator().manual_seed(3), t)
    ref = AffineProbPath(scheduler).sample(x_0=pr.x0, x_1=pr.x1, t=t)
    torch.testing.assert_close(xo, ref.x_t, **tol)
    torch.testing.assert_close(uo, ref.dx_t, **tol)


@pytest.mark.parametrize("kind, params, scheduler", KINDS, ids=IDS)
def test_conversions_equal_flow_matching(kind, params, scheduler):
    path, fm = ScheduledPath(kind, params), AffineProbPath(scheduler)
    g = torch.Generator().manual_seed(4)
    t = 0.05 + 0.9 * torch.rand(32, dtype=torch.float64, generator=g)
    x, pred = torch.randn(32, 3, dtype=torch.float64, generator=g), torch.randn(32, 3, dtype=torch.float64, generator=g)
    for src in ("velocity", "noise", "data"):
        for dst in ("velocity", "noise", "data"):
            if src == dst:
                continue
            theirs = getattr(fm, f"{FM_NAME[src]}_to_{FM_NAME[dst]}")(pred, x, t[:, None])
            mine = convert(pred, src, dst, t, x, path)
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10, msg=f"{src} -> {dst}")


@pytest.mark.parametrize("kind, params", [(k, p) for k, p, _ in KINDS], ids=IDS)
def test_conversions_round_trip_and_give_the_exact_score_of_a_gaussian(kind, params):
    """x1 ~ N(0, s1^2 I) independent of x0 ~ N(0, I): x_t ~ N(0, V I), V = a^2 + b^2 s1^2, so the exact score is
    -x / V, E[x0 | x] = a x / V, E[x1 | x] = b s1^2 x / V and the exact velocity is a' E[x0 | x] + b' E[x1 | x]."""
    path, s1 = ScheduledPath(kind, params), 0.7
    g = torch.Generator().manual_seed(5)
    t = 0.05 + 0.9 * torch.rand(40, dtype=torch.float64, generator=g)
    x = torch.randn(40, 3, dtype=torch.float64, generator=g)
    a, b, da, db = (c[:, None] for c in path.coefficients(t))
    var = a * a + b * b * s1 ** 2
    exact = {"score": -x / var, "noise": a * x / var, "data": b * s1 ** 2 * x / var}
    exact["velocity"] = da * exact["noise"] + db * exact["data"]
    for src in PARAMETERISATIONS:
        for dst in PARAMETERISATIONS:
            got = convert(exact[src], src, dst, t, x, path)
            assert torch.allclose(got, exact[dst], rtol=1e-9, atol=1e-9), f"{src} -> {dst}"
            back = convert(got, dst, src, t, x, path)
            assert torch.allclose(back, exact[src], rtol=1e-9, atol=1e-9), f"{src} -> {dst} -> {src}"
    # the one general velocity -> score (noise g, any source std) agrees on a deterministic path
    assert torch.allclose(velocity_to_score(exact["velocity"], t, x, path), exact["score"], rtol=1e-9, atol=1e-9)
    wrong = convert(exact["velocity"], "velocity", "score", t, x, LinearPath() if kind != "linear" else
                    ScheduledPath("cosine"))
    assert (wrong - exact["score"]).abs().max() > 1e-2  # the path matters


def test_conversion_guards_and_refusals():
    x, pred = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.float64)  # b = 0: noise -> data divides by zero
    assert not torch.isfinite(convert(pred, "noise", "data", t, x, ScheduledPath("cosine"))).all()
    guarded = convert(pred, "noise", "data", t, x, ScheduledPath("cosine"), eps=1e-4)
    assert torch.allclose(guarded, (x - pred) / 1e-4)
    with pytest.raises(ValueError, match="deterministic"):
        convert(pred, "noise", "velocity", t, x, ScheduledPath("cosine", sigma=0.1))
    with pytest.raises(ValueError, match="parameterisation"):
        convert(pred, "noise", "logits", t, x)


# ---------------------------------------------------------------------------------------------------------
# Time densities


def _mode_cdf(x, s):
    """SD3's mode density (Esser et al. 2024, eq. 20): t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), f
    decreasing, so P(t <= x) = 1 - f^-1(x), f^-1 by bisection (numpy, independent of flowprobe's torch code)."""
    lo, hi = np.zeros_like(x), np.ones_like(x)
    for _ in range(60):
        mid = (lo + hi) / 2
        f = 1 - mid - s * (np.cos(np.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = np.where(f > x, mid, lo), np.where(f > x, hi, mid)
    return 1 - (lo + hi) / 2


CDFS = {
    ("uniform", ()): lambda x: x,
    ("logit_normal", (("m", 0.0), ("s", 1.0))): lambda x: stats.norm.cdf(special.logit(x)),
    ("logit_normal", (("m", 0.8), ("s", 0.5))): lambda x: stats.norm.cdf((special.logit(x) - 0.8) / 0.5),
    ("mode", (("s", 1.29),)): lambda x: _mode_cdf(x, 1.29),
    ("mode", (("s", -0.8),)): lambda x: _mode_cdf(x, -0.8),
    ("u_shaped", (("a", 4.0),)): lambda x: (1 + np.sinh(4 * (x - 0.5)) / np.sinh(2)) / 2,
}


@pytest.mark.parametrize("key", list(CDFS), ids=[f"{k}{dict(p)}" for k, p in CDFS])
def test_time_samplers_follow_their_stated_density(key):
    kind, params = key
    sampler = TimeSampler(kind, **dict(params))
    lo, hi = 0.1, 0.95
    t = sampler.sample(20000, torch.Generator().manual_seed(6), dtype=torch.float64, time_range=(lo, hi))
    assert t.min() >= lo and t.max() <= hi
    unit = ((t - lo) / (hi - lo)).numpy()
    assert stats.kstest(unit, CDFS[key]).pvalue > 0.01
    if kind != "uniform":  # the test has power: the same draws are far from uniform
        assert stats.kstest(unit, "uniform").pvalue < 1e-6
    if kind != "mode":  # the stated density is the CDF's derivative
        x = np.linspace(0.02, 0.98, 49)
        fd = (CDFS[key](x + 1e-6) - CDFS[key](x - 1e-6)) / 2e-6
        assert np.allclose(sampler.density(torch.tensor(x)).numpy(), fd, rtol=1e-5)
    again = sampler.sample(20000, torch.Generator().manual_seed(6), dtype=torch.float64, time_range=(lo, hi))
    assert torch.equal(t, again)  # bit for bit from the seed


def test_directions_and_identities_of_the_time_samplers():
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    uniform = sample_times(1000, gen(), time_range=(0.2, 0.9))
    assert torch.equal(TimeSampler().sample(1000, gen(), time_range=(0.2, 0.9)), uniform)  # the old draws
    assert torch.equal(TimeSampler("mode", s=0.0).sample(1000, gen(), time_range=(0.2, 0.9)), uniform)
    # m > 0 favours the data end t -> 1; SD3's lognorm(m, s) (its t: noise at 1) is flowprobe's (-m, s)
    assert TimeSampler("logit_normal", m=1.0).sample(5000, gen()).mean() > 0.65
    sd3 = 1 - special.expit(1.0 + np.random.default_rng(0).standard_normal(20000))
    ours = TimeSampler("logit_normal", m=-1.0).sample(20000, gen(), dtype=torch.float64).numpy()
    assert stats.ks_2samp(sd3, ours).pvalue > 0.01
    assert stats.ks_2samp(1 - sd3, ours).pvalue < 1e-6
    # few-step intervals: t is the smaller of two draws, so P(t <= x) = 1 - (1 - F(x))^2
    t, h = sample_intervals(20000, gen(), 1.0, dtype=torch.float64, sampler=TimeSampler("u_shaped", a=4.0))
    cdf = CDFS[("u_shaped", (("a", 4.0),))]
    assert stats.kstest(t.numpy(), lambda x: 1 - (1 - cdf(x)) ** 2).pvalue > 0.01
    assert stats.kstest((t + h).numpy(), lambda x: cdf(x) ** 2).pvalue > 0.01


@pytest.mark.parametrize("kind, params, words", [
    ("gamma", {}, "one of uniform"), ("logit_normal", {"s": 0.0}, "s must be > 0"),
    ("logit_normal", {"m": math.nan}, "finite"), ("mode", {"s": 2.0}, "2/(pi-2)"), ("u_shaped", {"a": -1}, "(0, 50]"),
    ("uniform", {"m": 1.0}, "unknown parameter 'm'")])
def test_bad_time_sampler_values_are_refused(kind, params, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TimeSampler(kind, **params)


def test_training_from_the_api_with_a_schedule_and_a_time_density(one_thread):
    torch.manual_seed(0)
    coupling = IndependentCoupling(StandardGaussian(), EightGaussians())
    sampler = TimeSampler("logit_normal", m=0.0, s=1.0)
    objective = make_objective("cfm", ScheduledPath("cosine"), time_sampler=sampler)
    t, _, _ = objective.draw(coupling.sample(16, torch.Generator().manual_seed(8)), torch.Generator().manual_seed(9))
    assert torch.equal(t, sampler.sample(16, torch.Generator().manual_seed(9)))  # t comes from the sampler
    net = MLP(2, width=16, depth=1, time_embed_dim=8)
    state = fit(net, coupling, objective, steps=40, batch_size=64, lr=3e-3, seed=0, progress=False)
    assert all(math.isfinite(v) for v in state.losses) and np.mean(state.losses[-10:]) < np.mean(state.losses[:10])


TINY = ["--set", "steps=6", "--set", "batch_size=32", "--set", "model.width=16", "--set", "model.depth=1",
        "--set", "log_every=3", "--set", "sample.n=50", "--set", "sample.steps=3", "--set", "sample.plot=false",
        "--no-progress"]


@pytest.mark.parametrize("kind, params, sampling", [
    ("linear", "{}", "uniform"), ("cosine", "{}", "logit_normal"), ("vp", "{beta_min: 0.1, beta_max: 20}", "mode"),
    ("polynomial", "{n: 2}", "u_shaped"), ("linear_vp", "{}", "logit_normal")])
def test_cli_trains_with_each_schedule(tmp_path, capsys, one_thread, kind, params, sampling):
    run = tmp_path / "run"
    extra = ["--set", "objective.kind=meanflow", "--set", "model.time_scale=10"] if kind == "polynomial" else []
    code = main(["train", "--out", str(run), "--set", f"path.kind={kind}", "--set", f"path.params={params}",
                 "--set", f"objective.time_sampling={sampling}", *TINY, *extra])
    assert code == 0, capsys.readouterr().err
    record = json.loads((run / "run.json").read_text())
    assert record["path"]["path"] == ("linear" if kind == "linear" else "scheduled")
    assert record["path"].get("kind", "linear") == kind
    assert record["objective"].get("time_sampling", "uniform") == sampling


@pytest.mark.parametrize("override, words", [
    ("path.kind=sigmoid", ["path.kind", "cosine", "vp"]),
    ("path.params={foo: 1}", ["path.params", "unknown parameter 'foo'"]),
    ("path.params={n: 0}", ["path.params", "n must be in (0, 100]"]),
    ("objective.time_sampling=beta", ["objective.time_sampling", "logit_normal"]),
    ("objective.time_params={s: -1}", ["objective.time_params", "s must be > 0"]),
    ("objective.time_params={m: .nan}", ["objective.time_params", "finite"]),
])
def test_bad_schedule_values_are_one_line_exit_2(tmp_path, capsys, override, words):
    extra = ["--set", "objective.time_sampling=logit_normal"] if "time_params" in override else []
    extra += ["--set", "path.kind=polynomial"] if "{n:" in override else []
    code = main(["train", *extra, "--set", override, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err
    assert not (tmp_path / "run").exists()


def test_the_sde_sampler_uses_the_runs_path():
    """sample --sde derives the score from the velocity on the run's own path, not the straight line."""
    from flowprobe.config import from_dict
    from flowprobe.runs import TrainConfig
    from flowprobe.runs.sampling import sde_options

    cfg = from_dict(TrainConfig, {"path": {"kind": "vp", "params": {"beta_max": 10}},
                                  "coupling": {"kind": "independent"},
                                  "data": {"source": "gaussian", "source_params": {}}})
    path = sde_options(cfg, 0.1, "decay")["path"]
    assert isinstance(path, ScheduledPath) and path.kind == "vp" and path.params["beta_max"] == 10.0
    t = torch.linspace(0.1, 0.9, 5)
    assert not torch.allclose(LinearPath().a(t), path.a(t))
