"""The memorisation watch: its readings are the diagnosis checks, it leaves training untouched, it fires on a run
built to memorise and stays quiet on one that cannot, it logs, and it stops fit when asked."""

import importlib.util
import json
import math
import sys
import warnings

import pytest
import torch

from flowprobe.checkpoint import list_checkpoints, load_checkpoint
from flowprobe.couplings import FixedPairs, GaussianSampler, IndependentCoupling
from flowprobe.diagnosis.copies import copies_check
from flowprobe.diagnosis.membership import gradvar_check, membership_check
from flowprobe.diagnosis import EmpiricalPairField
from flowprobe.diagnosis.transport import map_check, pairing_check
from flowprobe.probes.memorization import PairSet
from flowprobe.nets.mlp import MLP
from flowprobe.objectives import CFMObjective
from flowprobe.paths import LinearPath, StochasticPath
from flowprobe.solvers import push_forward
from flowprobe.train import Checkpointer, fit
from flowprobe.watch import (WATCH_SCORE_THRESHOLD, MemorizationDetected, MemorizationWarning, MemorizationWatch,
                             lightning_callback)


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
    assert reading.copy_closeness == c.evidence["closeness"]
    pairs = PairSet(watch.train_sources_probe, watch.train_probe, {"assigned": torch.arange(8)})
    p, _, _ = pairing_check(net, pairs, n_max=8, method="euler", steps=watch.copy_steps)
    assert p.evidence["n_contested"] == reading.pairing_contested > 0
    assert reading.pairing_recall == p.evidence["recall_assigned"] and reading.pairing_excess == p.evidence["excess"]
    assert reading.pairing_chance == 1 / 8
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
        fit(net, coupling, CFMObjective(path), steps=1000, batch_size=8, lr=3e-3, hooks=[watch])
    assert watch.fired_at is not None and watch.fired_at <= 1000
    first = next(r for r in watch.readings if r.fired)
    assert first.step == watch.fired_at and first.signals == ["score"] and first.score >= WATCH_SCORE_THRESHOLD
    assert first.gradvar_ratio < 0.25 and first.auc > 0.6  # both signals say memorises (diagnosis thresholds)
    assert all(r.fired for r in watch.readings if r.step >= watch.fired_at)  # the collapse persists
    records = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(50, 1001, 50))
    assert all(r["event"] == "watch" and math.isfinite(r["auc"]) for r in records)
    fired = [r for r in records if r["fired"]]
    assert fired[0]["step"] == watch.fired_at and fired[0]["message"].startswith("memorisation watch fired")


def test_the_score_is_the_fitted_log_odds_and_the_detector_thresholds_it():
    """With the shipped weights the score is b + w_auc auc - w_gv log(ratio) + w_close closeness + w_pair pairing
    (membership weights without a ratio); the fitted weights have the signs the paper predicts (a lower
    GV(train)/GV(held-out), samples nearer the training set, partners reproduced: memorisation; membership no
    sign against it), and a reading fires exactly when its score reaches the threshold in use: the pooled one, or
    with ``early=True`` that of its kind of training (independent, paired; pairs of a map: the pooled one), or the
    caller's own."""
    from flowprobe.watch import (WATCH_SCORE_THRESHOLD_MEMBERSHIP, WATCH_SCORE_THRESHOLDS, WATCH_SCORE_WEIGHTS,
                                 WATCH_SCORE_WEIGHTS_MEMBERSHIP, WatchReading, memorisation_score)

    b, w_auc, w_gv, w_close, w_pair = WATCH_SCORE_WEIGHTS
    b_m, w_m, w_close_m, w_pair_m = WATCH_SCORE_WEIGHTS_MEMBERSHIP
    assert w_auc >= 0 and w_gv > 0 and w_close > 0 and w_pair > 0 and min(w_m, w_close_m, w_pair_m) > 0
    assert memorisation_score(0.8, 0.1, 0.6, 0.25) == pytest.approx(
        b + 0.8 * w_auc + w_gv * math.log(10) + 0.6 * w_close + 0.25 * w_pair)
    assert memorisation_score(0.8, None, 0.6, 0.25) == pytest.approx(b_m + 0.8 * w_m + 0.6 * w_close_m
                                                                      + 0.25 * w_pair_m)
    assert math.isnan(memorisation_score(float("nan"), 0.1))
    net, coupling, x0, x1, heldout = memorising_problem()
    held_src = torch.randn_like(heldout)
    watches, expected_thresholds = {}, {}
    for early in (False, True):  # the pooled threshold by default; with early=True the kind's early-warning one
        watches.update({("independent", early): MemorizationWatch(x1, heldout, LinearPath(), every=50, early=early),
                        ("paired", early): MemorizationWatch(x1, heldout, LinearPath(), every=50, train_sources=x0,
                                                             early=early),
                        ("map", early): MemorizationWatch(x1, heldout, LinearPath(), every=50, train_sources=x0,
                                                          heldout_sources=held_src, early=early)})
        expected_thresholds.update({(k, early): WATCH_SCORE_THRESHOLDS.get(k, WATCH_SCORE_THRESHOLD) if early
                                    else WATCH_SCORE_THRESHOLD for k in ("independent", "paired", "map")})
    watches[("paired", "own")] = MemorizationWatch(x1, heldout, LinearPath(), every=50, train_sources=x0, early=True,
                                                   threshold=-1.0)
    expected_thresholds[("paired", "own")] = -1.0
    assert WATCH_SCORE_THRESHOLDS["independent"] < WATCH_SCORE_THRESHOLD < WATCH_SCORE_THRESHOLDS["paired"]
    for (kind, mode), watch in watches.items():
        threshold = expected_thresholds[(kind, mode)]
        assert watch.kind == kind and watch.threshold == threshold
        # before any copy check (closeness 0.5, no pairing excess): the ratio at which a reading with membership AUC
        # 0.7 crosses the threshold, the AUC at which a reading without a ratio does, and readings either side
        crossing = math.exp((b + 0.7 * w_auc + 0.5 * w_close - threshold) / w_gv)
        auc_crossing = (WATCH_SCORE_THRESHOLD_MEMBERSHIP - b_m - 0.5 * w_close_m) / w_m
        assert 0.5 < auc_crossing < 1
        cases = ((0.7, crossing * 0.99, True), (0.7, crossing * 1.01, False), (auc_crossing + 1e-3, None, True),
                 (auc_crossing - 1e-3, None, False), (1.0, 1.0, w_auc + b + 0.5 * w_close >= threshold))
        for auc_value, ratio, expected in cases:
            r = WatchReading(step=50, auc=auc_value, auc_lower=0.5, auc_t=0.5, gradvar_ratio=ratio)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MemorizationWarning)
                watch.judge(r)
            assert r.fired is expected and r.signals == (["score"] if expected else []), (kind, auc_value, ratio)
            assert not expected or r.message.startswith("memorisation watch fired at step 50: memorisation score")


def test_the_score_reads_the_latest_copy_closeness_and_pairing_excess():
    """score = b + w_auc auc + w_gv (-log ratio) + w_close closeness + w_pair pairing (without a ratio: the
    membership weights, which have no w_gv); a closeness or pairing not measured yet reads as its null value; a
    reading without a copy check carries the latest measured ones; weights missing at the end of a tuple are 0."""
    from flowprobe.watch import NULL_INPUTS, WatchReading, detect, memorisation_score

    w, wm = (-1.0, 2.0, 0.5, 3.0, 4.0), (-2.0, 1.0, 3.0, 4.0)
    score = lambda *a: memorisation_score(*a, weights=w, weights_membership=wm)  # noqa: E731
    assert score(0.8, 0.1, 0.7, 0.2) == pytest.approx(-1.0 + 1.6 + 0.5 * math.log(10) + 2.1 + 0.8)
    assert score(0.8, None, 0.7, 0.2) == pytest.approx(-2.0 + 0.8 + 2.1 + 0.8)
    assert NULL_INPUTS == {"closeness": 0.5, "pairing": 0.0}
    assert score(0.8, 0.1) == pytest.approx(-1.0 + 1.6 + 0.5 * math.log(10) + 3.0 * 0.5)
    assert memorisation_score(0.8, 0.1, 0.7, 0.2, weights=(-1.0, 2.0, 0.5)) == pytest.approx(
        -1.0 + 1.6 + 0.5 * math.log(10))
    constants = {"weights": w, "weights_membership": wm}
    first = WatchReading(10, auc=0.6, gradvar_ratio=0.5, copy_closeness=0.9, pairing_excess=0.3)
    detect(first, None, **constants)
    assert first.inputs == {"auc": 0.6, "gradvar_ratio": 0.5, "closeness": 0.9, "pairing": 0.3}
    second = WatchReading(20, auc=0.7, gradvar_ratio=0.25)  # no copy check at this reading
    detect(second, first.inputs, **constants)
    assert second.inputs == {"auc": 0.7, "gradvar_ratio": 0.25, "closeness": 0.9, "pairing": 0.3}
    assert second.score == pytest.approx(score(0.7, 0.25, 0.9, 0.3))
    third = WatchReading(30, auc=0.7, gradvar_ratio=0.25, copy_closeness=0.4)  # copies, no pairs
    detect(third, second.inputs, **constants)
    assert third.inputs["closeness"] == 0.4 and third.inputs["pairing"] == 0.3


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


def test_a_frozen_ema_copy_gets_its_gradient_variance_read_and_stays_frozen():
    """The EMA model of a fit (a frozen copy: no parameter requires gradients) reads the same gradient-variance ratio
    as the trained net with the same weights, instead of none; its parameters are frozen again afterwards."""
    from flowprobe.train.step import make_ema

    net, coupling, x0, x1, heldout = memorising_problem()
    fit(net, coupling, CFMObjective(LinearPath()), steps=30, batch_size=8, lr=3e-3)
    ema = make_ema(net)  # equal weights, frozen
    assert not any(q.requires_grad for q in ema.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemorizationWarning)
        on_net = MemorizationWatch(x1, heldout, LinearPath(), train_sources=x0, copy_every=0).update(10, net)
        on_ema = MemorizationWatch(x1, heldout, LinearPath(), train_sources=x0, copy_every=0).update(10, ema)
    assert on_net.gradvar_ratio is not None and on_ema.gradvar_ratio == pytest.approx(on_net.gradvar_ratio, rel=1e-6)
    assert not any(q.requires_grad for q in ema.parameters()) and all(q.grad is None for q in ema.parameters())
    assert all(q.requires_grad for q in net.parameters())


# ------------------------------------------------------------------------------ TensorBoard and Lightning

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed")
needs_lightning = pytest.mark.skipif(
    not (importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning")),
    reason="lightning is not installed")


@needs_tensorboard
def test_tensorboard_scalars_equal_the_jsonl_readings(tmp_path):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net, coupling, x0, x1, heldout = memorising_problem()
    path = LinearPath()
    watch = MemorizationWatch(x1, heldout, path, every=20, n_probe=8, train_sources=x0, copy_every=40,
                              log_path=tmp_path / "watch.jsonl", tensorboard_dir=tmp_path / "tb")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemorizationWarning)
        fit(net, coupling, CFMObjective(path), steps=80, batch_size=8, lr=3e-3, hooks=[watch])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    board = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    records = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60, 80]
    want = {}
    for r in records:  # what the watch says it writes, from the JSONL reading
        scalars = {"watch/score": r["score"], "watch/auc": r["auc"],
                   "watch/auc_lower": r["auc_lower"], "watch/gradvar_ratio": r["gradvar_ratio"],
                   "watch/copy_excess": r["copy_excess"], "watch/copy_closeness": r["copy_closeness"],
                   "watch/pairing_excess": r["pairing_excess"], "watch/fired": float(r["fired"]),
                   **{f"watch/auc_t{row['t']:g}": row["auc"] for row in r["rows"]}}
        for tag, v in scalars.items():
            if v is not None and math.isfinite(v):
                want.setdefault(tag, []).append((r["step"], float(np.float32(v))))
    assert board == want
    assert [s for s, _ in board["watch/copy_excess"]] == [40, 80] and len(board["watch/auc_t0.5"]) == 4
    assert [s for s, _ in board["watch/pairing_excess"]] == [40, 80]


def _lightning():
    """The Lightning package the watch's callback is built on (the one installed)."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    return pl


def _lightning_flow(pl, net, x0, x1, lr=3e-3, batch_size=None):
    """A LightningModule training ``net`` with CFM on the straight path over the fixed pairs (x0, x1)."""

    class Flow(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, x):
            return self.net(t, x)

        def training_step(self, batch, batch_idx):
            a, b = batch
            t = torch.rand(a.shape[0])
            xt = (1 - t[:, None]) * a + t[:, None] * b
            return (self(t, xt) - (b - a)).pow(2).sum(1).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(x0, x1)
            return torch.utils.data.DataLoader(data, batch_size=batch_size or x0.shape[0], shuffle=True)

    return Flow()


def _trainer(pl, max_steps, callbacks, **options):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **options)


@needs_lightning
def test_lightning_callback_reads_at_its_steps_what_update_reads_on_the_same_weights():
    pl = _lightning()
    net, coupling, x0, x1, heldout = memorising_problem()
    module = _lightning_flow(pl, net, x0, x1)

    def watch_of():
        return MemorizationWatch(x1, heldout, LinearPath(), every=3, n_probe=8, train_sources=x0, copy_every=6,
                                 gradvar_samples=8, n_copy=32)

    watch, snapshots = watch_of(), {}

    class Snapshot(pl.Callback):  # the weights the watch read, taken right after it (no update in between)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on data-loader workers
        trainer = _trainer(pl, 9, [lightning_callback(watch), Snapshot()])
        trainer.fit(module)
    assert trainer.global_step == 9 and [r.step for r in watch.readings] == [3, 6, 9]
    direct, replay = watch_of(), _lightning_flow(pl, MLP(2, width=64, depth=3), x0, x1)
    for r in watch.readings:
        replay.load_state_dict(snapshots[r.step])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MemorizationWarning)
            d = direct.update(r.step, replay)
        assert {**r.to_dict(), "seconds": 0} == {**d.to_dict(), "seconds": 0}
    assert watch.readings[1].copy_excess is not None and watch.readings[0].copy_excess is None


@needs_lightning
def test_lightning_callback_with_on_fire_stop_stops_the_trainer():
    pl = _lightning()
    net, coupling, x0, x1, heldout = memorising_problem()
    watch = MemorizationWatch(x1, heldout, LinearPath(), every=50, train_sources=x0, on_fire="stop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(pl, 1000, [lightning_callback(watch)])
        trainer.fit(_lightning_flow(pl, net, x0, x1))
    assert watch.fired_at is not None and watch.readings[-1].stop
    assert trainer.should_stop and trainer.global_step == watch.fired_at < 1000


@needs_lightning
def test_lightning_callback_reads_each_step_once_under_gradient_accumulation():
    pl = _lightning()
    net, coupling, x0, x1, heldout = memorising_problem()
    watch = MemorizationWatch(x1, heldout, LinearPath(), every=3, n_probe=8, train_sources=x0, copy_every=0,
                              gradvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(pl, 6, [lightning_callback(watch)], accumulate_grad_batches=2)
        trainer.fit(_lightning_flow(pl, net, x0, x1, batch_size=4))  # two batches per optimiser step
    assert trainer.global_step == 6 and [r.step for r in watch.readings] == [3, 6]


@needs_lightning
def test_lightning_callback_fits_a_trainer_of_either_package(monkeypatch):
    """With both ``lightning`` and ``pytorch_lightning`` imported, a Trainer of either accepts the callback."""
    import types

    pl = _lightning()
    fake = types.ModuleType("fake_lightning_pytorch")
    fake.Callback = type("Callback", (), {})
    other = "pytorch_lightning" if pl.__name__.startswith("lightning") else "lightning.pytorch"
    monkeypatch.setitem(sys.modules, other, fake)
    if other == "lightning.pytorch":
        monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    net, coupling, x0, x1, heldout = memorising_problem()
    watch = MemorizationWatch(x1, heldout, LinearPath(), every=2, n_probe=8, train_sources=x0, copy_every=0,
                              gradvar=False)
    cb = lightning_callback(watch)
    assert isinstance(cb, pl.Callback) and isinstance(cb, fake.Callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(pl, 2, [cb]).fit(_lightning_flow(pl, net, x0, x1))
    assert [r.step for r in watch.readings] == [2]


@needs_lightning
def test_lightning_stop_is_shared_by_every_rank():
    """Data-parallel: only rank 0 reads; a stop it decides reaches the other ranks through the strategy."""
    net, coupling, x0, x1, heldout = memorising_problem()
    watch = MemorizationWatch(x1, heldout, LinearPath(), every=2, train_sources=x0, copy_every=0, on_fire="stop")
    calls = []

    class Strategy:
        def reduce_boolean_decision(self, decision, all=True):
            calls.append((decision, all))
            return True  # rank 0 fired

    class Trainer:
        global_step, global_rank, should_stop, strategy = 2, 1, False, Strategy()

    trainer = Trainer()
    lightning_callback(watch).on_train_batch_end(trainer, net, None, None, 0)
    assert watch.readings == [] and calls == [(False, False)] and trainer.should_stop


@needs_tensorboard
def test_a_resumed_fit_logs_each_reading_once_and_judges_as_before(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(resume_from=None):
        net, coupling, x0, x1, heldout = memorising_problem()
        watch = MemorizationWatch(x1, heldout, LinearPath(), every=100, train_sources=x0, copy_every=300,
                                  log_path=tmp_path / "watch.jsonl", tensorboard_dir=tmp_path / "tb")
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", MemorizationWarning)
            fit(net, coupling, CFMObjective(LinearPath()), steps=800, batch_size=8, lr=3e-3, resume_from=resume_from,
                hooks=[Checkpointer(tmp_path / "ckpt", every=100), watch])
        warned = [w for w in said if issubclass(w.category, MemorizationWarning)]
        return [{**r.to_dict(), "seconds": 0} for r in watch.readings], watch.fired_at, len(warned)

    first, fired, warned = run()
    steps = [r["step"] for r in first]
    assert steps == list(range(100, 801, 100)) and fired is not None and fired < 800 and warned == 1
    k = steps.index(fired)
    assert first[k]["fired"] and not any(r["fired"] for r in first[:k])
    # resumed from the checkpoint at the step the watch first fired: the later readings again, the same judgement,
    # and no second warning (the resumed watch knows from its log that it has fired)
    resumed, fired_again, warned_again = run(resume_from=list_checkpoints(tmp_path / "ckpt")[k])
    assert resumed == first[k + 1:] and fired_again == fired and warned_again == 0
    # the first reading after the resume had no copy check: it scored with the closeness and pairing carried
    # from the log, as the uninterrupted watch did
    assert resumed[0]["copy_closeness"] is None and resumed[0]["inputs"]["closeness"] is not None
    records = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == steps
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("watch/auc")] == steps


def test_heldout_pairs_of_a_map_read_a_net_that_learned_the_map_as_unseen_only_with_fresh_sources():
    """Pairs from a deterministic map x1 = G(x0) (as reflow's): a net that learned G fits held-out pairs
    (x0', G(x0')) about as well as its training pairs (membership AUC 0.58, GV ratio 0.5), while held-out targets
    with fresh sources read as unseen (AUC 1.0, GV ratio 1e-5): the checks and the watch take ``heldout_sources``
    for that, and the watch then reads no pairing check (reproducing the partners is what training asks for)."""
    g = torch.Generator().manual_seed(7)
    x0, x0_held = torch.randn(256, 2, generator=g), torch.randn(256, 2, generator=g)
    x1, x1_held = 2 * x0 + 1, 2 * x0_held + 1
    torch.manual_seed(0)
    net = MLP(2, width=64, depth=3)
    path = LinearPath()
    fit(net, FixedPairs(x0, x1), CFMObjective(path), steps=1500, batch_size=128, lr=3e-3)
    source = GaussianSampler((2,))
    common = dict(train_sources=x0, times=(0.1, 0.5, 0.9))
    fresh = membership_check(net, path, source, x1, x1_held, n_max=128, generator=torch.Generator().manual_seed(1),
                             **common)
    pairs = membership_check(net, path, source, x1, x1_held, n_max=128, generator=torch.Generator().manual_seed(1),
                             heldout_sources=x0_held, **common)
    assert fresh.evidence["max_auc"] > 0.95 and pairs.evidence["max_auc"] < 0.7 and pairs.evidence["heldout_pairs"]
    gv_pairs = gradvar_check(net, path, source, x1, x1_held, n_samples=64, heldout_sources=x0_held, **common)
    gv_fresh = gradvar_check(net, path, source, x1, x1_held, n_samples=64, **common)
    # fresh sources read a collapse by construction (about 1e-5 here); held-out pairs read a ratio near 1 (0.5 here)
    assert gv_pairs.evidence["ratio"] > 0.25 and gv_pairs.evidence["ratio"] > 1000 * gv_fresh.evidence["ratio"]
    same = gradvar_check(net, path, source, x1, x1, n_samples=64, heldout_sources=x0, **common)
    assert same.evidence["ratio"] == pytest.approx(1.0)  # the same pairs and draws on both sides
    watch = MemorizationWatch(x1, x1_held, path, n_probe=64, train_sources=x0, heldout_sources=x0_held,
                              copy_every=1, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemorizationWarning)
        reading = watch.update(1, net)
    m = membership_check(net, path, watch.source, watch.train_probe, watch.heldout_probe,
                         train_sources=watch.train_sources_probe, heldout_sources=watch.heldout_sources_probe,
                         times=watch.times, n_max=64, generator=torch.Generator().manual_seed(3))
    assert [r["auc"] for r in reading.rows] == [r["auc"] for r in m.evidence["rows"]]
    assert reading.pairing_excess is None and reading.copy_closeness is not None
    # the map check on the probe pairs (a sample of the 256 training pairs): the net that learned G lands both
    direct, _ = map_check(net, PairSet(watch.train_sources_probe, watch.train_probe, {}),
                          PairSet(watch.heldout_sources_probe, watch.heldout_probe, {}), n_max=64, method="euler",
                          steps=watch.copy_steps)
    assert reading.map_vote == direct.vote
    assert direct.evidence["landed_train"] == direct.evidence["landed_heldout"] == 1.0  # 64 of 64 each: no vote yet
    assert direct.vote is None and direct.evidence["excess_interval"][1] > 0.05
    assert (reading.map_landed_train, reading.map_landed_heldout, reading.map_excess_lower) == (
        direct.evidence["landed_train"], direct.evidence["landed_heldout"], direct.evidence["excess_interval"][0])
    assert "map" not in reading.signals
    with pytest.raises(ValueError, match="heldout_sources needs train_sources"):
        MemorizationWatch(x1, x1_held, path, heldout_sources=x0_held)


def test_the_map_check_fires_the_watch_on_a_net_that_reproduces_only_its_pairs(tmp_path):
    """The exact pair field of 8 pairs of the map x1 = 2 x0 + 1 carries its 8 training sources to their partners and
    held-out sources of the same map elsewhere: the watch's map check votes memorises and the detector fires on it."""
    g = torch.Generator().manual_seed(8)
    x0, x0_held = torch.randn(8, 2, generator=g), torch.randn(200, 2, generator=g)
    net = EmpiricalPairField(x0, 2 * x0 + 1, bandwidth=1e-3)
    watch = MemorizationWatch(2 * x0 + 1, 2 * x0_held + 1, LinearPath(), n_probe=64, train_sources=x0,
                              heldout_sources=x0_held, copy_every=1, seed=0)
    with pytest.warns(MemorizationWarning, match="of held-out sources of the same map"):
        reading = watch.update(1, net)
    assert reading.map_landed_train == 1.0 and reading.map_landed_heldout < 0.5
    assert reading.map_vote == "memorises" and "map" in reading.signals and watch.fired_at == 1
    assert watch.plot(tmp_path / "watch.png").is_file()  # the map excess is drawn beside the copy excess
