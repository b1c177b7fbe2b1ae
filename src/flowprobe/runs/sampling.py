"""Sampling a trained run: the source draws pushed through the learned ODE (or the SDE with its marginals),
on a uniform, cosine or Bellman-optimal grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ConfigError
from .config import TrainConfig

__all__ = ["generate", "sample_grid", "sde_options", "guided_net", "SAMPLE_SCHEDULES"]


def generate(model, source, n: int, solver: str, steps: int, seed: int, device, trajectory: bool = False,
              sde: dict | None = None, grid: Tensor | None = None):
    """Push n source draws (generator seeded ``seed``) through the learned ODE from t = 0 to t = 1, or, with
    ``sde`` = {diffusion, schedule, path, source_std}, through the SDE with the same marginals
    (:func:`flowprobe.solvers.integrate_sde`; its noise continues the same generator). ``grid`` replaces the
    uniform grid of ``steps`` steps."""
    from ..solvers import diffusion_schedule, integrate, integrate_average, integrate_sde

    g = torch.Generator(device=device).manual_seed(seed)
    x0, _ = source.sample(n, g)
    steps_or_grid = {"steps": steps} if grid is None else {"grid": grid}
    model.eval()
    with torch.no_grad():
        if solver == "average":
            return integrate_average(model, x0, return_trajectory=trajectory, **steps_or_grid)
        if sde is None:
            return integrate(model, x0, method=solver, return_trajectory=trajectory, **steps_or_grid)
        eps = diffusion_schedule(sde["diffusion"], sde["schedule"])
        return integrate_sde(model, x0, eps, g, path=sde["path"], source_std=sde["source_std"],
                             return_trajectory=trajectory, **steps_or_grid)


#: step schedules of ``flowprobe sample --schedule``
SAMPLE_SCHEDULES = ("uniform", "cosine", "optimal")


def sample_grid(model, source, schedule: str, steps: int, solver: str, seed: int, device, n_fit: int = 1024):
    """(grid or None, info) for ``--schedule``: None for uniform; the cosine grid; or the Bellman-optimal Euler grid
    (:func:`flowprobe.solvers.optimal_schedule`) fitted on ``n_fit`` other source draws (seed + 1) over
    max(64, 8 steps) candidate intervals, with the evaluations that cost."""
    from ..solvers import optimal_schedule, time_grid

    if schedule not in SAMPLE_SCHEDULES:
        raise ConfigError(f"--schedule: {schedule!r} is not allowed; choose from {', '.join(SAMPLE_SCHEDULES)}")
    if schedule == "uniform":
        return None, {}
    if solver == "dopri5":
        raise ConfigError(f"--schedule {schedule}: dopri5 chooses its own steps")
    if schedule == "cosine":
        return time_grid(steps, schedule="cosine"), {"schedule": "cosine"}
    if solver not in ("euler", "euler_maruyama"):
        raise ConfigError(f"--schedule optimal minimises Euler's one-step error; use --solver euler (or --sde), "
                          f"not {solver}")
    x_fit, _ = source.sample(n_fit, torch.Generator(device=device).manual_seed(seed + 1))
    model.eval()
    sched = optimal_schedule(model, x_fit, steps, candidates=max(64, 8 * steps))
    return sched.grid, {"schedule": "optimal", "grid": [round(float(v), 6) for v in sched.grid],
                        "schedule_nfe": sched.nfe, "schedule_fit_samples": n_fit}


def sde_options(cfg: TrainConfig, diffusion: float, schedule: str) -> dict:
    """What :func:`generate` needs to sample a run with an SDE, after checking that the velocity-derived score
    applies: independent coupling and a Gaussian source N(0, s^2 I) (images, or the 2-D ``gaussian`` toy)."""
    from ..solvers import DIFFUSION_SCHEDULES
    from .build import build_path

    if schedule not in DIFFUSION_SCHEDULES:
        raise ConfigError(f"--sde-schedule: {schedule!r} is not allowed; choose from {', '.join(DIFFUSION_SCHEDULES)}")
    if not (math.isfinite(diffusion) and diffusion > 0):
        raise ConfigError(f"--sde: the diffusion must be a finite number > 0, got {diffusion!r}")
    if cfg.coupling.kind != "independent" or cfg.coupling.weight_epsilon is not None:
        used = (f"coupling.kind: {cfg.coupling.kind}" if cfg.coupling.kind != "independent"
                else "weighted pairs (coupling.weight_epsilon)")
        raise ConfigError(f"--sde: the score is derived from the velocity, which needs the source drawn independently "
                          f"of the target; this run used {used}")
    if cfg.data.data_kind == "images" or (cfg.data.data_kind in ("array", "image_folder")
                                          and cfg.data.source_path is None):  # N(0, I) sources
        source_std = 1.0
    elif cfg.data.source == "gaussian":
        source_std = float(cfg.data.source_params.get("std", 1.0))
    else:
        raise ConfigError(f"--sde: the score is derived from the velocity, which needs a Gaussian source; this run's "
                          f"source is {cfg.data.source!r}")
    return {"diffusion": float(diffusion), "schedule": schedule, "path": build_path(cfg),
            "source_std": source_std}


def guided_net(net, label: int | None, guidance: float = 0.0):
    """(field, record) for ``--label`` / ``--guidance``: ``net`` itself without a label (the unconditional field of
    a class-conditional net), else :class:`flowprobe.guidance.GuidedField` (1 + w) v(c) - w v(null), w =
    ``guidance`` (diffusers' guidance_scale 1 + w). ConfigError for a label the net does not know."""
    from ..guidance import GuidedField, diffusers_guidance_scale

    k = int(getattr(net, "num_classes", 0) or getattr(getattr(net, "mlp", None), "num_classes", 0) or 0)
    if label is None:
        if guidance:
            raise ConfigError("--guidance: needs --label (the class to guide towards)")
        return net, {}
    if not k:
        raise ConfigError("--label: this model is not class-conditional (train it with model.num_classes)")
    if not 0 <= label < k:
        raise ConfigError(f"--label: {label} is not a class of this model (0..{k - 1})")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"--guidance: must be a finite number >= 0, got {guidance!r}")
    record = {"label": int(label), "guidance": float(guidance),
              "guidance_rule": "(1 + w) v(t, x | label) - w v(t, x | null); diffusers guidance_scale = 1 + w",
              "diffusers_guidance_scale": diffusers_guidance_scale(guidance)}
    return GuidedField(net, label, guidance, k).eval(), record
