"""Helpers shared by the low-dimensional experiments (pair memorisation, GMM, reflow, forward/backward, few-step):
the settings of the mixture experiments and the training of a time-conditioned MLP on a coupling. Flows are
pushed forward with :func:`flowprobe.solvers.push_forward`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from ..config import option
from ..device import choose_threads
from ..nets.embedding import TIME_SCALE
from ..nets.factory import build_net
from ..objectives import make_objective
from ..paths import make_path
from ..train import fit

__all__ = ["MixtureFlowOptions", "train_velocity", "mlp_spec"]


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


def mlp_spec(dim: int, width: int, depth: int, time_embed_dim: int = 32, **kwargs) -> dict:
    """The :func:`flowprobe.nets.factory.build_net` spec of an MLP velocity on R^dim (``kwargs``: the MLP's
    other arguments, e.g. activation, step_embed, time_scale)."""
    return {"class": "MLP", "kwargs": {"dim": dim, "width": width, "depth": depth, "time_embed_dim": time_embed_dim,
                                       **kwargs}}


def train_velocity(dim: int, coupling, sigma: float, *, width: int, depth: int, steps: int, batch_size: int,
                   lr: float, seed: int, device, reduction: str = "mean", schedule: str = "constant",
                   time_embed_dim: int = 32, lr_schedule: str = "cosine", objective: str = "cfm",
                   jump_fraction: float = 0.25, time_scale: float = TIME_SCALE,
                   hooks: Sequence = ()) -> tuple[nn.Module, list]:
    """Fit an MLP velocity v(t, x) with the CFM objective of path ``make_path(sigma, schedule)`` on
    ``coupling`` (or, with ``objective`` meanflow / splitmeanflow, an MLP of the average velocity u(t, x, h)
    with a step input); returns (net in eval mode, per-step losses). The net is initialised from ``seed``
    (:func:`flowprobe.nets.factory.build_net`); ``hooks`` go to :func:`flowprobe.train.fit`. On a CPU the
    thread count follows the size of the work (:func:`flowprobe.device.choose_threads`)."""
    few_step = objective != "cfm"
    net = build_net(mlp_spec(dim, width, depth, time_embed_dim, step_embed=few_step, time_scale=time_scale), seed)
    net = net.to(device)
    choose_threads(sum(p.numel() for p in net.parameters()), batch_size, device)
    obj = make_objective(objective, make_path(sigma, schedule), reduction,
                         **({"jump_fraction": jump_fraction} if few_step else {}))
    state = fit(net, coupling, obj, steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, seed=seed,
                device=device, hooks=hooks)
    model = state.model
    model.eval()
    return model, state.losses
