"""The histogram of per-sample log-likelihoods (or bits per dimension) written by ``flowprobe likelihood``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import plt, save_figure

__all__ = ["plot_likelihood_histogram"]


def plot_likelihood_histogram(path: str | Path, values, xlabel: str, title: str = "") -> Path:
    """A histogram of ``values`` (one per sample) with their mean marked; saved as PNG at ``path``."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if v.size:
        ax.hist(v, bins=min(50, max(5, v.size // 10)), color="tab:blue", alpha=0.8)
        ax.axvline(float(v.mean()), color="k", lw=1, ls="--", label=f"mean {v.mean():.4g}")
        ax.legend(frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
