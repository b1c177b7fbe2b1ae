"""The gaussian-gradvar and intersecting-lines experiments: tiny pipeline runs (fast) and the --quick runs with
their criteria (slow)."""

import json
import math

import pytest

from flowprobe.experiments import run_experiment

GG_TINY = ["n_samples=3000", "n_samples_small=1000", "angles=[0, 120, 180]", "rk4_draws=200", "rk4_steps=50"]
IL_TINY = ["n_eval=60", "exact_sigmas=[0.0, 0.2]", "euler_steps=[1, 3, 11]", "rk4_steps=[11, 21]",
           "extra_euler_steps=[2]", "agreement_solvers=[rk4:11, rk4:21]", "sigmas=[0.0]", "width=16", "depth=1",
           "train_steps=30", "batch_size=32", "n_trajectories=5"]


def test_gaussian_gradvar_pipeline(tmp_path):
    res = run_experiment("gaussian-gradvar", tmp_path, quick=True, overrides=GG_TINY, device="cpu", verbose=False)
    rows = res["rows"]
    # 3 rotations x 2 fields + independent x 1 field, for each of 2 sigmas
    assert len(rows) == 2 * (3 * 2 + 1)
    for r in rows:
        assert set(r) >= {"coupling", "field", "sigma", "loss", "gv", "gv_closed_form"}
    r = next(r for r in rows if r["coupling"] == "rotation-180" and r["field"] == "ot" and r["sigma"] == 0)
    assert r["gv_closed_form"] == pytest.approx(224 / 3, rel=1e-10)
    r = next(r for r in rows if r["coupling"] == "rotation-180" and r["field"] == "pair_optimal" and r["sigma"] > 0)
    assert math.isinf(r["gv_closed_form"]) and r["gv"] > 1e6
    # the exact checks hold at any sample size: zero-variance pair fields and the RK4 endpoint check
    crit = {c["name"].split(":")[0]: c["held"] for c in res["criteria"]}
    assert crit["R1.1 pair-optimal fields at sigma=0"]
    assert crit["R1.4 Lemma 1"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "gaussian-gradvar" and len(saved["rows"]) == len(rows)
    assert (tmp_path / "gradvar_bars.png").stat().st_size > 0 and (tmp_path / "report.md").exists()


def test_intersecting_lines_pipeline(tmp_path):
    res = run_experiment("intersecting-lines", tmp_path, quick=True, overrides=IL_TINY, device="cpu", verbose=False)
    keys = {"field", "schedule", "sigma", "solver", "steps", "nfe", "frac_pairing", "frac_ot", "mean_cos"}
    for r in res["runs"]:
        assert set(r) >= keys
        assert 0 <= r["frac_pairing"] <= 1 and 0 <= r["frac_ot"] <= 1
        assert r["nfe"] == r["steps"] * (4 if r["solver"] == "rk4" else 1)
    mlp = [r for r in res["runs"] if r["field"] == "mlp"]
    assert {(r["solver"], r["steps"]) for r in mlp} == {("euler", 1), ("euler", 3), ("euler", 11), ("rk4", 11),
                                                        ("rk4", 21), ("euler", 2)}
    # exact fields: the sigma = 0 pair field memorises on every odd Euler grid; the sigma = 0.2 fields reach OT with
    # RK4 at h <= sigma / 10 (these do not depend on training)
    exact0 = [r for r in res["runs"] if r["field"] == "exact" and r["sigma"] == 0 and r["solver"] == "euler"]
    assert all(r["frac_pairing"] == 1.0 and r["mean_cos"] < -0.999 for r in exact0)
    fine = [r for r in res["runs"] if r["field"] == "exact" and r["sigma"] == 0.2 and r["steps"] == 50]
    assert len(fine) == 2 and all(r["frac_ot"] == 1.0 for r in fine)  # constant and bridge
    assert all(c["held"] for c in res["criteria"] if c["name"].startswith("R2"))
    assert {a["field"] for a in res["solver_agreement"]} == {"exact", "mlp"}
    for f in ("memorisation_vs_steps.png", "trajectories.png", "results.json", "report.md"):
        assert (tmp_path / f).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gaussian-gradvar", "intersecting-lines"])
def test_quick_experiment_criteria_hold(tmp_path, name):
    res = run_experiment(name, tmp_path, quick=True, seed=0, device="cpu", verbose=False)
    failed = [c for c in res["criteria"] if not c["held"]]
    assert not failed, failed
    assert res["all_criteria_held"] and len(res["criteria"]) >= 7


@pytest.mark.parametrize("name", ["gaussian-gradvar", "intersecting-lines"])
def test_yaml_config_matches_defaults(name):
    """configs/NAME.yaml is a copy of the experiment's defaults, readable by flowprobe.config."""
    from pathlib import Path

    from flowprobe.config import load_config, to_dict
    from flowprobe.experiments.harness import REGISTRY, load_all

    load_all()
    cls = REGISTRY[name].config_cls
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    assert to_dict(load_config(cls, path)) == to_dict(cls())
