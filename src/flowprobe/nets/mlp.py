"""A time-conditioned MLP for low-dimensional data: net(t, x) with x of shape (B, dim)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .embedding import TIME_SCALE, label_embedding, timestep_embedding

__all__ = ["MLP"]

_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "selu": nn.SELU}


class MLP(nn.Module):
    """v(t, x) = MLP([x, emb(t)]), with ``depth`` hidden layers of ``width`` units.

    ``time_embed_dim``: size of the sinusoidal embedding of ``time_scale`` t (default 1000 t; 0 feeds raw t as
    one input).
    ``step_embed``: also take a step h (``net(t, x, h)``, the average velocity over [t, t + h] of few-step
    objectives such as MeanFlow): [x, emb(t), emb(h)]. The first layer's weights on emb(h) start at zero,
    so the new net starts as a velocity field, and h = 0 (or None) is the instantaneous velocity.
    ``num_classes`` = K > 0: class-conditional, ``net(t, x, y=labels)``; an ``nn.Embedding(K + 1, ...)`` of the
    label (index K, or ``y=None``, is the null label: the unconditional field) is added to the time embedding
    (:mod:`flowprobe.guidance`).
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 3, time_embed_dim: int = 32,
                 activation: str = "silu", out_dim: int | None = None, step_embed: bool = False,
                 time_scale: float = TIME_SCALE, num_classes: int = 0):
        super().__init__()
        if dim < 1 or width < 1 or depth < 1 or time_embed_dim < 0:
            raise ValueError("dim, width and depth must be >= 1 and time_embed_dim >= 0")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.dim, self.time_embed_dim, self.step_embed = dim, time_embed_dim, bool(step_embed)
        self.time_scale = float(time_scale)
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        n_time = max(time_embed_dim, 1)
        n_in = dim + n_time * (2 if step_embed else 1)
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), act()]
            n_in = width
        layers.append(nn.Linear(n_in, out_dim or dim))
        self.net = nn.Sequential(*layers)
        self.num_classes = int(num_classes)
        self.label_embed = nn.Embedding(num_classes + 1, n_time) if num_classes > 0 else None
        if step_embed:
            with torch.no_grad():
                self.net[0].weight[:, dim + n_time:] = 0

    def _embed(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        te = timestep_embedding(t, self.time_embed_dim, scale=self.time_scale) if self.time_embed_dim else t[:, None]
        return te.to(x.dtype)

    def forward(self, t: Tensor, x: Tensor, h: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        parts = [x, self._embed(t, x) + label_embedding(self.label_embed, self.num_classes, y, x)]
        if self.step_embed:
            parts.append(self._embed(torch.zeros(()) if h is None else h, x))
        elif h is not None:
            raise ValueError("this net has no step input (build it with step_embed=True)")
        return self.net(torch.cat(parts, dim=-1))
