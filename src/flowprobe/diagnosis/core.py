"""``diagnose``: run the checks on a velocity net and its data, and judge.

The net is ``net(t, x)`` from the source (t = 0) to the data (t = 1). Data are float tensors in the net's space
(images: N x C x H x W in [-1, 1]). Which checks run depends on what is given:

| check | needs | role |
|---|---|---|
| copies | training samples (baseline: held-out samples, else a split of the training set) | decisive |
| membership | training and held-out samples | supporting |
| gradvar | training and held-out samples, a net with trainable parameters | supporting |
| pairing | a pairs file (paired training) | decisive |
| map | a pairs file of a deterministic map and held-out pairs of the same map | decisive |
| transport | nothing more | informational |

Held-out pairs (``heldout_pairs``, pairs (x0', G(x0')) of the map the training pairs come from, such as a reflow
round's): their targets are the held-out samples, and the membership and gradient-variance checks pair each one with
its own source rather than a fresh draw (a net that learned the map would otherwise look like one that memorised it).
The map check replaces the pairing check's vote there: reproducing the partners is what such a net is trained to do,
so pairing does not vote (its evidence is kept).

A check that cannot run says why in the result (``Diagnosis.not_run()``). Progress goes to
``progress(stage, done, total)``; the wall time of every stage is in ``Diagnosis.timings``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..couplings import GaussianSampler
from ..paths import LinearPath, ProbabilityPath
from ..probes.consistency import parse_solver
from ..probes.gradvar import PER_SAMPLE_ERRORS
from ..probes.memorization import PairSet
from ..seeds import seeded_generator
from ..solvers import push_forward
from .copies import copies_check, split_baseline
from .membership import gradvar_check, membership_check
from .result import CheckResult, Diagnosis
from .stats import rms_norm
from .transport import map_check, pairing_check, transport_check
from .verdict import (DECISIVE, FAR_FROM_DATA_FACTOR, INFORMATIONAL, MAP_LEARNED_SHARE, SUPPORTING, decide,
                      thresholds)

__all__ = ["diagnose", "DiagnoseOptions", "CHECKS"]

#: The checks, in the order they run.
CHECKS = ("copies", "membership", "gradvar", "pairing", "map", "transport")

Progress = Callable[[str, int, int], None]


@dataclass
class DiagnoseOptions:
    """How much work each check does. ``n_generate``: samples drawn from the model for the copies check (and the
    size of the held-out baseline used); ``solver`` / ``steps``: the ODE solver that draws them (and integrates
    the training sources of a pairs file); ``membership_*`` and ``gradvar_*``: samples per group, time grids and
    repeats; ``gradvar_method``: an estimator of :mod:`flowprobe.probes.gradvar` or "auto" (ghost, exact if
    ghost fails); ``pairs_max``: pairs integrated; ``transport_*``: sources integrated and the two
    fixed-step solvers compared (straightness along the second); ``checks``: which checks to run; ``seed``: every
    random draw derives from it; ``mirror``: whether the copies check counts a training image and its left-right
    mirror as one item ("on", "off", or "auto": on for images (N, C, H, W), which are usually trained with random
    flips, off for vectors)."""

    n_generate: int = 1000
    solver: str = "euler"
    steps: int = 100
    batch_size: int = 500
    membership_samples: int = 512
    membership_times: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    membership_repeats: int = 1
    gradvar_samples: int = 128
    gradvar_times: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    gradvar_method: str = "auto"
    pairs_max: int = 1000
    transport_samples: int = 128
    transport_solvers: Sequence[str] = ("rk4:8", "rk4:32")
    checks: Sequence[str] = CHECKS
    seed: int = 0
    mirror: str = "auto"

    def __post_init__(self):
        unknown = sorted(set(self.checks) - set(CHECKS))
        if unknown:
            raise ValueError(f"checks: unknown {unknown}; choose from {', '.join(CHECKS)}")
        for name in ("n_generate", "steps", "batch_size", "membership_samples", "membership_repeats",
                     "gradvar_samples", "pairs_max", "transport_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for spec in self.transport_solvers:
            method, _ = parse_solver(spec)
            if method == "dopri5":
                raise ValueError(f"transport_solvers: {spec!r}: give fixed-step solvers (euler, midpoint, heun, rk4)")
        if self.mirror not in ("auto", "on", "off"):
            raise ValueError(f"mirror must be auto, on or off, got {self.mirror!r}")
        if len(self.transport_solvers) != 2:
            raise ValueError(f"transport_solvers: give two solvers, got {list(self.transport_solvers)}")
        for name in ("membership_times", "gradvar_times"):
            ts = [float(t) for t in getattr(self, name)]
            if not ts or not all(0 <= t <= 1 for t in ts):
                raise ValueError(f"{name} must be a non-empty list of times in [0, 1], got {ts}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class _Run:
    """The state of one diagnosis: timings and progress."""

    progress: Progress | None
    timings: dict = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        if self.progress is not None:
            self.progress(name, 0, 1)
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            if self.progress is not None:
                self.progress(name, 1, 1)


def _generator(seed: int, stream: int, device) -> torch.Generator:
    """Stream ``stream`` of ``seed`` (:func:`flowprobe.seeds.seeded_generator`): 1 sampling, 2 the copy
    baseline, 3 membership, 4 transport."""
    return seeded_generator(seed, stream, device)


def diagnose(net, train: Tensor | None = None, heldout: Tensor | None = None, *, pairs: PairSet | None = None,
             heldout_pairs: PairSet | None = None,
             path: ProbabilityPath | None = None, source=None, features: Callable[[Tensor], Tensor] | None = None,
             options: DiagnoseOptions | None = None, progress: Progress | None = None, device=None,
             model_info: dict | None = None, data_info: dict | None = None) -> Diagnosis:
    """Judge whether ``net`` memorises its training data.

    ``train``: the training samples (N, ...) (with ``pairs`` and no ``train``, the pairs' targets); ``heldout``:
    real samples from the same distribution the net never saw; ``pairs``: the training pairs of a paired run;
    ``heldout_pairs``: held-out pairs of the map the training ``pairs`` come from (instead of ``heldout``; module
    docstring); ``path``: the path the net was trained on (default linear); ``source``: a sampler of the source (default
    N(0, I) of the sample shape); ``features``: an optional feature map for a second copies check. Tensors are
    moved to ``device`` (default: the net's). Returns a :class:`~flowprobe.diagnosis.result.Diagnosis`.
    """
    options = options or DiagnoseOptions()
    path = path or LinearPath()
    if device is None:
        p = next(iter(net.parameters()), None) if hasattr(net, "parameters") else None
        b = next(iter(net.buffers()), None) if hasattr(net, "buffers") else None
        device = (p if p is not None else b).device if (p is not None or b is not None) else torch.device("cpu")
    device = torch.device(device)
    if train is None and pairs is None:
        raise ValueError("diagnose needs training samples (train) or training pairs (pairs)")
    if heldout_pairs is not None:
        if pairs is None or heldout is not None:
            raise ValueError("heldout_pairs needs the training pairs (pairs) and replaces heldout: give one of them")
        if heldout_pairs.x0.shape[0] < 2:
            raise ValueError(f"heldout_pairs: need at least 2 held-out pairs, got {heldout_pairs.x0.shape[0]}")
        if heldout_pairs.x0.shape[1:] != pairs.x0.shape[1:]:
            raise ValueError(f"held-out pairs have shape {tuple(heldout_pairs.x0.shape[1:])}, the training pairs "
                             f"{tuple(pairs.x0.shape[1:])}")
        heldout_pairs = PairSet(heldout_pairs.x0.to(device, torch.float32), heldout_pairs.x1.to(device, torch.float32),
                                {}, heldout_pairs.metadata)
        heldout = heldout_pairs.x1
    if pairs is not None:
        partners = {"assigned": torch.arange(pairs.x0.shape[0]), **pairs.partners}  # x0[i] is paired with x1[i]
        pairs = PairSet(pairs.x0.to(device), pairs.x1.to(device), {k: v.to(device) for k, v in partners.items()},
                        pairs.metadata)
    train = (pairs.x1 if train is None else train).to(device, torch.float32)
    heldout = None if heldout is None else heldout.to(device, torch.float32)
    if heldout is not None and heldout.shape[1:] != train.shape[1:]:
        raise ValueError(f"held-out samples have shape {tuple(heldout.shape[1:])}, training samples "
                         f"{tuple(train.shape[1:])}")
    shape = tuple(train.shape[1:])
    source = source or GaussianSampler(shape, device=device)
    run = _Run(progress)
    checks: dict[str, CheckResult] = {}
    artifacts: dict = {}
    if hasattr(net, "eval"):
        net.eval()
    wanted = set(options.checks)
    _copies(net, train, heldout, source, features, options, run, checks, artifacts, device, wanted)
    _membership(net, path, source, train, heldout, pairs, heldout_pairs, options, run, checks, device, wanted)
    _pairing_and_map(net, pairs, heldout_pairs, options, run, checks, artifacts, device, wanted)
    _transport(net, train, source, options, run, checks, device, wanted)
    settings = {**options.to_dict(), "path": path.describe() if hasattr(path, "describe") else str(path),
                "device": str(device), "thresholds": thresholds(),
                "source": source.describe() if hasattr(source, "describe") else type(source).__name__}
    data = {"train_samples": int(train.shape[0]), "heldout_samples": None if heldout is None else int(heldout.shape[0]),
            "pairs": None if pairs is None else int(pairs.x0.shape[0]),
            "heldout_pairs": None if heldout_pairs is None else int(heldout_pairs.x0.shape[0]),
            "sample_shape": list(shape),
            **(data_info or {})}
    ordered = {name: checks[name] for name in CHECKS if name in checks}
    return Diagnosis(decide(list(ordered.values())), ordered, dict(model_info or {}), data, settings,
                     {k: round(v, 4) for k, v in run.timings.items()}, _warnings(ordered), artifacts)


def _warnings(checks: dict[str, CheckResult]) -> list[str]:
    """Lines worth reading beside the verdict: non-finite samples, samples far from the data."""
    out = []
    copies = checks.get("copies")
    if copies is not None and copies.ran:
        ev = copies.evidence
        if ev.get("non_finite"):
            out.append(f"{ev['non_finite']} generated samples are not finite (left out of the copies check)")
        gen_d, ref_d = ev.get("nn_distance_median"), ev.get("reference_nn_distance_median")
        if gen_d is not None and ref_d and gen_d > FAR_FROM_DATA_FACTOR * ref_d:
            out.append(f"generated samples lie far from the data (median nearest-training distance {gen_d:.3g}, "
                       f"{gen_d / ref_d:.1f}x that of real samples): the model may be undertrained or mis-specified "
                       f"(path, source, data scaling); 'generalises' would only mean 'does not copy'")
    mapped = checks.get("map")
    if mapped is not None and mapped.ran and mapped.evidence["landed_heldout"] < MAP_LEARNED_SHARE:
        out.append(f"only {mapped.evidence['landed_heldout']:.1%} of the held-out sources of the map land on their "
                   f"partners (under {MAP_LEARNED_SHARE:.0%}): the net has not learned the map"
                   + ("" if mapped.vote == "memorises" else "; the map check's 'generalises' only means it does not "
                      "reproduce its training pairs better than new ones"))
    transport = checks.get("transport")
    if transport is not None and transport.ran and transport.evidence.get("non_finite_end_points"):
        out.append(f"{transport.evidence['non_finite_end_points']} transport end points are not finite")
    return out


def _copies(net, train, heldout, source, features, options, run, checks, artifacts, device, wanted) -> None:
    if "copies" not in wanted:
        checks["copies"] = CheckResult.skipped("copies", DECISIVE, "not requested")
        return
    with run.stage("sampling"):
        x0, _ = source.sample(options.n_generate, _generator(options.seed, 1, device))
        generated = push_forward(net, x0.to(device, torch.float32), method=options.solver, steps=options.steps,
                                 batch_size=options.batch_size,
                                 progress=None if run.progress is None else lambda d, n: run.progress("sampling", d, n))
    with run.stage("nearest neighbours"):
        if heldout is not None:
            pick = torch.randperm(heldout.shape[0], generator=_generator(options.seed, 2, device), device=device)
            reference, pool, baseline = heldout[pick[:options.n_generate]], None, "held-out"
        elif train.shape[0] >= 4:
            pool, reference = split_baseline(train, _generator(options.seed, 2, device), options.n_generate)
            baseline = "training-split"
        else:
            checks["copies"] = CheckResult.skipped("copies", DECISIVE, "no held-out samples and fewer than 4 "
                                                   "training samples to split for a baseline")
            return
        mirror = options.mirror == "on" or (options.mirror == "auto" and train.dim() == 4)
        check, arrays = copies_check(generated, train, reference, baseline, features=features, pool=pool,
                                     mirror=mirror)
    if baseline == "training-split":
        check.evidence["note"] = ("no held-out set: the baseline is one half of the training set measured against "
                                  "the other half")
    checks["copies"] = check
    artifacts.update({"generated": generated.cpu(), "copies": arrays, "train": train.cpu(),
                      "heldout": reference.cpu()})


def _membership(net, path, source, train, heldout, pairs, heldout_pairs, options, run, checks, device,
                wanted) -> None:
    no_heldout = "needs held-out samples (--heldout): the training samples alone have nothing to be compared with"
    train_sources = None if pairs is None else pairs.x0.to(device, torch.float32)
    held_sources = None if heldout_pairs is None else heldout_pairs.x0
    x1 = train if pairs is None else pairs.x1.to(device, torch.float32)
    for name in ("membership", "gradvar"):
        if name not in wanted:
            checks[name] = CheckResult.skipped(name, SUPPORTING, "not requested")
        elif heldout is None:
            checks[name] = CheckResult.skipped(name, SUPPORTING, no_heldout)
    if "membership" not in checks:
        with run.stage("membership"):
            checks["membership"] = membership_check(
                net, path, source, x1, heldout, train_sources=train_sources, times=options.membership_times,
                n_max=options.membership_samples, repeats=options.membership_repeats,
                generator=_generator(options.seed, 3, device), batch_size=options.batch_size, progress=run.progress,
                heldout_sources=held_sources)
    if "gradvar" not in checks:
        with run.stage("gradient variance"):
            try:
                checks["gradvar"] = gradvar_check(net, path, source, x1, heldout, train_sources=train_sources,
                                                  times=options.gradvar_times, n_samples=options.gradvar_samples,
                                                  method=options.gradvar_method, seed=options.seed,
                                                  heldout_sources=held_sources)
            except PER_SAMPLE_ERRORS as e:  # a net torch.func cannot map
                first = (str(e).strip().splitlines() or [""])[0]
                checks["gradvar"] = CheckResult.skipped("gradvar", SUPPORTING, f"per-sample gradients failed: "
                                                        f"{type(e).__name__}: {first}")


def _pairing_and_map(net, pairs, heldout_pairs, options, run, checks, artifacts, device, wanted) -> None:
    solver = {"method": options.solver, "steps": options.steps, "batch_size": options.batch_size, "device": device}
    if "pairing" not in wanted:
        checks["pairing"] = CheckResult.skipped("pairing", DECISIVE, "not requested")
    elif pairs is None:
        checks["pairing"] = CheckResult.skipped("pairing", DECISIVE, "needs a pairs file (--pairs; paired training)")
    else:
        with run.stage("pairing"):
            checks["pairing"], endpoints, used = pairing_check(net, pairs, n_max=options.pairs_max, **solver)
        artifacts["pairing"] = {"endpoints": endpoints.cpu(), "targets": used.x1.cpu(),
                                "partners": {k: v.cpu() for k, v in used.partners.items()}}
        if heldout_pairs is not None:  # pairs of a map: reproducing the partners is the job, the map check votes
            c = checks["pairing"]
            checks["pairing"] = CheckResult("pairing", INFORMATIONAL, True, None, c.summary, "does not vote: the pairs "
                                            "come from a map, whose partners the net is meant to reproduce (the map "
                                            "check votes)", c.evidence, c.thresholds)
    if "map" not in wanted:
        checks["map"] = CheckResult.skipped("map", DECISIVE, "not requested")
    elif pairs is None or heldout_pairs is None:
        checks["map"] = CheckResult.skipped("map", DECISIVE, "needs training pairs of a deterministic map and held-out "
                                            "pairs of the same map (--heldout PAIRS_FILE)")
    else:
        with run.stage("map"):
            checks["map"], artifacts["map"] = map_check(net, pairs, heldout_pairs, n_max=options.pairs_max, **solver)


def _transport(net, train, source, options, run, checks, device, wanted) -> None:
    if "transport" not in wanted:
        checks["transport"] = CheckResult.skipped("transport", INFORMATIONAL, "not requested")
        return
    with run.stage("transport"):
        x0, _ = source.sample(options.transport_samples, _generator(options.seed, 4, device))
        checks["transport"] = transport_check(net, x0.to(device, torch.float32), rms_norm(train),
                                              solvers=tuple(options.transport_solvers))
