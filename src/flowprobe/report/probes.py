"""Figures of the probes: gradient-variance profiles and the memorisation probe's distance histograms.

The probes compute; these functions draw what they return (duck-typed: nothing here imports a probe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from . import plt, save_figure

__all__ = ["plot_profiles", "plot_pairing_histograms"]


def plot_profiles(profiles: Sequence[tuple[str, object]], path, title: str = "gradient variance") -> Path:
    """GV(t) on a log scale with +-1 SE error bars, one line per (label, result), beside the mean per-sample loss
    (and the oracle loss where known); saved atomically as PNG.

    Each result is a :class:`flowprobe.probes.gradvar.GradVarResult` (anything with ``times``, ``gv``, ``gv_se``,
    ``loss`` and ``column(key)``)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, res in profiles:
        t, gv, se = res.times, res.gv, res.gv_se
        lo = np.minimum(se, gv * (1 - 1e-9))  # keep the lower bar above 0 on a log axis
        axes[0].errorbar(t, gv, yerr=[lo, se], marker="o", ms=3, capsize=2, label=label)
        line = axes[1].errorbar(t, res.loss, yerr=res.column("loss_se"), marker="o", ms=3, capsize=2, label=label)
        oracle = res.column("oracle_loss")
        if np.isfinite(oracle).any():
            axes[1].plot(t, oracle, ls="--", color=line[0].get_color(), label=f"{label}: oracle")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("tr Cov(per-sample gradient)")
    axes[0].set_title(title)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("mean per-sample loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _flat(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1)
    return x if x.is_floating_point() else x.float()


def plot_pairing_histograms(outputs: Tensor, targets: Tensor, partners: dict[str, Tensor], path: str | Path,
                            title: str = "distance of each endpoint to its partners") -> Path:
    """Histograms of ||x_hat_i - x1_partner(i)|| for each named partner (index tensors into ``targets``),
    saved as a PNG."""
    flat_out = _flat(outputs).cpu()
    flat_tgt = _flat(targets).cpu()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, idx in partners.items():
        l2 = (flat_out - flat_tgt[idx.cpu()]).norm(dim=1).numpy()
        ax.hist(l2, bins=40, alpha=0.55, label=f"to {name} partner (mean {l2.mean():.3g})")
    ax.set_xlabel("L2 distance")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
