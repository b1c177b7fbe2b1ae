"""The run's JSON-lines log mirrored into TensorBoard: :class:`TensorBoardLog`, a :func:`flowprobe.train.fit` hook.

The JSONL file (:class:`~flowprobe.train.hooks.MetricsLog`, and every other hook that appends to the same file,
such as the gradient-variance log) stays the record of the run; this hook copies each record appended to it
into TensorBoard's own ``SummaryWriter``, so the two cannot disagree: every finite number of a record
(nested mappings flattened with ``/``; list items by their time ``t`` when they have one, else by position)
becomes the scalar ``<event>/<key>`` at the record's ``step``. The start and resume records describe the run
and are not copied. TensorBoard stores scalars as float32.

A resume from step T opens the writer with ``purge_step=T``: TensorBoard's readers drop every event of step
>= T written before (by the interrupted run), and the hook copies again the log's records from step T on (the
train job truncates the log to the checkpoint's step first), so each step appears once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import ConfigError
from .hooks import Hook

__all__ = ["TensorBoardLog", "summary_writer_class", "record_scalars", "SKIPPED_EVENTS"]

#: Records of these events describe the run; they are not metrics and are not copied.
SKIPPED_EVENTS = ("start", "resume")


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, imported on demand; a one-line ConfigError without TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard: TensorBoard is not installed (pip install tensorboard, or the "
                          "flowprobe[tensorboard] extra); set log.tensorboard: false to train without it") from None
    return SummaryWriter


def record_scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one JSONL record: ``{"<event>/<key>": value}`` for every finite number in it
    (booleans, strings, None and non-finite numbers left out; ``step`` is the x-axis, not a scalar)."""
    out: dict[str, float] = {}
    prefix = str(record.get("event", "metrics"))
    _flatten(prefix, {k: v for k, v in record.items() if k not in ("event", "step")}, out)
    return out


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            t = v.get("t") if isinstance(v, dict) else None
            if isinstance(t, (int, float)) and not isinstance(t, bool):  # a row per time: named by its time
                _flatten(f"{prefix}/t={t:g}", {k: x for k, x in v.items() if k != "t"}, out)
            else:
                _flatten(f"{prefix}/{i}", v, out)


class TensorBoardLog(Hook):
    """Copy the records appended to the JSONL file ``jsonl_path`` into TensorBoard event files in ``log_dir``
    (module docstring), every ``every`` steps (default: the loop's ``log_every``; records of other intervals,
    e.g. gradient variance, are copied at the next one, at their own steps) and at the end of training. Put it
    after the hooks that write the log. :meth:`sync` copies what came since (e.g. the train job's evaluation
    record, written after ``fit``); :meth:`close` closes the writer."""

    def __init__(self, log_dir: str | Path, jsonl_path: str | Path, every: int | None = None):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"tensorboard every must be an integer >= 1 or None, got {every!r}")
        self.log_dir, self.jsonl_path, self.every = Path(log_dir), Path(jsonl_path), every
        self._writer_class = summary_writer_class()  # a missing TensorBoard stops here, before any training
        self._writer = None
        self._offset = 0
        self._first_step = 0

    def setup(self, state) -> None:
        if self.every is None:
            self.every = state.options.log_every

    def begin(self, state) -> None:
        self.open(state.step)

    def open(self, step: int = 0) -> None:
        """Open the writer for a run that starts (or resumes) at ``step``: events of steps >= ``step`` already in
        ``log_dir`` are purged for readers, and the log's records from ``step`` on are copied."""
        self.close()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = self._writer_class(str(self.log_dir), purge_step=step)
        self._offset, self._first_step = 0, step
        self.sync()

    def step(self, state) -> None:
        self.sync()

    def end(self, state, interrupted: bool) -> None:
        self.sync()

    def sync(self) -> int:
        """Copy the complete records appended to the log since the last call; returns how many were copied."""
        if self._writer is None or not self.jsonl_path.exists():
            return 0
        with open(self.jsonl_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is left for the next call
        copied = 0
        for line in data[:end].decode().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a crash: not a record
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int) or record.get("event") in SKIPPED_EVENTS or step < self._first_step:
                continue
            for tag, value in record_scalars(record).items():
                self._writer.add_scalar(tag, value, step)
            copied += 1
        self._offset += end
        self._writer.flush()
        return copied

    def close(self) -> None:
        """Copy what is left and close the writer (a later :meth:`open` starts a new event file)."""
        if self._writer is not None:
            self.sync()
            self._writer.close()
            self._writer = None
