"""Nothing lost, nothing silently wrong: divergence, damaged checkpoints, resume safety (docs/reliability.md).

Each test is built to fail on the behaviour it guards against (a NaN run writing checkpoints, a flipped byte
loading silently, a resume under a changed config, a log that repeats steps, temp files left behind)."""

import json
import math

import pytest
import torch

from flowprobe.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, verify_checkpoint
from flowprobe.cli import main
from flowprobe.train import Checkpointer, DivergenceError, fit

TINY = ["--set", "steps=40", "--set", "batch_size=32", "--set", "model.width=16", "--set", "model.depth=1",
        "--set", "log_every=10", "--set", "ckpt_every=20", "--set", "sample.n=100", "--set", "sample.steps=4",
        "--set", "sample.plot=false", "--no-progress"]


def _train(out, *extra):
    return main(["train", *TINY, "--out", str(out), *extra])


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ divergence


def test_divergence_stops_before_a_nonfinite_checkpoint(tmp_path, tiny_problem):
    """lr = 1e6 blows the loss up; the loop stops at a log point, names the first bad step and the last good
    checkpoint, and never writes a checkpoint with non-finite weights."""
    net, coupling, objective = tiny_problem()
    with pytest.raises(DivergenceError) as e:
        fit(net, coupling, objective, steps=200, batch_size=32, lr=1e6, log_every=5,
            hooks=[Checkpointer(tmp_path, every=5)])
    err = e.value
    assert 1 <= err.step <= 200
    for ck in list_checkpoints(tmp_path):
        loaded = load_checkpoint(ck)
        assert all(torch.isfinite(v).all() for k, v in loaded.tensors.items() if k.startswith("net."))
        assert loaded.step < err.step
    if list_checkpoints(tmp_path):
        assert err.last_good == list_checkpoints(tmp_path)[-1]


def test_divergence_after_resume_keeps_the_good_checkpoints(tmp_path, tiny_problem):
    """The issue's case: 40 good steps with keep=2, then the run continued into divergence with lr = 1e6. The
    good checkpoints survive (keep never deletes the last finite one: none but finite ones are written) and the
    error names the checkpoint the run resumed from as the last good one."""
    net, coupling, objective = tiny_problem()
    fit(net, coupling, objective, steps=40, batch_size=32, hooks=[Checkpointer(tmp_path, every=20, keep=2)])
    good = list_checkpoints(tmp_path)
    assert [load_checkpoint(p).step for p in good] == [20, 40]
    net2, _, _ = tiny_problem()
    with pytest.raises(DivergenceError) as e:
        fit(net2, coupling, objective, steps=4000, batch_size=32, lr=1e6, log_every=20, resume_from=good[-1],
            hooks=[Checkpointer(tmp_path, every=20, keep=2)])
    assert e.value.step > 40 and e.value.last_good is not None
    kept = list_checkpoints(tmp_path)
    assert kept and kept[-1] == e.value.last_good
    for p in kept:
        assert all(torch.isfinite(v).all() for k, v in load_checkpoint(p).tensors.items() if k.startswith("net."))


def test_diverging_run_from_scratch_exits_nonzero_with_one_line(tmp_path, capsys):
    code = _train(tmp_path / "run", "--set", "optim.lr=1e6", "--set", "steps=300", "--set", "model.width=128",
                  "--set", "model.depth=3")
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "not finite" in err
    for ck in list_checkpoints(tmp_path / "run" / "checkpoints"):
        assert all(torch.isfinite(v).all() for k, v in load_checkpoint(ck).tensors.items() if k.startswith("net."))


# ------------------------------------------------------------------------------------------------ integrity


def _flip_byte(path, offset_from_end):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def trained(tmp_path):
    run = tmp_path / "run"
    assert _train(run) == 0
    return run


def test_flipped_tensor_byte_is_detected(trained):
    last = list_checkpoints(trained / "checkpoints")[-1]
    verify_checkpoint(last)  # intact: passes
    _flip_byte(last, 9)  # inside the tensor data (the end of the file is data, not the header)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(last)
    assert main(["sample", str(trained), "--n", "10", "--steps", "2", "--out", str(trained / "s.npy")]) == 2


def test_edited_sidecar_is_detected(trained, capsys):
    last = list_checkpoints(trained / "checkpoints")[-1]
    side_path = last.with_suffix(".json")
    side = json.loads(side_path.read_text())
    side["extra"]["model"]["kwargs"]["activation"] = "tanh"
    side_path.write_text(json.dumps(side))
    code = main(["sample", str(last), "--n", "10", "--steps", "2", "--out", str(trained / "s.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "sidecar" in err and str(side_path.name) in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("damage", ["empty", "binary", "list", "nostep", "truncated"])
def test_damaged_halves_are_one_line_errors(trained, capsys, damage):
    last = list_checkpoints(trained / "checkpoints")[-1]
    side_path = last.with_suffix(".json")
    if damage == "empty":
        side_path.write_text("")
    elif damage == "binary":
        side_path.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "list":
        side_path.write_text("[1, 2]")
    elif damage == "nostep":
        side = json.loads(side_path.read_text())
        del side["step"]
        side_path.write_text(json.dumps(side))
    else:
        last.write_bytes(last.read_bytes()[:50])
    code = main(["sample", str(last), "--n", "10", "--steps", "2", "--out", str(trained / "s.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err


def test_nan_weights_in_a_checkpoint_are_refused(tmp_path, tiny_problem):
    """A checkpoint written by other code with a NaN weight (digests intact) does not give NaN samples."""
    from flowprobe.checkpoint import checkpoint_path, save_checkpoint
    from flowprobe.runs import load_model

    net, _, _ = tiny_problem()
    with torch.no_grad():
        next(net.parameters())[0, 0] = math.nan
    spec = {"class": "MLP", "kwargs": {"dim": 2, "width": 32, "depth": 2, "time_embed_dim": 8}}
    path = save_checkpoint(checkpoint_path(tmp_path, 1), net=net, step=1, extra={"model": spec})
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(path)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_falls_back_to_the_newest_intact_checkpoint(trained, capsys):
    newest = list_checkpoints(trained / "checkpoints")[-1]
    _flip_byte(newest, 9)
    capsys.readouterr()
    assert _train(trained, "--set", "steps=60", "--resume") == 0
    out = capsys.readouterr().out
    assert "skipped" in out and newest.name in out
    steps = [r["step"] for r in _records(trained) if r["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 60


@pytest.mark.parametrize("override", ["optim.lr=0.5", "seed=3", "batch_size=16", "ema_decay=0.5", "model.width=8"])
def test_resume_refuses_a_config_that_breaks_exact_continuation(trained, capsys, override):
    capsys.readouterr()
    assert _train(trained, "--set", override, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert override.split("=")[0] in err and len(err.splitlines()) == 1


def test_resume_allows_a_longer_run_and_refuses_a_shorter_one(trained, capsys):
    assert _train(trained, "--set", "steps=10", "--resume") == 2
    assert "steps" in capsys.readouterr().err
    assert _train(trained, "--set", "steps=60", "--resume") == 0


def test_resume_without_checkpoints_says_so(tmp_path, capsys):
    assert _train(tmp_path / "fresh", "--resume") == 2
    assert "no intact checkpoint" in capsys.readouterr().err


def test_metrics_log_reads_as_one_run_after_resume(trained):
    """Kill-like resume from the middle checkpoint: the re-run steps appear once, and one eval record remains."""
    ckpts = list_checkpoints(trained / "checkpoints")
    for p in ckpts[1:]:  # as if the run had been killed after the step-20 checkpoint
        p.with_suffix(".json").unlink()
        p.unlink()
    assert _train(trained, "--resume") == 0
    recs = _records(trained)
    steps = [r["step"] for r in recs if r["event"] == "train"]
    assert steps == [10, 20, 30, 40]
    assert sum(r["event"] == "eval" for r in recs) == 1


def test_stale_temp_files_are_cleaned_at_start(trained):
    stale = [trained / ".metrics.jsonl.abc123.tmp", trained / "checkpoints" / ".step_00000040.safetensors.x.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    assert _train(trained, "--set", "steps=60", "--resume") == 0
    assert not any(p.exists() for p in stale)


@pytest.mark.parametrize("preset, override, needle", [
    ("cifar10", "model.model_channels=8", "GroupNorm"),   # 8 channels cannot be split into the preset's 32 groups
    ("tiny", "model.num_res_blocks=1", None),             # a buildable change trains
])
def test_an_architecture_the_settings_cannot_build_is_one_line(tmp_path, capsys, preset, override, needle):
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    args = ["train", "--set", f"data.dataset={folder}", "--set", "model.arch=unet", "--set", f"model.preset={preset}",
            "--set", override, "--set", "steps=1", "--set", "batch_size=2", "--set", "sample.n=2",
            "--set", "sample.steps=1", "--out", str(tmp_path / "run"), "--device", "cpu"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    if needle is None:
        assert code == 0
        return
    assert code == 2 and len(err) == 1 and err[0].startswith("flowprobe: error: model:") and needle in err[0]
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not list_checkpoints(ckpts)
