"""The learning-rate schedule of :func:`flowprobe.train.fit`: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math

__all__ = ["learning_rate", "LR_SCHEDULES"]

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(step: int, *, lr: float, steps: int, warmup: int = 0, schedule: str = "constant") -> float:
    """Learning rate of optimiser step ``step`` (0-based) out of ``steps``:

        lr_k = lr * min(1, (k + 1) / warmup) * c(k),   c(k) = 1 (constant) or (1 + cos(pi k / steps)) / 2 (cosine).

    Without warm-up (``warmup = 0``) the first factor is 1.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * step / steps))
    return lr * f
