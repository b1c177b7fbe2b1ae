"""TensorBoard logging of a config run (``log.tensorboard: true``): the event files, read back with TensorBoard's
own EventAccumulator, hold the JSONL records' numbers at the same steps (and the training losses), a resume
writes no step twice, and training is bitwise the same with and without it."""

import json
import sys

import numpy as np
import pytest
import torch

from flowprobe.config import ConfigError, from_dict
from flowprobe.runs.config import TrainConfig
from flowprobe.runs.jobs import train_from_config
from flowprobe.train.tensorboard import TensorBoardLog, record_scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tensorboard: bool = True, **extra) -> TrainConfig:
    return from_dict(TrainConfig, {
        "model": {"width": 16, "depth": 2, "time_embed_dim": 8}, "path": {"sigma": 0.1},
        "steps": 40, "batch_size": 32, "log_every": 10, "ckpt_every": 20, "gradvar_every": 20,
        "gradvar_times": "0.2:0.8:2", "gradvar_samples": 8, "log": {"tensorboard": tensorboard},
        "sample": {"n": 64, "steps": 4, "plot": False}, **extra})


def read_board(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_from_log(path) -> dict[str, list[tuple[int, float]]]:
    """The JSONL records' numbers as TensorBoard holds them (float32), per tag in step order."""
    want: dict[str, list] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["event"] in ("start", "resume"):
            continue
        for tag, v in record_scalars(r).items():
            want.setdefault(tag, []).append((r["step"], float(np.float32(v))))
    return want


def test_tensorboard_scalars_equal_the_jsonl_records(tmp_path):
    result = train_from_config(tiny_config(), tmp_path / "run", device="cpu", progress=False)
    board, want = read_board(tmp_path / "run" / "tensorboard"), expected_from_log(tmp_path / "run" / "metrics.jsonl")
    assert board == want
    # the tags a reader looks for, at the logging steps, and the loss is the window mean of the training losses
    assert [s for s, _ in board["train/loss"]] == [10, 20, 30, 40]
    losses = result.state.losses
    assert [v for _, v in board["train/loss"]] == [float(np.float32(sum(losses[k - 10:k]) / 10))
                                                   for k in (10, 20, 30, 40)]
    assert [s for s, _ in board["train/lr"]] == [10, 20, 30, 40] and board["eval/energy_distance"][0][0] == 40
    assert board["eval/energy_distance"][0][1] == float(np.float32(result.evaluation["energy_distance"]))
    assert [s for s, _ in board["gradvar/rows/t=0.2/gv"]] == [20, 40]  # the gradient-variance log, at its steps


def test_a_resume_writes_no_step_twice(tmp_path):
    out = tmp_path / "run"
    train_from_config(tiny_config(), out, device="cpu", progress=False)
    first = read_board(out / "tensorboard")
    (out / "checkpoints" / "step_00000040.safetensors").unlink()  # as if killed after step 30's log, before 40
    (out / "checkpoints" / "step_00000040.json").unlink(missing_ok=True)
    result = train_from_config(tiny_config(), out, device="cpu", progress=False, resume=True)
    assert result.state.start == 20
    board = read_board(out / "tensorboard")
    assert board == expected_from_log(out / "metrics.jsonl")
    for tag, events in board.items():  # each step once, whatever the interrupted run had written
        steps = [s for s, _ in events]
        assert steps == sorted(set(steps)), tag
    assert [s for s, _ in board["eval/energy_distance"]] == [40]
    assert [s for s, _ in board["train/loss"]] == [10, 20, 30, 40]
    # an exact resume: the same numbers as the uninterrupted run (timing aside)
    assert board["train/loss"] == first["train/loss"] and board["eval/energy_distance"] == first["eval/energy_distance"]


def test_training_is_bitwise_the_same_with_and_without_tensorboard(tmp_path):
    weights = []
    for on in (False, True):
        r = train_from_config(tiny_config(on, gradvar_every=None), tmp_path / f"run{on}", device="cpu",
                              progress=False)
        weights.append(r.state.net.state_dict())
    assert (tmp_path / "runTrue" / "tensorboard").is_dir() and not (tmp_path / "runFalse" / "tensorboard").exists()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_missing_tensorboard_is_one_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="log.tensorboard: TensorBoard is not installed") as info:
        TensorBoardLog(tmp_path / "tb", tmp_path / "m.jsonl")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="TensorBoard is not installed"):
        train_from_config(tiny_config(gradvar_every=None), tmp_path / "run", device="cpu", progress=False)


def test_record_scalars_flattens_nested_records():
    r = {"event": "gradvar", "step": 5, "method": "exact", "ok": True, "bad": float("nan"), "n": 3,
         "rows": [{"t": 0.5, "gv": 2.0, "none": None}], "groups": {"a": 1.5}, "xs": [1.0, 2.0]}
    assert record_scalars(r) == {"gradvar/n": 3.0, "gradvar/rows/t=0.5/gv": 2.0, "gradvar/groups/a": 1.5,
                                 "gradvar/xs/0": 1.0, "gradvar/xs/1": 2.0}
