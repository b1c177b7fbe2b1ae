"""Helpers shared by the low-dimensional experiments (pair memorisation, GMM, reflow, forward/backward):
train a time-conditioned MLP on a coupling and push sources through its flow."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import option

from ..nets import MLP
from ..nets.embedding import TIME_SCALE
from ..objectives import make_objective
from ..paths import make_path
from ..solvers import integrate, integrate_average
from ..train import fit

__all__ = ["MixtureFlowOptions", "train_velocity", "push_forward", "run_seed"]


@dataclass
class MixtureFlowOptions:
    """Data, network, training and solver settings shared by the experiments that pair N(0, I) with a
    Gaussian mixture (gmm, reflow): same meaning and defaults in each."""

    n_pairs: int = option(1000, ge=2)
    n_components: int = option(8, ge=1)
    mean_scale: float = option(3.0, gt=0)
    component_std: float = option(0.3, gt=0)
    width: int = option(256, ge=1)
    depth: int = option(3, ge=1)
    steps: int = option(5000, ge=1)
    base_steps: int = option(5000, ge=1, help="steps of the first (independent-coupling) CFM")
    batch_size: int = option(256, ge=1)
    lr: float = option(1e-3, gt=0)
    reduction: str = option("mean", choices=("mean", "sum"))
    solver: str = option("rk4", choices=("euler", "midpoint", "heun", "rk4"))
    solver_steps: int = option(100, ge=1)


def run_seed(ctx, offset: int) -> int:
    """An integer seed for ``fit`` derived from the run seed (``offset`` separates streams)."""
    return ctx.seed * 1_000_003 + offset


def train_velocity(dim: int, coupling, sigma: float, *, width: int, depth: int, steps: int, batch_size: int,
                   lr: float, seed: int, device, reduction: str = "mean", schedule: str = "constant",
                   time_embed_dim: int = 32, lr_schedule: str = "cosine", objective: str = "cfm",
                   jump_fraction: float = 0.25, time_scale: float = TIME_SCALE) -> tuple[nn.Module, list]:
    """Fit an MLP velocity v(t, x) with the CFM objective of path ``make_path(sigma, schedule)`` on
    ``coupling`` (or, with ``objective`` meanflow / splitmeanflow, an MLP of the average velocity u(t, x, h)
    with a step input); returns (net in eval mode, per-step losses). The net is initialised from ``seed``."""
    few_step = objective != "cfm"
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG left untouched
        torch.manual_seed(seed)
        net = MLP(dim, width, depth, time_embed_dim, step_embed=few_step, time_scale=time_scale)
    net = net.to(device)
    obj = make_objective(objective, make_path(sigma, schedule), reduction,
                         **({"jump_fraction": jump_fraction} if few_step else {}))
    state = fit(net, coupling, obj, steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, seed=seed,
                device=device)
    model = state.model
    model.eval()
    return model, state.losses


@torch.no_grad()
def push_forward(net: nn.Module, x0: Tensor, method: str = "rk4", steps: int = 50, chunk_size: int = 8192,
                 t0: float = 0.0, t1: float = 1.0) -> Tensor:
    """Phi(x0): integrate dx/dt = net(t, x) from t0 to t1, ``chunk_size`` rows at a time; ``method="average"``
    jumps with an average-velocity net instead (:func:`flowprobe.solvers.integrate_average`)."""
    def solve(x):
        if method == "average":
            return integrate_average(net, x, steps=steps, t0=t0, t1=t1).x
        return integrate(net, x, method=method, steps=steps, t0=t0, t1=t1).x

    outs = [solve(x0[s:s + chunk_size]) for s in range(0, x0.shape[0], chunk_size)]
    return torch.cat(outs)
