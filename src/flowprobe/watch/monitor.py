"""The memorisation watch itself (:class:`MemorizationWatch`): the fixed probe set, the checks of one reading, the
log, the flag, and the :func:`flowprobe.train.fit` hook protocol (package docstring: :mod:`flowprobe.watch`)."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..couplings import GaussianSampler
from ..diagnosis.copies import copies_check
from ..diagnosis.membership import gradvar_check, membership_check
from ..diagnosis.transport import map_check, pairing_check
from ..io import append_jsonl, truncate_jsonl
from ..paths import ProbabilityPath
from ..probes.gradvar import PER_SAMPLE_ERRORS
from ..probes.memorization import PairSet
from ..solvers import push_forward
from .detector import WatchReading, detect, finite_number, score_threshold

__all__ = ["MemorizationWatch", "MemorizationDetected", "MemorizationWarning", "WATCH_FAR_FACTOR", "DEFAULT_EVERY",
           "DEFAULT_TIMES", "ON_FIRE"]

logger = logging.getLogger(__name__)

#: Generated samples with a norm above this many times the largest training norm are left out of the copy check.
WATCH_FAR_FACTOR = 10.0
#: Default steps between readings (keeps the overhead under 5% on the CPU benchmarks: benchmarks/watch_overhead.py).
DEFAULT_EVERY = 1000
#: Default probe times.
DEFAULT_TIMES = (0.1, 0.5, 0.9)
ON_FIRE = ("warn", "stop")


class MemorizationDetected(RuntimeError):
    """Raised by the watch's ``step(state)`` hook when its detector fires and ``on_fire="stop"``; ``reading``
    holds what it saw, ``step`` the optimiser step."""

    def __init__(self, message: str, reading: "WatchReading"):
        super().__init__(message)
        self.reading = reading
        self.step = reading.step


class MemorizationWarning(UserWarning):
    """The one-line warning the watch gives when its detector first fires."""


class MemorizationWatch:
    """Watch a training run for memorisation (the docstring of :mod:`flowprobe.watch`).

    ``train_data`` / ``heldout_data``: (N, ...) target samples the net trains on and never sees; ``path``: the
    probability path of the training objective; ``source``: the source sampler (default N(0, I) of the data's
    shape); ``train_sources``: the training sources x0_i paired with ``train_data`` (paired training, e.g.
    :class:`~flowprobe.couplings.FixedPairs`; the pairing check then runs with each copy check), else None;
    ``heldout_sources``: for pairs drawn from a deterministic map (reflow's (x0, G(x0))), the sources of the held-out
    targets, so that membership and gradient variance compare training pairs with held-out pairs of the same map,
    and the map check runs with each copy check (the pairing check is then not read: reproducing the partners is
    what training asks for; reproducing them for the training sources only is memorisation).
    ``n_probe`` samples of each group (chosen once with ``seed``), probe ``times``; ``gradvar``: measure gradient
    variance (``gradvar_samples`` per time and group, ``gradvar_method`` "auto" = ghost, else exact);
    ``copy_every``: steps between copy checks (a multiple of ``every``; None: 4 ``every``; 0: never) on ``n_copy``
    generated samples (Euler, ``copy_steps`` steps), against up to ``copy_reference`` held-out samples (the baseline
    copy fraction of real unseen samples). ``use_ema``: as a fit hook, read the EMA copy (``state.model``) instead
    of the trained net. ``early``: fire on the early-warning score threshold of the kind of training (``kind``:
    independent, paired, or map) instead of the pooled one; ``threshold``: a score threshold of your own (overrides
    both; ``self.threshold`` is the one in use).
    """

    def __init__(self, train_data: Tensor, heldout_data: Tensor, path: ProbabilityPath, *,
                 every: int = DEFAULT_EVERY, n_probe: int = 64, times: Sequence[float] = DEFAULT_TIMES,
                 seed: int = 0, source=None, train_sources: Tensor | None = None, gradvar: bool = True,
                 gradvar_samples: int = 32, gradvar_method: str = "auto", copy_every: int | None = None,
                 n_copy: int = 128, copy_steps: int = 16, copy_reference: int = 512, log_path: str | Path | None = None,
                 tensorboard_dir: str | Path | None = None, on_fire: str = "warn", use_ema: bool = False,
                 heldout_sources: Tensor | None = None, early: bool = False, threshold: float | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if on_fire not in ON_FIRE:
            raise ValueError(f"on_fire must be one of {', '.join(ON_FIRE)}, got {on_fire!r}")
        if n_probe < 2 or train_data.shape[0] < 2 or heldout_data.shape[0] < 2:
            raise ValueError("the watch needs n_probe >= 2 and at least 2 training and 2 held-out samples")
        if train_sources is not None and train_sources.shape != train_data.shape:
            raise ValueError(f"train_sources must have the shape of train_data {tuple(train_data.shape)}")
        if tuple(train_data.shape[1:]) != tuple(heldout_data.shape[1:]):
            raise ValueError(f"train_data and heldout_data must hold samples of one shape, got "
                             f"{tuple(train_data.shape[1:])} and {tuple(heldout_data.shape[1:])}")
        if heldout_sources is not None and (train_sources is None or heldout_sources.shape != heldout_data.shape):
            raise ValueError("heldout_sources needs train_sources and the shape of heldout_data "
                             f"{tuple(heldout_data.shape)}")
        self.every, self.seed, self.path, self.on_fire, self.use_ema = every, int(seed), path, on_fire, use_ema
        self.times = tuple(float(t) for t in times)
        self.copy_every = 4 * every if copy_every is None else int(copy_every)
        self.gradvar, self.gradvar_samples, self.gradvar_method = gradvar, gradvar_samples, gradvar_method
        self.n_copy, self.copy_steps = n_copy, copy_steps
        self.source = source if source is not None else GaussianSampler(tuple(train_data.shape[1:]))
        g = torch.Generator().manual_seed(self.seed)
        i_tr = torch.randperm(train_data.shape[0], generator=g)[:n_probe]
        i_ho = torch.randperm(heldout_data.shape[0], generator=g)[:n_probe]
        self.train_data = train_data.detach()
        self.kind = "independent" if train_sources is None else "paired" if heldout_sources is None else "map"
        self.early = bool(early)
        self.threshold = float(threshold) if threshold is not None else score_threshold(self.kind, self.early)
        self.train_probe = train_data.detach()[i_tr.to(train_data.device)]
        self.heldout_probe = heldout_data.detach()[i_ho.to(heldout_data.device)]
        i_ref = torch.randperm(heldout_data.shape[0], generator=g)[:copy_reference]
        self.copy_reference = heldout_data.detach()[i_ref.to(heldout_data.device)]
        self.train_sources_probe = None if train_sources is None else train_sources.detach()[
            i_tr.to(train_sources.device)]
        self.heldout_sources_probe = None if heldout_sources is None else heldout_sources.detach()[
            i_ho.to(heldout_sources.device)]
        self.log_path = None if log_path is None else Path(log_path)
        self.tensorboard_dir = tensorboard_dir
        self.readings: list[WatchReading] = []
        self.fired_at: int | None = None
        self.inputs: dict | None = None  # the score inputs of the last reading (carried to the next)
        self._writer = None
        self._purge_step: int | None = None

    # ------------------------------------------------------------------------------------------- the checks

    def generator(self, device=None) -> torch.Generator:
        """The reading's generator: seeded with ``seed`` afresh at every reading (so every reading draws the same)."""
        return torch.Generator(device=device if device is not None else "cpu").manual_seed(self.seed)

    def probes(self, device) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(train probe, held-out probe, their paired sources or None each) on ``device``."""
        src = None if self.train_sources_probe is None else self.train_sources_probe.to(device)
        ho_src = None if self.heldout_sources_probe is None else self.heldout_sources_probe.to(device)
        return self.train_probe.to(device), self.heldout_probe.to(device), src, ho_src

    def membership(self, net, device):
        """:func:`~flowprobe.diagnosis.membership.membership_check` on the probe set with the reading's generator."""
        tr, ho, src, ho_src = self.probes(device)
        return membership_check(net, self.path, self.source, tr, ho, train_sources=src, times=self.times,
                                n_max=tr.shape[0], generator=self.generator(device), heldout_sources=ho_src)

    def gradient_variance(self, net, device):
        """:func:`~flowprobe.diagnosis.membership.gradvar_check` on the probe set (seed ``seed``)."""
        tr, ho, src, ho_src = self.probes(device)
        return gradvar_check(net, self.path, self.source, tr, ho, train_sources=src, times=self.times,
                             n_samples=self.gradvar_samples, method=self.gradvar_method, seed=self.seed,
                             heldout_sources=ho_src)

    def copies(self, net, device):
        """:func:`~flowprobe.diagnosis.copies.copies_check` on ``n_copy`` samples pushed forward (Euler,
        ``copy_steps``) from source draws of the reading's generator, against the held-out copy reference."""
        x0, _ = self.source.sample(self.n_copy, self.generator())
        generated = push_forward(net, x0.to(device, torch.float32), method="euler", steps=self.copy_steps)
        # far outside the data, nearest-neighbour distances lose all precision (d1 = d2 = 0 reads as a copy):
        # such samples are counted as non-finite by the check and left out
        scale = self.train_data.flatten(1).norm(dim=1).max().item()
        far = generated.flatten(1).norm(dim=1) > WATCH_FAR_FACTOR * max(scale, 1e-12)
        generated = torch.where(far.reshape(-1, *[1] * (generated.dim() - 1)), float("nan"), generated)
        check, _ = copies_check(generated, self.train_data.to(device), self.copy_reference.to(device), "held-out")
        return check

    def pairing(self, net, device):
        """:func:`~flowprobe.diagnosis.transport.pairing_check` on the paired training probes (sources
        ``train_sources`` and their training partners), Euler with ``copy_steps``; None without paired sources, or
        with held-out pairs (pairs of a map, where reproducing the partners is what training asks for)."""
        tr, _, src, ho_src = self.probes(device)
        if src is None or ho_src is not None:
            return None
        n = tr.shape[0]
        pairs = PairSet(src, tr, {"assigned": torch.arange(n, device=device)})
        check, _, _ = pairing_check(net, pairs, n_max=n, method="euler", steps=self.copy_steps, device=device)
        return check

    def map_pairs(self, net, device):
        """:func:`~flowprobe.diagnosis.transport.map_check` on the probe pairs (training and held-out pairs of the
        map), Euler with ``copy_steps``; None without held-out pairs."""
        tr, ho, src, ho_src = self.probes(device)
        if ho_src is None:
            return None
        check, _ = map_check(net, PairSet(src, tr, {}), PairSet(ho_src, ho, {}), n_max=max(tr.shape[0], ho.shape[0]),
                             method="euler", steps=self.copy_steps, device=device)
        return check

    # ------------------------------------------------------------------------------------------- reading

    def update(self, step: int, net: nn.Module) -> WatchReading:
        """Read the net at optimiser step ``step``: run the checks, apply the detector, log the reading and return
        it (``.fired``, ``.stop``). The net's train/eval mode and its parameters' ``.grad`` are restored afterwards.
        A net none of whose parameters requires gradients (a frozen copy, such as an EMA model) gets gradients for
        the gradient-variance check during the reading (its per-sample gradients with respect to all its
        parameters), and is frozen again after it."""
        start = time.perf_counter()
        param = next(net.parameters(), None) if hasattr(net, "parameters") else None
        device = param.device if param is not None else self.train_probe.device
        was_training = getattr(net, "training", False)
        params = list(net.parameters()) if hasattr(net, "parameters") else []
        grads = [None if q.grad is None else q.grad.clone() for q in params]  # the loop's gradients, untouched
        frozen = bool(params) and not any(q.requires_grad for q in params)
        if hasattr(net, "eval"):
            net.eval()
        for q in params if frozen else ():
            q.requires_grad_(True)
        try:
            reading = self.read(step, net, device)
        finally:
            for q in params if frozen else ():
                q.requires_grad_(False)
            for q, g in zip(params, grads):
                q.grad = g
            if was_training:
                net.train()
        self.judge(reading)
        reading.seconds = time.perf_counter() - start
        self.readings.append(reading)
        self.record(reading)
        return reading

    def read(self, step: int, net, device) -> WatchReading:
        """The numbers of one reading (no judgement)."""
        try:
            m = self.membership(net, device)
        except ValueError as e:  # every per-sample loss non-finite: nothing to rank
            logger.warning("memorisation watch: no membership reading at step %d (%s)", step, e)
            reading = WatchReading(step)
        else:
            rows = [{k: r[k] for k in ("t", "auc", "auc_lower", "auc_upper", "loss_train", "loss_heldout", "gap")}
                    for r in m.evidence["rows"]]
            best = max(rows, key=lambda r: r["auc_lower"])
            reading = WatchReading(step, auc=max(r["auc"] for r in rows), auc_lower=best["auc_lower"],
                                   auc_t=best["t"], rows=rows)
        if self.gradvar:
            try:
                g = self.gradient_variance(net, device)
            except PER_SAMPLE_ERRORS as e:  # a net torch.func cannot map
                logger.warning("memorisation watch: no gradient-variance reading at step %d (%s)", step, e)
                self.gradvar = False
                return self.read_copies(step, net, device, reading)
            if g.ran:
                reading.gradvar_ratio = g.evidence["ratio"]
                reading.gradvar_lower, reading.gradvar_upper = g.evidence["ratio_interval"]
                reading.gradvar_method = g.evidence["method"]
        return self.read_copies(step, net, device, reading)

    def read_copies(self, step: int, net, device, reading: WatchReading) -> WatchReading:
        """Add the copy check to ``reading`` when ``step`` is a multiple of ``copy_every``."""
        if self.copy_every and step % self.copy_every == 0:
            c = self.copies(net, device)
            if c.ran and "copy_fraction" in c.evidence:
                reading.copy_fraction = c.evidence["copy_fraction"]
                reading.copy_reference_fraction = c.evidence["reference_copy_fraction"]
                reading.copy_excess = c.evidence["excess"]
                reading.copy_excess_lower = c.evidence["excess_interval"][0]
                reading.copy_closeness = c.evidence["closeness"]
            reading.copy_left_out = c.evidence.get("non_finite", 0)
            p = self.pairing(net, device)
            if p is not None and p.evidence["n_contested"]:
                ev = p.evidence
                reading.pairing_recall, reading.pairing_chance = ev["recall_assigned"], ev["chance"]
                reading.pairing_contested, reading.pairing_excess = ev["n_contested"], ev["excess"]
            m = self.map_pairs(net, device)
            if m is not None:
                ev = m.evidence
                reading.map_landed_train, reading.map_landed_heldout = ev["landed_train"], ev["landed_heldout"]
                reading.map_excess, reading.map_excess_lower = ev["excess"], ev["excess_interval"][0]
                reading.map_vote = m.vote
        return reading

    def judge(self, r: WatchReading) -> None:
        """Apply the detector (:func:`detect`) to reading ``r``; warn the first time it fires."""
        said = detect(r, self.inputs, threshold=self.threshold)
        self.inputs = r.inputs
        r.fired = bool(r.signals)
        r.stop = r.fired and self.on_fire == "stop"
        if r.fired:
            r.message = f"memorisation watch fired at step {r.step}: " + "; ".join(said)
            if self.fired_at is None:
                self.fired_at = r.step
                warnings.warn(r.message, MemorizationWarning, stacklevel=3)
            else:
                logger.info(r.message)

    def record(self, r: WatchReading) -> None:
        """The reading as a JSON line in ``log_path`` and as TensorBoard scalars (when installed)."""
        if self.log_path is not None:
            append_jsonl(self.log_path, r.to_dict())
        writer = self.tensorboard()
        if writer is None:
            return
        scalars = {"watch/score": r.score, "watch/auc": r.auc, "watch/auc_lower": r.auc_lower,
                   "watch/gradvar_ratio": r.gradvar_ratio,
                   "watch/copy_excess": r.copy_excess, "watch/copy_closeness": r.copy_closeness,
                   "watch/pairing_excess": r.pairing_excess, "watch/map_excess": r.map_excess,
                   "watch/fired": float(r.fired)}
        for row in r.rows:
            scalars[f"watch/auc_t{row['t']:g}"] = row["auc"]
        for name, v in scalars.items():
            if finite_number(v):
                writer.add_scalar(name, v, r.step)
        writer.flush()

    def tensorboard(self):
        """The SummaryWriter of ``tensorboard_dir`` (created on first use), or None (no directory, or TensorBoard
        not installed: then a one-time log message and no scalars)."""
        if self._writer is None and self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: the watch writes no TensorBoard scalars")
                self.tensorboard_dir = None
                return None
            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        return self._writer

    def plot(self, path: str | Path) -> Path | None:
        """The readings so far over training (:func:`flowprobe.report.diagnosis.plot_watch`) as a PNG at ``path``:
        those in ``log_path`` when there is one (a resumed run's earlier readings too), else this watch's; None when
        there is no reading yet."""
        from ..report.diagnosis import plot_watch

        records = [r.to_dict() for r in self.readings]
        if self.log_path is not None and self.log_path.is_file():
            records = [r for r in map(json.loads, self.log_path.read_text().splitlines()) if r.get("event") == "watch"]
        if not records:
            return None
        return plot_watch(path, records, self.threshold, self.fired_at)

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------------------------------- fit hook

    def setup(self, state) -> None:
        """Hook protocol: nothing to register (the watch re-seeds its own generators at every reading)."""

    def begin(self, state) -> None:
        """Hook protocol: on a resume, :meth:`resume_at` the checkpoint's step."""
        if state.step:
            self.resume_at(state.step)

    def resume_at(self, step: int) -> None:
        """Training continues after optimiser step ``step`` (a resume): readings of later steps that an interrupted
        run logged are dropped from ``log_path`` and purged from TensorBoard, so that no step is logged twice; the
        readings up to ``step`` kept in ``log_path`` restore the detector's state: whether it has fired, and the
        score inputs carried from the last reading (the latest copy closeness and pairing excess), so the resumed
        watch scores and warns as the uninterrupted one would."""
        if self.log_path is not None and self.log_path.is_file():
            truncate_jsonl(self.log_path, lambda r: r.get("event") != "watch" or r.get("step", 0) <= step)
            for line in self.log_path.read_text().splitlines():
                record = json.loads(line)
                if record.get("event") != "watch":
                    continue
                if record.get("fired") and self.fired_at is None:
                    self.fired_at = record["step"]
                self.inputs = record.get("inputs") or self.inputs
        self.close()
        self._purge_step = step + 1

    def step(self, state) -> None:
        """Hook protocol: a reading of ``state.net`` (``state.model`` with ``use_ema``) at ``state.step``; raises
        :class:`MemorizationDetected` when the detector fires with ``on_fire="stop"``."""
        reading = self.update(state.step, state.model if self.use_ema else state.net)
        if reading.stop:
            self.close()
            raise MemorizationDetected(reading.message, reading)

    def end(self, state, interrupted: bool) -> None:
        """Hook protocol: close the TensorBoard writer."""
        self.close()
