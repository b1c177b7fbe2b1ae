"""Figures of ``flowprobe diagnose``: copies beside their nearest training samples, the copy-ratio histograms, the
membership AUC and losses over t, and the gradient-variance profiles of training and held-out samples; and the
memorisation watch's readings over training.

Each function takes plain tensors, arrays and row dicts (what :mod:`flowprobe.diagnosis` stores), draws one PNG
and returns its path; nothing here imports a check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from . import plt, save_figure

__all__ = ["plot_copies_images", "plot_copies_scatter", "plot_ratio_histogram", "plot_membership", "plot_gradvar",
           "plot_watch"]


def _image(x: Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) or (H, W) floats in [0, 1] for imshow."""
    img = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    img = img.permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def plot_copies_images(path: str | Path, generated: Tensor, neighbours: Tensor, ratios: Tensor,
                       threshold: float, n: int = 12) -> Path:
    """The ``n`` generated images with the lowest copy ratio d1 / d2 (worst first), each above its nearest
    training image, titled with the ratio (red when below ``threshold``, i.e. a copy)."""
    order = torch.argsort(ratios.cpu())[:n]
    n = len(order)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n + 0.6, 3.0), squeeze=False)
    for col, k in enumerate(order.tolist()):
        r = float(ratios[k])
        axes[0, col].imshow(_image(generated[k]), cmap="gray", vmin=0, vmax=1)
        axes[1, col].imshow(_image(neighbours[k]), cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(f"{r:.2f}", fontsize=8, color="red" if r < threshold else "black")
        for row in (0, 1):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    axes[0, 0].set_ylabel("generated", fontsize=8)
    axes[1, 0].set_ylabel("nearest train", fontsize=8)
    fig.suptitle("generated samples beside their nearest training sample, lowest d1/d2 first", fontsize=9)
    return save_figure(fig, path)


def plot_copies_scatter(path: str | Path, train: Tensor, generated: Tensor, ratios: Tensor, threshold: float,
                        heldout: Tensor | None = None, max_points: int = 4000) -> Path:
    """2-D samples: training points, held-out points, and generated points coloured by whether they are copies
    (d1 / d2 below ``threshold``)."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    tr = train[:max_points].cpu().numpy()
    gen = generated[:max_points].cpu().numpy()
    copy = (ratios[:max_points].cpu() < threshold).numpy()
    if heldout is not None:
        ho = heldout[:max_points].cpu().numpy()
        ax.scatter(ho[:, 0], ho[:, 1], s=4, c="0.7", label="held-out", alpha=0.6)
    ax.scatter(gen[~copy, 0], gen[~copy, 1], s=4, c="tab:blue", label="generated", alpha=0.6)
    ax.scatter(gen[copy, 0], gen[copy, 1], s=6, c="tab:red", label=f"generated copies (d1/d2 < {threshold:.2g})")
    ax.scatter(tr[:, 0], tr[:, 1], s=16, marker="x", c="black", label="training", linewidths=0.8)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("generated samples and the training set")
    return save_figure(fig, path)


def plot_ratio_histogram(path: str | Path, ratios: Tensor, reference_ratios: Tensor, threshold: float,
                         reference_label: str = "held-out") -> Path:
    """Histograms of the copy ratio d1 / d2 of generated and of real reference samples, with the copy threshold."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    for values, label in ((ratios, "generated"), (reference_ratios, reference_label)):
        v = values.detach().double().cpu().numpy()
        ax.hist(v, bins=bins, alpha=0.55, density=True, label=f"{label} (copies {(v < threshold).mean():.1%})")
    ax.axvline(threshold, color="red", ls="--", lw=1, label=f"copy threshold {threshold:.2g}")
    ax.set_xlabel("d1 / d2 (nearest / second-nearest training distance)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_map_errors(path: str | Path, train_errors: Tensor, heldout_errors: Tensor, tolerance: float) -> Path:
    """Histograms (log scale) of ||Phi(x0) - x1|| for the training pairs and the held-out pairs of the map, with the
    tolerance under which a source lands on its partner (> 0; non-finite errors are left out of the histograms and
    count as not landed)."""
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    vals = [v.detach().double().cpu().numpy() for v in (train_errors, heldout_errors)]
    positive = np.concatenate(vals)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    lo = max(positive.min() if positive.size else tolerance / 100, tolerance / 1e4)
    hi = max(positive.max() if positive.size else tolerance * 10, tolerance * 2)
    bins = np.geomspace(lo, hi, 41)
    for v, label in zip(vals, ("training pairs", "held-out pairs")):
        landed = (v <= tolerance).mean() if v.size else float("nan")
        v = v[np.isfinite(v)]
        ax.hist(np.clip(v, lo, hi), bins=bins, alpha=0.55, density=False, weights=np.full(v.size, 1 / max(v.size, 1)),
                label=f"{label} (landed {landed:.1%})")
    ax.axvline(tolerance, color="red", ls="--", lw=1, label=f"tolerance {tolerance:.3g}")
    ax.set(xscale="log", xlabel="||Phi(x0) - x1|| (end point to partner)", ylabel="share of sources")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _col(rows: Sequence[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def plot_membership(path: str | Path, rows: Sequence[dict], margin: float) -> Path:
    """Left: the AUC of the per-sample loss (held-out above train) over t with its corrected interval, the chance
    level 0.5 and the ``margin``. Right: mean per-sample losses of both groups with +-1 SE."""
    t = _col(rows, "t")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    a = _col(rows, "auc")
    axes[0].errorbar(t, a, yerr=[a - _col(rows, "auc_lower"), _col(rows, "auc_upper") - a], marker="o", capsize=3)
    axes[0].axhline(0.5, color="0.5", lw=1, label="chance")
    axes[0].axhline(margin, color="red", ls="--", lw=1, label=f"margin {margin}")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_ylabel("AUC (held-out loss > train loss)")
    for key, label in (("loss_train", "train"), ("loss_heldout", "held-out")):
        axes[1].errorbar(t, _col(rows, key), yerr=_col(rows, f"{key}_se"), marker="o", capsize=3, label=label)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("mean per-sample CFM loss")
    for ax in axes:
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_gradvar(path: str | Path, rows: Sequence[dict]) -> Path:
    """Gradient variance over t of training and held-out samples (log scale, +-1 SE), and their ratio."""
    t = _col(rows, "t")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("gv_train", "train"), ("gv_heldout", "held-out")):
        gv, se = _col(rows, key), _col(rows, f"{key}_se")
        lo = np.minimum(se, gv * (1 - 1e-9))
        axes[0].errorbar(t, gv, yerr=[lo, se], marker="o", capsize=3, label=label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("tr Cov(per-sample gradient)")
    axes[0].legend(fontsize=8)
    axes[1].plot(t, _col(rows, "ratio"), marker="o")
    axes[1].axhline(1.0, color="0.5", lw=1)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("GV(train) / GV(held-out)")
    for ax in axes:
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_watch(path: str | Path, readings: Sequence[dict], threshold: float, fired_at: int | None = None) -> Path:
    """The memorisation watch's readings over training steps: max_t membership AUC with its lower bound and the copy
    closeness, GV(train) / GV(held-out) with its interval (log scale), the copy check's excess copy fraction, the
    pairing excess and the map check's excess where they ran, and the memorisation score against the detector's
    ``threshold``; a dotted line where the detector first fired."""
    step = _col(readings, "step")
    fig, grid = plt.subplots(2, 2, figsize=(11, 7))
    axes = grid.ravel()
    axes[0].plot(step, _col(readings, "auc"), marker="o", label="max_t AUC")
    axes[0].plot(step, _col(readings, "auc_lower"), ls="--", label="its lower bound")
    axes[0].axhline(0.5, color="0.5", lw=1)
    closeness = _col(readings, "copy_closeness")
    if np.isfinite(closeness).any():
        near = np.isfinite(closeness)
        axes[0].plot(step[near], closeness[near], marker="s", color="C2", label="copy closeness")
    axes[0].set_ylabel("membership AUC, copy closeness")
    ratio = _col(readings, "gradvar_ratio")
    if np.isfinite(ratio).any():
        axes[1].plot(step, ratio, marker="o", label="GV(train) / GV(held-out)")
        axes[1].fill_between(step, _col(readings, "gradvar_lower"), _col(readings, "gradvar_upper"), alpha=0.2)
        axes[1].set_yscale("log")
    axes[1].axhline(1.0, color="0.5", lw=1)
    axes[1].set_ylabel("gradient-variance ratio")
    copies = _col(readings, "copy_excess")
    ran = np.isfinite(copies)
    axes[2].plot(step[ran], copies[ran], marker="s", color="C2", label="excess")
    axes[2].plot(step[ran], _col(readings, "copy_excess_lower")[ran], ls="--", color="C2", label="its lower bound")
    pairing = _col(readings, "pairing_excess")
    if np.isfinite(pairing).any():
        paired = np.isfinite(pairing)
        axes[2].plot(step[paired], pairing[paired], marker="^", color="C4", label="pairing recall - chance")
    mapped = _col(readings, "map_excess")
    if np.isfinite(mapped).any():
        on = np.isfinite(mapped)
        axes[2].plot(step[on], mapped[on], marker="v", color="C5", label="map: landed train - held-out")
        axes[2].plot(step[on], _col(readings, "map_excess_lower")[on], ls="--", color="C5", label="its lower bound")
    axes[2].axhline(0.0, color="0.5", lw=1)
    axes[2].set_ylabel("excess: copies (generated - held-out), pairing, map")
    axes[3].plot(step, _col(readings, "score"), marker="o")
    axes[3].axhline(threshold, color="red", ls="--", lw=1, label=f"threshold {threshold:g}")
    axes[3].set_ylabel("memorisation score (log-odds)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if fired_at is not None:
            ax.axvline(fired_at, color="red", ls=":", lw=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, path)
