"""The memorisation watch on a `flowprobe train` run (the config's ``watch:`` section): its readings land in the run's
metrics.jsonl and equal a watch rebuilt on the saved checkpoint, ``on_fire: stop`` ends the command with exit code 4
keeping the checkpoints, training is unchanged by it, a resume logs each reading once, and a run with nothing to
memorise is a one-line error."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from flowprobe.cli import main
from flowprobe.runs.hooks import config_watch
from flowprobe.runs.load import load_run
from flowprobe.watch import MemorizationWarning

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--set", "model.width=64", "--set", "model.depth=3", "--set", "ema_decay=null", "--set", "sample.n=200",
         "--set", "sample.steps=5", "--set", "sample.trajectories=10", "--set", "sample.plot=false", "--no-progress"]
PAIRS = ["--set", "coupling.kind=fixed_pairs", "--set", "data.n_train=8", "--set", "batch_size=8"]


def readings(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "watch"]


def test_stop_ends_the_run_with_exit_4_and_the_readings_match_a_rebuilt_watch(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.warns(MemorizationWarning):
        code = main(["train", *SMALL, *PAIRS, "--set", "steps=3000", "--set", "watch.every=100",
                     "--set", "watch.on_fire=stop", "--set", "ckpt_every=100", "--out", str(run)])
    assert code == 4 and "memorisation watch fired at step" in capsys.readouterr().err
    got = readings(run)
    fired = got[-1]["step"]
    assert [r["step"] for r in got] == list(range(100, fired + 1, 100)) and fired < 3000
    assert got[-1]["fired"] and not any(r["fired"] for r in got[:-1])
    assert (run / "checkpoints" / f"step_{fired:08d}.safetensors").is_file()  # written before the stop
    assert (run / "watch.png").is_file()
    # the same watch built from the saved run, carrying the score inputs of the reading before (the latest copy
    # closeness and pairing excess), reads the saved net exactly as the training run did
    loaded = load_run(run / "checkpoints" / f"step_{fired:08d}.safetensors", use_ema=False)
    watch = config_watch(loaded.config, loaded.coupling, loaded.source, loaded.target, loaded.objective.path,
                         None, "cpu")
    assert torch.equal(watch.train_sources_probe, loaded.coupling.x0[torch.randperm(8, generator=torch.Generator()
                                                                                    .manual_seed(0))])
    watch.inputs = got[-2]["inputs"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemorizationWarning)
        again = watch.update(fired, loaded.net).to_dict()
    assert {**again, "seconds": 0} == {**got[-1], "seconds": 0}
    # watch.early: the early-warning threshold of the run's kind of training (fixed pairs)
    from dataclasses import replace

    from flowprobe.watch import WATCH_SCORE_THRESHOLD, WATCH_SCORE_THRESHOLDS

    early = replace(loaded.config, watch=replace(loaded.config.watch, early=True))
    assert watch.kind == "paired" and watch.threshold == WATCH_SCORE_THRESHOLD
    assert config_watch(early, loaded.coupling, loaded.source, loaded.target, loaded.objective.path, None,
                        "cpu").threshold == WATCH_SCORE_THRESHOLDS["paired"]


def test_the_watch_leaves_the_run_bitwise_unchanged_and_logs_each_reading_once_on_resume(tmp_path):
    common = [*SMALL, "--set", "data.n_train=64", "--set", "batch_size=32", "--set", "ckpt_every=100",
              "--set", "optim.lr_schedule=constant"]  # the schedule must not depend on the steps a resume changes
    assert main(["train", *common, "--set", "steps=300", "--out", str(tmp_path / "plain")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemorizationWarning)
        assert main(["train", *common, "--set", "steps=200", "--set", "watch.every=50", "--set",
                     "watch.copy_every=100", "--out", str(tmp_path / "watched")]) == 0
        assert main(["train", *common, "--set", "steps=300", "--set", "watch.every=50", "--set",
                     "watch.copy_every=100", "--out", str(tmp_path / "watched"), "--resume"]) == 0
    name = "checkpoints/step_00000300.safetensors"
    plain, watched = load_file(tmp_path / "plain" / name), load_file(tmp_path / "watched" / name)
    assert plain.keys() == watched.keys() and all(torch.equal(plain[k], watched[k]) for k in plain)
    got = readings(tmp_path / "watched")
    assert [r["step"] for r in got] == [50, 100, 150, 200, 250, 300]
    assert [r["copy_excess"] is not None for r in got] == [False, True, False, True, False, True]
    assert not any(r["fired"] for r in got)  # 64 points of the moons with a minibatch-OT coupling: no copying yet
    assert (tmp_path / "watched" / "watch.png").is_file() and not (tmp_path / "plain" / "watch.png").exists()


def test_a_run_with_nothing_to_memorise_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", *SMALL, "--set", "steps=10", "--set", "watch.every=5", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "watch:" in err[0] and "fresh training samples" in err[0]
