"""``flowprobe probe gradvar`` and ``flowprobe probe memorization``: load checkpoints, run a probe, write its
JSON and figure, print a summary.

The probes themselves (:mod:`flowprobe.probes`) take a net, a path and data; this module turns checkpoints into
those (:func:`flowprobe.runs.load_run` / :func:`flowprobe.runs.load_model`) and draws the figures with
:mod:`flowprobe.report.probes`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import ConfigError
from ..device import resolve_device
from ..io import write_json
from ..objectives import REDUCTIONS, AverageVelocityObjective, make_objective
from ..paths import ProbabilityPath
from ..affine_paths import make_scheduled_path
from ..probes.ghost import CONV_RULES
from ..probes.gradvar import ENDPOINT_MARGIN, ESTIMATORS, gradient_variance, parse_times, sampler_device
from ..probes.memorization import evaluate_pairs, limit_pairs, load_pairs
from ..report.probes import plot_pairing_histograms, plot_profiles
from ..runs import load_model, load_run
from ..runs.load import sample_shape
from ..solvers import METHODS

__all__ = ["register", "ProbeTarget", "load_probe_target", "probe_gradvar_cli", "run_gradvar", "run_memorization"]


def register(subparsers) -> None:
    """Add ``flowprobe probe`` with its sub-commands ``gradvar`` and ``memorization``."""
    probe = subparsers.add_parser("probe", help="measure a trained model: gradient variance, memorisation, ...")
    probe_sub = probe.add_subparsers(dest="probe", metavar="PROBE")
    _register_gradvar(probe_sub)
    _register_memorization(probe_sub)
    probe.set_defaults(func=lambda args: (probe.print_help(), 2)[1])


# --------------------------------------------------------------------------------------------------------------
# gradvar


@dataclass
class ProbeTarget:
    """A model to probe: the network, its training path and pair sampler, and where it came from."""

    label: str
    net: nn.Module
    path: ProbabilityPath
    sampler: object
    info: dict = field(default_factory=dict)
    objective: AverageVelocityObjective | None = None  #: the few-step objective the net was trained with, if any


def load_probe_target(checkpoint, device="cpu", use_ema: bool = True) -> ProbeTarget:
    """Rebuild the network, path and coupling of a ``flowprobe train`` checkpoint (safetensors + JSON
    sidecar holding the training config) and load its weights (the EMA copy when there is one), through
    :func:`flowprobe.runs.load_run` (2-D toys and image runs alike)."""
    run = load_run(checkpoint, device, use_ema)
    ck = run.checkpoint
    label = ck.path.parent.parent.name if ck.path.parent.name == "checkpoints" else ck.path.parent.name
    few = run.objective if isinstance(run.objective, AverageVelocityObjective) else None
    return ProbeTarget(label=f"{label}/step{ck.step}", net=run.net, path=run.objective.path, sampler=run.coupling,
                       info={"checkpoint": str(ck.path), "step": ck.step, "weights": run.weights}, objective=few)


def _override_path(path: ProbabilityPath, sigma: float | None, schedule: str | None) -> ProbabilityPath:
    if sigma is None and schedule is None:
        return path
    base_sigma = float(getattr(path, "sigma", 0.0))
    base_schedule = getattr(path, "schedule", "constant")
    return make_scheduled_path(getattr(path, "kind", "linear"), getattr(path, "params", None),  # keep (a, b)
                               base_sigma if sigma is None else sigma, base_schedule if schedule is None else schedule)


def probe_gradvar_cli(targets: Sequence[ProbeTarget], out, *, times="0:1:21", samples: int = 256,
                      method: str = "exact", directions: Sequence[str] = ("forward",), sigma: float | None = None,
                      schedule: str | None = None, chunk_size: int = 64, micro_batch_size: int = 8,
                      groups="layer", reduction: str = "sum", seed: int = 0, progress: bool = True,
                      ghost_conv: str = "auto", step: float | str | None = None) -> dict:
    """Profile every target in every direction and write ``out/gradvar.json`` and ``out/gradvar.png``.

    Every profile uses a generator seeded with ``seed`` (on the sampler's device), so several
    checkpoints are compared on the same draws (common random numbers). ``sigma``/``schedule``
    override the checkpoint's path. ``step`` (few-step checkpoints): probe the loss of the objective they were
    trained with at step h = min(step, 1 - t), or h = 1 - t for "to_end"
    (:func:`flowprobe.probes.gradvar.gradient_variance`). ``method`` is one of the estimators
    :data:`flowprobe.probes.gradvar.ESTIMATORS`. Returns the JSON document.
    """
    out = Path(out)
    if samples < 2:
        raise ConfigError(f"--samples must be >= 2, got {samples}")
    try:
        parse_times(times)
    except ValueError as e:
        raise ConfigError(f"--times: {e}") from None
    profiles, docs = [], []
    for target in targets:
        path = _override_path(target.path, sigma, schedule)
        objective = None
        if step is not None:
            if target.objective is None:
                raise ConfigError(f"--step: {target.label} was trained with the CFM objective; --step probes "
                                  f"few-step (meanflow, splitmeanflow) checkpoints")
            objective = make_objective(target.objective.name, path, reduction)
        for direction in directions:
            gen = torch.Generator(device=sampler_device(target.sampler)).manual_seed(seed)
            res = gradient_variance(target.net, path, target.sampler, times, n_samples=samples, method=method,
                                    chunk_size=chunk_size, generator=gen, reduction=reduction, groups=groups,
                                    direction=direction, progress=progress, micro_batch_size=micro_batch_size,
                                    ghost_conv=ghost_conv, objective=objective, step=0.0 if step is None else step)
            label = target.label if len(directions) == 1 else f"{target.label} ({direction})"
            taken = {lab for lab, _ in profiles}
            if label in taken:
                label = next(f"{label} #{k}" for k in range(2, len(taken) + 2) if f"{label} #{k}" not in taken)
            profiles.append((label, res))
            docs.append({"label": label, **target.info, **res.to_dict()})
    doc = {"probe": "gradvar", "seed": seed, "profiles": docs}
    write_json(out / "gradvar.json", doc)
    plot_profiles(profiles, out / "gradvar.png", title=f"gradient variance ({method}, n = {samples})")
    return doc


def _parse_step(text: str | None) -> float | str | None:
    if text is None or text == "to_end":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"--step: {text!r} is neither a number >= 0 nor to_end")
    return value


def _check_gradvar_flags(args) -> None:
    """The flag values that the probe would only reject after loading checkpoints, checked first."""
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise ConfigError(f"--sigma must be a finite number >= 0, got {args.sigma}")
    if args.chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if args.samples < 2:
        raise ConfigError(f"--samples must be >= 2, got {args.samples}")
    if args.method == "microbatch" and (args.samples % args.micro_batch_size or
                                        args.samples // args.micro_batch_size < 2):
        raise ConfigError(f"--method microbatch needs --samples = K x --micro-batch-size with K >= 2 micro-batches; "
                          f"got --samples {args.samples}, --micro-batch-size {args.micro_batch_size}")
    try:
        parse_times(args.times)
    except ValueError as e:
        raise ConfigError(f"--times: {e}") from None
    _parse_step(args.step)


def run_gradvar(args) -> int:
    """``flowprobe probe gradvar``: profile the checkpoints, write the files, print where GV peaks."""
    device = resolve_device(args.device)
    directions = ("forward", "backward") if args.direction == "both" else (args.direction,)
    _check_gradvar_flags(args)
    targets = [load_probe_target(c, device, use_ema=not args.no_ema) for c in args.checkpoints]
    doc = probe_gradvar_cli(targets, args.out, times=args.times, samples=args.samples, method=args.method,
                            directions=directions, sigma=args.sigma, schedule=args.schedule,
                            chunk_size=args.chunk_size, micro_batch_size=args.micro_batch_size, groups=args.groups,
                            reduction=args.reduction, seed=args.seed, progress=not args.no_progress,
                            ghost_conv=args.ghost_conv, step=_parse_step(args.step))
    for p in doc["profiles"]:
        peak = max(p["rows"], key=lambda r: r["gv"] or 0.0)
        print(f"{p['label']}: GV peaks at t = {peak['t']:.3g} ({peak['gv']:.4g} +- {peak['gv_se']:.2g})")
    print(f"wrote {args.out}/gradvar.json and {args.out}/gradvar.png")
    return 0


def _register_gradvar(subparsers) -> None:
    p = subparsers.add_parser(
        "gradvar", help="gradient variance of the CFM loss versus t for trained checkpoints",
        description="Per-sample gradient variance tr Cov(grad l_i) of the CFM loss on a grid of times, for one or "
                    "more checkpoints (overlaid in one plot). Writes OUT/gradvar.json and OUT/gradvar.png.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="step_*.safetensors checkpoints (with their .json), checkpoint folders or run folders")
    p.add_argument("--times", default="0:1:21",
                   help=f"'a:b:K' (K points from a to b, clipped to [{ENDPOINT_MARGIN}, {1 - ENDPOINT_MARGIN}] and to "
                        "the path's range) or 'uniform:K' (K bins, per-sample t uniform in each); default 0:1:21")
    p.add_argument("--samples", type=int, default=256, help="samples per time (default 256)")
    p.add_argument("--method", default="exact", choices=ESTIMATORS, help="the estimator (default exact)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--direction", default="forward", choices=("forward", "backward", "both"),
                   help="backward swaps every pair (source <-> target); both overlays the two")
    p.add_argument("--sigma", type=float, default=None, help="override the checkpoint's path noise level")
    p.add_argument("--schedule", default=None, choices=("constant", "bridge"), help="override the noise schedule")
    p.add_argument("--chunk-size", type=int, default=64, help="samples per vmap / backward chunk (memory)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="micro-batch size m for --method microbatch")
    p.add_argument("--ghost-conv", default="auto", choices=CONV_RULES,
                   help="--method ghost: per-sample conv weight gradients by grouped convolution, im2col matmuls, "
                        "or the faster of the two per layer shape (auto, the default)")
    p.add_argument("--step", default=None, metavar="H|to_end",
                   help="few-step checkpoints (objective meanflow / splitmeanflow): probe their own loss at the step "
                        "h = min(H, 1 - t), or the jump to the end (to_end); default: the CFM loss (h = 0)")
    p.add_argument("--groups", default="layer", choices=("layer", "block", "all"), help="per-group breakdown")
    p.add_argument("--reduction", default="sum", choices=REDUCTIONS, help="loss over dimensions (default sum)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-ema", action="store_true", help="probe the raw weights even when an EMA copy exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_gradvar)


# --------------------------------------------------------------------------------------------------------------
# memorization


def run_memorization(args) -> int:
    """``flowprobe probe memorization``: integrate the pairs file's sources, write the metrics and histograms."""
    if args.steps < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 2):
        raise ConfigError("--steps and --batch-size must be >= 1 and --limit >= 2")
    device = resolve_device(args.device)
    net, ck = load_model(args.checkpoint, device, use_ema=not args.no_ema)
    pairs = load_pairs(args.pairs)
    shape = sample_shape(ck)
    if shape is not None and tuple(pairs.x0.shape[1:]) != shape:
        raise ConfigError(f"{args.pairs}: samples of shape {tuple(pairs.x0.shape[1:])}, but {ck.path.name} models "
                          f"samples of shape {shape}")
    if args.limit is not None:
        pairs, dropped = limit_pairs(pairs, args.limit)
        if dropped:
            print(f"note: --limit drops partners pointing beyond the first {args.limit}: {', '.join(dropped)}")
    metrics, outputs = evaluate_pairs(net, pairs, method=args.solver, steps=args.steps, batch_size=args.batch_size,
                                      device=device, precision=args.precision)
    out = Path(args.out)
    metrics.update({"checkpoint": str(ck.path), "checkpoint_step": ck.step, "pairs": str(args.pairs),
                    "ema": (not args.no_ema) and ck.has_ema})
    write_json(out / "memorization.json", metrics)
    plot_pairing_histograms(outputs, pairs.x1.to(outputs.device), pairs.partners, out / "memorization.png")
    for name in pairs.partners:
        print(f"{name:>10}: L2 {metrics[f'l2_{name}_mean']:.4g} +- {metrics[f'l2_{name}_std']:.4g}, "
              f"nn acc {metrics[f'nn_acc_{name}']:.3f} (chance {metrics['chance']:.2g})")
    print(f"wrote {out / 'memorization.json'} and {out / 'memorization.png'}")
    return 0


def _register_memorization(subparsers) -> None:
    p = subparsers.add_parser(
        "memorization", help="integrate the training sources of a pairs file; distance to each partner",
        description="Integrate every x0 of a pairs file with the checkpoint's model and report, for the assigned "
                    "partner (x1[i]) and every other partner index in the file (e.g. ot_index), the mean/std L2 "
                    "distance and the nearest-target accuracy (chance 1/N). Writes memorization.json and "
                    "memorization.png into --out.")
    p.add_argument("checkpoint", help="checkpoint .safetensors file (with its .json) or run folder")
    p.add_argument("--pairs", required=True, help="pairs .safetensors file (tensors x0, x1, optional ot_index)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--solver", default="euler", choices=METHODS)
    p.add_argument("--steps", type=int, default=100, help="solver steps (default 100)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if an EMA copy exists")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=run_memorization)
