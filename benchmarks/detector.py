"""How well does the memorisation watch's detector predict memorisation, and how early? A labelled suite of CPU runs.

    python benchmarks/detector.py run [--seeds 0,1] [--dims 2] [--archs mlp] [--out benchmarks/detector_runs.jsonl]
                                      [--workers 1]
    python benchmarks/detector.py report [--runs benchmarks/detector_runs.jsonl] [--figures docs/figures]

The suite: 2-D Gaussian mixtures (8 components on a circle of radius 3, std 0.3), a 3 x 128 MLP trained with
:func:`flowprobe.train.fit` under a :class:`flowprobe.watch.MemorizationWatch` (the shipped detector, readings every
steps / 16, copy check every second reading), varied over

- training-set size N in {8, 16, 24, 32, 128, 1024} (16 and 24: near where copying starts),
- coupling: ``independent`` (fresh source draws against the N training targets), ``paired`` (N fixed pairs), or
  ``reflow`` (N pairs (x0, G(x0)) of a teacher flow's map G, :func:`reflow_teacher`; the watch compares them with
  held-out pairs of the same map, and the label reads copies and the map check: reproducing the partners is what
  reflow asks, reproducing them only for the training sources is not),
- path noise sigma in {0, 0.1} (constant sigma),
- length: 600 or 2000 steps,
- data: the mixture in d = 2 (``--dims 2``), embedded in d = 16 (``--dims 16``), or CelebA faces at 8x8 (``--dims 192``:
  192 values per image, the same MLP on the flattened image; with ``--archs unet`` a tiny UNet on the 3 x 8 x 8 images),

and the seeds given (seed 0 is the tune half: the detector's score is chosen, fitted and thresholded on it alone;
seed 1 the report half; seed 2 the fresh half of the two-signal score (membership and gradient variance), read after
that score was fixed and before the four-input score (with the copy closeness and the pairing excess) was designed;
seeds 4 and 5 the fresh halves of the four-input score, run after its constants were committed (seed 5 after seed 4
was read); seeds 8 and 9 the fresh halves of the flag's thresholds per kind of training (independent, paired; chosen on
the tune half's runs of each kind, committed before seeds 8 and 9 were run); the UNet runs, seed 3, seed 6, settings
outside the grid (the mixture in d = 64, path noise sigma = 1), and seed 7, reflow pairs, are reported apart).

Labels come from the END of training and from the diagnosis' decisive checks only, never from the watch: a run
memorises when :func:`flowprobe.diagnosis.copies.copies_check` on 512 generated samples (RK4, 32 steps) against 512
fresh samples of the mixture finds an excess copy fraction whose interval lies above COPY_EXCESS_MARGIN, or (paired
runs) when :func:`flowprobe.diagnosis.transport.pairing_check` votes memorises (the training-partner recall on the
contested pairs exceeds chance by more than PAIRING_EXCESS_MARGIN, with its interval), or, where there are too few
contested pairs for the vote (N < 30), when the recall exceeds chance by that margin and an exact one-sided binomial
test against chance gives p < 0.025 (the pairs are the whole training set, so their recall is a fact, not an
estimate), or (reflow runs) when :func:`flowprobe.diagnosis.transport.map_check` votes memorises: its 512 held-out
pairs of the map are the label's copy reference and their sources, every training pair is integrated, and the share
of training sources that land within MAP_TOLERANCE of their partner is compared with the held-out share (Newcombe's
interval; with fewer than 30 training pairs, Fisher's exact one-sided test at 2.5% and the excess above the margin).
(This part of the label was declared after the reflow runs' watch readings had been read, and before the map check
was computed on any of them; its first version took the training share as exact, which a review showed to
false-alarm on small training sets, and was replaced by the rule above before the runs were relabelled.)

``report`` refits the score on the tune half (SCORE_CANDIDATES, fit_score, choose_threshold) and says whether the
shipped constants are the refitted ones, then prints per half the ROC AUC at 25 / 50 / 100% of training of the
score (largest reading score so far), of its flag (fired or not) and of each signal alone (latest reading: max_t
membership AUC; -log GV ratio; copy excess; copy closeness; pairing excess), the old rules and the two-signal score
replayed, the steps at which the detector fired
against the step at which the watch's own copy check first saw copies, and draws the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import warnings
from pathlib import Path

import torch

from scipy.stats import binom

from flowprobe.couplings import FixedPairs, GaussianSampler, IndependentCoupling, TensorSampler
from flowprobe.diagnosis.copies import copies_check
from flowprobe.diagnosis.stats import auc
from flowprobe.diagnosis.transport import map_check, pairing_check
from flowprobe.diagnosis.verdict import PAIRING_EXCESS_MARGIN
from flowprobe.nets import MLP
from flowprobe.nets.unet import UNet
from flowprobe.objectives import CFMObjective
from flowprobe.paths import make_path
from flowprobe.probes.memorization import PairSet
from flowprobe.solvers import push_forward
from flowprobe.train import fit
from flowprobe.watch import (WATCH_COPY_EXCESS, WATCH_SCORE_THRESHOLD, WATCH_SCORE_THRESHOLDS,
                             WATCH_SCORE_THRESHOLD_MEMBERSHIP, WATCH_SCORE_WEIGHTS, WATCH_SCORE_WEIGHTS_MEMBERSHIP,
                             MemorizationWatch, WatchReading, detect, score_terms)

SIZES = (8, 16, 24, 32, 128, 1024)
COUPLINGS = ("independent", "paired")
SIGMAS = (0.0, 0.1)
LENGTHS = (600, 2000)
FRACTIONS = (0.25, 0.5, 1.0)


def mixture(n: int, generator: torch.Generator, dim: int = 2) -> torch.Tensor:
    """n samples of 8 Gaussians (std 0.3 in every direction) centred on the circle of radius 3 in the first two
    coordinates of R^dim."""
    k = torch.randint(8, (n,), generator=generator)
    angle = 2 * math.pi * k.double() / 8
    centres = torch.zeros(n, dim)
    centres[:, :2] = 3 * torch.stack([angle.cos(), angle.sin()], 1).float()
    return centres + 0.3 * torch.randn(n, dim, generator=generator)


#: the UNet of the image runs with --archs unet (16 channels, two levels, no attention; 0.18M parameters)
UNET_8X8 = dict(image_size=8, in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(), dropout=0.0, num_heads=1, num_head_channels=None, num_groups=8)
#: CelebA 8x8 (RGB, flattened to 192 values in [-1, 1]): the first images train, the next IMAGE_POOL are held out by
#: the watch, the next IMAGE_POOL are the label's copy reference (the image part needs ../shared/data or
#: $FLOWPROBE_DATA)
IMAGE_DIM, IMAGE_POOL = 192, 512
_IMAGES: dict = {}


def celeba8(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, held-out, label reference) from CelebA at 8x8, flattened."""
    from flowprobe.data.image_files import load_images
    from flowprobe.data.images import to_tensor, to_unit

    if "x" not in _IMAGES:
        data = load_images("celeba", resolution=8, limit=max(SIZES) + 2 * IMAGE_POOL)
        _IMAGES["x"] = to_unit(to_tensor(data.images)).flatten(1)
    x = _IMAGES["x"]
    return x[:n], x[-2 * IMAGE_POOL:-IMAGE_POOL], x[-IMAGE_POOL:]


def label(net, train, x0_pairs, seed: int, reference: torch.Tensor | None = None,
          map_pairs: tuple | None = None) -> dict:
    """Ground truth at the end of training from the decisive diagnosis checks (module docstring); ``map_pairs``:
    (training sources, held-out sources) of a reflow run, whose held-out targets are ``reference``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    dim = train.shape[1]
    reference = mixture(512, g, dim) if reference is None else reference
    x0 = torch.randn(512, *train.shape[1:], generator=g)
    generated = push_forward(net, x0, method="rk4", steps=32)
    copies, _ = copies_check(generated, train, reference, "held-out")
    out = {"copy_excess": copies.evidence["excess"], "copy_excess_lower": copies.evidence["excess_interval"][0],
           "copy_vote": copies.vote}
    memorises = copies.vote == "memorises"
    if x0_pairs is not None:
        n = train.shape[0]
        check, _, _ = pairing_check(net, PairSet(x0_pairs, train, {"assigned": torch.arange(n)}), method="rk4",
                                    steps=32)
        ev = check.evidence
        m, rec, chance = ev["n_contested"], ev["recall_assigned"], ev["chance"]
        k = round(rec * m)
        # the training pairs are the whole population, so the recall is not an estimate: the label asks for the
        # vote's excess over chance and, for the few-pair runs the vote needs more pairs for, an exact one-sided
        # binomial test against chance at the level of the vote's interval (2.5%)
        p_value = float(binom.sf(k - 1, m, chance)) if m else 1.0
        reproduced = m > 0 and rec - chance > PAIRING_EXCESS_MARGIN and p_value < 0.025
        out.update({"pairing_recall": rec, "pairing_recall_ot": ev["recall_ot"], "pairing_contested": m,
                    "pairing_chance": chance, "pairing_p_value": p_value, "pairing_vote": check.vote})
        memorises = memorises or check.vote == "memorises" or reproduced
    if map_pairs is not None:  # every training pair is integrated (map_check)
        n = train.shape[0]
        check, _ = map_check(net, PairSet(map_pairs[0], train, {}), PairSet(map_pairs[1], reference, {}),
                             n_max=max(n, reference.shape[0]), method="rk4", steps=32)
        ev = check.evidence
        out.update({"map_landed_train": ev["landed_train"], "map_landed_heldout": ev["landed_heldout"],
                    "map_excess_lower": ev["excess_interval"][0], "map_vote": check.vote})
        memorises = memorises or check.vote == "memorises"
    out["memorises"] = bool(memorises)
    return out


def reflow_teacher(dim: int, seed: int):
    """The flow whose map G gives the reflow pairs (x0, G(x0)): the 3 x 128 MLP trained 2000 steps on 4096 samples of
    the mixture with an independent coupling (a generalising flow), and G = its RK4 push-forward (32 steps)."""
    g = torch.Generator().manual_seed(50_000 + seed)
    pool = mixture(4096, g, dim)
    torch.manual_seed(50_000 + seed)
    teacher = MLP(dim, width=128, depth=3)
    fit(teacher, IndependentCoupling(GaussianSampler((dim,)), TensorSampler(pool)), CFMObjective(make_path(0.0)),
        steps=2000, batch_size=256, lr=2e-3, seed=50_000 + seed)
    return lambda x0: push_forward(teacher, x0, method="rk4", steps=32).detach()


def one_run(cfg: dict) -> dict:
    torch.set_num_threads(1)
    n, coupling_kind, sigma, steps, seed = cfg["n"], cfg["coupling"], cfg["sigma"], cfg["steps"], cfg["seed"]
    dim = cfg.get("dim", 2)
    g = torch.Generator().manual_seed(seed * 1_000_003 + n + (0 if dim == 2 else 7919 * dim))
    reference, arch, heldout_sources = None, cfg.get("arch", "mlp"), None
    if coupling_kind == "reflow":  # pairs of the teacher's map; held out: pairs of the same map; label: copies only
        teacher = reflow_teacher(dim, seed)
        x0_pairs, heldout_sources, x0_ref = (torch.randn(k, dim, generator=g) for k in (n, 512, 512))
        train, heldout, reference = teacher(x0_pairs), teacher(heldout_sources), teacher(x0_ref)
    elif dim == IMAGE_DIM:
        train, heldout, reference = celeba8(n)
        if arch == "unet":  # the images as images, (3, 8, 8)
            train, heldout, reference = (x.reshape(-1, 3, 8, 8) for x in (train, heldout, reference))
    else:
        train, heldout = mixture(n, g, dim), mixture(512, g, dim)
    shape = tuple(train.shape[1:])
    if coupling_kind != "reflow":
        x0_pairs = torch.randn(n, *shape, generator=g) if coupling_kind == "paired" else None
    coupling = (FixedPairs(x0_pairs, train) if x0_pairs is not None
                else IndependentCoupling(GaussianSampler(shape), TensorSampler(train)))
    torch.manual_seed(seed)
    net = MLP(dim, width=128, depth=3) if arch == "mlp" else UNet(**UNET_8X8)
    path = make_path(sigma)
    every = steps // 16
    watch = MemorizationWatch(train, heldout, path, every=every, copy_every=2 * every, train_sources=x0_pairs,
                              heldout_sources=heldout_sources, seed=seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(net, coupling, CFMObjective(path), steps=steps, batch_size=min(64, 4 * n), lr=2e-3, seed=seed,
            hooks=[watch])
    seconds = time.perf_counter() - t0
    return {**cfg, "seconds": seconds, "fired_at": watch.fired_at, "detector": SHIPPED,
            "label": label(net, train, None if coupling_kind == "reflow" else x0_pairs, seed, reference,
                           (x0_pairs, x0_ref) if coupling_kind == "reflow" else None),
            "readings": [r.to_dict() for r in watch.readings]}


KEYS = ("n", "coupling", "sigma", "steps", "seed", "dim", "arch")
DEFAULTS = {"dim": 2, "arch": "mlp"}


def configs(seeds, sizes=SIZES, couplings=COUPLINGS, sigmas=SIGMAS, lengths=LENGTHS, dims=(2,),
            archs=("mlp",)) -> list[dict]:
    return [{"n": n, "coupling": c, "sigma": s, "steps": k, "seed": seed, "dim": d, "arch": a}
            for seed, d, a, n, c, s, k in itertools.product(seeds, dims, archs, sizes, couplings, sigmas, lengths)
            if a == "mlp" or d == IMAGE_DIM]


def run_key(r: dict) -> str:
    return json.dumps({k: r.get(k, DEFAULTS.get(k)) for k in KEYS}, sort_keys=True)


def run(args) -> None:
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {run_key(r) for r in map(json.loads, out.read_text().splitlines())}
    grid = configs([int(s) for s in args.seeds.split(",")], [int(v) for v in args.sizes.split(",")],
                   args.couplings.split(","), [float(v) for v in args.sigmas.split(",")],
                   [int(v) for v in args.lengths.split(",")], [int(v) for v in args.dims.split(",")],
                   args.archs.split(","))
    todo = [c for c in grid if run_key(c) not in done]
    print(f"{len(todo)} runs to do ({len(done)} done)")
    start = time.perf_counter()
    if args.workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.imap_unordered(one_run, todo)
            for r in results:
                write(out, r, start)
    else:
        for c in todo:
            write(out, one_run(c), start)


def write(out: Path, r: dict, start: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(r) + "\n")
    print(f"[{time.perf_counter() - start:6.0f}s] {r.get('arch', 'mlp')} d={r.get('dim', 2):2d} n={r['n']:5d} "
          f"{r['coupling']:11s} sigma={r['sigma']:.2g} "
          f"steps={r['steps']:5d} seed={r['seed']} memorises={r['label']['memorises']} fired_at={r['fired_at']} "
          f"({r['seconds']:.1f}s)", flush=True)


# ------------------------------------------------------------------------------------------------ report


def latest(readings: list, step: float, key: str):
    vals = [r[key] for r in readings if r["step"] <= step and r.get(key) is not None]
    return vals[-1] if vals else None


def reading_of(x: dict) -> WatchReading:
    """A stored reading as the watch's WatchReading (to replay the detector on it)."""
    return WatchReading(**{k: v for k, v in x.items() if k in WatchReading.__dataclass_fields__})


_JUDGED: dict = {}


def judged(r: dict, constants: dict | None = None) -> list[WatchReading]:
    """Run ``r``'s stored readings judged in order by the detector with ``constants`` (keyword arguments of
    flowprobe.watch.detect; default: the shipped ones), each carrying the score inputs of the one before, as the
    watch does: its own judgement, replayed (``.inputs``, ``.score``, ``.signals``). Kept per run object and
    constants (the report asks for the same replay once per signal and fraction); the cache holds ``r`` itself, so
    its id is not reused while the entry lives."""
    key = (id(r), repr(sorted((constants or {}).items())))
    hit = _JUDGED.get(key)
    if hit is not None and hit[0] is r:
        return hit[1]
    out, previous, kwargs = [reading_of(x) for x in r["readings"]], None, detect_constants(r, constants)
    for x in out:
        detect(x, previous, **kwargs)
        previous = x.inputs
    _JUDGED[key] = (r, out)
    return out


def replay(r: dict, constants: dict | None = None) -> tuple[list, list, list]:
    """(score, copies held, fired) of each stored reading of run ``r`` (:func:`judged`)."""
    out = judged(r, constants)
    return [x.score for x in out], ["copies" in x.signals for x in out], [bool(x.signals) for x in out]


def fired_at(r: dict, constants: dict | None = None) -> int | None:
    """The step at which the detector first fires on run ``r``'s stored readings, with the shipped constants or those
    given, or None."""
    _, _, fired = replay(r, constants)
    return first_fired(r, fired)


def first_fired(r: dict, fired: list) -> int | None:
    return next((x["step"] for x, f in zip(r["readings"], fired) if f), None)


def signals_at(r: dict, fraction: float, constants: dict | None = None) -> dict:
    """At this fraction of training: the detector (the shipped one, or with ``constants``) fired or not, its score
    (the largest reading's score so far: the detector fires once any reading's score reaches the threshold), and the
    latest continuous signals."""
    step = fraction * r["steps"]
    gv = latest(r["readings"], step, "gradvar_ratio")
    scores, _, fired = replay(r, constants)
    so_far = [s for x, s in zip(r["readings"], scores) if x["step"] <= step and math.isfinite(s)]
    at = first_fired(r, fired)
    return {"fired": float(at is not None and at <= step), "score": max(so_far) if so_far else None,
            "membership": latest(r["readings"], step, "auc"),
            "gradvar": -math.log(gv) if gv and gv > 0 else None,
            "copies": latest(r["readings"], step, "copy_excess"),
            "closeness": latest(r["readings"], step, "copy_closeness"),
            "pairing": latest(r["readings"], step, "pairing_excess")}


def roc_auc(runs: list, fraction: float, signal: str, constants: dict | None = None) -> tuple[float, int]:
    pos = [signals_at(r, fraction, constants)[signal] for r in runs if r["label"]["memorises"]]
    neg = [signals_at(r, fraction, constants)[signal] for r in runs if not r["label"]["memorises"]]
    pos, neg = [v for v in pos if v is not None], [v for v in neg if v is not None]
    if not pos or not neg:
        return float("nan"), 0
    return auc(torch.tensor(pos), torch.tensor(neg))[0], len(pos) + len(neg)


def roc_curve(runs: list, fraction: float, signal: str):
    pts = [(signals_at(r, fraction)[signal], r["label"]["memorises"]) for r in runs]
    pts = [(v, y) for v, y in pts if v is not None]
    n_pos, n_neg = sum(y for _, y in pts), sum(not y for _, y in pts)
    fpr, tpr = [0.0], [0.0]
    for thr in sorted({v for v, _ in pts}, reverse=True):
        tpr.append(sum(y and v >= thr for v, y in pts) / max(n_pos, 1))
        fpr.append(sum((not y) and v >= thr for v, y in pts) / max(n_neg, 1))
    return fpr + [1.0], tpr + [1.0]


# ---------------------------------------------------------------- choosing the score (tune half only)

#: the candidate scores: which of the score's inputs (flowprobe.watch.score_inputs) enter the logistic regression
#: (weights of the others are 0); the last two read the sampled checks as well (session 8: copy closeness, pairing)
SCORE_CANDIDATES = {"membership and gradient variance": ("auc", "gradvar"), "gradient variance": ("gradvar",),
                    "membership": ("auc",),
                    "membership, gradient variance, copy closeness and pairing": ("auc", "gradvar", "closeness",
                                                                                   "pairing"),
                    "gradient variance, copy closeness and pairing": ("gradvar", "closeness", "pairing")}
#: the score's inputs in the order of flowprobe.watch.WATCH_SCORE_WEIGHTS (after the intercept)
INPUTS = ("auc", "gradvar", "closeness", "pairing")
#: L2 penalty on the standardised weights of the logistic regression (keeps a separable tune half finite)
L2 = 0.01
#: the detector's constants as flowprobe.watch ships them
SHIPPED = {"weights": WATCH_SCORE_WEIGHTS, "weights_membership": WATCH_SCORE_WEIGHTS_MEMBERSHIP,
           "threshold": WATCH_SCORE_THRESHOLD, "threshold_membership": WATCH_SCORE_THRESHOLD_MEMBERSHIP}
#: the watch with ``early=True``: the thresholds per kind of training (the default while seeds 8 and 9 were run)
EARLY = {**SHIPPED, "thresholds_by_kind": dict(WATCH_SCORE_THRESHOLDS)}
#: the watch's kind of training (flowprobe.watch.KINDS) of each coupling of the suite
KIND_OF = {"independent": "independent", "paired": "paired", "reflow": "map"}


def detect_constants(r: dict, constants: dict | None) -> dict:
    """The keyword arguments of flowprobe.watch.detect for run ``r`` from ``constants`` (default: the shipped ones):
    ``thresholds_by_kind`` becomes the threshold of the run's kind (the pooled ``threshold`` for a kind it lacks)."""
    c = dict(SHIPPED if constants is None else constants)
    by_kind = c.pop("thresholds_by_kind", None)
    if by_kind:
        c["threshold"] = by_kind.get(KIND_OF[r["coupling"]], c["threshold"])
    return c


def fit_score(runs: list, names: tuple, with_gv: bool = True) -> tuple:
    """Logistic regression of the label on the inputs ``names`` of the score at the latest reading at each of
    FRACTIONS (the three pooled), on standardised features with an L2 penalty; returned as the raw weights of
    flowprobe.watch.memorisation_score (0 for an input not used): (b, w_auc, w_gv, w_close, w_pair), or without
    ``with_gv`` (b, w_auc, w_close, w_pair)."""
    import numpy as np
    from scipy.optimize import minimize

    rows, ys = [], []
    for r in runs:
        inputs = [x.inputs for x in judged(r)]
        for f in FRACTIONS:
            k = max(i for i, x in enumerate(r["readings"]) if x["step"] <= f * r["steps"])
            rows.append([score_terms(**inputs[k])[n] for n in names])
            ys.append(float(r["label"]["memorises"]))
    xs, ys = np.array(rows), np.array(ys)
    keep = np.isfinite(xs).all(1)
    xs, ys = xs[keep], ys[keep]
    mu, sd = xs.mean(0), xs.std(0)
    sd[sd == 0] = 1.0  # an input constant over these runs (no pairing under an independent coupling): weight 0
    z = (xs - mu) / sd

    def loss(w):
        logit = w[0] + z @ w[1:]
        p = 1 / (1 + np.exp(-logit))
        grad = np.concatenate([[np.sum(p - ys)], z.T @ (p - ys) + 2 * L2 * w[1:]])
        return np.sum(np.logaddexp(0, logit) - ys * logit) + L2 * np.sum(w[1:] ** 2), grad

    w = minimize(loss, np.zeros(len(names) + 1), jac=True, method="BFGS").x
    raw = dict(zip(names, w[1:] / sd))
    b = w[0] - float(np.sum(w[1:] * mu / sd))
    order = INPUTS if with_gv else tuple(n for n in INPUTS if n != "gradvar")
    return (round(float(b), 4), *(round(float(raw.get(n, 0.0)), 4) for n in order))


def choose_threshold(runs: list, constants: dict) -> float:
    """The score threshold with the best balanced accuracy of 'fired by then' (score or copies) on ``runs``, averaged
    over FRACTIONS; among equals the largest (fewest false alarms)."""
    per_run = [(r, replay(r, constants)[:2]) for r in runs]
    candidates = sorted({round(s, 4) for _, (scores, _) in per_run for s in scores if math.isfinite(s)})
    best, best_value = None, -1.0
    for thr in candidates:
        value = 0.0
        for f in FRACTIONS:
            hits = {True: [], False: []}
            for r, (scores, copies) in per_run:
                early = [(s, c) for x, s, c in zip(r["readings"], scores, copies) if x["step"] <= f * r["steps"]]
                hits[r["label"]["memorises"]].append(any(c or s >= thr for s, c in early))
            value += (sum(hits[True]) / len(hits[True]) + 1 - sum(hits[False]) / len(hits[False])) / 2
        if value >= best_value - 1e-12:
            best, best_value = thr, value
    return float(best)


def tune_score(runs: list) -> tuple[str, dict]:
    """The candidate of SCORE_CANDIDATES whose fitted score has the best mean ROC AUC over FRACTIONS on ``runs`` (the
    tune half), with its threshold and the fallback without gradient variance: the constants flowprobe.watch
    ships."""
    import numpy as np

    fitted = {}
    for name, names in SCORE_CANDIDATES.items():
        constants = {**SHIPPED, "weights": fit_score(runs, names)}
        cells = []
        for f in FRACTIONS:
            y, v = [], []
            for r in runs:
                scores, _, _ = replay(r, constants)
                so_far = [s for x, s in zip(r["readings"], scores) if x["step"] <= f * r["steps"]]
                y.append(r["label"]["memorises"])
                v.append(max(so_far))
            y, v = np.array(y), np.array(v)
            cells.append(auc(torch.tensor(v[y]), torch.tensor(v[~y]))[0])
        fitted[name] = (sum(cells) / len(cells), constants)
        print(f"candidate score '{name}': weights (b, w_auc, w_gv, w_close, w_pair) {constants['weights']}, "
              "tune-half AUC " + " / ".join(f"{c:.3f}" for c in cells))
    name = max(fitted, key=lambda k: fitted[k][0])
    constants = fitted[name][1]
    without_gv = tuple(n for n in SCORE_CANDIDATES[name] if n != "gradvar")
    constants["weights_membership"] = fit_score(runs, ("auc", *without_gv) if "auc" not in without_gv else without_gv,
                                                with_gv=False)
    constants["threshold"] = choose_threshold(runs, constants)
    no_gv = [{**r, "readings": [{**x, "gradvar_ratio": None} for x in r["readings"]]} for r in runs]
    constants["threshold_membership"] = choose_threshold(no_gv, constants)
    return name, constants


#: the scores shipped before, fitted on the same tune half, replayed for comparison: the two-signal score (membership
#: and gradient variance, before the copy closeness and the pairing excess were read)
REPLAYED = {"two-signal score": {"weights": (-8.519, 6.6952, 1.4785), "weights_membership": (-12.946, 14.2338),
                                 "threshold": 0.8472, "threshold_membership": 0.497},
            "early-warning thresholds per kind of training (early=True)": EARLY}
#: the threshold rule session 6 shipped (membership AUC > 0.6 with lower bound > 0.5, and GV(train) / GV(held-out)
#: upper bound < 0.25, one reading; or copies), and the first rule (either, two readings), replayed for comparison
OLD_RULES = {"threshold rule (membership and GV collapse)": {"auc": 0.6, "lower": 0.5, "consecutive": 1,
                                                              "gradvar": 0.25, "combine": "and"},
             "first threshold rule (either, two readings)": {"auc": 0.6, "lower": 0.5, "consecutive": 2,
                                                              "gradvar": 0.25, "combine": "or"}}


def simulate(readings: list, rule: dict) -> int | None:
    """The step at which one of the OLD_RULES first fires on stored readings, or None."""
    streak = {"membership": 0, "gradvar": 0}
    for x in readings:
        member = x["auc_lower"] > rule["lower"] and any(
            row["auc"] > rule["auc"] and row["auc_lower"] > rule["lower"] for row in x["rows"])
        upper = x.get("gradvar_upper")
        measured = upper is not None and math.isfinite(upper)
        streak["membership"] = streak["membership"] + 1 if member else 0
        streak["gradvar"] = streak["gradvar"] + 1 if measured and upper < rule["gradvar"] else 0
        both = rule["combine"] == "and" and measured  # without a GV reading membership decides alone
        held = (min if both else max)(streak.values()) >= rule["consecutive"]
        copy = x.get("copy_excess_lower")
        if held or (copy is not None and copy > WATCH_COPY_EXCESS):
            return x["step"]
    return None


#: input sets looked at after the score was chosen (not candidates): which input carries the gain
ABLATIONS = {**SCORE_CANDIDATES, "gradient variance and pairing": ("gradvar", "pairing"),
             "gradient variance and copy closeness": ("gradvar", "closeness")}


def ablation(halves: dict) -> None:
    """Each input set of ABLATIONS fitted on the tune half as the candidates are, its score's ROC AUC on every half
    (analysis after the choice, not a choice)."""
    print("\n## input sets fitted on the tune half, ROC AUC of their score at 25 / 50 / 100% (analysis, not a choice)")
    print("| inputs | " + " | ".join(halves) + " |\n|---|" + "---|" * len(halves))
    tune = halves["tune (seed 0)"]
    for name, names in ABLATIONS.items():
        constants = {**SHIPPED, "weights": fit_score(tune, names)}
        cells = [" / ".join(f"{roc_auc(rs, f, 'score', constants)[0]:.3f}" for f in FRACTIONS)
                 for rs in halves.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


def binary_auc(runs: list, at_of, fraction: float) -> float:
    """ROC AUC (= balanced accuracy) of 'fired by this fraction of training', ``at_of(run)`` the firing step."""
    fired = [(at_of(r), r) for r in runs]
    pos = [float(f is not None and f <= fraction * r["steps"]) for f, r in fired if r["label"]["memorises"]]
    neg = [float(f is not None and f <= fraction * r["steps"]) for f, r in fired if not r["label"]["memorises"]]
    return auc(torch.tensor(pos), torch.tensor(neg))[0] if pos and neg else float("nan")


def rules_table(halves: dict) -> None:
    print("\n## the old threshold rules, replayed (binary: AUC = balanced accuracy)")
    print("| rule | half | AUC at 25% | AUC at 50% | AUC at 100% |\n|---|---|---|---|---|")
    for name, rule in OLD_RULES.items():
        for half, rs in halves.items():
            cells = [binary_auc(rs, lambda r, rule=rule: simulate(r["readings"], rule), f) for f in FRACTIONS]
            print(f"| {name} | {half} | " + " | ".join(f"{a:.3f}" for a in cells) + " |")


def replay_check(runs: list) -> None:
    """Replaying the detector each run was recorded with must reproduce its recorded firing step."""
    same = 0
    for r in runs:
        if "detector" in r:
            constants = {k: tuple(v) if isinstance(v, list) else v for k, v in r["detector"].items()}
            same += fired_at(r, constants) == r["fired_at"]
        else:  # recorded with a threshold rule (the first runs: the first rule, unnamed in the record)
            rule = r.get("rule", OLD_RULES["first threshold rule (either, two readings)"])
            same += simulate(r["readings"], rule) == r["fired_at"]
    print(f"replay check: the detector each run was recorded with, replayed offline, fires at the recorded step in "
          f"{same} of {len(runs)} runs")


#: the MLP seeds of the grid the score was not tuned on
HELD = (1, 2, 4, 5, 8, 9)
#: the fresh seeds of the thresholds per kind of training (run after they were committed)
FRESH_BY_KIND = (8, 9)


def report(args) -> None:
    runs = [json.loads(line) for line in Path(args.runs).read_text().splitlines()]
    mlp = [r for r in runs if r.get("arch", "mlp") == "mlp"]
    halves = {"tune (seed 0)": [r for r in mlp if r["seed"] == 0],
              "report (seed 1)": [r for r in mlp if r["seed"] == 1],
              "seed 2 (fresh for the two-signal score; seen before the four-input score was designed)":
                  [r for r in mlp if r["seed"] == 2],
              "fresh (seed 4, run after the four-input score was committed)": [r for r in mlp if r["seed"] == 4],
              "fresh (seed 5, run after seed 4 was read)": [r for r in mlp if r["seed"] == 5],
              "fresh (seeds 8 and 9, run after the thresholds per kind were committed)":
                  [r for r in mlp if r["seed"] in FRESH_BY_KIND],
              "independent-coupling runs of seeds 8 and 9": [r for r in mlp if r["seed"] in FRESH_BY_KIND and
                                                             r["coupling"] == "independent"],
              "paired runs of seeds 8 and 9": [r for r in mlp if r["seed"] in FRESH_BY_KIND and
                                               r["coupling"] == "paired"],
              "MLP runs not tuned on (seeds 1, 2, 4, 5, 8, 9)": [r for r in mlp if r["seed"] in HELD],
              "independent-coupling MLP runs not tuned on": [r for r in mlp if r["seed"] in HELD and
                                                             r["coupling"] == "independent"],
              "paired MLP runs not tuned on": [r for r in mlp if r["seed"] in HELD and r["coupling"] == "paired"],
              "out of the grid (seed 6: d = 64, sigma = 1)": [r for r in mlp if r["seed"] == 6],
              "reflow pairs (seed 7)": [r for r in mlp if r["seed"] == 7],
              "UNet image runs (seed 3)": [r for r in runs if r.get("arch") == "unet"],
              "all": runs}
    halves = {k: v for k, v in halves.items() if v}
    print(f"{len(runs)} runs, {sum(r['seconds'] for r in runs):.0f} s of training+watch, "
          f"{sum(r['label']['memorises'] for r in runs)} memorise")
    replay_check(runs)
    name, tuned = tune_score(halves["tune (seed 0)"])
    print(f"chosen on the tune half: '{name}', {tuned}")
    print(f"shipped in flowprobe.watch: {SHIPPED} -- " + ("the same" if tuned == SHIPPED else "DIFFERENT"))
    by_kind = {kind: choose_threshold([r for r in halves["tune (seed 0)"] if r["coupling"] == kind], tuned)
               for kind in COUPLINGS}
    print(f"thresholds per kind chosen on the tune half: {by_kind}; early=True in flowprobe.watch: "
          f"{WATCH_SCORE_THRESHOLDS} -- " + ("the same" if by_kind == WATCH_SCORE_THRESHOLDS else "DIFFERENT"))
    for kind in COUPLINGS:  # an alternative looked at on the tune half alone and not shipped: constants per coupling
        print(f"\nthe same procedure on the tune half's {kind} runs alone (not shipped):")
        print(f"chosen: {tune_score([r for r in halves['tune (seed 0)'] if r['coupling'] == kind])}")
    for half, rs in halves.items():
        m = sum(r["label"]["memorises"] for r in rs)
        print(f"\n## {half}: {len(rs)} runs, {m} memorise, {len(rs) - m} do not")
        print("| signal | AUC at 25% | AUC at 50% | AUC at 100% |\n|---|---|---|---|")
        for sig in ("score", "fired", "membership", "gradvar", "copies", "closeness", "pairing"):
            cells = [roc_auc(rs, f, sig) for f in FRACTIONS]
            print(f"| {sig} | " + " | ".join(f"{a:.3f} (n={k})" for a, k in cells) + " |")
        for replayed, constants in REPLAYED.items():
            for sig in ("score", "fired"):
                cells = [roc_auc(rs, f, sig, constants) for f in FRACTIONS]
                print(f"| {sig} of the {replayed}, replayed | " + " | ".join(f"{a:.3f} (n={k})" for a, k in cells)
                      + " |")
        for f in FRACTIONS:
            fired = [(at := fired_at(r)) is not None and at <= f * r["steps"] for r in rs]
            tp = sum(r["label"]["memorises"] and x for r, x in zip(rs, fired))
            fp = sum((not r["label"]["memorises"]) and x for r, x in zip(rs, fired))
            print(f"detector by {f:.0%}: {tp}/{m} memorising runs flagged, {fp}/{len(rs) - m} others flagged")
    rules_table(halves)
    ablation(halves)
    timing(runs)
    figures(runs, Path(args.figures))


def copies_seen_at(r: dict) -> int | None:
    """The step at which the watch's copy check first saw copies in run ``r`` (excess lower bound above the margin)."""
    return next((x["step"] for x in r["readings"]
                 if x.get("copy_excess_lower") is not None and x["copy_excess_lower"] > WATCH_COPY_EXCESS), None)


def timing(runs: list) -> None:
    print("\n## when the shipped detector fires vs when the watch's copy check first sees copies (memorising runs)")
    print("| run | fired at | copies first seen | fraction of training |\n|---|---|---|---|")
    fractions, order = [], {"earlier": 0, "same reading": 0, "later": 0, "never": 0}
    pairs = []  # (the flag, the copies) as fractions of training, in runs where the copy check saw copies
    for r in runs:
        if not r["label"]["memorises"]:
            continue
        first_copy = copies_seen_at(r)
        at = fired_at(r)
        if at is not None:
            fractions.append(at / r["steps"])
        if first_copy is not None:  # the score alone (the copy check is part of the detector) against the copies
            by_score = fired_at(r, {**SHIPPED, "copy_excess": math.inf})
            pairs.append((at / r["steps"], first_copy / r["steps"]))
            order["never" if by_score is None else "earlier" if by_score < first_copy else
                  "same reading" if by_score == first_copy else "later"] += 1
        name = (f"{r.get('arch', 'mlp')} d={r.get('dim', 2)} n={r['n']} {r['coupling']} sigma={r['sigma']} "
                f"steps={r['steps']} seed={r['seed']}")
        print(f"| {name} | {at} | {first_copy} | {'-' if at is None else round(at / r['steps'], 3)} |")
    if fractions:
        fractions.sort()
        print(f"\nfired on {len(fractions)} of {sum(r['label']['memorises'] for r in runs)} memorising runs; median at "
              f"{fractions[len(fractions) // 2]:.3f} of training")
    print(f"memorising runs where the watch's copy check saw copies: {sum(order.values())}; the score alone fired "
          + ", ".join(f"{k}: {v}" for k, v in order.items()))
    if pairs:
        flag, copy = (sorted(v) for v in zip(*pairs))
        print(f"there, median fraction of training at which the flag fired {flag[len(flag) // 2]:.3f}, at which the "
              f"copy check first saw copies {copy[len(copy) // 2]:.3f}; the flag strictly earlier in "
              f"{sum(a < b for a, b in pairs)} of {len(pairs)}")


def figures(runs: list, folder: Path) -> None:
    """ROC curves on the runs the detector was not fitted on (seeds >= 1), and one memorising and one generalising
    run's readings over training."""
    from flowprobe.report import plt, save_figure

    held = [r for r in runs if r["seed"] >= 1]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, f in zip(axes, FRACTIONS):
        for sig, style in (("score", "k-"), ("membership", "-"), ("gradvar", "-"), ("copies", "-")):
            fpr, tpr = roc_curve(held, f, sig)
            ax.plot(fpr, tpr, style, label=f"{sig} (AUC {roc_auc(held, f, sig)[0]:.2f})")
        fpr, tpr = roc_curve(held, f, "fired")
        ax.plot(fpr[1], tpr[1], "ro", label="the detector's flag")
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        ax.set(title=f"{f:.0%} of training", xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"ROC on the {len(held)} runs the detector was not fitted on (seeds >= 1)", fontsize=10)
    save_figure(fig, folder / "detector_roc.png")
    score_alone = {**SHIPPED, "copy_excess": math.inf}

    def warned_early(r):  # the score alone fired before the watch's copy check first saw copies
        first, by_score = copies_seen_at(r), fired_at(r, score_alone)
        return first is not None and by_score is not None and by_score < first

    mem = next((r for r in held if r["label"]["memorises"] and r["coupling"] == "independent" and r["steps"] == 2000
                and warned_early(r)), None)
    gen = next((r for r in held if mem is not None and not r["label"]["memorises"] and r["coupling"] == "independent"
                and r["steps"] == 2000 and r.get("dim", 2) == mem.get("dim", 2) and r["n"] > mem["n"]), None)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for r, name, color in ((mem, "memorising", "C0"), (gen, "generalising", "C1")):
        if r is None:
            continue
        steps = [x["step"] for x in r["readings"]]
        axes[0].plot(steps, [x["auc"] for x in r["readings"]], color=color,
                     label=f"{name}: d={r.get('dim', 2)} n={r['n']} {r['coupling']} sigma={r['sigma']}")
        axes[1].plot(steps, [x["gradvar_ratio"] for x in r["readings"]], color=color)
        checked = [(x["step"], x["copy_closeness"]) for x in r["readings"] if x.get("copy_closeness") is not None]
        axes[2].plot(*zip(*checked), marker="s", color=color)
        axes[3].plot(steps, replay(r)[0], color=color)
        at, first = fired_at(r), copies_seen_at(r)
        for ax in axes:
            if at:
                ax.axvline(at, ls=":", color=color)
            if first:
                ax.axvline(first, ls="--", color=color, lw=0.8)
    axes[2].axhline(0.5, color="0.6", lw=0.8)
    axes[3].axhline(SHIPPED["threshold"], color="0.6", lw=0.8)
    axes[0].set(xlabel="step", ylabel="max_t membership AUC")
    axes[1].set(xlabel="step", ylabel="GV(train) / GV(held-out)", yscale="log")
    axes[2].set(xlabel="step", ylabel="copy closeness (at copy checks)")
    axes[3].set(xlabel="step", ylabel="memorisation score (log-odds)")
    axes[0].legend(fontsize=7)
    fig.suptitle("dotted: the detector fires; dashed: the watch's copy check first sees copies", fontsize=9)
    save_figure(fig, folder / "detector_readings.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default="benchmarks/detector_runs.jsonl")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--couplings", default=",".join(COUPLINGS))
    p.add_argument("--sigmas", default=",".join(map(str, SIGMAS)))
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--dims", default="2")
    p.add_argument("--archs", default="mlp", help="mlp, unet (a tiny UNet on the 3 x 8 x 8 images; --dims 192 only)")
    p = sub.add_parser("report")
    p.add_argument("--runs", default="benchmarks/detector_runs.jsonl")
    p.add_argument("--figures", default="docs/figures")
    args = parser.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
