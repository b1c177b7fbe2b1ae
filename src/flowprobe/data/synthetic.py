"""Synthetic sources and targets for the low-dimensional experiments.

Every sampler follows the :class:`flowprobe.couplings.Sampler` protocol, ``sample(n, generator) -> (x, idx)``,
where ``idx`` is the position in the draw (a fresh draw has no pool). Mixtures also offer
``sample_labeled(n, generator) -> (x, k)`` with the component index k of each row.

- :class:`GaussianMixture`: x = mu_k + std * eps, k ~ Categorical(weights), eps ~ N(0, I_d).
- :func:`random_gmm`: the mixture of the paper's Table 1 (means ~ mean_scale * N(0, I), std 0.3).
- :func:`low_variance_mixture`: the mixture of the forward/backward gradient-variance experiment,
  x = mode_scale * C_k + noise_std * eps with C_k ~ N(0, I) (per-dimension variance
  ~ mode_scale^2 + noise_std^2, e.g. 0.3^2 + 0.1^2 = 0.1, below the unit noise variance).
- :func:`shifted_gaussian`: N(mean * 1, std^2 I), the target of the adversarial-pairing experiment.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianMixture", "random_gmm", "low_variance_mixture", "shifted_gaussian"]


class GaussianMixture:
    """An isotropic Gaussian mixture p(x) = sum_k w_k N(x; mu_k, std_k^2 I_d).

    ``means``: (K, d); ``std``: one float or K floats; ``weights``: K non-negative numbers (normalised;
    uniform by default). Draws are made on the generator's device and returned on ``device``
    (default: the device of ``means``), in ``dtype``.
    """

    def __init__(self, means: Tensor, std: float | Tensor = 1.0, weights: Tensor | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d) with K, d >= 1, got {tuple(means.shape)}")
        K = means.shape[0]
        self.device = torch.device(device) if device is not None else means.device
        self.dtype = dtype
        self.means = means.to(self.device, dtype)
        std_t = torch.as_tensor(std, dtype=dtype).flatten().to(self.device)
        if std_t.numel() == 1:
            std_t = std_t.expand(K).clone()
        if std_t.numel() != K or not bool((std_t > 0).all()):
            raise ValueError(f"std must be one positive number or {K} positive numbers")
        self.stds = std_t
        if weights is None:
            w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if w.numel() != K or not bool((w >= 0).all()) or not float(w.sum()) > 0:
                raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
            w = w / w.sum()
        self.weights = w

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def sample_labeled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x, k): n draws and their component indices (k ~ Categorical(weights), then x ~ N(mu_k, std_k^2 I))."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        gdev = generator.device
        k = torch.multinomial(self.weights.to(gdev), n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long, device=gdev)
        eps = torch.randn((n, self.dim), generator=generator, device=gdev, dtype=self.dtype)
        k = k.to(self.device)
        x = self.means[k] + self.stds[k, None] * eps.to(self.device)
        return x, k

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x, idx): n draws; idx is the position in the draw (Sampler protocol)."""
        x, _ = self.sample_labeled(n, generator)
        return x, torch.arange(n, device=self.device)

    def mean(self) -> Tensor:
        """E[x] = sum_k w_k mu_k."""
        return (self.weights.to(self.device, self.dtype)[:, None] * self.means).sum(0)

    def covariance(self) -> Tensor:
        """Cov[x] = sum_k w_k (std_k^2 I + mu_k mu_k^T) - E[x] E[x]^T."""
        w = self.weights.to(self.device, self.dtype)
        m = self.mean()
        second = (w[:, None, None] * self.means[:, :, None] * self.means[:, None, :]).sum(0)
        second = second + torch.eye(self.dim, device=self.device, dtype=self.dtype) * (w * self.stds ** 2).sum()
        return second - m[:, None] * m[None, :]

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = logsumexp_k [log w_k - ||x - mu_k||^2 / (2 std_k^2) - (d/2) log(2 pi std_k^2)]."""
        d = self.dim
        x = x.to(self.device, self.dtype)
        sq = (x[:, None, :] - self.means[None]).pow(2).sum(-1)
        var = self.stds ** 2
        logw = self.weights.to(self.device, self.dtype).log()
        comp = logw[None] - sq / (2 * var[None]) - 0.5 * d * torch.log(2 * math.pi * var)[None]
        return torch.logsumexp(comp, dim=1)

    def describe(self) -> dict:
        return {"sampler": "gaussian_mixture", "dim": self.dim, "n_components": self.n_components,
                "std": [float(s) for s in self.stds]}


def random_gmm(dim: int, n_components: int = 8, mean_scale: float = 3.0, std: float = 0.3,
               generator: torch.Generator | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> GaussianMixture:
    """The Table-1 mixture: K equal-weight components, means mu_k = mean_scale * c_k with c_k ~ N(0, I_d)
    drawn from ``generator``, and a common std."""
    if dim < 1 or n_components < 1:
        raise ValueError("dim and n_components must be >= 1")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    c = torch.randn((n_components, dim), generator=gen, device=gen.device, dtype=dtype)
    return GaussianMixture(mean_scale * c.to(device), std, device=device, dtype=dtype)


def low_variance_mixture(dim: int = 16, n_modes: int = 8, mode_scale: float = 0.3, noise_std: float = 0.1,
                         generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> GaussianMixture:
    """x = mode_scale * C_k + noise_std * eps, C_k ~ N(0, I_d) (K = n_modes), eps ~ N(0, I_d).

    Expected per-dimension variance over the draw of C: mode_scale^2 (1 - 1/K) + noise_std^2
    (~0.3^2 + 0.1^2 = 0.1 by default; 0.5 C + 0.3 eps gives ~0.34, the negative control).
    """
    return random_gmm(dim, n_modes, mode_scale, noise_std, generator, device, dtype)


def shifted_gaussian(dim: int, mean: float = 3.0, std: float = 1.0, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32):
    """N(mean * 1, std^2 I_d) as a :class:`~flowprobe.couplings.GaussianSampler`."""
    from ..couplings import GaussianSampler

    return GaussianSampler((dim,), torch.full((dim,), float(mean), dtype=dtype, device=device), std,
                           device=device, dtype=dtype)
