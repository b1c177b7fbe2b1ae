"""Check 1, copies: are generated samples copies of training samples, more often than real held-out samples are?

For each sample s, d1 <= d2 are the distances to its two nearest training samples and ratio = d1 / d2; ratio below
1/3 (:data:`~flowprobe.probes.memorization.COPY_THRESHOLD`) counts as a copy (Yoon et al., 2023). The copy fraction
of the generated samples is compared with that of real samples the model never saw (the baseline: in low
dimension even honest samples often sit much closer to one training point than to the next; for a locally
uniform density P(ratio < r) = r^d). The baseline is the held-out set, or, without one, half of the training set
measured against the other half (real samples that half of the pool never saw).

Evidence: both fractions with Wilson intervals, their difference with Newcombe's interval, distance summaries, the
closeness (the chance that a generated sample sits relatively nearer a training sample than a real unseen one does,
P(ratio_generated < ratio_reference), ties counted half: 0.5 when the generated samples stand to the training set as
fresh data do, 1 when every one is nearer; it moves before copies pass the 1/3 ratio), the
count of non-finite generated samples (left out of the search and reported), in pixel space and, when a feature map
is given, in feature space as well. Images of a model trained with random left-right flips are compared with the
training set and its mirror images (``mirror``): a mirrored copy is a copy. The check votes memorises when either
space votes so, generalises when every space does (:func:`~flowprobe.diagnosis.verdict.copies_vote`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..probes.memorization import copy_statistics
from .result import CheckResult
from .stats import auc, newcombe_interval, wilson_interval
from .verdict import (COPY_EXCESS_MARGIN, COPY_THRESHOLD, DECISIVE, GENERALISES, MEMORISES, MIN_SAMPLES,
                      copies_vote)

__all__ = ["copies_check", "split_baseline", "apply_features", "finite_rows"]


def finite_rows(x: Tensor) -> Tensor:
    """Boolean mask of the rows of ``x`` whose every entry is finite."""
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(1)


def split_baseline(train: Tensor, generator: torch.Generator, n_max: int) -> tuple[Tensor, Tensor]:
    """(pool, queries): a random half of ``train`` as the pool and up to ``n_max`` of the other half as real
    samples that pool never saw (the copy baseline when there is no held-out set)."""
    perm = torch.randperm(train.shape[0], generator=generator, device=generator.device).to(train.device)
    half = train.shape[0] // 2
    return train[perm[:half]], train[perm[half:half + n_max]]


def apply_features(features: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 256) -> Tensor:
    """``features`` applied in batches without a graph; returns (N, F) float32."""
    outs = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            f = features(x[s:s + batch_size])
            outs.append(torch.as_tensor(f).reshape(min(batch_size, x.shape[0] - s), -1).float())
    return torch.cat(outs)


def _compare(gen: dict, ref: dict) -> dict:
    """Evidence of one space from the copy statistics of the generated and of the reference samples."""
    n_g, n_r = int(gen["ratio"].numel()), int(ref["ratio"].numel())
    k_g = int((gen["ratio"] < COPY_THRESHOLD).sum())
    k_r = int((ref["ratio"] < COPY_THRESHOLD).sum())
    excess, lower, upper = newcombe_interval(k_g, n_g, k_r, n_r)
    vote = copies_vote(n_g, n_r, excess, lower, upper)
    closeness, closeness_se = auc(-gen["ratio"], -ref["ratio"])  # P(ratio_generated < ratio_reference)
    return {"n_generated": n_g, "n_reference": n_r, "copies_generated": k_g, "copies_reference": k_r,
            "copy_fraction": k_g / n_g, "copy_fraction_interval": wilson_interval(k_g, n_g),
            "reference_copy_fraction": k_r / n_r, "reference_copy_fraction_interval": wilson_interval(k_r, n_r),
            "excess": excess, "excess_interval": [lower, upper], "closeness": closeness, "closeness_se": closeness_se,
            "nn_distance_median": gen["d1"].median().item(), "reference_nn_distance_median": ref["d1"].median().item(),
            "ratio_median": gen["ratio"].median().item(), "reference_ratio_median": ref["ratio"].median().item(),
            "vote": vote.vote, "reason": vote.reason}


def copies_check(generated: Tensor, train: Tensor, reference: Tensor, baseline: str, *,
                 features: Callable[[Tensor], Tensor] | None = None, chunk_size: int = 4096,
                 pool: Tensor | None = None, mirror: bool = False) -> tuple[CheckResult, dict]:
    """The copies check. ``generated``: model samples (non-finite rows are counted and left out); ``train``: the
    training samples, against which the generated samples are measured; ``reference``: real samples measured
    against ``pool`` (default ``train``), which must not contain them (the held-out set, or one half of the
    training set with ``pool`` the other half); ``baseline`` names which ("held-out" or "training split").
    ``mirror``: images (N, C, H, W) whose model was trained with random left-right flips; a training image and its
    mirror count as one item (:func:`~flowprobe.probes.memorization.copy_statistics`), for the generated and the
    reference samples alike. Returns (the check, per-sample arrays for the figures)."""
    mask = finite_rows(generated)
    n_bad = int((~mask).sum())
    gen = generated[mask]
    thresholds = {"copy_ratio_threshold": COPY_THRESHOLD, "copy_excess_margin": COPY_EXCESS_MARGIN,
                  "min_samples": MIN_SAMPLES}
    if gen.shape[0] == 0:
        return CheckResult("copies", DECISIVE, True, None, "every generated sample is non-finite",
                           "every generated sample is non-finite", {"non_finite": n_bad}, thresholds), {}
    pool = train if pool is None else pool
    reference = reference.to(gen.device)
    if mirror and train.dim() != 4:
        raise ValueError(f"mirror needs images (N, C, H, W), got samples of shape {tuple(train.shape[1:])}")
    train_m, pool_m = (train.flip(-1), pool.flip(-1)) if mirror else (None, None)
    gen_stats = copy_statistics(gen, train, chunk_size, mirrored=train_m)
    ref_stats = copy_statistics(reference, pool, chunk_size, mirrored=pool_m)
    spaces = {"pixels": _compare(gen_stats, ref_stats)}
    if features is not None:
        f_gen, f_train, f_ref, f_pool = (apply_features(features, x) for x in (gen, train, reference, pool))
        f_train_m, f_pool_m = ((apply_features(features, train_m), apply_features(features, pool_m)) if mirror
                               else (None, None))
        spaces["features"] = _compare(copy_statistics(f_gen, f_train, chunk_size, mirrored=f_train_m),
                                      copy_statistics(f_ref, f_pool, chunk_size, mirrored=f_pool_m))
    votes = [ev["vote"] for ev in spaces.values()]
    vote = MEMORISES if MEMORISES in votes else (GENERALISES if all(v == GENERALISES for v in votes) else None)
    main = spaces["pixels"]
    reason = "; ".join(f"{name}: {ev['reason']}" for name, ev in spaces.items())
    summary = (f"{main['copy_fraction']:.1%} of {main['n_generated']} generated samples are copies (ratio < 1/3) vs "
               f"{main['reference_copy_fraction']:.1%} of {main['n_reference']} {baseline} real samples; excess "
               f"{main['excess']:+.3f} [{main['excess_interval'][0]:+.3f}, {main['excess_interval'][1]:+.3f}]")
    scalars = {k: v for k, v in main.items() if k not in ("vote", "reason")}
    evidence = {"baseline": baseline, "non_finite": n_bad, "mirror": bool(mirror), **scalars, "spaces": spaces}
    arrays = {"ratio": gen_stats["ratio"].cpu(), "d1": gen_stats["d1"].cpu(), "nn_index": gen_stats["nn_index"].cpu(),
              "reference_ratio": ref_stats["ratio"].cpu(), "finite": mask.cpu()}
    return CheckResult("copies", DECISIVE, True, vote, summary, reason, evidence, thresholds), arrays
