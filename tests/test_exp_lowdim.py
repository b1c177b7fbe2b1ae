"""The low-dimensional experiments: tiny end-to-end pipelines (fast) and the --quick runs (slow)."""

import json
import math

import pytest
import torch

from flowprobe.experiments import run_experiment
from flowprobe.couplings import SwappedCoupling
from flowprobe.experiments.forward_backward import flat_spread
from flowprobe.experiments.reflow import MappedCoupling
from flowprobe.couplings import GaussianSampler, IndependentCoupling

TINY = {
    "pair-memorization": ["width=16", "steps=10", "n_pairs=16", "control_n_pairs=16", "sigmas=[0, 0.5, 1, 2]",
                          "solver_steps=4", "phase=true", "phase_dims=[3]", "phase_n_pairs=[8]",
                          "phase_sigmas=[0, 1]", "phase_steps=5", "batch_size=8"],
    "gmm": ["dims=[2]", "width=16", "steps=10", "base_steps=10", "n_pairs=32", "n_eval=32", "solver_steps=4",
            "train_seeds=2", "eval_repeats=2", "batch_size=16"],
    "reflow": ["width=16", "steps=10", "base_steps=10", "n_pairs=32", "n_eval=32", "solver_steps=4", "rounds=2",
               "batch_size=16", "floor=true"],
    "forward-backward": ["width=16", "steps=10", "n_samples=8", "times=[0.01, 0.5, 0.99]", "dim=4", "batch_size=16"],
    "few-step": ["width=16", "mem_width=16", "gauss_steps=10", "mem_steps=10", "n_eval=64", "n_pairs=16", "dim=3",
                 "sigmas=[0, 1]", "jumps=[1, 2]", "solver_steps=4", "batch_size=16", "gauss_dim=3"],
}


def _finite(v):
    return v is None or (isinstance(v, (int, float)) and math.isfinite(v))


def test_pair_memorization_pipeline(tmp_path):
    res = run_experiment("pair-memorization", tmp_path, quick=False, seed=0, overrides=TINY["pair-memorization"],
                         device="cpu", verbose=False)
    runs = res["runs"]
    roles = [r["role"] for r in runs]
    assert roles.count("sweep") == 4 and roles.count("control") == 1 and roles.count("phase") == 2
    for r in runs:
        for k in ("dim", "n_pairs", "sigma", "nn_acc_assigned", "nn_acc_ot", "l2_assigned", "l2_ot"):
            assert k in r and _finite(r[k])
        assert 0 <= r["nn_acc_assigned"] <= 1 and r["l2_assigned"] >= 0
    assert [c["name"][:8] for c in res["criteria"]][:2] == ["sigma = ", "sigma = "]
    assert len(res["criteria"]) == 4
    assert (tmp_path / "sigma_sweep.png").stat().st_size > 0
    assert (tmp_path / "phase_diagram.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["nn_acc_assigned"] == runs[0]["nn_acc_assigned"]


def test_pair_memorization_is_reproducible(tmp_path):
    over = TINY["pair-memorization"] + ["control=false", "phase=false", "sigmas=[0]"]
    a = run_experiment("pair-memorization", tmp_path / "a", quick=False, seed=3, overrides=over, device="cpu",
                       verbose=False)
    b = run_experiment("pair-memorization", tmp_path / "b", quick=False, seed=3, overrides=over, device="cpu",
                       verbose=False)
    assert a["runs"][0]["l2_assigned"] == b["runs"][0]["l2_assigned"]


def test_gmm_pipeline(tmp_path):
    res = run_experiment("gmm", tmp_path, quick=False, seed=0, overrides=TINY["gmm"], device="cpu", verbose=False)
    runs = res["runs"]
    assert {(r["pairing"], r["sigma"]) for r in runs} == {("random", 0.0), ("random", 0.05), ("reflow", 0.0),
                                                          ("reflow", 0.05)}
    for r in runs:
        assert r["dim"] == 2
        # biased (V) minus unbiased (U) MMD^2 with a Gaussian kernel is (1 - mean off-diagonal k_xx) / n +
        # (1 - mean off-diagonal k_yy) / m: strictly between 0 and 1/n + 1/m (here n = m = 32), whatever the samples
        for kind in ("generalization", "memorization"):
            gap = r[f"mmd_{kind}"] - r[f"mmd_{kind}_unbiased"]
            assert 0 < gap <= 2 / 32 + 1e-12, (kind, gap)
        assert _finite(r["mmd_generalization_unbiased"]) and r["mmd_generalization_std"] > 0
    assert len(res["criteria"]) == 4
    assert (tmp_path / "gmm_mmd.png").exists()


def test_reflow_pipeline(tmp_path):
    res = run_experiment("reflow", tmp_path, quick=False, seed=0, overrides=TINY["reflow"], device="cpu", verbose=False)
    rounds = res["rounds"]
    # per start: round 0 + 2 sigmas x 2 rounds
    assert len(rounds) == 2 * (1 + 2 * 2)
    for r in rounds:
        assert r["start"] in ("independent", "rot180")
        for k in ("round", "sigma", "l2_to_generated", "straightness", "transport_cost", "ot_cost", "w2_to_target"):
            assert k in r and _finite(r[k])
        # a coupling of two point sets costs at least the optimal one
        assert r["transport_cost"] >= r["ot_cost"] - 1e-6 * max(1.0, r["ot_cost"])
    base = [r for r in rounds if r["round"] == 0]
    assert [r["l2_to_generated"] is None for r in base] == [True, False]  # independent vs rot180
    assert len(res["retrain_floor"]) == 2
    assert len(res["criteria"]) == 4  # the Table-3 sign and the straightening, per start


def test_forward_backward_pipeline(tmp_path):
    res = run_experiment("forward-backward", tmp_path, quick=False, seed=0, overrides=TINY["forward-backward"],
                         device="cpu", verbose=False)
    runs = res["runs"]
    assert [(r["data"], r["direction"], r["sigma"]) for r in runs] == [
        ("low_variance", "forward", 0.0), ("low_variance", "backward", 0.0), ("low_variance", "forward", 0.05),
        ("low_variance", "backward", 0.05), ("control", "forward", 0.0), ("control", "backward", 0.0)]
    for r in runs:
        assert r["times"] == [0.01, 0.5, 0.99]
        assert all(g > 0 and _finite(g) for g in r["gv"]) and len(r["gv_se"]) == 3 and len(r["loss"]) == 3
        expect = r["gv"][-1] / r["gv"][0] if r["direction"] == "forward" else r["gv"][0] / r["gv"][-1]
        assert r["endpoint_ratio"] == pytest.approx(expect)
        assert r["flat_spread"] == pytest.approx((max(r["gv"]) - min(r["gv"])) / (max(r["gv"]) + min(r["gv"])))
    assert len(res["criteria"]) == 6
    # the control criterion is flatness of the whole curve (spec R8: "flat within +-15 %"), not the endpoint ratio
    control_runs = [r for r in runs if r["data"] == "control"]
    control_crits = [c for c in res["criteria"] if c["name"].startswith("control")]
    assert [c["held"] for c in control_crits] == [r["flat_spread"] <= 0.15 for r in control_runs]
    assert all("flat within +-0.15" in c["name"] for c in control_crits)
    assert (tmp_path / "gradvar_forward_backward.png").exists()


def _own_integrate(net, x0, method: str, steps: int):
    """The test's own fixed-step integrators (Euler, RK4, average-velocity jumps), float64 time grid."""
    x = x0.clone()
    h = 1.0 / steps
    with torch.no_grad():
        for k in range(steps):
            t = torch.full((x.shape[0],), k * h)
            if method == "euler":
                x = x + h * net(t, x)
            elif method == "average":
                x = x + h * net(t, x, torch.full_like(t, h))
            else:  # rk4
                k1 = net(t, x)
                k2 = net(t + h / 2, x + h / 2 * k1)
                k3 = net(t + h / 2, x + h / 2 * k2)
                k4 = net(t + h, x + h * k3)
                x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_few_step_pipeline(tmp_path):
    """Every reported number of the few-step experiment recomputed from the saved nets and data, with the test's
    own integrators, the Gaussian flow map in closed form (m1 + S1^(1/2) x0) and the OT partner from scipy."""
    import numpy as np
    from safetensors.torch import load_file
    from scipy.linalg import sqrtm
    from scipy.optimize import linear_sum_assignment

    from flowprobe.runs import load_model

    res = run_experiment("few-step", tmp_path, quick=False, seed=0, overrides=TINY["few-step"] + ["save_models=true"],
                         device="cpu", verbose=False)
    gauss, mem = res["gaussian"], res["memorization"]
    # cfm, meanflow, splitmeanflow at the main time scale, and meanflow again at the extra one
    assert [(r["objective"], r["time_scale"]) for r in gauss] == [("cfm", 10.0), ("meanflow", 10.0),
                                                                    ("splitmeanflow", 10.0), ("meanflow", 1000.0)]
    data = load_file(tmp_path / "models" / "gaussian-data.safetensors")
    x0, m1, s1 = data["x0"], data["m1"].double().numpy(), data["S1"].double().numpy()
    exact = torch.from_numpy(m1 + x0.double().numpy() @ np.real(sqrtm(s1)).T)
    spread = (exact - exact.mean(0)).norm(dim=1).mean().item()
    for r in gauss:
        assert r["jumps"] == [1, 2] and r["spread"] == pytest.approx(spread, rel=1e-5)
        net, _ = load_model(tmp_path / "models" / f"gaussian-{r['objective']}-scale{r['time_scale']:g}.safetensors")
        jump = "euler" if r["objective"] == "cfm" else "average"
        for k, err in zip(r["jumps"], r["jump_error"]):
            own = (_own_integrate(net, x0, jump, k).double() - exact).norm(dim=1).mean().item() / spread
            assert err == pytest.approx(own, rel=1e-4)
        own_ode = (_own_integrate(net, x0, "rk4", 4).double() - exact).norm(dim=1).mean().item() / spread
        assert r["ode_error"] == pytest.approx(own_ode, rel=1e-4)
    assert {(r["objective"], r["sigma"]) for r in mem} == {(o, s) for o in ("cfm", "meanflow", "splitmeanflow")
                                                           for s in (0.0, 1.0)}
    pairs = load_file(tmp_path / "models" / "pairs-data.safetensors")
    x0, x1, assigned = pairs["x0"], pairs["x1"], pairs["assigned"]
    assert sorted(assigned.tolist()) == list(range(x0.shape[0]))
    _, ot = linear_sum_assignment(torch.cdist(x0.double(), x1.double()).pow(2).numpy())
    ot = torch.from_numpy(ot)
    for r in mem:
        net, _ = load_model(tmp_path / "models" / f"pairs-{r['objective']}-sigma{r['sigma']:g}.safetensors")
        for how, end in (("ode", _own_integrate(net, x0, "rk4", 4)),
                         ("jump", _own_integrate(net, x0, "euler" if r["objective"] == "cfm" else "average", 1))):
            nearest = torch.cdist(end, x1).argmin(dim=1)
            assert r[f"nn_acc_assigned_{how}"] == pytest.approx((nearest == assigned).double().mean().item())
            assert r[f"nn_acc_ot_{how}"] == pytest.approx((nearest == ot).double().mean().item())
            assert r[f"l2_assigned_{how}"] == pytest.approx((end - x1[assigned]).norm(dim=1).mean().item(), rel=1e-5)
            assert r[f"l2_ot_{how}"] == pytest.approx((end - x1[ot]).norm(dim=1).mean().item(), rel=1e-5)
    assert len(res["criteria"]) == 6 and (tmp_path / "few_step.png").stat().st_size > 0


def test_flat_spread_is_the_narrowest_relative_band():
    # 0.85 and 1.15 lie exactly in 1 +- 0.15; an endpoint ratio of 1 says nothing about the middle
    assert flat_spread([0.85, 1.0, 1.15]) == pytest.approx(0.15)
    assert flat_spread([2.0, 6.0, 2.0]) == pytest.approx(0.5)  # 4 (1 +- 0.5) = 2 .. 6
    assert flat_spread([3.0, 3.0]) == 0.0
    assert flat_spread([5.0, 1.0]) == flat_spread([1.0, 5.0]) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="positive"):
        flat_spread([1.0, 0.0])
    with pytest.raises(ValueError, match="positive"):
        flat_spread([])


def test_helper_couplings():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([5.0, 5.0])
    p = MappedCoupling(GaussianSampler((2,)), lambda x: mu - x).sample(10, g)
    assert torch.allclose(p.x0 + p.x1, mu.expand(10, 2))
    base = IndependentCoupling(GaussianSampler((2,)), GaussianSampler((2,), mean=10.0))
    a = base.sample(6, torch.Generator().manual_seed(1))
    b = SwappedCoupling(base).sample(6, torch.Generator().manual_seed(1))
    assert torch.equal(a.x0, b.x1) and torch.equal(a.x1, b.x0)


# ---------------------------------------------------------------------------------------------------- slow


# Which criteria each --quick run must meet (checked for seeds 0, 1, 2 when the experiments were written):
# every one of pair-memorization; the four forward/backward ratio criteria (the higher-variance negative
# control is reported, it is not flat); for gmm only the generalisation criteria -- the memorisation sign of
# Table 1 (MMD(sigma=0) < MMD(sigma=0.05)) is within seed noise here and is reported, not asserted
# (docs/reproduction.md, gmm); for reflow the straightening criteria -- the Table-3 sign (L2 to generated
# smaller at sigma = 0) is within one or two paired standard errors in these 2-d toys (docs/reproduction.md, reflow).
MUST_HOLD = {
    "pair-memorization": lambda name: True,
    "reflow": lambda name: "straightens" in name,
    "forward-backward": lambda name: not name.startswith("control"),
    "gmm": lambda name: "Generalization" in name,
}
# few-step (beyond the paper) is not run here: its quick run takes 100 s, and its Gaussian criteria are asserted
# with the same protocol by tests/test_meanflow.py::test_few_step_objectives_learn_the_one_step_map. Its quick
# runs for seeds 0-2 met every Gaussian criterion and CFM's memorisation; the ODE of a MeanFlow net's h = 0 field
# memorised 0.89-0.97 (docs/neighbours.md).


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pair-memorization", "gmm", "reflow", "forward-backward"])
def test_quick_experiment_criteria_hold(name, tmp_path):
    res = run_experiment(name, tmp_path, quick=True, seed=0, device="cpu", verbose=False)
    checked = [c for c in res["criteria"] if MUST_HOLD[name](c["name"])]
    assert checked
    failed = [c for c in checked if not c["held"]]
    assert not failed, failed
