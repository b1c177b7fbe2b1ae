"""What :func:`flowprobe.train.fit` is handed besides the net, the coupling and the objective.

A hook is any object with some of these methods (:class:`Hook` gives them all, doing nothing):

- ``setup(state)``: once, after the net, EMA, optimiser and generators exist and before a resume restores them;
  a hook that draws random numbers registers its own generator in ``state.generators`` here, so that it is
  checkpointed and restored with the run's and the training draws stay untouched;
- ``begin(state)``: once, after a resume (``state.step`` is the first step to run);
- ``step(state)``: after every ``every``-th optimiser step (``state.step`` steps done, ``state.losses`` synced);
- ``end(state, interrupted)``: once, after the last step or on Ctrl-C (then the loop raises KeyboardInterrupt).

Hooks run on rank 0 only. The loop itself imports no probe: gradient-variance logging and the memorisation
watch reach it as hooks from above (:mod:`flowprobe.runs.hooks`, :mod:`flowprobe.watch`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..checkpoint import checkpoint_path, list_checkpoints, save_checkpoint
from ..io import append_jsonl

__all__ = ["Hook", "MetricsLog", "Checkpointer", "Callback", "DivergenceError", "nonfinite_parameters"]


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter. ``step``: the first optimiser step whose loss was
    not finite (or the step at which non-finite weights were found); ``last_good``: the newest checkpoint
    written before it (None without checkpoints)."""

    def __init__(self, message: str, step: int, last_good: Path | None = None):
        super().__init__(message)
        self.step = step
        self.last_good = last_good


class Hook:
    """The hook protocol with no-op methods; subclass and override what you need."""

    every: int | None = None

    def setup(self, state) -> None:
        pass

    def begin(self, state) -> None:
        pass

    def step(self, state) -> None:
        pass

    def end(self, state, interrupted: bool) -> None:
        pass


class Callback(Hook):
    """``fn(state)`` every ``every`` steps (the net is put back in train mode afterwards)."""

    def __init__(self, fn: Callable[[Any], Any], every: int):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"callback every must be an integer >= 1, got {every!r}")
        self.fn, self.every = fn, every

    def step(self, state) -> None:
        self.fn(state)
        state.net.train()


class MetricsLog(Hook):
    """JSON lines in ``path``: a start (or resume) record describing the run, then one record per ``every``
    steps (default: the loop's ``log_every``) with the mean training loss over the window, the learning rate,
    the throughput and the samples seen."""

    def __init__(self, path: str | Path, every: int | None = None):
        self.path = Path(path)
        self.every = every
        self._t, self._s = 0.0, 0

    def setup(self, state) -> None:
        if self.every is None:
            self.every = state.options.log_every

    def begin(self, state) -> None:
        o = state.options
        append_jsonl(self.path, {
            "event": "resume" if state.step else "start", "step": state.step, "steps": o.steps,
            "batch_size": o.batch_size, "world_size": state.world, "lr": o.lr, "lr_schedule": o.lr_schedule,
            "warmup": o.warmup, "grad_clip": o.grad_clip, "weight_decay": o.weight_decay, "ema_decay": o.ema_decay,
            "precision": o.precision, "compile": o.compile if isinstance(o.compile, str) else bool(o.compile),
            "seed": o.seed, "device": str(state.device), "version": __version__, **state.description})
        self._t, self._s = time.perf_counter(), state.step

    def step(self, state) -> None:
        now, done = time.perf_counter(), state.step
        window = state.losses[self._s:done]
        append_jsonl(self.path, {"event": "train", "step": done, "loss": sum(window) / max(len(window), 1),
                                 "lr": state.optimizer.param_groups[0]["lr"],
                                 "steps_per_s": (done - self._s) / max(now - self._t, 1e-9),
                                 "samples_seen": done * state.options.batch_size})
        self._t, self._s = now, done


def nonfinite_parameters(*modules: torch.nn.Module | None) -> list[str]:
    """Names of parameters and buffers of ``modules`` (None skipped) holding a NaN or an infinity."""
    bad = []
    for prefix, m in zip(("net", "ema"), modules):
        if m is None:
            continue
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{prefix}.{name}")
    return bad


class Checkpointer(Hook):
    """A checkpoint (:func:`flowprobe.checkpoint.save_checkpoint`: weights, EMA, optimiser, every generator of
    the run, losses) in ``directory`` every ``every`` steps and at the end or on Ctrl-C; ``keep`` keeps only
    the newest k. ``config`` goes into the sidecars and ``extra`` into their ``extra`` (e.g. the model spec).

    A checkpoint is never written with non-finite weights (that raises :class:`DivergenceError` instead), so
    the newest kept checkpoint is always a finite one; ``last_saved`` names it."""

    def __init__(self, directory: str | Path, every: int | None = None, keep: int | None = None,
                 config: Any = None, extra: dict | None = None):
        for name, v in (("every", every), ("keep", keep)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"checkpoint {name} must be an integer >= 1 or None, got {v!r}")
        self.directory, self.every, self.keep = Path(directory), every, keep
        self.config, self.extra = config, dict(extra or {})
        self.last_saved: Path | None = None
        self._saved_step = -1

    def begin(self, state) -> None:
        if state.resumed_from is not None:
            self._saved_step, self.last_saved = state.step, Path(state.resumed_from)

    def step(self, state) -> None:
        self.save(state)

    def end(self, state, interrupted: bool) -> None:
        if self._saved_step != state.step and (state.step > state.start or interrupted):
            self.save(state)

    def save(self, state) -> Path:
        bad = nonfinite_parameters(state.net, state.ema)
        if bad:
            raise DivergenceError(f"non-finite weights at step {state.step} ({bad[0]}"
                                  f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); no checkpoint written",
                                  state.step, self.last_saved)
        path = save_checkpoint(checkpoint_path(self.directory, state.step), net=state.net, ema=state.ema,
                               optimizer=state.optimizer, step=state.step, config=self.config,
                               generators=state.generators, losses=state.losses[:state.step],
                               extra={**self.extra, "descriptions": state.description, "world_size": state.world,
                                      "batch_size": state.options.batch_size})
        self._saved_step, self.last_saved = state.step, path
        if self.keep is not None:
            for old in list_checkpoints(self.directory)[:-self.keep]:
                old.with_suffix(".json").unlink(missing_ok=True)
                old.unlink(missing_ok=True)
        return path


def first_nonfinite(values: list[float], offset: int) -> int | None:
    """The 1-based step of the first non-finite value of ``values`` (which start after step ``offset``)."""
    for i, v in enumerate(values):
        if not math.isfinite(v):
            return offset + i + 1
    return None
