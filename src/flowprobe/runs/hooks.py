"""Hooks that bring probes into the training loop (the loop itself imports no probe)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import append_jsonl
from ..probes.gradvar import gradient_variance, parse_times
from ..train.hooks import Hook

__all__ = ["GradVarHook", "GRADVAR_SEED_OFFSET"]

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
