"""Checkpoints: round trip, exact resume (bitwise on CPU), atomic writes, no unpickling."""

import json
import os
import signal
from dataclasses import asdict

import pytest
import safetensors.torch
import torch

import flowprobe.checkpoint as ckpt_mod
from flowprobe.checkpoint import (checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint,
                                  save_checkpoint)
from flowprobe.config import ConfigError
from flowprobe.runs import TrainConfig
from flowprobe.train import Callback, Checkpointer, fit

KW = dict(batch_size=16, lr=0.01, warmup=3, lr_schedule="cosine", grad_clip=1.0, weight_decay=0.01, ema_decay=0.9)


def _params(m):
    return [p.detach().clone() for p in m.state_dict().values()]


def test_round_trip(tmp_path, tiny_problem):
    net, coupling, objective = tiny_problem()
    state = fit(net, coupling, objective, steps=6, ema_decay=0.5, batch_size=8)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, betas=(0.8, 0.95))
    net(torch.rand(4), torch.randn(4, 2)).pow(2).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(11)
    torch.rand(3, generator=gen)
    cfg = TrainConfig(steps=77)
    path = save_checkpoint(checkpoint_path(tmp_path, 6), net=net, ema=state.ema, optimizer=opt, step=6, config=cfg,
                           generators={"train": gen}, losses=state.losses, extra={"note": "x"})
    assert path.name == "step_00000006.safetensors" and path.with_suffix(".json").is_file()

    net2, _, _ = tiny_problem(seed=1)
    ema2, _, _ = tiny_problem(seed=2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.5)
    gen2 = torch.Generator().manual_seed(0)
    ck = load_checkpoint(path, net=net2, ema=ema2, optimizer=opt2, generators={"train": gen2})
    assert ck.step == 6 and ck.extra == {"note": "x"}
    assert ck.config == asdict(cfg)
    assert ck.losses == state.losses
    for a, b in zip(_params(net), _params(net2)):
        assert torch.equal(a, b)
    for a, b in zip(_params(state.ema), _params(ema2)):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s2["param_groups"][0]["betas"] == (0.8, 0.95) and isinstance(s2["param_groups"][0]["betas"], tuple)
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=gen2))


def _straight_and_resumed(tmp_path, tiny_problem, steps):
    net, coupling, objective = tiny_problem()
    straight = fit(net, coupling, objective, steps=steps, hooks=[Checkpointer(tmp_path / "a", every=steps // 2)],
                   **KW)
    mid = checkpoint_path(tmp_path / "a", steps // 2)
    assert mid.is_file()
    fresh, _, _ = tiny_problem(seed=123)  # a different initialisation: everything must come from the checkpoint
    resumed = fit(fresh, coupling, objective, steps=steps, resume_from=mid, **KW)
    return straight, resumed


def test_resume_is_exact(tmp_path, tiny_problem):
    straight, resumed = _straight_and_resumed(tmp_path, tiny_problem, 20)
    for a, b in zip(_params(straight.net), _params(resumed.net)):
        assert torch.equal(a, b)
    for a, b in zip(_params(straight.ema), _params(resumed.ema)):
        assert torch.equal(a, b)
    assert resumed.losses == straight.losses and len(resumed.losses) == 20


def test_interrupt_checkpoints_and_resumes_exactly(tmp_path, tiny_problem):
    """Ctrl-C in the middle: the step finishes, a checkpoint is written, KeyboardInterrupt is raised;
    resuming from it reaches the same parameters as an uninterrupted run."""
    net, coupling, objective = tiny_problem()
    straight = fit(net, coupling, objective, steps=16, **KW)
    # A background shell job starts with SIGINT ignored; this test needs Python's usual handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupted_run_resumes_exactly(tmp_path, tiny_problem, coupling, objective, straight)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_run_resumes_exactly(tmp_path, tiny_problem, coupling, objective, straight):
    def interrupt(state):
        if state.step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    net2, _, _ = tiny_problem()
    with pytest.raises(KeyboardInterrupt):
        fit(net2, coupling, objective, steps=16, hooks=[Callback(interrupt, 1), Checkpointer(tmp_path)],
            **KW)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000007.safetensors"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    net3, _, _ = tiny_problem(seed=9)
    resumed = fit(net3, coupling, objective, steps=16, resume_from=tmp_path, **KW)
    for a, b in zip(_params(straight.net), _params(resumed.net)):
        assert torch.equal(a, b)


def test_failed_write_leaves_no_partial_file(tmp_path, tiny_problem, monkeypatch):
    net, _, _ = tiny_problem()
    good = save_checkpoint(checkpoint_path(tmp_path, 1), net=net, step=1)
    good_bytes = good.read_bytes()
    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)  # half a file...
        raise OSError("disk full")  # ...and then the crash

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(checkpoint_path(tmp_path, 2), net=net, step=2)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(good, net=net, step=1)  # overwriting an existing checkpoint
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.json", "step_00000001.safetensors"]
    assert good.read_bytes() == good_bytes

    def crash_in_sidecar(path, obj):
        raise OSError("killed")

    monkeypatch.setattr(ckpt_mod, "write_json", crash_in_sidecar)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(checkpoint_path(tmp_path, 3), net=net, step=3)
    # the tensor half of step 3 exists, but without its sidecar the checkpoint does not count
    assert (tmp_path / "step_00000003.safetensors").is_file()
    assert latest_checkpoint(tmp_path) == good
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_halves_must_agree(tmp_path, tiny_problem):
    net, _, _ = tiny_problem()
    p = save_checkpoint(checkpoint_path(tmp_path, 4), net=net, step=4)
    side = json.loads(p.with_suffix(".json").read_text())
    side["step"] = 5
    p.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ConfigError, match="disagree"):
        load_checkpoint(p)
    with pytest.raises(ConfigError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_loading_never_unpickles(tmp_path, tiny_problem, monkeypatch):
    net, coupling, objective = tiny_problem()
    fit(net, coupling, objective, steps=2, batch_size=4, ema_decay=0.9, hooks=[Checkpointer(tmp_path)])

    def forbidden(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    import pickle

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    net2, _, _ = tiny_problem(seed=3)
    ck = load_checkpoint(tmp_path, net=net2)
    assert ck.step == 2 and ck.has_ema
    assert all(torch.equal(a, b) for a, b in zip(_params(net), _params(net2)))


def test_ckpt_keep_prunes_old_checkpoints(tmp_path, tiny_problem):
    net, coupling, objective = tiny_problem()
    fit(net, coupling, objective, steps=8, batch_size=4, hooks=[Checkpointer(tmp_path, every=2, keep=2)])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006.safetensors", "step_00000008.safetensors"]
    assert len(list(tmp_path.iterdir())) == 4


def test_ignored_sigint_stays_ignored(tiny_problem):
    """A run started with SIGINT ignored (a background job, nohup) is not made interruptible by fit."""
    net, coupling, objective = tiny_problem()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        seen = []
        fit(net, coupling, objective, steps=2,
            hooks=[Callback(lambda s: seen.append(signal.getsignal(signal.SIGINT)), 1)],
            **KW)
        assert seen and all(h is signal.SIG_IGN for h in seen)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_cuda_rng_states_round_trip_in_device_order(tmp_path, tiny_problem, monkeypatch):
    """The CUDA generator states of every device are saved and restored in device order (device 10 after 9, not
    after 1), exercised on a CPU machine by standing in for torch.cuda's RNG calls."""
    from flowprobe.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(12)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda ss: restored.extend(ss))
    net, _, _ = tiny_problem()
    path = save_checkpoint(checkpoint_path(tmp_path, 3), net=net, step=3)
    load_checkpoint(path, restore_global_rng=True)
    assert [int(s[0]) for s in restored] == list(range(12))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # fewer devices now: the first ones are restored
    restored.clear()
    load_checkpoint(path, restore_global_rng=True)
    assert [int(s[0]) for s in restored] == [0, 1]
