"""The memorisation watch as a Lightning ``Callback`` (an optional dependency: ``lightning`` or
``pytorch_lightning``, imported when the callback is built)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .monitor import MemorizationWatch

__all__ = ["lightning_callback", "lightning_callback_bases", "LIGHTNING_PACKAGES"]


#: The packages a Lightning callback can be built for, newest name first.
LIGHTNING_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def lightning_callback_bases() -> tuple[type, ...]:
    """The ``Callback`` classes the watch's Lightning callback derives from: those of the Lightning packages already
    imported (``lightning.pytorch``, ``pytorch_lightning``), else of every one installed; a Trainer accepts only
    callbacks of its own package, and deriving from each makes one callback fit both."""
    import importlib
    import importlib.util
    import sys

    names = [n for n in LIGHTNING_PACKAGES if n in sys.modules]
    if not names:
        names = [n for n in LIGHTNING_PACKAGES if importlib.util.find_spec(n.split(".")[0]) is not None]
    if not names:
        raise ImportError("lightning_callback needs lightning or pytorch_lightning installed")
    return tuple(importlib.import_module(n).Callback for n in names)


def lightning_callback(watch: MemorizationWatch, net_of: Callable[[nn.Module], nn.Module] | None = None):
    """A Lightning ``Callback`` that calls ``watch.update(global_step, net)`` every ``watch.every`` optimiser steps
    (once per step, also under gradient accumulation), where ``net = net_of(lightning_module)`` (default: the
    module itself, called ``net(t, x)``), on global rank 0; a fired reading with ``on_fire="stop"`` sets
    ``trainer.should_stop`` on every rank (the decision is shared through the trainer's strategy, as Lightning's
    early stopping does). A fit resumed at step T drops the watch's logged readings after T
    (:meth:`MemorizationWatch.resume_at`). Needs ``lightning`` or ``pytorch_lightning``
    (:func:`lightning_callback_bases`)."""
    bases = lightning_callback_bases()

    class WatchCallback(*bases):
        def __init__(self):
            super().__init__()
            self.watch = watch
            self.last_step = -1

        def on_train_start(self, trainer, pl_module):
            self.last_step = int(trainer.global_step)
            if self.last_step and getattr(trainer, "global_rank", 0) == 0:
                watch.resume_at(self.last_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = int(trainer.global_step)
            if step == 0 or step == self.last_step or step % watch.every:
                return  # no optimiser step since the last batch (gradient accumulation), or not a reading step
            self.last_step = step
            stop = False
            if getattr(trainer, "global_rank", 0) == 0:
                stop = watch.update(step, net_of(pl_module) if net_of is not None else pl_module).stop
            strategy = getattr(trainer, "strategy", None)
            if watch.on_fire == "stop" and strategy is not None:  # every rank takes part; any rank's stop counts
                stop = bool(strategy.reduce_boolean_decision(stop, all=False))
            if stop:
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module):
            watch.close()

    return WatchCallback()
