"""Checks 2 and 3: does the net fit its training samples better than held-out samples?

Membership gap (check 2). At each time t of a grid, for n training and n held-out targets x1 (n = the smaller
group, at most ``n_max``), draw x0 from the source and z ~ N(0, I) (stochastic paths), form
x_t = a(t) x0 + b(t) x1 + g(t) z, u_t = a'(t) x0 + b'(t) x1 + g'(t) z and the per-sample loss
l = mean over dimensions of (v(t, x_t) - u_t)^2, averaged over ``repeats`` draws. Row i of both groups shares its
x0 and z (common random numbers), so the paired difference l_heldout,i - l_train,i has a small standard error.
With a pairs file, a training target keeps its own training source x0_i (its pair), and held-out targets get
fresh x0, or their own sources when held-out pairs are given (``heldout_sources``: pairs from a deterministic map,
such as reflow's (x0, G(x0)), where a fresh pairing would make every held-out target look unseen). The AUC of the
loss as a classifier (held-out loss above training loss) is the Mann-Whitney statistic with DeLong's standard error;
its intervals are Bonferroni-corrected over the times.

Gradient variance (check 3). :func:`flowprobe.probes.gradvar.gradient_variance` on the training pairs and on
the held-out targets (same generator seed), by default with the ghost estimator (exact per-sample gradient norms
from one backward pass; parameters of module types it does not cover get torch.func per-sample gradients), which
gave the exact method's numbers about 4x faster on CPU (a 3 x 128 MLP, the tiny 16x16 UNet). The summary is the
geometric mean over t of GV(train) / GV(held-out), with the delta-method standard error of its logarithm,
se(log GV) = se(GV) / GV per group and time.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..couplings import FixedPairs, IndependentCoupling, TensorSampler
from ..objectives import squared_error
from ..paths import ProbabilityPath
from ..probes.gradvar import PER_SAMPLE_ERRORS, gradient_variance
from .result import CheckResult
from .stats import auc, mean_se
from .verdict import (GRADVAR_COLLAPSE_RATIO, GRADVAR_PARITY_RATIO, MEMBERSHIP_AUC_MARGIN, MIN_SAMPLES, SUPPORTING,
                      gradvar_vote, interval_z, membership_vote)

__all__ = ["membership_check", "gradvar_check", "per_sample_losses"]


@torch.no_grad()
def per_sample_losses(net, path: ProbabilityPath, t: float, x0: Tensor, x1: Tensor, z: Tensor | None,
                      batch_size: int = 512) -> Tensor:
    """l_i = mean over dimensions of (v(t, x_t,i) - u_t,i)^2 at one time t, shape (n,), float64."""
    out = []
    for s in range(0, x0.shape[0], batch_size):
        a, b = x0[s:s + batch_size], x1[s:s + batch_size]
        tv = torch.full((a.shape[0],), float(t), dtype=a.dtype, device=a.device)
        x_t, u_t = path.sample(a, b, tv, None if z is None else z[s:s + batch_size])
        out.append(squared_error(net(tv, x_t).to(u_t.dtype), u_t, "mean").double())
    return torch.cat(out)


def _draw(source, n: int, shape, generator: torch.Generator, device, dtype) -> Tensor:
    x0, _ = source.sample(n, generator)
    x0 = x0.to(device=device, dtype=dtype)
    if tuple(x0.shape[1:]) != tuple(shape):
        raise ValueError(f"the source draws samples of shape {tuple(x0.shape[1:])}, the data has {tuple(shape)}")
    return x0


def _row(t: float, l_tr: Tensor, l_ho: Tensor, z: float) -> dict:
    keep = torch.isfinite(l_tr) & torch.isfinite(l_ho)
    l_tr, l_ho = l_tr[keep], l_ho[keep]
    mt, st = mean_se(l_tr)
    mh, sh = mean_se(l_ho)
    gap, gap_se = mean_se(l_ho - l_tr)
    value, se = auc(l_ho, l_tr)
    return {"t": t, "n": int(keep.sum()), "non_finite": int((~keep).sum()), "loss_train": mt, "loss_train_se": st,
            "loss_heldout": mh, "loss_heldout_se": sh, "gap": gap, "gap_se": gap_se,
            "relative_gap": gap / mh if mh > 0 else float("nan"), "auc": value, "auc_se": se,
            "auc_lower": max(0.0, value - z * se), "auc_upper": min(1.0, value + z * se)}


def membership_check(net, path: ProbabilityPath, source, train: Tensor, heldout: Tensor, *,
                     train_sources: Tensor | None = None, times: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                     n_max: int = 512, repeats: int = 1, generator: torch.Generator,
                     batch_size: int = 512, progress=None, heldout_sources: Tensor | None = None) -> CheckResult:
    """The membership-gap check (module docstring). ``train_sources``: the training sources x0_i paired with
    ``train`` (paired training), else None (fresh source draws); ``heldout_sources``: the sources paired with
    ``heldout`` (held-out pairs), else None (fresh source draws)."""
    n = min(train.shape[0], heldout.shape[0], n_max)
    thresholds = {"membership_auc_margin": MEMBERSHIP_AUC_MARGIN, "min_samples": MIN_SAMPLES,
                  "intervals": f"Bonferroni over {len(times)} times"}
    gen_dev = generator.device
    i_tr = torch.randperm(train.shape[0], generator=generator, device=gen_dev)[:n].to(train.device)
    i_ho = torch.randperm(heldout.shape[0], generator=generator, device=gen_dev)[:n].to(heldout.device)
    x1_tr, x1_ho = train[i_tr], heldout[i_ho]
    x0_fixed = None if train_sources is None else train_sources[i_tr]
    x0_ho_fixed = None if heldout_sources is None else heldout_sources[i_ho]
    shape, dtype, device = tuple(train.shape[1:]), train.dtype, train.device
    z_mult = interval_z(len(times))
    rows = []
    for k, t in enumerate(times):
        l_tr = torch.zeros(n, dtype=torch.float64, device=device)
        l_ho = torch.zeros_like(l_tr)
        for _ in range(repeats):
            x0 = _draw(source, n, shape, generator, device, dtype)
            z = None
            if not path.deterministic:
                z = torch.randn((n, *shape), generator=generator, device=gen_dev, dtype=dtype).to(device)
            l_tr += per_sample_losses(net, path, t, x0 if x0_fixed is None else x0_fixed, x1_tr, z, batch_size)
            l_ho += per_sample_losses(net, path, t, x0 if x0_ho_fixed is None else x0_ho_fixed, x1_ho, z, batch_size)
        rows.append(_row(float(t), (l_tr / repeats).cpu(), (l_ho / repeats).cpu(), z_mult))
        if progress is not None:
            progress("membership", k + 1, len(times))
    vote = membership_vote(n, n, rows)
    best = max(rows, key=lambda r: r["auc"])
    summary = (f"largest AUC {best['auc']:.3f} +- {best['auc_se']:.3f} at t = {best['t']:.3g} (held-out loss "
               f"{best['loss_heldout']:.4g} vs train {best['loss_train']:.4g}), n = {n} per group")
    evidence = {"n_per_group": n, "repeats": repeats, "paired_sources": train_sources is not None,
                "heldout_pairs": heldout_sources is not None, "max_auc": best["auc"], "max_auc_t": best["t"],
                "rows": rows}
    return CheckResult("membership", SUPPORTING, True, vote.vote, summary, vote.reason, evidence, thresholds)


def _trainable(net) -> int:
    params = getattr(net, "parameters", None)
    return sum(p.numel() for p in params() if p.requires_grad) if callable(params) else 0


def _log_ratio(tr: dict, ho: dict) -> tuple[float, float]:
    """log(GV_train / GV_heldout) at one time and its delta-method standard error."""
    if not (tr["gv"] and ho["gv"] and tr["gv"] > 0 and ho["gv"] > 0):
        return float("nan"), float("nan")
    se = math.hypot((tr["gv_se"] or 0.0) / tr["gv"], (ho["gv_se"] or 0.0) / ho["gv"])
    return math.log(tr["gv"] / ho["gv"]), se


def gradvar_check(net: nn.Module, path: ProbabilityPath, source, train: Tensor, heldout: Tensor, *,
                  train_sources: Tensor | None = None, times: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                  n_samples: int = 128, method: str = "auto", seed: int = 0, chunk_size: int = 64,
                  heldout_sources: Tensor | None = None) -> CheckResult:
    """The gradient-variance check (module docstring); ``method``: an estimator of the probe, or "auto" (ghost,
    then exact if ghost fails on this net); ``heldout_sources``: the sources paired with ``heldout`` (held-out
    pairs), else fresh source draws."""
    thresholds = {"gradvar_collapse_ratio": GRADVAR_COLLAPSE_RATIO, "gradvar_parity_ratio": GRADVAR_PARITY_RATIO,
                  "min_samples": MIN_SAMPLES}
    n_params = _trainable(net)
    if n_params == 0:
        return CheckResult.skipped("gradvar", SUPPORTING, "the model has no trainable parameters")
    methods = ("ghost", "exact") if method == "auto" else (method,)
    train_sampler = (FixedPairs(train_sources, train) if train_sources is not None
                     else IndependentCoupling(source, TensorSampler(train)))
    held_sampler = (FixedPairs(heldout_sources, heldout) if heldout_sources is not None
                    else IndependentCoupling(source, TensorSampler(heldout)))
    for k, method in enumerate(methods):
        try:
            profiles = {}
            for name, sampler in (("train", train_sampler), ("heldout", held_sampler)):
                gen = torch.Generator(device=train.device).manual_seed(seed)
                profiles[name] = gradient_variance(net, path, sampler, list(times), n_samples=n_samples,
                                                   method=method, chunk_size=chunk_size, generator=gen, groups="all",
                                                   device=train.device)
            break
        except PER_SAMPLE_ERRORS:
            if k == len(methods) - 1:
                raise
    rows, logs, ses = [], [], []
    for tr, ho in zip(profiles["train"].rows, profiles["heldout"].rows):
        lr, se = _log_ratio(tr, ho)
        rows.append({"t": tr["t"], "gv_train": tr["gv"], "gv_train_se": tr["gv_se"], "gv_heldout": ho["gv"],
                     "gv_heldout_se": ho["gv_se"], "ratio": math.exp(lr) if math.isfinite(lr) else float("nan"),
                     "loss_train": tr["loss"], "loss_heldout": ho["loss"]})
        logs.append(lr)
        ses.append(se)
    if all(math.isfinite(v) for v in logs + ses):
        mean_log = sum(logs) / len(logs)
        se_log = math.sqrt(sum(s * s for s in ses)) / len(ses)
        z = interval_z(1)
        ratio, lower, upper = math.exp(mean_log), math.exp(mean_log - z * se_log), math.exp(mean_log + z * se_log)
    else:
        ratio = lower = upper = float("nan")
    vote = gradvar_vote(n_samples, ratio, lower, upper)
    summary = (f"GV(train) / GV(held-out) = {ratio:.3g} [{lower:.3g}, {upper:.3g}] (geometric mean over "
               f"{len(rows)} times, {method} per-sample gradients, n = {n_samples} per time)")
    evidence = {"method": method, "parameters": n_params, "n_samples": n_samples,
                "paired_sources": train_sources is not None, "heldout_pairs": heldout_sources is not None,
                "ratio": ratio, "ratio_interval": [lower, upper],
                "rows": rows}
    return CheckResult("gradvar", SUPPORTING, True, vote.vote, summary, vote.reason, evidence, thresholds)
