"""Image grids: generated or real images as one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..io import atomic_write

__all__ = ["save_image_grid", "to_uint8"]


def to_uint8(x: Tensor) -> Tensor:
    """Floats in [-1, 1] -> uint8 round((x + 1) * 127.5), clipped to [0, 255]."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_image_grid(path: str | Path, images: Tensor, ncol: int | None = None, pad: int = 2) -> Path:
    """Write images (N, C, H, W) with values in [-1, 1] as one PNG grid (atomically): ``ncol`` columns
    (default ceil(sqrt(N))), ``pad`` white pixels between tiles; pixel = round((x + 1) * 127.5) clipped."""
    x = to_uint8(images.detach().cpu())
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = x.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = x[k].permute(1, 2, 0).numpy()
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    path = Path(path)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
