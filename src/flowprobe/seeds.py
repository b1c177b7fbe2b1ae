"""The one seed-derivation rule of the library: independent streams from one user seed."""

from __future__ import annotations

import torch

__all__ = ["derive_seed", "seeded_generator", "SEED_STRIDE"]

#: A prime stride: stream k of seed s is seeded with s * SEED_STRIDE + k, so streams of different seeds do
#: not collide for k < SEED_STRIDE.
SEED_STRIDE = 1_000_003


def derive_seed(seed: int, k: int) -> int:
    """The seed of stream ``k`` of run seed ``seed``: seed * 1_000_003 + k."""
    return int(seed) * SEED_STRIDE + int(k)


def seeded_generator(seed: int, k: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` (seed, k)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, k))
