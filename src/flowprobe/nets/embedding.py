"""Sinusoidal time embedding shared by every flowprobe network."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["timestep_embedding", "TIME_SCALE", "label_embedding"]

#: t in [0, 1] is multiplied by this before the sinusoidal embedding. With max_period 10000, raw t
#: in [0, 1] would leave most frequencies nearly constant over the whole interval.
TIME_SCALE = 1000.0


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = TIME_SCALE) -> Tensor:
    """Sinusoidal embedding of shape (B, dim) of the scalars ``scale * t``.

    emb[:, k] = cos(scale t w_k), emb[:, half + k] = sin(scale t w_k), w_k = max_period^(-k / half),
    half = dim // 2 (a zero column is appended when dim is odd).
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = (scale * t.to(dtype))[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def label_embedding(table, num_classes: int, y: Tensor | None, x: Tensor) -> Tensor | float:
    """What a net adds to its time embedding for class labels ``y`` (B,): ``table(y)`` (an ``nn.Embedding`` of
    num_classes + 1 rows), the null row ``num_classes`` for ``y=None``; 0 for an unconditional net (``table``
    None), which refuses labels."""
    if table is None:
        if y is not None:
            raise ValueError("this net is not class-conditional (build it with num_classes > 0)")
        return 0.0
    if y is None:
        y = torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)
    return table(torch.as_tensor(y, device=x.device).long().expand(x.shape[0])).to(x.dtype)
