"""Hooks that bring probes into the training loop (the loop itself imports no probe)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError
from ..io import append_jsonl
from ..probes.gradvar import gradient_variance, parse_times
from ..train.hooks import Hook
from ..watch import MemorizationWatch

__all__ = ["GradVarHook", "GRADVAR_SEED_OFFSET", "config_watch"]

#: The gradient-variance probe draws from its own generator, seeded with seed + GRADVAR_SEED_OFFSET.
GRADVAR_SEED_OFFSET = 7919


class GradVarHook(Hook):
    """Every ``every`` steps, the gradient-variance profile of the current (raw) weights at ``times`` (a list or
    "a:b:K") with ``n_samples`` pairs per time, appended to the JSONL file ``path`` as an event "gradvar".

    It uses the paper's per-sample loss (sum over dimensions), whatever reduction training uses, exact
    per-sample gradients, and its own generator (seeded ``seed + GRADVAR_SEED_OFFSET``, registered with the
    run's generators so it is checkpointed and restored): the training draws are untouched, so a run with
    this hook trains bit-identically to one without."""

    def __init__(self, path: str | Path, objective, coupling, every: int, times="0:1:11", n_samples: int = 256,
                 seed: int = 0):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"gradvar every must be an integer >= 1, got {every!r}")
        parse_times(times)  # a bad value stops here, not at the first reading
        self.path, self.objective, self.coupling = Path(path), objective, coupling
        self.every, self.times, self.n_samples, self.seed = every, times, n_samples, seed
        self.generator: torch.Generator | None = None

    def setup(self, state) -> None:
        self.generator = torch.Generator(device=state.device).manual_seed(self.seed + GRADVAR_SEED_OFFSET)
        state.generators["gradvar"] = self.generator

    def step(self, state) -> None:
        result = gradient_variance(state.net, self.objective.path, self.coupling, self.times,
                                   n_samples=self.n_samples, method="exact", generator=self.generator,
                                   reduction="sum")
        state.net.train()
        append_jsonl(self.path, {"event": "gradvar", "step": state.step, **result.to_dict()})


def config_watch(cfg, coupling, source, target, path, log: str | Path, device, world: int = 1) -> MemorizationWatch:
    """The memorisation watch of a run's ``watch:`` section (:class:`~flowprobe.runs.config.WatchConfig`), writing
    its readings to the run's JSONL ``log``: its training samples are the run's (pool, images or fixed pairs, with
    their sources), its held-out samples those ``flowprobe diagnose`` uses for the run (a run on pairs of a map:
    its held-out pairs, ``data.heldout_pairs``, with their sources). A run with nothing to
    memorise or nothing held out, or ``on_fire: stop`` under several processes, is a ConfigError naming ``watch``."""
    from .diagnose import heldout_data_of, heldout_pairs_of, training_data_of

    w = cfg.watch
    if w.on_fire == "stop" and world > 1:
        raise ConfigError(f"watch.on_fire: stop is not supported with {world} processes (only rank 0 reads the "
                          f"watch); use warn")
    x_train, pairs, why = training_data_of(coupling, device)
    if x_train is None and pairs is None:
        raise ConfigError(f"watch: {why.replace(': pass --train', '')}; there is no training set to memorise")
    held_pairs = heldout_pairs_of(cfg, device, tuple(pairs.x0.shape[1:])) if pairs is not None else None
    if held_pairs is not None:
        x_held, why_held = held_pairs.x1[:w.n_heldout], "held-out pairs"
    else:
        x_held, why_held = heldout_data_of(cfg, target, w.n_heldout, cfg.seed, device)
    if x_held is None:
        why_held = why_held.replace(": give them with --heldout", "")
        raise ConfigError(f"watch: no held-out samples for this run ({why_held})")
    sources = None
    if pairs is not None:
        x_train, sources = pairs.x1, pairs.x0
    return MemorizationWatch(x_train, x_held.to(x_train.device, x_train.dtype), path, every=w.every,
                             n_probe=w.n_probe, seed=cfg.seed, source=source if hasattr(source, "sample") else None,
                             train_sources=sources, copy_every=w.copy_every, log_path=log, on_fire=w.on_fire,
                             heldout_sources=None if held_pairs is None else
                             held_pairs.x0[:w.n_heldout].to(x_train.device, x_train.dtype),
                             use_ema=cfg.ema_decay is not None, early=w.early)
