"""Gradient variance over t for forward and backward fields on CIFAR-10 (E5, spec R8).

A forward field carries noise (t = 0) to images (t = 1); a backward field is the same model class
trained on the swapped pairs, images (t = 0) to noise (t = 1). Both are trained with CFM(sigma),
sigma in {0, 0.05} (constant), on independent noise-image pairs. At each t of a grid we draw n fresh
pairs, set t_i = t, and measure the gradient variance GV(t) = tr Cov(grad_theta l_i) of the per-sample
loss l_i = ||v(t, x_t) - u_t||^2 (sum over dimensions) with :func:`flowprobe.probes.gradvar.gradient_variance`,
with its standard error.

The paper reports that GV peaks near t = 1 for forward fields and near t = 0 for backward fields: the
end where the *noise* sits is where the target u = x1 - x0 is least predictable from x_t, because the
noise endpoint cannot be identified there while the images have a small conditional variance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import option, to_dict
from ..io import write_json
from ..couplings import GaussianSampler, IndependentCoupling, SwappedCoupling
from ..data.images import ImageSampler, load_images_for, to_tensor
from ..paths import make_path
from ..probes.ghost import CONV_RULES
from ..probes.gradvar import gradient_variance
from ..report.probes import plot_profiles
from .harness import derive_seed, experiment
from .imageflow import QUICK_MODEL, ImageModelConfig, ImageTrainOptions, model_spec, resolve_precision, train_image_flow

__all__ = ["CifarGradvarConfig", "run", "DEFAULT_TIMES"]

DEFAULT_TIMES = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


@dataclass
class CifarGradvarConfig(ImageTrainOptions):
    dataset: str = option("cifar10", help="dataset name or path (see flowprobe.data.images)")
    data_root: str | None = option(None)
    resolution: int = option(32, ge=4)
    n_train: int | None = option(None, ge=2, help="a seeded random subset of the training images (None: all)")
    flip: bool = option(True, help="random horizontal flips of the images")
    directions: list[str] = option(default_factory=lambda: ["forward", "backward"], choices=("forward", "backward"))
    sigmas: list[float] = option(default_factory=lambda: [0.0, 0.05], ge=0)
    model: ImageModelConfig = field(default_factory=lambda: ImageModelConfig(preset="cifar10", model_channels=64))
    steps: int = option(4000, ge=1)
    times: list[float] = option(default_factory=lambda: list(DEFAULT_TIMES), ge=0, le=1)
    gv_samples: int = option(256, ge=2, help="per-sample gradients per time")
    gv_method: str = option("exact", choices=("exact", "naive", "microbatch", "ghost"))
    gv_chunk: int = option(64, ge=1)
    gv_ghost_conv: str = option("auto", choices=CONV_RULES, help="gv_method ghost: the convolution rule")
    gv_reduction: str = option("sum", choices=("sum", "mean"), help="per-sample loss of the probe")
    residual_probe: bool = option(False, help="also measure the gain GV / loss of the actual residual, of white "
                                  "noise and of image differences with the same per-sample norms, at each t")
    forward_peak_min: float = option(0.8, help="criterion: forward argmax_t GV >= this")
    backward_peak_max: float = option(0.2, help="criterion: backward argmax_t GV <= this")


CLAIM = ("Gradient variance over t is asymmetric: for the forward (noise -> data) field it peaks near t = 1, "
         "for the backward (data -> noise) field near t = 0 (CIFAR-10). CFM(sigma = 0.05) is reported to have lower "
         "variance 'in integrated samples' (meaning unclear; the ratio is reported without an asserted direction).")


def _load(cfg: CifarGradvarConfig, ctx):
    """The training images on the device (a seeded random subset of ``n_train`` when given)."""
    t0 = time.perf_counter()
    images = load_images_for("dataset", cfg.dataset, root=cfg.data_root, resolution=cfg.resolution).images
    if cfg.n_train is not None and cfg.n_train < len(images):
        rng = np.random.default_rng(derive_seed(ctx.seed, 5))
        images = images[np.sort(rng.choice(len(images), cfg.n_train, replace=False))]
    images = to_tensor(images, ctx.device)
    ctx.log(f"{len(images)} training images {tuple(images.shape[1:])} in {time.perf_counter() - t0:.1f} s")
    ctx.progress.finish("loading images")
    return images


def _profile(cfg: CifarGradvarConfig, ctx, spec, precision, forward, direction: str, sigma: float, k: int):
    """Train model ``k`` (``direction``, CFM(sigma)) and measure its gradient variance over t; (row, result)."""
    dev = ctx.device
    coupling = forward if direction == "forward" else SwappedCoupling(forward)
    stage = f"training {direction} sigma={sigma:g}"
    ctx.log(f"{stage}: {cfg.steps} steps ({spec['class']}, {precision})")
    t1 = time.perf_counter()
    state = train_image_flow(spec, coupling, float(sigma), steps=cfg.steps, batch_size=cfg.batch_size,
                             lr=cfg.lr, seed=derive_seed(ctx.seed, 401 + k), device=dev, precision=precision,
                             grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, compile=cfg.compile,
                             warmup=cfg.warmup, reduction=cfg.reduction, hooks=[ctx.training_hook(stage, cfg.steps)])
    train_s = time.perf_counter() - t1
    net = state.model.eval()
    t1 = time.perf_counter()
    gen = torch.Generator(device=dev).manual_seed(derive_seed(ctx.seed, 501 + k))
    path = make_path(float(sigma), "constant")
    res = gradient_variance(net, path, forward, cfg.times,
                            n_samples=cfg.gv_samples, method=cfg.gv_method, chunk_size=cfg.gv_chunk,
                            generator=gen, reduction=cfg.gv_reduction, direction=direction, device=dev,
                            ghost_conv=cfg.gv_ghost_conv)
    gv_s = time.perf_counter() - t1
    gains = _residual_gains(net, path, coupling, forward, cfg, gen, dev) if cfg.residual_probe else None
    ctx.progress.finish(f"probing {direction} sigma={sigma:g}")
    gv = [float(v) for v in res.gv]
    tail = state.losses[-min(len(state.losses), 100):]
    row = {"direction": direction, "sigma": float(sigma), "times": [float(v) for v in res.times],
           "gv": gv, "gv_se": [float(v) for v in res.gv_se], "loss": [float(v) for v in res.loss],
           "argmax_t": float(res.times[int(np.nanargmax(res.gv))]), "steps": cfg.steps,
           "final_train_loss": sum(tail) / max(1, len(tail)), "train_s": train_s, "gv_s": gv_s}
    if gains is not None:
        row["residual_gain"] = gains
    ctx.log(f"{direction} sigma={sigma:g}: argmax_t GV = {row['argmax_t']:g}; GV(t_first) "
            f"{gv[0]:.4g}, GV(t_last) {gv[-1]:.4g} (train {train_s:.0f} s, probe {gv_s:.0f} s)")
    return row, res


def _stages(cfg: CifarGradvarConfig) -> list[tuple[str, float]]:
    """The progress plan in training steps (a probe counts as GV_WORK_PER_SAMPLE steps per per-sample gradient)."""
    plan = [("loading images", 1)]
    for direction in cfg.directions:
        for sigma in cfg.sigmas:
            plan += [(f"training {direction} sigma={sigma:g}", cfg.steps),
                     (f"probing {direction} sigma={sigma:g}", GV_WORK_PER_SAMPLE * cfg.gv_samples * len(cfg.times))]
    return plan


#: Progress weight of one per-sample gradient of the probe, in training steps.
GV_WORK_PER_SAMPLE = 1 / 64


@experiment("cifar-gradvar", config=CifarGradvarConfig,
            quick={"resolution": 8, "n_train": 2000, "model": QUICK_MODEL,
                   "steps": 150, "batch_size": 64, "lr": 3e-3, "gv_samples": 64, "gv_chunk": 64},
            claim=CLAIM)
def run(cfg: CifarGradvarConfig, ctx) -> dict:
    """CIFAR-10 gradient variance versus t, forward and backward fields, sigma in {0, 0.05}."""
    ctx.plan(_stages(cfg))
    dev = ctx.device
    precision = resolve_precision(cfg.precision, dev)
    images = _load(cfg, ctx)
    shape = tuple(images.shape[1:])
    spec = model_spec(cfg.model, cfg.resolution, shape[0])
    forward = IndependentCoupling(GaussianSampler(shape, device=dev), ImageSampler(images, flip=cfg.flip))
    runs, profiles = [], []
    k = 0
    for direction in cfg.directions:
        for sigma in cfg.sigmas:
            row, res = _profile(cfg, ctx, spec, precision, forward, direction, sigma, k)
            runs.append(row)
            write_json(ctx.out / "partial.json", {"runs": runs})  # survives a timeout
            profiles.append((f"{direction} sigma={sigma:g}", res))
            k += 1
    _criteria(cfg, ctx, runs)
    ratios = _report(cfg, ctx, runs, spec, precision, len(images))
    plot_profiles(profiles, ctx.figure("gradvar"), title="CIFAR-10: tr Cov of per-sample gradients vs t")
    return {"runs": runs, "ratios": ratios, "model": spec, "precision": precision}


def _criteria(cfg: CifarGradvarConfig, ctx, runs) -> None:
    for r in runs:
        if r["direction"] == "forward":
            ctx.criterion(f"forward sigma={r['sigma']:g}: argmax_t GV >= {cfg.forward_peak_min:g}",
                          r["argmax_t"] >= cfg.forward_peak_min,
                          f"argmax at t = {r['argmax_t']:g}; GV(t={r['times'][0]:g}) {r['gv'][0]:.4g}, "
                          f"GV(t={r['times'][-1]:g}) {r['gv'][-1]:.4g}")
        else:
            ctx.criterion(f"backward sigma={r['sigma']:g}: argmax_t GV <= {cfg.backward_peak_max:g}",
                          r["argmax_t"] <= cfg.backward_peak_max,
                          f"argmax at t = {r['argmax_t']:g}; GV(t={r['times'][0]:g}) {r['gv'][0]:.4g}, "
                          f"GV(t={r['times'][-1]:g}) {r['gv'][-1]:.4g}")


def _report(cfg: CifarGradvarConfig, ctx, runs, spec, precision, n_images: int) -> list[dict]:
    """The report's tables and note; the GV(sigma=0.05) / GV(sigma=0) ratios per direction."""
    ratios = []
    by = {(r["direction"], r["sigma"]): r for r in runs}
    for direction in cfg.directions:
        base, noisy = by.get((direction, 0.0)), by.get((direction, 0.05))
        if base is None or noisy is None:
            continue
        ratio = [n / b if b > 0 else float("nan") for n, b in zip(noisy["gv"], base["gv"])]
        ratios.append({"direction": direction, "times": base["times"], "ratio": ratio})
        ctx.table(f"GV(sigma=0.05) / GV(sigma=0), {direction} (no direction asserted)",
                  [{"t": t, "gv_sigma0": b, "gv_sigma0.05": n, "ratio": q}
                   for t, b, n, q in zip(base["times"], base["gv"], noisy["gv"], ratio)])
    for r in runs:
        if "residual_gain" in r:
            ctx.table(f"Gain GV / mean ||r||^2 of residuals with the actual per-sample norms, {r['direction']} "
                      f"sigma={r['sigma']:g} (actual = v - u; white = Gaussian noise; image = centred images)",
                      [{"t": g["t"], "loss": g["actual"]["sq_norm"],
                        **{f"gain_{k}": g[k]["gain"] for k in ("actual", "white", "image")},
                        "image/white": g["image"]["gain"] / g["white"]["gain"]} for g in r["residual_gain"]])
    ctx.table("Gradient variance at the ends of the grid",
              [{"direction": r["direction"], "sigma": r["sigma"], "argmax_t": r["argmax_t"], "gv_first": r["gv"][0],
                "gv_last": r["gv"][-1], "loss_first": r["loss"][0], "loss_last": r["loss"][-1],
                "final_train_loss": r["final_train_loss"], "train_s": r["train_s"], "gv_s": r["gv_s"]} for r in runs])
    ctx.note(f"Model {spec['class']} {to_dict(spec['kwargs'])}; {cfg.steps} steps of batch {cfg.batch_size}, lr "
             f"{cfg.lr}, {precision}, {n_images} training images at {cfg.resolution}x{cfg.resolution}. Probe: "
             f"{cfg.gv_method} per-sample gradients, n = {cfg.gv_samples} per t, loss reduction "
             f"'{cfg.gv_reduction}', the net in eval mode; error bars are standard errors.")
    return ratios


def _residual_gains(net, path, coupling, forward, cfg, generator, device) -> list[dict]:
    """Per t of the grid: :func:`flowprobe.probes.gradvar.residual_gain` of the actual residual v - u, of
    white noise and of centred training images (``forward``'s targets, whatever the field's direction), each
    rescaled to the actual per-sample norms."""
    from ..objectives import CFMObjective
    from ..probes.gradvar import matched_residuals, residual_gain

    objective = CFMObjective(path, "sum")
    rows = []
    n = cfg.gv_samples
    for t in cfg.times:
        pairing = coupling.sample(n, generator)
        tv, x_t, u_t = objective.draw(pairing, generator, torch.full((n,), float(t), device=device))
        with torch.no_grad():
            actual = net(tv, x_t) - u_t
        white = torch.randn(x_t.shape, generator=generator, device=generator.device).to(device)
        images = forward.sample(n, generator).x1.to(device)
        images = images - images.mean(0, keepdim=True)
        res = matched_residuals(actual, {"white": white, "image": images})
        rows.append({"t": float(t), **residual_gain(net, tv, x_t, res, method=cfg.gv_method,
                                                     chunk_size=cfg.gv_chunk, ghost_conv=cfg.gv_ghost_conv)})
    return rows
