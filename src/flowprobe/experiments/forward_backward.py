"""Gradient variance over t of forward (noise -> data) and backward (data -> noise) fields (E5, spec R8, CPU).

Data: the low-variance mixture x = mode_scale * C_k + noise_std * eps (d = 16, 8 modes, C_k ~ N(0, I);
per-dimension variance ~0.1 by default, well below the unit variance of the Gaussian noise), like images in
[-1, 1] against N(0, I). A forward field is trained on the independent coupling noise -> data and a backward
field on the same coupling swapped (data at t = 0, noise at t = 1). For each trained field the gradient
variance of the CFM loss, GV(t) = tr Cov_i(grad_theta l_i) at fixed t (sum reduction, exact per-sample
gradients), is measured with :func:`flowprobe.probes.gradvar.gradient_variance` on a grid of times.

Expected: the forward GV peaks near t = 1 and the backward GV near t = 0 -- at the end where the noise sits,
the noise endpoint cannot be identified from x_t, and the residual Cov(noise | x_t) ~ I is much larger than
the data's conditional variance at the other end. A negative control with data variance ~0.34
(x = 0.5 C_k + 0.3 eps by default) tests how much of the asymmetry is due to the low data variance; spec R8
expects its curves to be flat within +-15 %, checked on the whole curve: with the flatness
spread = (max_t GV - min_t GV) / (max_t GV + min_t GV), the half-width of the narrowest band c (1 +- spread)
that holds every GV(t), the control passes when spread <= flat_tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass


from ..config import option
from ..couplings import GaussianSampler, IndependentCoupling, SwappedCoupling
from ..data.synthetic import low_variance_mixture
from ..paths import make_path
from ..probes.gradvar import gradient_variance
from ..report import plt, save_figure
from .harness import derive_seed, experiment
from .lowdim import train_velocity

__all__ = ["ForwardBackwardConfig", "run", "flat_spread"]

CLAIM = ("Gradient variance over t is asymmetric: it peaks near t = 1 for a forward (noise -> data) field and "
         "near t = 0 for a backward (data -> noise) field (CIFAR-10 in the paper; here the CPU version on a "
         "low-variance mixture).")


@dataclass
class ForwardBackwardConfig:
    dim: int = option(16, ge=1)
    n_modes: int = option(8, ge=1)
    mode_scale: float = option(0.3, gt=0)
    noise_std: float = option(0.1, gt=0)
    sigmas: list[float] = option(default_factory=lambda: [0.0, 0.05], ge=0)
    control: bool = option(True, help="also run the higher-variance negative control (sigma = 0)")
    control_mode_scale: float = option(0.5, gt=0)
    control_noise_std: float = option(0.3, gt=0)
    width: int = option(256, ge=1)
    depth: int = option(3, ge=1)
    steps: int = option(3000, ge=1)
    batch_size: int = option(256, ge=1)
    lr: float = option(1e-3, gt=0)
    lr_schedule: str = option("cosine", choices=("constant", "cosine"))
    reduction: str = option("mean", choices=("mean", "sum"), help="training loss over dimensions (the probe uses sum)")
    times: list[float] = option(default_factory=lambda: [0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99], gt=0, lt=1)
    n_samples: int = option(512, ge=2, help="per-sample gradients per time")
    chunk_size: int = option(128, ge=1)
    ratio_threshold: float = option(2.0, gt=0)
    flat_tolerance: float = option(0.15, ge=0, lt=1, help="control: every GV(t) within c (1 +- this) for some c "
                                   "counts as flat")


def flat_spread(values) -> float:
    """(max v - min v) / (max v + min v) for positive values v: the smallest f such that every v lies in
    [c (1 - f), c (1 + f)] for one level c (then c = (max + min) / 2). A curve is "flat within +-15 %" iff
    flat_spread <= 0.15, i.e. max / min <= 1.15 / 0.85."""
    vals = [float(v) for v in values]
    if not vals or min(vals) <= 0:
        raise ValueError(f"flat_spread needs a non-empty list of positive values, got {vals}")
    return (max(vals) - min(vals)) / (max(vals) + min(vals))


def _stage(label: str, direction: str, sigma: float) -> str:
    return f"{label} {direction} sigma={sigma}"


def _stages(cfg: ForwardBackwardConfig) -> list[tuple[str, float]]:
    """The progress plan, in training steps (each probe counted as PROBE_WORK steps)."""
    jobs = [("low_variance", d, s) for s in sorted(set(cfg.sigmas)) for d in ("forward", "backward")]
    jobs += [("control", d, 0.0) for d in ("forward", "backward")] if cfg.control else []
    return [(name, work) for label, d, s in jobs
            for name, work in ((_stage(label, d, s), cfg.steps), (_stage(label, d, s) + " probe", PROBE_WORK))]


#: Progress weight of one gradient-variance profile, in training steps.
PROBE_WORK = 100


def _profile(cfg, ctx, data, sigma, direction, offset, label) -> dict:
    dev = ctx.device
    coupling = IndependentCoupling(GaussianSampler((cfg.dim,), device=dev), data)
    train_coupling = coupling if direction == "forward" else SwappedCoupling(coupling)
    net, losses = train_velocity(cfg.dim, train_coupling, sigma, width=cfg.width, depth=cfg.depth, steps=cfg.steps,
                                 batch_size=cfg.batch_size, lr=cfg.lr, seed=derive_seed(ctx.seed, offset), device=dev,
                                 reduction=cfg.reduction, lr_schedule=cfg.lr_schedule,
                                 hooks=[ctx.training_hook(_stage(label, direction, sigma), cfg.steps)])
    res = gradient_variance(net, make_path(sigma), coupling, list(cfg.times), n_samples=cfg.n_samples,
                            method="exact", direction=direction, chunk_size=cfg.chunk_size,
                            generator=ctx.generator(offset + 1, device=dev))
    ctx.progress.finish(_stage(label, direction, sigma) + " probe")
    rows = res.rows
    out = {"data": label, "direction": direction, "sigma": sigma, "times": [r["t"] for r in rows],
           "gv": [r["gv"] for r in rows], "gv_se": [r["gv_se"] for r in rows], "loss": [r["loss"] for r in rows],
           "loss_se": [r["loss_se"] for r in rows], "mean_grad_sq": [r["mean_grad_sq"] for r in rows],
           "final_train_loss": sum(losses[-100:]) / len(losses[-100:]), "n_samples": cfg.n_samples,
           "data_variance": float(data.covariance().trace()) / cfg.dim}
    g = out["gv"]
    out["endpoint_ratio"] = g[-1] / g[0] if direction == "forward" else g[0] / g[-1]
    out["flat_spread"] = flat_spread(g)
    ctx.log(f"{label} {direction} sigma={sigma}: GV(t={out['times'][0]}) {g[0]:.4g}, GV(t={out['times'][-1]}) "
            f"{g[-1]:.4g}, ratio {out['endpoint_ratio']:.2f}")
    return out


@experiment("forward-backward", config=ForwardBackwardConfig, claim=CLAIM,
            quick={"width": 128, "steps": 1500, "sigmas": [0.0], "n_samples": 256,
                   "times": [0.01, 0.1, 0.5, 0.9, 0.99]})
def run(cfg: ForwardBackwardConfig, ctx) -> dict:
    """GV(t) of forward and backward fields on a low-variance mixture, with a higher-variance control."""
    ctx.plan(_stages(cfg))
    dev = ctx.device
    times = sorted(cfg.times)
    cfg.times = times
    data = low_variance_mixture(cfg.dim, cfg.n_modes, cfg.mode_scale, cfg.noise_std,
                                generator=ctx.generator(1, device="cpu"), device=dev)
    runs = []
    for si, sigma in enumerate(sorted(set(cfg.sigmas))):
        for di, direction in enumerate(("forward", "backward")):
            runs.append(_profile(cfg, ctx, data, sigma, direction, 100 + 10 * si + di, "low_variance"))
    if cfg.control:
        ctrl = low_variance_mixture(cfg.dim, cfg.n_modes, cfg.control_mode_scale, cfg.control_noise_std,
                                    generator=ctx.generator(2, device="cpu"), device=dev)
        for di, direction in enumerate(("forward", "backward")):
            runs.append(_profile(cfg, ctx, ctrl, 0.0, direction, 500 + di, "control"))

    thr = cfg.ratio_threshold
    for r in runs:
        t0, t1 = r["times"][0], r["times"][-1]
        if r["data"] == "low_variance":
            if r["direction"] == "forward":
                name = f"forward, sigma = {r['sigma']}: GV({t1})/GV({t0}) >= {thr:g}"
            else:
                name = f"backward, sigma = {r['sigma']}: GV({t0})/GV({t1}) >= {thr:g}"
            ctx.criterion(name, r["endpoint_ratio"] >= thr, f"ratio {r['endpoint_ratio']:.2f}")
        else:
            tol = cfg.flat_tolerance
            ctx.criterion(f"control (data variance {r['data_variance']:.2f}; {cfg.control_mode_scale:g} C_k + "
                          f"{cfg.control_noise_std:g} eps), {r['direction']}: GV(t) flat within +-{tol:g} over "
                          f"t in [{t0:g}, {t1:g}]", r["flat_spread"] <= tol,
                          f"spread {r['flat_spread']:.2f} (GV {min(r['gv']):.4g} .. {max(r['gv']):.4g}); "
                          f"endpoint ratio {r['endpoint_ratio']:.2f}")
    table = []
    for r in runs:
        for t, gv, se, loss in zip(r["times"], r["gv"], r["gv_se"], r["loss"]):
            table.append({"data": r["data"], "direction": r["direction"], "sigma": r["sigma"], "t": t, "gv": gv,
                          "gv_se": se, "loss": loss})
    ctx.table(f"GV(t), exact per-sample gradients, {cfg.n_samples} per time, sum reduction", table)
    ctx.table("paper-calibrated reference (spec R8, d = 16, sigma = 0, 3x256 MLP, 3000 steps, M = 512)", [
        {"direction": "forward", **{f"t={t}": v for t, v in zip((0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99),
                                                                  (2106, 1969, 1734, 1717, 1385, 4521, 13226))}},
        {"direction": "backward", **{f"t={t}": v for t, v in zip((0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99),
                                                                   (8692, 3579, 1323, 1899, 2075, 2510, 2689))}}])
    _figure(ctx, runs)
    ctx.note(f"Training reduction: {cfg.reduction}; the probe uses the per-sample sum over dimensions. "
             f"lr schedule {cfg.lr_schedule}.")
    return {"runs": runs}


def _figure(ctx, runs) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ls = "-" if r["data"] == "low_variance" else ":"
        mk = "o" if r["direction"] == "forward" else "s"
        ax.errorbar(r["times"], r["gv"], yerr=r["gv_se"], fmt=mk + ls, capsize=2, ms=4,
                    label=f"{r['direction']}, sigma={r['sigma']}" + (" (control)" if r["data"] == "control" else ""))
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("GV(t) = tr Cov(per-sample gradient)")
    ax.legend(fontsize=7)
    ax.set_title("forward (noise -> data) vs backward (data -> noise)")
    save_figure(fig, ctx.figure("gradvar_forward_backward"))
