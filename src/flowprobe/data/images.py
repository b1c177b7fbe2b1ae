"""Images on the training side: uint8 tensors on the device, a sampler, fixed image pairings.

:class:`ImageSampler` keeps the uint8 images on the training device (N x 3 x H x W) and returns
float batches in [-1, 1] (x / 127.5 - 1) with an optional random horizontal flip, all drawn from the
caller's generator: no data-loader process in the hot loop. :class:`IndexedPairs` is a fixed coupling
(x0[i], image[partner[i]]) with uint8 targets. Pairings: :func:`fixed_noise` (noise fixed per image
index), :func:`ot_partner` (exact OT assignment), :func:`shuffled_partner` (seeded permutation); reflow
pairs are the flow's end points (:func:`flowprobe.solvers.push_forward`). Reading image files and the decode
cache: :mod:`flowprobe.data.image_files` (:func:`load_images` is re-exported here).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..couplings import Pairing, ot_permutation
from ..seeds import seeded_generator
from .image_files import DATASETS, ImageData, dataset_path, find_data_root, load_images, load_images_for

__all__ = ["to_tensor", "to_unit", "ImageSampler", "IndexedPairs", "fixed_noise", "shuffled_partner", "ot_partner",
           "load_images", "load_images_for", "ImageData", "DATASETS", "dataset_path", "find_data_root"]


# ------------------------------------------------------------------------------------ tensors, sampler

def to_tensor(images: np.ndarray | Tensor, device: str | torch.device = "cpu") -> Tensor:
    """uint8 (N, H, W, C) -> uint8 tensor (N, C, H, W) on ``device`` (contiguous)."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).contiguous().to(device)


def to_unit(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels p in {0..255} -> floats p / 127.5 - 1 in [-1, 1]."""
    return x.to(dtype) / 127.5 - 1.0


def _draw_indices(N: int, n: int, generator: torch.Generator) -> Tensor:
    if n <= N:
        return torch.randperm(N, generator=generator, device=generator.device)[:n]
    return torch.randint(N, (n,), generator=generator, device=generator.device)


class ImageSampler:
    """Draws training images from a uint8 tensor (N, C, H, W) kept on its device.

    ``sample(n, generator) -> (x, idx)``: n rows drawn uniformly without replacement (with replacement
    when n > N), scaled to x / 127.5 - 1 in [-1, 1], each flipped left-right with probability 1/2 when
    ``flip``. All randomness comes from ``generator`` (the flip mask too).
    """

    def __init__(self, data: Tensor, flip: bool = True, dtype: torch.dtype = torch.float32):
        if data.dtype != torch.uint8 or data.dim() != 4:
            raise ValueError(f"data must be a uint8 tensor (N, C, H, W), got {data.dtype} {tuple(data.shape)}")
        self.data, self.flip, self.dtype = data, bool(flip), dtype

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = _draw_indices(len(self), n, generator)
        x = to_unit(self.data[idx.to(self.data.device)], self.dtype)
        if self.flip:
            mask = torch.rand(n, generator=generator, device=generator.device) < 0.5
            mask = mask.to(x.device)[:, None, None, None]
            x = torch.where(mask, x.flip(-1), x)
        return x, idx.to(self.data.device)


class IndexedPairs:
    """A fixed coupling of sources x0[i] (float) with uint8 images ``images[partner[i]]``.

    ``sample(n, generator)`` draws rows i and returns a Pairing with x1 = images[partner[i]] scaled to
    [-1, 1] (no flip: the pairing is by index), i0 = i and i1 = partner[i].
    """

    def __init__(self, x0: Tensor, images: Tensor, partner: Tensor | None = None, dtype: torch.dtype = torch.float32):
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        partner = torch.arange(x0.shape[0]) if partner is None else partner
        if partner.shape != (x0.shape[0],):
            raise ValueError(f"partner must have shape ({x0.shape[0]},), got {tuple(partner.shape)}")
        if tuple(x0.shape[1:]) != tuple(images.shape[1:]):
            raise ValueError(f"x0 rows {tuple(x0.shape[1:])} and images {tuple(images.shape[1:])} differ in shape")
        self.x0, self.images, self.dtype = x0, images, dtype
        self.partner = partner.to(images.device, torch.long)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        idx = _draw_indices(len(self), n, generator).to(self.x0.device)
        i1 = self.partner[idx.to(self.partner.device)]
        x1 = to_unit(self.images[i1], self.dtype).to(self.x0.device)
        return Pairing(self.x0[idx], x1, idx, i1)

    def describe(self) -> dict:
        return {"coupling": "indexed_pairs", "n_pairs": len(self)}


# -------------------------------------------------------------------------------------------- pairings

def fixed_noise(n: int, shape: tuple[int, ...], seed: int, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, block: int = 256) -> Tensor:
    """x0[i] ~ N(0, I) of ``shape``, fixed per index: rows are drawn on the CPU in blocks of ``block``
    rows, block b from a generator seeded with (seed, b), so row i is the same for every n > i and on
    every device."""
    rows = []
    for b in range(0, n, block):
        g = seeded_generator(seed, b // block)
        rows.append(torch.randn((block, *shape), generator=g, dtype=torch.float32)[:n - b])
    x = torch.cat(rows) if rows else torch.zeros((0, *shape))
    return x.to(device=device, dtype=dtype)


def shuffled_partner(n: int, seed: int) -> Tensor:
    """The adversarial pairing: a uniformly random permutation of range(n) from a generator seeded with
    ``seed`` (x0[i] is paired with image[perm[i]])."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def ot_partner(x0: Tensor, x1: Tensor, method: str = "lsa", device: str | torch.device | None = None) -> Tensor:
    """Exact OT partner: the permutation p minimising sum_i ||x0_i - x1_p(i)||^2 (discrete Monge
    assignment between two equal-size point clouds). The cost matrix is computed in float64 on
    ``device`` (the GPU when given: N = 10^4 images of 12288 values is seconds), the assignment by
    scipy's ``linear_sum_assignment`` (``"lsa"``, fine to N ~ 10^4) or POT's ``emd``. Returns a CPU
    int64 tensor."""
    if device is not None:
        x0, x1 = x0.to(device), x1.to(device)
    x1 = to_unit(x1) if x1.dtype == torch.uint8 else x1
    return ot_permutation(x0, x1, method).cpu()
