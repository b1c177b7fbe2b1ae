"""The training loop shared by every model (toy MLPs, image UNets, experiments).

``fit`` is the low-level loop: a net, a coupling (anything with ``sample(n, generator) -> Pairing``),
a :class:`~flowprobe.objectives.CFMObjective` and a step budget. It returns the trained net.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .objectives import CFMObjective

__all__ = ["fit", "TrainState"]


@dataclass
class TrainState:
    """What ``fit`` returns: the trained net, its EMA copy (None without EMA), the number of optimiser
    steps taken and the logged losses. ``model`` is what to sample: the EMA when there is one."""

    net: nn.Module
    ema: nn.Module | None = None
    step: int = 0
    losses: list = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.net


def fit(net: nn.Module, coupling, objective: CFMObjective, *, steps: int, batch_size: int, lr: float = 1e-3,
        seed: int = 0, lr_schedule: str = "constant", warmup: int = 0, grad_clip: float | None = None,
        weight_decay: float = 0.0, device: str | torch.device = "cpu", progress: bool = False) -> TrainState:
    """Train ``net`` for ``steps`` AdamW steps on batches drawn from ``coupling``.

    Learning rate: linear warm-up over ``warmup`` steps, then constant or cosine decay to 0.
    Randomness comes only from a generator seeded with ``seed`` (on ``device``).
    """
    device = torch.device(device)
    net.to(device).train()
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if lr_schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * step / steps))
        return lr * f

    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        pairing = coupling.sample(batch_size, gen)
        loss = objective(net, pairing, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
    net.eval()
    return TrainState(net=net, step=steps, losses=losses)


def register_cli(subparsers) -> None:  # replaced by the full train/sample commands
    pass
