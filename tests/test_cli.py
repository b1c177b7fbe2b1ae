"""The train and sample commands, end to end on a tiny config; config errors are one line, exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from flowprobe.cli import main
from flowprobe.config import load_config
from flowprobe.runs import TrainConfig, default_config_path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "steps=30", "--set", "batch_size=32", "--set", "model.width=16", "--set", "model.depth=1",
        "--set", "log_every=10", "--set", "ckpt_every=15", "--set", "sample.n=200", "--set", "sample.steps=5",
        "--set", "sample.trajectories=20", "--no-progress"]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sample", "reproduce", "probe"):
        assert f"    {cmd}" in out


def test_bad_override_is_one_line_exit_2():
    """Through the real entry point: no traceback, one line naming the key and what is allowed."""
    r = subprocess.run([sys.executable, "-m", "flowprobe.cli", "train", str(REPO / "configs" / "toy.yaml"),
                        "--set", "optim.lrr=0.1", "--out", "unused"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "optim.lrr" in lines[0] and "lr" in lines[0] and "warmup" in lines[0]
    assert not Path("unused").exists()


@pytest.mark.parametrize("override, words", [
    ("precision=fp16", ["precision", "fp32", "bf16"]),
    ("steps=-3", ["steps", ">= 1"]),
    ("batch_size=abc", ["batch_size", "integer"]),
    ("coupling.kind=fixed_pairs", ["fixed_pairs", "data.n_train"]),
    ("data.target_params={radius: 2}", ["data.target_params", "radius"]),
    ("data.source=spiral", ["data.source", "eight_gaussians"]),
])
def test_bad_values_are_one_line_exit_2(tmp_path, capsys, override, words):
    code = main(["train", "--set", override, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    for w in words:
        assert w in err
    assert not (tmp_path / "run").exists()


def test_packaged_config_is_the_repository_config():
    assert default_config_path().read_text() == (REPO / "configs" / "toy.yaml").read_text()
    cfg = load_config(TrainConfig, default_config_path())
    assert cfg.data.source == "eight_gaussians" and cfg.data.target == "moons"


def test_train_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(REPO / "configs" / "toy.yaml"), "--out", str(run), *TINY]) == 0
    for f in ("config.yaml", "run.json", "metrics.jsonl", "samples.png", "checkpoints/step_00000015.safetensors",
              "checkpoints/step_00000030.safetensors", "checkpoints/step_00000030.json"):
        assert (run / f).is_file(), f
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "train"] == [10, 20, 30]
    ev = [r for r in recs if r["event"] == "eval"]
    assert len(ev) == 1 and ev[0]["solver"] == "euler" and ev[0]["steps"] == 5 and ev[0]["nfe"] == 5
    assert recs[0]["coupling"] == {"coupling": "minibatch_ot", "method": "exact", "reg": 0.05}
    info = json.loads((run / "run.json").read_text())
    assert info["path"] == {"path": "linear", "sigma": 0.0} and info["config"]["steps"] == 30
    assert (run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second train into the same folder needs --resume
    assert main(["train", "--out", str(run), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(run), *TINY, "--set", "steps=40", "--resume"]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "resume"] == [30]
    assert [r["step"] for r in recs if r["event"] == "train"] == [10, 20, 30, 40]

    npy = tmp_path / "s.npy"
    assert main(["sample", str(run), "--n", "64", "--steps", "3", "--solver", "heun", "--out", str(npy),
                 "--plot", str(tmp_path / "s.png")]) == 0
    x = np.load(npy, allow_pickle=False)
    assert x.shape == (64, 2) and np.isfinite(x).all()
    rec = json.loads(npy.with_suffix(".json").read_text())
    assert rec["nfe"] == 6 and rec["solver"] == "heun" and rec["steps"] == 3 and rec["step"] == 40
    assert rec["model"] == "ema"
    assert (tmp_path / "s.png").is_file()

    st = tmp_path / "s.safetensors"
    ck = run / "checkpoints" / "step_00000015.safetensors"
    assert main(["sample", str(ck), "--n", "10", "--steps", "4", "--solver", "rk4", "--out", str(st),
                 "--seed", "3"]) == 0
    with safe_open(str(st), "pt") as f:
        assert f.get_tensor("samples").shape == (10, 2)
        meta = f.metadata()
    assert meta["nfe"] == "16" and meta["step"] == "15"
    # same seed, same samples; the .npy path gives the same numbers
    assert main(["sample", str(ck), "--n", "10", "--steps", "4", "--solver", "rk4", "--out", str(tmp_path / "t.npy"),
                 "--seed", "3"]) == 0
    with safe_open(str(st), "pt") as f:
        assert np.array_equal(f.get_tensor("samples").numpy(), np.load(tmp_path / "t.npy"))

    assert main(["sample", str(ck), "--n", "10", "--steps", "4", "--out", str(tmp_path / "x.txt")]) == 2
    assert main(["sample", str(tmp_path / "nope"), "--n", "10", "--steps", "4", "--out", str(st)]) == 2
    assert main(["train", "--device", "quantum", "--out", str(tmp_path / "r2"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("flowprobe: error:") for line in err)


def _readme_block(after: str) -> str:
    text = (REPO / "README.md").read_text()
    i = text.index(after)
    a = text.index("```bash\n", i) + len("```bash\n")
    return text[a:text.index("```", a)].strip()


def test_ci_runs_the_readme_commands():
    setup, tests = _readme_block("Set up"), _readme_block("Tests:")
    assert setup == 'pip install torch==2.13.0 && pip install -e ".[dev]" && pip install --no-deps torchcfm==1.0.7'
    assert tests == "python -m pytest tests"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert any(line.startswith(setup + " ||") or line == setup for line in ci)
    assert any(line.startswith(tests + " ||") or line == tests for line in ci)
    assert _readme_block("Main job").startswith("flowprobe ")


def test_sample_with_the_sde(tmp_path, capsys):
    """--sde samples by Euler-Maruyama with the velocity-derived score: recorded in the JSON, repeatable per seed,
    different from the ODE; refused (one-line error) where that score does not apply."""
    run = tmp_path / "run"
    gauss = ["--set", "data.source=gaussian", "--set", "data.source_params={std: 1.5}",
             "--set", "coupling.kind=independent", "--set", "sample.plot=false"]
    assert main(["train", "--out", str(run), *TINY, *gauss]) == 0
    outs = []
    for name, extra in (("a", ["--sde", "0.5"]), ("b", ["--sde", "0.5"]), ("c", [])):
        f = tmp_path / f"{name}.npy"
        assert main(["sample", str(run), "--n", "50", "--steps", "8", "--out", str(f), "--seed", "1", *extra]) == 0
        outs.append((np.load(f), json.loads(f.with_suffix(".json").read_text())))
    (a, ra), (b, _), (c, rc) = outs
    assert ra["solver"] == "euler_maruyama" and ra["diffusion"] == 0.5 and ra["diffusion_schedule"] == "decay"
    assert ra["source_std"] == 1.5 and ra["nfe"] == 8 and rc["solver"] == "euler" and "diffusion" not in rc
    assert np.array_equal(a, b) and not np.allclose(a, c) and np.isfinite(a).all()

    # a Bellman-optimal Euler grid, recorded with what it cost; refused for a method it does not optimise
    f = tmp_path / "opt.npy"
    assert main(["sample", str(run), "--n", "50", "--steps", "4", "--schedule", "optimal", "--out", str(f)]) == 0
    rec = json.loads(f.with_suffix(".json").read_text())
    grid = rec["grid"]
    assert rec["schedule"] == "optimal" and len(grid) == 5 and grid[0] == 0 and grid[-1] == 1
    assert grid == sorted(grid) and rec["schedule_nfe"] == 17 * 64 and rec["nfe"] == 4
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "5", "--steps", "4", "--schedule", "optimal", "--solver", "heun",
                 "--out", str(f)]) == 2
    assert "Euler" in capsys.readouterr().err

    other = tmp_path / "ot"  # the packaged toy: minibatch OT from eight Gaussians
    assert main(["train", "--out", str(other), *TINY, "--set", "sample.plot=false"]) == 0
    capsys.readouterr()
    short = ["--n", "10", "--steps", "4", "--out", str(tmp_path / "x.npy")]
    assert main(["sample", str(other), *short, "--sde", "0.5"]) == 2
    assert main(["sample", str(run), *short, "--sde", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "independent" in err[0] and "> 0" in err[1]


@pytest.mark.parametrize("kind", ["meanflow", "splitmeanflow"])
def test_train_and_sample_a_few_step_objective(tmp_path, capsys, kind):
    """objective.kind gives the net a step input; sample.solver / --solver average jump with it; a velocity run or
    config that asks for jumps stops with one line."""
    run = tmp_path / "run"
    few = ["--set", f"objective.kind={kind}", "--set", "model.time_scale=10", "--set", "sample.solver=average",
           "--set", "sample.steps=2", "--set", "sample.plot=false"]
    assert main(["train", "--out", str(run), *TINY, *few]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["objective"]["objective"] == kind
    ev = [r for r in recs if r["event"] == "eval"][0]
    assert ev["solver"] == "average" and ev["nfe"] == 2
    spec = json.loads(next((run / "checkpoints").glob("*.json")).read_text())["extra"]["model"]
    assert spec["kwargs"]["step_embed"] is True and spec["kwargs"]["time_scale"] == 10.0
    out = tmp_path / "one.npy"
    assert main(["sample", str(run), "--n", "20", "--steps", "1", "--solver", "average", "--out", str(out)]) == 0
    assert np.load(out).shape == (20, 2) and json.loads(out.with_suffix(".json").read_text())["nfe"] == 1
    # the same net is also a velocity field (h = 0): the ODE solvers work on it
    assert main(["sample", str(run), "--n", "20", "--steps", "3", "--solver", "heun", "--out", str(out)]) == 0
    # the gradient-variance probe measures its own loss at the jump to the end
    probe = tmp_path / "gv"
    assert main(["probe", "gradvar", str(run), "--times", "0:1:3", "--samples", "8", "--step", "to_end",
                 "--out", str(probe), "--device", "cpu", "--no-progress"]) == 0
    prof = json.loads((probe / "gradvar.json").read_text())["profiles"][0]
    assert prof["step"] == "to_end" and prof["objective"]["objective"] == kind
    assert main(["probe", "gradvar", str(run), "--times", "0:1:3", "--samples", "8", "--step", "soon",
                 "--out", str(probe), "--device", "cpu", "--no-progress"]) == 2

    cfm = tmp_path / "cfm"
    assert main(["train", "--out", str(cfm), *TINY, "--set", "sample.plot=false"]) == 0
    capsys.readouterr()
    assert main(["sample", str(cfm), "--n", "5", "--steps", "1", "--solver", "average", "--out", str(out)]) == 2
    assert main(["train", "--out", str(tmp_path / "x"), *TINY, "--set", "sample.solver=average"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("average" in line for line in err)
    assert main(["probe", "gradvar", str(cfm), "--times", "0:1:3", "--samples", "8", "--step", "0.5",
                 "--out", str(probe), "--device", "cpu", "--no-progress"]) == 2
    assert "CFM objective" in capsys.readouterr().err


def test_train_with_weighted_pairs(tmp_path, capsys):
    """coupling.weight_epsilon trains weighted CFM on any coupling kind, is recorded, and rules out --sde."""
    run = tmp_path / "run"
    extra = ["--set", "coupling.kind=independent", "--set", "coupling.weight_epsilon=4", "--set", "sample.plot=false",
             "--set", "data.source=gaussian", "--set", "data.source_params={}"]
    assert main(["train", "--out", str(run), *TINY, *extra]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["coupling"] == {"coupling": "weighted", "epsilon": 4.0, "base": {"coupling": "independent"}}
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "5", "--steps", "2", "--sde", "0.5", "--out", str(tmp_path / "x.npy")]) == 2
    assert "weighted" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "bad"), *TINY, "--set", "coupling.weight_epsilon=0"]) == 2
