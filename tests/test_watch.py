"""The memorisation watch: its readings are the diagnosis checks, it leaves training untouched, it fires on a run
built to memorise and stays quiet on one that cannot, it logs, and it stops fit when asked."""

import importlib.util
import json
import math
import warnings

import pytest
import torch

from flowprobe.checkpoint import list_checkpoints, load_checkpoint
from flowprobe.couplings import FixedPairs, GaussianSampler, IndependentCoupling
from flowprobe.diagnosis.copies import copies_check
from flowprobe.diagnosis.membership import gradvar_check, membership_check
from flowprobe.nets.mlp import MLP
from flowprobe.objectives import CFMObjective
from flowprobe.paths import LinearPath, StochasticPath
from flowprobe.solvers import push_forward
from flowprobe.train import Checkpointer, fit
from flowprobe.watch import MemorizationDetected, MemorizationWarning, MemorizationWatch, lightning_callback


pytestmark = pytest.mark.usefixtures("one_thread")


def memorising_problem(seed: int = 0):
    """Eight fixed pairs, deterministic path (sigma = 0): the run is built to memorise its pairs."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(8, 2, generator=g)
    x1 = 2 * torch.randn(8, 2, generator=g) + 3
    heldout = 2 * torch.randn(256, 2, generator=g) + 3
    torch.manual_seed(seed)
    return MLP(2, width=64, depth=3), FixedPairs(x0, x1), x0, x1, heldout


def gaussian_problem(seed: int = 0):
    """N(0, I) -> N(2, I) with an independent coupling: the held-out samples come from the same law as the
    training draws, so nothing can be memorised."""
    g = torch.Generator().manual_seed(seed)
    train, heldout = torch.randn(512, 2, generator=g) + 2, torch.randn(512, 2, generator=g) + 2
    torch.manual_seed(seed)
    coupling = IndependentCoupling(GaussianSampler((2,)), GaussianSampler((2,), mean=2.0))
    return MLP(2, width=64, depth=3), coupling, train, heldout


def test_readings_equal_the_diagnosis_checks():
    net, coupling, x0, x1, heldout = memorising_problem()
    path = LinearPath()
    fit(net, coupling, CFMObjective(path), steps=30, batch_size=8, lr=3e-3)
    watch = MemorizationWatch(x1, heldout, path, every=10, n_probe=8, train_sources=x0, copy_every=10, seed=3)
    reading = watch.update(10, net)
    m = membership_check(net, path, watch.source, watch.train_probe, watch.heldout_probe,
                         train_sources=watch.train_sources_probe, times=watch.times, n_max=8,
                         generator=torch.Generator().manual_seed(3))
    rows = m.evidence["rows"]
    assert [r["auc"] for r in reading.rows] == [r["auc"] for r in rows]
    assert [r["loss_train"] for r in reading.rows] == [r["loss_train"] for r in rows]
    assert reading.auc == max(r["auc"] for r in rows)
    gv = gradvar_check(net, path, watch.source, watch.train_probe, watch.heldout_probe,
                       train_sources=watch.train_sources_probe, times=watch.times, n_samples=32, seed=3)
    assert reading.gradvar_ratio == gv.evidence["ratio"] and reading.gradvar_method == gv.evidence["method"]
    x0_gen, _ = watch.source.sample(watch.n_copy, torch.Generator().manual_seed(3))
    generated = push_forward(net, x0_gen, method="euler", steps=watch.copy_steps)
    c, _ = copies_check(generated, x1, watch.copy_reference, "held-out")
    assert reading.copy_excess == c.evidence["excess"] and reading.copy_fraction == c.evidence["copy_fraction"]
    # a second reading of the same net reads the same numbers (fixed probes, noise and times)
    again = watch.update(20, net)
    assert again.rows == reading.rows and again.gradvar_ratio == reading.gradvar_ratio


def test_training_is_bitwise_unchanged_by_the_watch(tmp_path):
    weights = []
    for hooked in (False, True):
        net, coupling, train, heldout = gaussian_problem(seed=1)
        objective = CFMObjective(StochasticPath(0.1))  # the noise draws matter
        hooks = [MemorizationWatch(train, heldout, objective.path, every=5, copy_every=10, seed=9,
                                   log_path=tmp_path / "w.jsonl")] if hooked else []
        state = fit(net, coupling, objective, steps=30, batch_size=16, lr=3e-3, seed=4, hooks=hooks)
        weights.append({k: v.clone() for k, v in state.net.state_dict().items()})
        assert net.training is False  # fit leaves the net in eval mode either way
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_fires_on_a_memorising_run_and_logs(tmp_path):
    net, coupling, x0, x1, heldout = memorising_problem()
    path = LinearPath()
    watch = MemorizationWatch(x1, heldout, path, every=50, train_sources=x0, log_path=tmp_path / "watch.jsonl",
                              tensorboard_dir=tmp_path / "tb")
    with pytest.warns(MemorizationWarning, match=r"memorisation watch fired at step \d+"):
        fit(net, coupling, CFMObjective(path), steps=400, batch_size=8, lr=3e-3, hooks=[watch])
    assert watch.fired_at is not None and watch.fired_at <= 400
    assert watch.readings[-1].fired and watch.readings[-1].signals
    records = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(50, 401, 50))
    assert all(r["event"] == "watch" and math.isfinite(r["auc"]) for r in records)
    assert records[-1]["fired"] and records[-1]["message"].startswith("memorisation watch fired")


def test_stays_quiet_on_a_gaussian_run():
    net, coupling, train, heldout = gaussian_problem()
    path = LinearPath()
    watch = MemorizationWatch(train, heldout, path, every=50, copy_every=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemorizationWarning)
        fit(net, coupling, CFMObjective(path), steps=400, batch_size=64, lr=3e-3, hooks=[watch])
    assert watch.fired_at is None and len(watch.readings) == 8
    assert all(not r.fired for r in watch.readings)
    assert any(r.copy_excess is not None for r in watch.readings)


def test_on_fire_stop_stops_fit_and_keeps_the_checkpoints(tmp_path):
    net, coupling, x0, x1, heldout = memorising_problem()
    path = LinearPath()
    watch = MemorizationWatch(x1, heldout, path, every=50, train_sources=x0, on_fire="stop")
    ckpt = Checkpointer(tmp_path / "ckpt", every=50)
    with pytest.warns(MemorizationWarning), pytest.raises(MemorizationDetected) as info:
        fit(net, coupling, CFMObjective(path), steps=1000, batch_size=8, lr=3e-3, hooks=[ckpt, watch])
    assert info.value.step == watch.fired_at < 1000 and info.value.reading.stop
    saved = list_checkpoints(tmp_path / "ckpt")
    assert saved and load_checkpoint(saved[-1], net=MLP(2, width=64, depth=3)).step == info.value.step


def test_plain_loop_reading_has_fired_and_stop():
    net, coupling, x0, x1, heldout = memorising_problem()
    path = LinearPath()
    watch = MemorizationWatch(x1, heldout, path, every=1, train_sources=x0, on_fire="stop", copy_every=0)
    r = watch.update(1, net)
    assert r.fired is False and r.stop is False and r.copy_excess is None
    with pytest.raises(ValueError, match="on_fire"):
        MemorizationWatch(x1, heldout, path, on_fire="explode")


@pytest.mark.skipif(not (importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning")),
                    reason="lightning is not installed")
def test_lightning_callback_calls_the_watch():
    net, coupling, x0, x1, heldout = memorising_problem()
    watch = MemorizationWatch(x1, heldout, LinearPath(), every=2, train_sources=x0, copy_every=0)
    cb = lightning_callback(watch)

    class Trainer:
        global_step, global_rank, should_stop = 2, 0, False

    cb.on_train_batch_end(Trainer(), net, None, None, 0)
    assert len(watch.readings) == 1 and watch.readings[0].step == 2


def test_generated_samples_far_from_the_data_are_not_copies():
    class Runaway(torch.nn.Module):
        def forward(self, t, x):
            return torch.full_like(x, 1e6)

    net, coupling, x0, x1, heldout = memorising_problem()
    watch = MemorizationWatch(x1, heldout, LinearPath(), n_copy=40)
    check = watch.copies(Runaway(), "cpu")
    assert check.evidence["non_finite"] == 40 and "copy_fraction" not in check.evidence


def test_a_reading_leaves_the_gradients_and_mode_of_the_net_alone():
    net, coupling, x0, x1, heldout = memorising_problem()
    net.train()
    net(torch.rand(4), torch.randn(4, 2)).sum().backward()
    before = [p.grad.clone() for p in net.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemorizationWarning)
        MemorizationWatch(x1, heldout, LinearPath(), train_sources=x0, copy_every=1).update(1, net)
    assert net.training and all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))
    net.zero_grad(set_to_none=True)
    MemorizationWatch(x1, heldout, LinearPath(), train_sources=x0).update(1, net)
    assert all(p.grad is None for p in net.parameters())
