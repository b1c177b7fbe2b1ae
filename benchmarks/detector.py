"""How well does the memorisation watch's detector predict memorisation, and how early? A labelled suite of CPU runs.

    python benchmarks/detector.py run [--seeds 0,1] [--out benchmarks/detector_runs.jsonl] [--workers 1]
    python benchmarks/detector.py report [--runs benchmarks/detector_runs.jsonl] [--figures docs/figures]

The suite: 2-D Gaussian mixtures (8 components on a circle of radius 3, std 0.3), a 3 x 128 MLP trained with
:func:`flowprobe.train.fit` under a :class:`flowprobe.watch.MemorizationWatch` (default thresholds, readings every
steps / 16, copy check every second reading), varied over

- training-set size N in {8, 16, 24, 32, 128, 1024} (16 and 24: near where copying starts),
- coupling: ``independent`` (fresh source draws against the N training targets) or ``paired`` (N fixed pairs),
- path noise sigma in {0, 0.1} (constant sigma),
- length: 600 or 2000 steps,
- data: the mixture in d = 2 (``--dims 2``), embedded in d = 16 (``--dims 16``), or CelebA faces at 8x8 (``--dims 192``:
  192 values per image, the same MLP on the flattened image),

and the seeds given (seed 0 is the tune half, seeds >= 1 the report half: the thresholds were fixed before the suite
ran, from the diagnosis constants; the tune half is what was looked at while writing the rule).

Labels come from the END of training and from the diagnosis' decisive checks only, never from the watch: a run
memorises when :func:`flowprobe.diagnosis.copies.copies_check` on 512 generated samples (RK4, 32 steps) against 512
fresh samples of the mixture finds an excess copy fraction whose interval lies above COPY_EXCESS_MARGIN, or (paired
runs) when :func:`flowprobe.diagnosis.transport.pairing_check` votes memorises (the training-partner recall on the
contested pairs exceeds chance by more than PAIRING_EXCESS_MARGIN, with its interval), or, where there are too few
contested pairs for the vote (N < 30), when the recall exceeds chance by that margin and an exact one-sided binomial
test against chance gives p < 0.025 (the pairs are the whole training set, so their recall is a fact, not an
estimate).

``report`` prints the ROC AUC of the detector (fired or not by 25 / 50 / 100% of training) and of each signal alone
(latest reading: max_t membership AUC; -log GV ratio; copy excess) and of the detector restricted to one of its
conditions ("fired:membership" ...) per half, the steps at which the detector
fired against the step at which the watch's own copy check first saw copies, and draws the figures.
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
from flowprobe.diagnosis.transport import pairing_check
from flowprobe.diagnosis.verdict import PAIRING_EXCESS_MARGIN
from flowprobe.nets import MLP
from flowprobe.objectives import CFMObjective
from flowprobe.paths import make_path
from flowprobe.probes.memorization import PairSet
from flowprobe.solvers import push_forward
from flowprobe.train import fit
from flowprobe.watch import (WATCH_AUC, WATCH_AUC_LOWER, WATCH_BOTH_SUPPORTING, WATCH_CONSECUTIVE, WATCH_COPY_EXCESS,
                             WATCH_GRADVAR_RATIO, MemorizationWatch)

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


def label(net, train, x0_pairs, seed: int, reference: torch.Tensor | None = None) -> dict:
    """Ground truth at the end of training from the decisive diagnosis checks (module docstring)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    dim = train.shape[1]
    reference = mixture(512, g, dim) if reference is None else reference
    x0 = torch.randn(512, dim, generator=g)
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
    out["memorises"] = bool(memorises)
    return out


def one_run(cfg: dict) -> dict:
    torch.set_num_threads(1)
    n, coupling_kind, sigma, steps, seed = cfg["n"], cfg["coupling"], cfg["sigma"], cfg["steps"], cfg["seed"]
    dim = cfg.get("dim", 2)
    g = torch.Generator().manual_seed(seed * 1_000_003 + n + (0 if dim == 2 else 7919 * dim))
    reference = None
    if dim == IMAGE_DIM:
        train, heldout, reference = celeba8(n)
    else:
        train, heldout = mixture(n, g, dim), mixture(512, g, dim)
    x0_pairs = torch.randn(n, dim, generator=g) if coupling_kind == "paired" else None
    coupling = (FixedPairs(x0_pairs, train) if x0_pairs is not None
                else IndependentCoupling(GaussianSampler((dim,)), TensorSampler(train)))
    torch.manual_seed(seed)
    net = MLP(dim, width=128, depth=3)
    path = make_path(sigma)
    every = steps // 16
    watch = MemorizationWatch(train, heldout, path, every=every, copy_every=2 * every, train_sources=x0_pairs,
                              seed=seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(net, coupling, CFMObjective(path), steps=steps, batch_size=min(64, 4 * n), lr=2e-3, seed=seed,
            hooks=[watch])
    seconds = time.perf_counter() - t0
    return {**cfg, "seconds": seconds, "fired_at": watch.fired_at, "rule": SHIPPED_RULE,
            "label": label(net, train, x0_pairs, seed, reference), "readings": [r.to_dict() for r in watch.readings]}


KEYS = ("n", "coupling", "sigma", "steps", "seed", "dim")


def configs(seeds, sizes=SIZES, couplings=COUPLINGS, sigmas=SIGMAS, lengths=LENGTHS, dims=(2,)) -> list[dict]:
    return [{"n": n, "coupling": c, "sigma": s, "steps": k, "seed": seed, "dim": d}
            for seed, d, n, c, s, k in itertools.product(seeds, dims, sizes, couplings, sigmas, lengths)]


def run_key(r: dict) -> str:
    return json.dumps({k: r.get(k, 2 if k == "dim" else None) for k in KEYS}, sort_keys=True)


def run(args) -> None:
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {run_key(r) for r in map(json.loads, out.read_text().splitlines())}
    grid = configs([int(s) for s in args.seeds.split(",")], [int(v) for v in args.sizes.split(",")],
                   args.couplings.split(","), [float(v) for v in args.sigmas.split(",")],
                   [int(v) for v in args.lengths.split(",")], [int(v) for v in args.dims.split(",")])
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
    print(f"[{time.perf_counter() - start:6.0f}s] d={r.get('dim', 2):2d} n={r['n']:5d} {r['coupling']:11s} "
          f"sigma={r['sigma']:.2g} "
          f"steps={r['steps']:5d} seed={r['seed']} memorises={r['label']['memorises']} fired_at={r['fired_at']} "
          f"({r['seconds']:.1f}s)", flush=True)


# ------------------------------------------------------------------------------------------------ report


def latest(readings: list, step: int, key: str):
    vals = [r[key] for r in readings if r["step"] <= step and r.get(key) is not None]
    return vals[-1] if vals else None


def signals_at(r: dict, fraction: float) -> dict:
    """The detector as shipped (SHIPPED_RULE replayed on the readings) and each of its conditions alone, fired by
    this fraction of training or not; and the latest continuous signals."""
    step = fraction * r["steps"]
    gv = latest(r["readings"], step, "gradvar_ratio")
    alone = {"membership": {**SHIPPED_RULE, "gradvar": None, "copies": math.inf, "combine": "or"},
             "gradvar": {**SHIPPED_RULE, "auc": 2.0, "copies": math.inf, "combine": "or"},
             "copies": {**SHIPPED_RULE, "auc": 2.0, "gradvar": None, "combine": "or"}}

    def fired(rule):
        at = simulate(r["readings"], rule)
        return float(at is not None and at <= step)

    return {"fired": fired(SHIPPED_RULE), **{f"fired:{k}": fired(rule) for k, rule in alone.items()},
            "membership": latest(r["readings"], step, "auc"),
            "gradvar": -math.log(gv) if gv and gv > 0 else None,
            "copies": latest(r["readings"], step, "copy_excess")}


def roc_auc(runs: list, fraction: float, signal: str) -> tuple[float, int]:
    pos = [signals_at(r, fraction)[signal] for r in runs if r["label"]["memorises"]]
    neg = [signals_at(r, fraction)[signal] for r in runs if not r["label"]["memorises"]]
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


#: the rule the suite's runs were recorded with (the watch's first constants, taken from the diagnosis)
DEFAULT_RULE = {"auc": 0.6, "lower": 0.5, "consecutive": 2, "gradvar": 0.25, "combine": "or", "copies": 0.05}
#: the rule flowprobe.watch ships now (its module constants)
SHIPPED_RULE = {"auc": WATCH_AUC, "lower": WATCH_AUC_LOWER, "consecutive": WATCH_CONSECUTIVE,
                "gradvar": WATCH_GRADVAR_RATIO, "combine": "and" if WATCH_BOTH_SUPPORTING else "or",
                "copies": WATCH_COPY_EXCESS}
#: the grid searched on the tune half only
RULE_GRID = {"auc": (0.6, 0.7, 0.8, 0.9), "lower": (0.5, 0.6, 0.7, 0.8), "consecutive": (1, 2, 3),
             "gradvar": (None, 0.1, 0.25, 0.5), "combine": ("or", "and"), "copies": (0.05,)}


def simulate(readings: list, rule: dict) -> int | None:
    """The step at which a detector with ``rule``'s thresholds first fires on stored readings (the watch's logic,
    flowprobe.watch.MemorizationWatch._detect, replayed offline), or None."""
    streak = {"membership": 0, "gradvar": 0}
    for x in readings:
        member = x["auc_lower"] > rule["lower"] and any(
            row["auc"] > rule["auc"] and row["auc_lower"] > rule["lower"] for row in x["rows"])
        upper = x.get("gradvar_upper")
        collapse = rule["gradvar"] is not None and upper is not None and math.isfinite(upper) and \
            upper < rule["gradvar"]
        streak["membership"] = streak["membership"] + 1 if member else 0
        streak["gradvar"] = streak["gradvar"] + 1 if collapse else 0
        measured = upper is not None and math.isfinite(upper)  # without a GV reading membership decides alone
        both = rule["combine"] == "and" and rule["gradvar"] is not None and measured
        held = (min if both else max)(streak.values()) >= rule["consecutive"]
        copy = x.get("copy_excess_lower")
        if held or (copy is not None and copy > rule["copies"]):
            return x["step"]
    return None


def rule_auc(runs: list, rule: dict, fraction: float) -> float:
    """ROC AUC (= balanced accuracy) of 'fired by this fraction of training' under ``rule``."""
    fired = [(simulate(r["readings"], rule), r) for r in runs]
    pos = [float(f is not None and f <= fraction * r["steps"]) for f, r in fired if r["label"]["memorises"]]
    neg = [float(f is not None and f <= fraction * r["steps"]) for f, r in fired if not r["label"]["memorises"]]
    return auc(torch.tensor(pos), torch.tensor(neg))[0] if pos and neg else float("nan")


def tune(runs: list) -> dict:
    """The rule of RULE_GRID with the best mean AUC over FRACTIONS on ``runs`` (the tune half); ties go to the
    rule nearest the shipped one (fewest changed constants)."""
    best, best_key = None, None
    for values in itertools.product(*RULE_GRID.values()):
        rule = dict(zip(RULE_GRID, values))
        score = sum(rule_auc(runs, rule, f) for f in FRACTIONS) / len(FRACTIONS)
        key = (round(score, 9), -sum(rule[k] != DEFAULT_RULE[k] for k in rule))
        if best_key is None or key > best_key:
            best, best_key = rule, key
    return best


def rules_table(halves: dict) -> None:
    runs = halves["all"]
    same = sum(simulate(r["readings"], r.get("rule", DEFAULT_RULE)) == r["fired_at"] for r in runs)
    print(f"\nreplay check: the rule each run was recorded with, replayed offline, fires at the recorded step in "
          f"{same} of {len(runs)} runs")
    tuned = tune(halves["tune (seed 0)"])
    print(f"\n## detector rules (thresholds tuned on the tune half only): recorded with {DEFAULT_RULE}, tuned "
          f"{tuned}, shipped {SHIPPED_RULE}")
    print("| rule | half | AUC at 25% | AUC at 50% | AUC at 100% |\n|---|---|---|---|---|")
    rules = (("recorded with", DEFAULT_RULE), ("tuned on seed 0", tuned), ("shipped", SHIPPED_RULE),
             ("shipped, membership only", {**SHIPPED_RULE, "gradvar": None, "combine": "or"}),
             ("shipped, gradient variance only", {**SHIPPED_RULE, "auc": 2.0, "combine": "or"}),
             ("shipped, membership or gradient variance", {**SHIPPED_RULE, "combine": "or"}))
    for name, rule in rules:
        for half, rs in halves.items():
            print(f"| {name} | {half} | " + " | ".join(f"{rule_auc(rs, rule, f):.3f}" for f in FRACTIONS) + " |")


def report(args) -> None:
    runs = [json.loads(line) for line in Path(args.runs).read_text().splitlines()]
    halves = {"tune (seed 0)": [r for r in runs if r["seed"] == 0],
              "report (seeds >= 1)": [r for r in runs if r["seed"] >= 1], "all": runs}
    print(f"{len(runs)} runs, {sum(r['seconds'] for r in runs):.0f} s of training+watch, "
          f"{sum(r['label']['memorises'] for r in runs)} memorise")
    for name, rs in halves.items():
        m = sum(r["label"]["memorises"] for r in rs)
        print(f"\n## {name}: {len(rs)} runs, {m} memorise, {len(rs) - m} do not")
        print("| signal | AUC at 25% | AUC at 50% | AUC at 100% |\n|---|---|---|---|")
        for sig in ("fired", "fired:membership", "fired:gradvar", "fired:copies", "membership", "gradvar", "copies"):
            cells = [roc_auc(rs, f, sig) for f in FRACTIONS]
            print(f"| {sig} | " + " | ".join(f"{a:.3f} (n={k})" for a, k in cells) + " |")
        fired = [simulate(r["readings"], SHIPPED_RULE) is not None for r in rs]
        tp = sum(r["label"]["memorises"] and f for r, f in zip(rs, fired))
        fp = sum((not r["label"]["memorises"]) and f for r, f in zip(rs, fired))
        print(f"detector at 100%: {tp}/{m} memorising runs flagged, {fp}/{len(rs) - m} others flagged")
    rules_table(halves)
    timing(runs)
    figures(runs, Path(args.figures))


def timing(runs: list) -> None:
    print("\n## when the shipped detector fires vs when the watch's copy check first sees copies (memorising runs)")
    print("| run | fired at | copies first seen | fraction of training |\n|---|---|---|---|")
    fractions = []
    for r in runs:
        if not r["label"]["memorises"]:
            continue
        first_copy = next((x["step"] for x in r["readings"] if "copies" in x["signals"]), None)
        at = simulate(r["readings"], SHIPPED_RULE)
        if at is not None:
            fractions.append(at / r["steps"])
        name = f"d={r.get('dim', 2)} n={r['n']} {r['coupling']} sigma={r['sigma']} steps={r['steps']} seed={r['seed']}"
        print(f"| {name} | {at} | {first_copy} | {'-' if at is None else round(at / r['steps'], 3)} |")
    if fractions:
        fractions.sort()
        print(f"\nfired on {len(fractions)} of {sum(r['label']['memorises'] for r in runs)} memorising runs; median at "
              f"{fractions[len(fractions) // 2]:.3f} of training")


def figures(runs: list, folder: Path) -> None:
    from flowprobe.report import plt, save_figure

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, f in zip(axes, FRACTIONS):
        for sig in ("membership", "gradvar", "copies"):
            fpr, tpr = roc_curve(runs, f, sig)
            a, _ = roc_auc(runs, f, sig)
            ax.plot(fpr, tpr, label=f"{sig} (AUC {a:.2f})")
        fired = roc_curve(runs, f, "fired")
        ax.plot(fired[0], fired[1], "k--", label=f"detector (AUC {roc_auc(runs, f, 'fired')[0]:.2f})")
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        ax.set(title=f"{f:.0%} of training", xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, folder / "detector_roc.png")
    mem = next((r for r in runs if r["label"]["memorises"] and simulate(r["readings"], SHIPPED_RULE) is not None
                and r["steps"] == 2000), None)
    gen = next((r for r in runs if not r["label"]["memorises"] and r["steps"] == 2000), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r, name in ((mem, "memorising"), (gen, "generalising")):
        if r is None:
            continue
        steps = [x["step"] for x in r["readings"]]
        axes[0].plot(steps, [x["auc"] for x in r["readings"]], label=f"{name}: n={r['n']} {r['coupling']}")
        axes[1].plot(steps, [x["gradvar_ratio"] for x in r["readings"]], label=name)
        at = simulate(r["readings"], SHIPPED_RULE)
        if at:
            for ax in axes:
                ax.axvline(at, ls=":", color="r")
    axes[0].axhline(SHIPPED_RULE["auc"], color="0.6", lw=0.8)
    axes[1].axhline(SHIPPED_RULE["gradvar"], color="0.6", lw=0.8)
    axes[0].set(xlabel="step", ylabel="max_t membership AUC")
    axes[1].set(xlabel="step", ylabel="GV(train) / GV(held-out)", yscale="log")
    axes[0].legend(fontsize=7)
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
    p = sub.add_parser("report")
    p.add_argument("--runs", default="benchmarks/detector_runs.jsonl")
    p.add_argument("--figures", default="docs/figures")
    args = parser.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
