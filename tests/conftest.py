"""Shared fixtures: a tiny 2-D flow-matching problem (net, coupling, objective) that trains in milliseconds."""

import pytest
import torch

from flowprobe.couplings import IndependentCoupling
from flowprobe.data.toy import EightGaussians, StandardGaussian
from flowprobe.nets import MLP
from flowprobe.objectives import CFMObjective
from flowprobe.paths import StochasticPath


def make_tiny_problem(seed: int = 0, dtype=torch.float32, sigma: float = 0.1, width: int = 32):
    """N(0, I) -> eight Gaussians with a stochastic path (so the noise draw matters), a small MLP."""
    torch.manual_seed(seed)
    net = MLP(2, width=width, depth=2, time_embed_dim=8).to(dtype)
    coupling = IndependentCoupling(StandardGaussian(dtype=dtype), EightGaussians(dtype=dtype))
    objective = CFMObjective(StochasticPath(sigma), reduction="mean")
    return net, coupling, objective


@pytest.fixture
def tiny_problem():
    return make_tiny_problem
