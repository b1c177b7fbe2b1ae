"""Two-dimensional toy distributions.

Every sampler follows the ``Sampler`` protocol of :mod:`flowprobe.couplings`: ``sample(n, generator)``
returns ``(x, idx)`` with x of shape (n, 2) and idx the position in the draw (these are fresh draws,
not a finite pool). Samples are made on the generator's device unless ``device`` is given, so a CUDA
generator gives CUDA samples; all randomness comes from the generator.

- :class:`EightGaussians`: a mixture of 8 isotropic Gaussians with centres on a circle,
  mu_k = radius (cos(2 pi k / 8), sin(2 pi k / 8)), std ``std``, equal weights.
- :class:`Moons`: the two interleaved half circles (``sklearn.datasets.make_moons`` convention), centred
  and scaled: outer (cos th, sin th), inner (1 - cos th, 1/2 - sin th), th ~ U[0, pi], plus N(0, noise^2)
  on the unit scale, then x -> scale (x - (1/2, 1/4)).
- :class:`Checkerboard`: uniform on the dark squares of a 4 x 4 board on [-2, 2]^2, times ``scale``.
- :class:`StandardGaussian`: N(0, std^2 I) in 2-D.

The Gaussian-type toys (:class:`StandardGaussian`, :class:`EightGaussians`) also give their exact ``log_prob(x)``
(the source density of a likelihood, :mod:`flowprobe.probes.likelihood`).

:func:`make_toy` builds one by name (used by configs); :func:`flowprobe.metrics.energy_distance` compares a
trained flow's samples with its target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["EightGaussians", "Moons", "Checkerboard", "StandardGaussian", "TOY_DISTRIBUTIONS", "make_toy"]


class _Toy2D:
    dim = 2

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype

    def _dev(self, generator: torch.Generator) -> torch.device:
        return generator.device

    def _out(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dev = self.device if self.device is not None else x.device
        return x.to(dev), torch.arange(x.shape[0], device=dev)

    def _rand(self, shape, generator):
        return torch.rand(shape, generator=generator, device=generator.device, dtype=self.dtype)

    def _randn(self, shape, generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype)

    def describe(self) -> dict:
        return {"distribution": type(self).__name__}


class StandardGaussian(_Toy2D):
    """x ~ N(0, std^2 I_2)."""

    def __init__(self, std: float = 1.0, device=None, dtype=torch.float32):
        super().__init__(device, dtype)
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std = float(std)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self._out(self.std * self._randn((n, 2), generator))

    def log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, std^2 I_2) = -||x||^2 / (2 std^2) - log(2 pi std^2), shape (n,)."""
        return -0.5 * x.pow(2).sum(-1) / self.std ** 2 - math.log(2 * math.pi * self.std ** 2)

    def describe(self) -> dict:
        return {"distribution": "gaussian", "std": self.std}


class EightGaussians(_Toy2D):
    """Equal mixture of N(mu_k, std^2 I), mu_k = radius (cos(k pi / 4), sin(k pi / 4)), k = 0..7.

    A draw picks the component k uniformly, then adds std * N(0, I) to mu_k.
    """

    def __init__(self, radius: float = 4.0, std: float = 0.25, device=None, dtype=torch.float32):
        super().__init__(device, dtype)
        if not (radius > 0 and std > 0):
            raise ValueError(f"radius and std must be > 0, got radius={radius}, std={std}")
        self.radius, self.std = float(radius), float(std)

    @property
    def centers(self) -> Tensor:
        """The 8 mode centres, shape (8, 2), float64 on the CPU."""
        ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return self.radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)

    def _centers_on(self, device: torch.device) -> Tensor:
        # built on the device itself: copying a CPU tensor to the GPU at every draw would synchronise
        ang = torch.arange(8, device=device, dtype=torch.float64) * (2 * math.pi / 8)
        return (self.radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)).to(self.dtype)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        k = torch.randint(8, (n,), generator=generator, device=generator.device)
        mu = self._centers_on(generator.device)[k]
        return self._out(mu + self.std * self._randn((n, 2), generator))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = logsumexp_k [-||x - mu_k||^2 / (2 std^2)] - log 8 - log(2 pi std^2), shape (n,)."""
        sq = (x[:, None, :] - self.centers.to(x.device, x.dtype)[None]).pow(2).sum(-1)
        return torch.logsumexp(-0.5 * sq / self.std ** 2, dim=1) - math.log(8 * 2 * math.pi * self.std ** 2)

    def describe(self) -> dict:
        return {"distribution": "eight_gaussians", "radius": self.radius, "std": self.std}


class Moons(_Toy2D):
    """Two interleaved half circles: with th ~ U[0, pi] and a fair coin, the unit-scale point is
    (cos th, sin th) or (1 - cos th, 1/2 - sin th), plus N(0, noise^2 I); then x -> scale (x - (1/2, 1/4))."""

    def __init__(self, noise: float = 0.08, scale: float = 3.0, device=None, dtype=torch.float32):
        super().__init__(device, dtype)
        if not (noise >= 0 and scale > 0):
            raise ValueError(f"noise must be >= 0 and scale > 0, got noise={noise}, scale={scale}")
        self.noise, self.scale = float(noise), float(scale)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        th = math.pi * self._rand((n,), generator)
        inner = self._rand((n,), generator) < 0.5
        outer_pt = torch.stack([torch.cos(th), torch.sin(th)], dim=1)
        inner_pt = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], dim=1)
        x = torch.where(inner[:, None], inner_pt, outer_pt) + self.noise * self._randn((n, 2), generator)
        x = torch.stack([x[:, 0] - 0.5, x[:, 1] - 0.25], dim=1)  # scalar offsets: no host-to-device copy
        return self._out(self.scale * x)

    def describe(self) -> dict:
        return {"distribution": "moons", "noise": self.noise, "scale": self.scale}


class Checkerboard(_Toy2D):
    """Uniform on the 8 dark unit squares of a 4 x 4 board on [-2, 2]^2 (squares whose integer corner
    (i, j) has i + j even), scaled by ``scale``."""

    def __init__(self, scale: float = 2.0, device=None, dtype=torch.float32):
        super().__init__(device, dtype)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x1 = 4 * self._rand((n,), generator) - 2
        col = torch.floor(x1)
        row = 2 * torch.randint(2, (n,), generator=generator, device=generator.device).to(self.dtype) - 2
        row = row + torch.remainder(col, 2)  # dark squares: row parity equals column parity
        x2 = row + self._rand((n,), generator)
        return self._out(self.scale * torch.stack([x1, x2], dim=1))

    def describe(self) -> dict:
        return {"distribution": "checkerboard", "scale": self.scale}


TOY_DISTRIBUTIONS = {"gaussian": StandardGaussian, "eight_gaussians": EightGaussians, "moons": Moons,
                     "checkerboard": Checkerboard}


def make_toy(name: str, device=None, dtype=torch.float32, **params):
    """The toy sampler called ``name`` (one of ``TOY_DISTRIBUTIONS``) with its keyword ``params``."""
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(f"unknown toy distribution {name!r}; choose from {', '.join(TOY_DISTRIBUTIONS)}")
    return TOY_DISTRIBUTIONS[name](device=device, dtype=dtype, **params)
