"""The experiment registry: every experiment has a configs/NAME.yaml equal to its defaults, and the
--config / --set / --quick layers apply in order."""

from pathlib import Path

import pytest
import torch
import yaml

from flowprobe.config import ConfigError, from_dict
from flowprobe.experiments import REGISTRY, run_experiment
from flowprobe.experiments.harness import default_config_yaml, load_all

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
load_all()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_experiment_has_a_config_file_equal_to_its_defaults(name):
    exp = REGISTRY[name]
    path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), f"configs/{name}.yaml is missing (flowprobe reproduce {name} --print-config)"
    assert from_dict(exp.config_cls, yaml.safe_load(path.read_text())) == exp.config_cls()
    # the generated text reads back to the defaults too
    assert from_dict(exp.config_cls, yaml.safe_load(default_config_yaml(name))) == exp.config_cls()


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("chunk_size: 5000\nrk4_draws: 500\n")
    res = run_experiment("gaussian-gradvar", tmp_path / "out", quick=True, config_file=cfg,
                         overrides=["rk4_draws=400"], device="cpu", verbose=False)
    assert res["config"]["chunk_size"] == 5000                 # from the file
    assert res["config"]["rk4_draws"] == 400                   # --set wins over the file
    quick = REGISTRY["gaussian-gradvar"].quick
    for k, v in quick.items():                                 # --quick sizes still apply
        if k != "rk4_draws":
            assert res["config"][k] == v
    assert (tmp_path / "out" / "report.md").is_file()


def test_bad_config_key_names_it(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("no_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        run_experiment("gaussian-gradvar", tmp_path / "out", quick=True, config_file=cfg, device="cpu", verbose=False)


# ------------------------------------------------------------------------------------- discovery and sizes

IL_TINY = ["n_eval=60", "exact_sigmas=[0.0, 0.2]", "euler_steps=[1, 3, 11]", "rk4_steps=[11, 21]",
           "extra_euler_steps=[2]", "agreement_solvers=[rk4:11, rk4:21]", "sigmas=[0.0]", "width=16", "depth=1",
           "train_steps=30", "batch_size=32", "n_trajectories=5"]


def test_every_experiment_module_is_discovered():
    """No hand-written module list: every module of flowprobe.experiments except the shared ones registers at
    least one experiment, and the registry holds experiments of no other module."""
    import pkgutil

    import flowprobe.experiments as pkg
    from flowprobe.experiments.harness import SHARED_MODULES

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)} - SHARED_MODULES
    owners = {e.run.__module__.rsplit(".", 1)[-1] for e in REGISTRY.values()}
    assert owners == modules
    assert {"harness", "lowdim", "imageflow"} == SHARED_MODULES


def test_default_intersecting_lines_run_on_cpu_is_the_quick_one():
    """`flowprobe reproduce intersecting-lines` on a CPU runs the quick size, into results/NAME-quick, and is
    expected to take under 3 minutes; --full (quick=False) is the paper's size, into results/NAME-full."""
    from flowprobe.experiments.harness import default_quick, plan_run

    exp = REGISTRY["intersecting-lines"]
    plan = plan_run("intersecting-lines", device="cpu")
    assert plan.quick and plan.size_from_device
    assert plan.config == from_dict(exp.config_cls, exp.quick)
    assert plan.out == Path("results") / "intersecting-lines-quick"
    assert plan.estimate_s is not None and plan.estimate_s < 180
    assert plan.other_size_estimate_s > 5 * plan.estimate_s          # the full size, announced as the other size
    full = plan_run("intersecting-lines", quick=False, device="cpu")
    assert not full.quick and full.config == exp.config_cls()
    assert full.out == Path("results") / "intersecting-lines-full"
    assert default_quick(torch.device("cpu")) and not default_quick(torch.device("cuda"))


def test_progress_is_one_overall_count(tmp_path):
    """A multi-stage run reports one count over all its stages: the total is fixed from the start and the work
    done only grows, to the total."""
    calls = []
    res = run_experiment("intersecting-lines", tmp_path, quick=True, overrides=IL_TINY, device="cpu",
                         progress=lambda stage, done, total: calls.append((stage, done, total)), log=lambda s: None)
    assert res["all_criteria_held"] is not None
    totals = {t for _, _, t in calls}
    assert len(totals) == 1 and totals.pop() > 0
    done = [d for _, d, _ in calls]
    assert done == sorted(done) and done[-1] == calls[-1][2]
    stages = list(dict.fromkeys(s for s, _, _ in calls))
    assert "training MLP sigma=0" in stages and len(stages) >= 4


def test_interrupted_run_leaves_no_empty_folder(tmp_path):
    from dataclasses import dataclass

    from flowprobe.experiments.harness import experiment

    @dataclass
    class Empty:
        pass

    @experiment("interrupted-for-test", config=Empty)
    def interrupted(cfg, ctx):
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment("interrupted-for-test", tmp_path / "results" / "x-quick", device="cpu", verbose=False)
        assert not (tmp_path / "results").exists()
    finally:
        REGISTRY.pop("interrupted-for-test")


# ------------------------------------------------------------------------------------- the command

def test_reproduce_command_announces_size_time_and_folder(tmp_path, capsys):
    """stderr is not a terminal here: the announcement and the progress go out as plain lines."""
    from flowprobe.cli import main

    out = tmp_path / "il"
    args = ["reproduce", "intersecting-lines", "--device", "cpu", "--out", str(out)]
    for o in IL_TINY:
        args += ["--set", o]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "intersecting-lines: quick size (the default on cpu)" in cap.err
    assert "Expected to take about" in cap.err and "--full" in cap.err
    assert "% of the run done" in cap.err and "training MLP sigma=0" in cap.err
    assert "\x1b[" not in cap.err                                   # no terminal control codes
    assert "criteria held" in cap.out and (out / "report.md").is_file()


def test_reproduce_quick_and_full_are_exclusive(capsys):
    from flowprobe.cli import main

    with pytest.raises(SystemExit):
        main(["reproduce", "intersecting-lines", "--quick", "--full"])
    assert "not allowed with" in capsys.readouterr().err


def test_reproduce_list_names_every_experiment(capsys):
    from flowprobe.cli import main

    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY)
