"""A time-conditioned MLP for low-dimensional data: net(t, x) with x of shape (B, dim)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .embedding import timestep_embedding

__all__ = ["MLP"]

_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "selu": nn.SELU}


class MLP(nn.Module):
    """v(t, x) = MLP([x, emb(t)]), with ``depth`` hidden layers of ``width`` units.

    ``time_embed_dim``: size of the sinusoidal embedding of 1000 t (0 feeds raw t as one input).
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 3, time_embed_dim: int = 32,
                 activation: str = "silu", out_dim: int | None = None):
        super().__init__()
        if dim < 1 or width < 1 or depth < 1 or time_embed_dim < 0:
            raise ValueError("dim, width and depth must be >= 1 and time_embed_dim >= 0")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.dim, self.time_embed_dim = dim, time_embed_dim
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        n_in = dim + max(time_embed_dim, 1)
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), act()]
            n_in = width
        layers.append(nn.Linear(n_in, out_dim or dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.time_embed_dim:
            te = timestep_embedding(t, self.time_embed_dim)
        else:
            te = t[:, None]
        return self.net(torch.cat([x, te.to(x.dtype)], dim=-1))
