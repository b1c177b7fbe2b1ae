"""Figures of 2-D flows: samples over the target, and trajectories."""

from __future__ import annotations

import torch
from torch import Tensor

from . import plt, save_figure

__all__ = ["plot_flow_2d"]


def plot_flow_2d(path, trajectory: Tensor, target: Tensor | None = None, n_paths: int = 256, title: str = ""):
    """Save a PNG of a 2-D flow: left, the generated samples (trajectory[-1]) over the target sample;
    right, ``n_paths`` trajectories from their source points (black) to their end points (blue).

    ``trajectory`` has shape (K + 1, n, 2) (states at the solver's grid times).
    """
    traj = trajectory.detach().float().cpu()
    x0, x1 = traj[0], traj[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    ax = axes[0]
    if target is not None:
        tgt = target.detach().float().cpu()
        ax.scatter(tgt[:, 0], tgt[:, 1], s=2, c="tab:orange", alpha=0.35, label="target")
    ax.scatter(x1[:, 0], x1[:, 1], s=2, c="tab:blue", alpha=0.6, label="generated")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_title("samples")
    ax = axes[1]
    m = min(n_paths, traj.shape[1])
    if m:
        ax.plot(traj[:, :m, 0].numpy(), traj[:, :m, 1].numpy(), c="olive", alpha=0.25, lw=0.6)
        ax.scatter(x0[:m, 0], x0[:m, 1], s=4, c="black", alpha=0.8, label="x(0)")
        ax.scatter(x1[:m, 0], x1[:m, 1], s=4, c="tab:blue", alpha=0.9, label="x(1)")
        ax.legend(loc="upper right", markerscale=3)
    ax.set_title(f"{m} trajectories")
    lim = float(torch.cat([x0, x1]).abs().max()) * 1.05 + 1e-6
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
