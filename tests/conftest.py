"""Shared fixtures: a tiny 2-D flow-matching problem (net, coupling, objective) that trains in milliseconds."""

import pytest
import torch

from flowprobe.couplings import IndependentCoupling, WeightedCoupling
from flowprobe.data.toy import EightGaussians, StandardGaussian
from flowprobe.nets import MLP
from flowprobe.objectives import make_objective
from flowprobe.paths import StochasticPath


def make_tiny_problem(seed: int = 0, dtype=torch.float32, sigma: float = 0.1, width: int = 32,
                      objective: str = "cfm", weighted: bool = False):
    """N(0, I) -> eight Gaussians with a stochastic path (so the noise draw matters), a small MLP. ``objective``:
    cfm, or a few-step objective (then the MLP takes a step input); ``weighted``: W-CFM weights on the pairs."""
    torch.manual_seed(seed)
    few_step = objective != "cfm"
    net = MLP(2, width=width, depth=2, time_embed_dim=8, step_embed=few_step, time_scale=10.0 if few_step else 1000.0)
    net = net.to(dtype)
    coupling = IndependentCoupling(StandardGaussian(dtype=dtype), EightGaussians(dtype=dtype))
    if weighted:
        coupling = WeightedCoupling(coupling, 8.0)
    return net, coupling, make_objective(objective, StochasticPath(sigma), reduction="mean", **(
        {} if objective == "cfm" else {"jump_fraction": 0.5}))


@pytest.fixture
def tiny_problem():
    return make_tiny_problem


@pytest.fixture
def one_thread():
    """Tiny MLPs run ~10x faster on one intra-op thread on a shared CPU (benchmarks/threads.py); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
