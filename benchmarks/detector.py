"""How well does the memorisation watch's detector predict memorisation, and how early? A labelled suite of CPU runs.

    python benchmarks/detector.py run [--seeds 0,1] [--out benchmarks/detector_runs.jsonl] [--workers 1]
    python benchmarks/detector.py report [--runs benchmarks/detector_runs.jsonl] [--figures docs/figures]

The suite: 2-D Gaussian mixtures (8 components on a circle of radius 3, std 0.3), a 3 x 128 MLP trained with
:func:`flowprobe.train.fit` under a :class:`flowprobe.watch.MemorizationWatch` (default thresholds, readings every
steps / 16, copy check every second reading), varied over

- training-set size N in {8, 32, 128, 1024},
- coupling: ``independent`` (fresh source draws against the N training targets) or ``paired`` (N fixed pairs),
- path noise sigma in {0, 0.1} (constant sigma),
- length: 600 or 2000 steps,

and the seeds given (seed 0 is the tune half, seeds >= 1 the report half: the thresholds were fixed before the suite
ran, from the diagnosis constants; the tune half is what was looked at while writing the rule).

Labels come from the END of training and from the diagnosis' decisive checks only, never from the watch: a run
memorises when :func:`flowprobe.diagnosis.copies.copies_check` on 512 generated samples (RK4, 32 steps) against 512
fresh samples of the mixture finds an excess copy fraction whose interval lies above COPY_EXCESS_MARGIN, or (paired
runs) when :func:`flowprobe.diagnosis.transport.pairing_check` finds the training partner recalled for at least
PAIRING_RECALL_MEMORISES of the pairs and more often than the OT partner.

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

from flowprobe.couplings import FixedPairs, GaussianSampler, IndependentCoupling, TensorSampler
from flowprobe.diagnosis.copies import copies_check
from flowprobe.diagnosis.stats import auc
from flowprobe.diagnosis.transport import pairing_check
from flowprobe.diagnosis.verdict import PAIRING_RECALL_MEMORISES
from flowprobe.nets import MLP
from flowprobe.objectives import CFMObjective
from flowprobe.paths import make_path
from flowprobe.probes.memorization import PairSet
from flowprobe.solvers import push_forward
from flowprobe.train import fit
from flowprobe.watch import MemorizationWatch

SIZES = (8, 32, 128, 1024)
COUPLINGS = ("independent", "paired")
SIGMAS = (0.0, 0.1)
LENGTHS = (600, 2000)
FRACTIONS = (0.25, 0.5, 1.0)


def mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of 8 Gaussians (std 0.3) on the circle of radius 3."""
    k = torch.randint(8, (n,), generator=generator)
    angle = 2 * math.pi * k.double() / 8
    centres = 3 * torch.stack([angle.cos(), angle.sin()], 1).float()
    return centres + 0.3 * torch.randn(n, 2, generator=generator)


def label(net, train, x0_pairs, seed: int) -> dict:
    """Ground truth at the end of training from the decisive diagnosis checks (module docstring)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    reference = mixture(512, g)
    x0 = torch.randn(512, 2, generator=g)
    generated = push_forward(net, x0, method="rk4", steps=32)
    copies, _ = copies_check(generated, train, reference, "held-out")
    out = {"copy_excess": copies.evidence["excess"], "copy_excess_lower": copies.evidence["excess_interval"][0],
           "copy_vote": copies.vote}
    memorises = copies.vote == "memorises"
    if x0_pairs is not None:
        n = train.shape[0]
        check, _, _ = pairing_check(net, PairSet(x0_pairs, train, {"assigned": torch.arange(n)}), method="rk4",
                                    steps=32)
        rec, ot = check.evidence["recall_assigned"], check.evidence["recall_ot"]
        out.update({"pairing_recall": rec, "pairing_recall_ot": ot, "pairing_vote": check.vote})
        memorises = memorises or (rec >= PAIRING_RECALL_MEMORISES and (ot is None or rec > ot))
    out["memorises"] = bool(memorises)
    return out


def one_run(cfg: dict) -> dict:
    torch.set_num_threads(1)
    n, coupling_kind, sigma, steps, seed = cfg["n"], cfg["coupling"], cfg["sigma"], cfg["steps"], cfg["seed"]
    g = torch.Generator().manual_seed(seed * 1_000_003 + n)
    train, heldout = mixture(n, g), mixture(512, g)
    x0_pairs = torch.randn(n, 2, generator=g) if coupling_kind == "paired" else None
    coupling = (FixedPairs(x0_pairs, train) if x0_pairs is not None
                else IndependentCoupling(GaussianSampler((2,)), TensorSampler(train)))
    torch.manual_seed(seed)
    net = MLP(2, width=128, depth=3)
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
    return {**cfg, "seconds": seconds, "fired_at": watch.fired_at, "label": label(net, train, x0_pairs, seed),
            "readings": [r.to_dict() for r in watch.readings]}


def configs(seeds, sizes=SIZES, couplings=COUPLINGS, sigmas=SIGMAS, lengths=LENGTHS) -> list[dict]:
    return [{"n": n, "coupling": c, "sigma": s, "steps": k, "seed": seed}
            for seed, n, c, s, k in itertools.product(seeds, sizes, couplings, sigmas, lengths)]


def run(args) -> None:
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {json.dumps({k: r[k] for k in ("n", "coupling", "sigma", "steps", "seed")}, sort_keys=True)
                for r in map(json.loads, out.read_text().splitlines())}
    grid = configs([int(s) for s in args.seeds.split(",")], [int(v) for v in args.sizes.split(",")],
                   args.couplings.split(","), [float(v) for v in args.sigmas.split(",")],
                   [int(v) for v in args.lengths.split(",")])
    todo = [c for c in grid if json.dumps(c, sort_keys=True) not in done]
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
    print(f"[{time.perf_counter() - start:6.0f}s] n={r['n']:5d} {r['coupling']:11s} sigma={r['sigma']:.2g} "
          f"steps={r['steps']:5d} seed={r['seed']} memorises={r['label']['memorises']} fired_at={r['fired_at']} "
          f"({r['seconds']:.1f}s)", flush=True)


# ------------------------------------------------------------------------------------------------ report


def latest(readings: list, step: int, key: str):
    vals = [r[key] for r in readings if r["step"] <= step and r.get(key) is not None]
    return vals[-1] if vals else None


def signals_at(r: dict, fraction: float) -> dict:
    step = fraction * r["steps"]
    gv = latest(r["readings"], step, "gradvar_ratio")
    held = {sig: float(any(sig in x["signals"] for x in r["readings"] if x["step"] <= step))
            for sig in ("membership", "gradvar", "copies")}
    return {"fired": float(r["fired_at"] is not None and r["fired_at"] <= step),
            **{f"fired:{k}": v for k, v in held.items()},
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
        tp = sum(r["label"]["memorises"] and r["fired_at"] is not None for r in rs)
        fp = sum((not r["label"]["memorises"]) and r["fired_at"] is not None for r in rs)
        print(f"detector at 100%: {tp}/{m} memorising runs flagged, {fp}/{len(rs) - m} others flagged")
    timing(runs)
    figures(runs, Path(args.figures))


def timing(runs: list) -> None:
    print("\n## when it fires vs when the watch's copy check first sees copies (memorising runs)")
    print("| run | fired at | copies first seen | signals at first fire |\n|---|---|---|---|")
    for r in runs:
        if not r["label"]["memorises"]:
            continue
        first_copy = next((x["step"] for x in r["readings"] if "copies" in x["signals"]), None)
        first = next((x for x in r["readings"] if x["fired"]), None)
        name = f"n={r['n']} {r['coupling']} sigma={r['sigma']} steps={r['steps']} seed={r['seed']}"
        print(f"| {name} | {r['fired_at']} | {first_copy} | {','.join(first['signals']) if first else '-'} |")


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
    mem = next((r for r in runs if r["label"]["memorises"] and r["fired_at"] is not None and r["steps"] == 2000), None)
    gen = next((r for r in runs if not r["label"]["memorises"] and r["steps"] == 2000), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r, name in ((mem, "memorising"), (gen, "generalising")):
        if r is None:
            continue
        steps = [x["step"] for x in r["readings"]]
        axes[0].plot(steps, [x["auc"] for x in r["readings"]], label=f"{name}: n={r['n']} {r['coupling']}")
        axes[1].plot(steps, [x["gradvar_ratio"] for x in r["readings"]], label=name)
        if r["fired_at"]:
            for ax in axes:
                ax.axvline(r["fired_at"], ls=":", color="r")
    axes[0].axhline(0.6, color="0.6", lw=0.8)
    axes[1].axhline(0.25, color="0.6", lw=0.8)
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
    p = sub.add_parser("report")
    p.add_argument("--runs", default="benchmarks/detector_runs.jsonl")
    p.add_argument("--figures", default="docs/figures")
    args = parser.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
