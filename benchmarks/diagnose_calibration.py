"""Calibrate ``flowprobe.diagnosis.diagnose`` on trained nets with known answers (CPU).

Cases (the protocol is fixed below, before any verdict was seen; the thresholds are the library's, unchanged):

1. Images (CelebA, 8x8x3 = 192 dimensions, the first images of ``../shared/data/celeba/images.tar.gz``):
   the same net trained the same number of steps on 32 images (expected: memorises) and on 4096 images
   (expected: generalises). Held out: 1000 images (indices 4096..5095) that neither net saw. Two nets:
   the tiny UNet (``unet_preset("tiny", image_size=8)``, 0.18M parameters) and, because a UNet step is
   ~25x slower on CPU, the flowprobe MLP on flattened images (``FlatMLP``, 3 x 256) trained longer.
   No left-right flips (``ImageSampler(flip=False)``): the copies check compares with the training images
   as stored, so a flipped copy would not count as a copy.
2. Fixed pairs (the ``pair-memorization`` experiment's protocol, its ``--quick`` sizes, via its own
   ``train_velocity``): N = 128 sources x0 ~ N(0, I_16), targets x1 ~ N(3, I_16), paired by a random
   permutation; an MLP 3 x 256 trained 2000 steps with CFM(sigma) at sigma = 0 (expected: memorises,
   decided by the pairing check) and sigma = 1.0 (expected: the pairing is not reproduced). The pairs
   are given to ``diagnose`` as a ``PairSet`` with the OT partners (exact assignment). Held out:
   1000 fresh draws of N(3, I_16).

Run: ``python benchmarks/diagnose_calibration.py`` (285 s on a shared, loaded 2-core CPU);
``--cases pairs,mlp`` runs a subset, ``--scale 0.05`` shortens every training run (timing only: the verdicts
of a scaled run are not the calibration), ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch

from flowprobe.couplings import FixedPairs, GaussianSampler, IndependentCoupling, ot_permutation
from flowprobe.data.image_files import load_images
from flowprobe.data.images import ImageSampler, to_tensor, to_unit
from flowprobe.device import choose_threads
from flowprobe.diagnosis import DiagnoseOptions, diagnose
from flowprobe.experiments.lowdim import train_velocity
from flowprobe.nets import FlatMLP, count_parameters, unet_preset
from flowprobe.objectives import CFMObjective
from flowprobe.paths import make_path
from flowprobe.probes.memorization import PairSet
from flowprobe.train import fit

# ------------------------------------------------------------------ the protocol (fixed before any verdict)

RESOLUTION = 8
SMALL, LARGE, HELDOUT = 32, 4096, 1000
IMAGE_RUNS = {  # net: (steps, batch size, lr)
    "unet": (1000, 64, 1e-3),
    "mlp": (4000, 128, 1e-3),
}
IMAGE_OPTIONS = DiagnoseOptions(n_generate=500, steps=50, membership_samples=256, gradvar_samples=64,
                                transport_samples=64)
PAIRS = dict(dim=16, n_pairs=128, shift=3.0, width=256, depth=3, steps=2000, batch_size=128, lr=2e-3)
SIGMAS = (0.0, 1.0)
PAIR_OPTIONS = DiagnoseOptions(n_generate=1000)
SEED = 0


def _image_net(kind: str):
    if kind == "unet":
        return unet_preset("tiny", image_size=RESOLUTION, in_channels=3, dropout=0.0)
    return FlatMLP(3 * RESOLUTION * RESOLUTION, width=256, depth=3)


def _decisive(d) -> str:
    """The decisive numbers of a diagnosis, one string."""
    parts = []
    c = d.checks.get("copies")
    if c is not None and c.ran:
        e = c.evidence
        lo, hi = e["excess_interval"]
        parts.append(f"copies {e['copy_fraction']:.3f} {_iv(e['copy_fraction_interval'])} vs "
                     f"{e['reference_copy_fraction']:.3f} {_iv(e['reference_copy_fraction_interval'])} "
                     f"(excess {e['excess']:+.3f} [{lo:+.3f}, {hi:+.3f}]) -> {c.vote or 'no vote'}")
    p = d.checks.get("pairing")
    if p is not None and p.ran:
        e = p.evidence
        parts.append(f"partner recall {e['recall_assigned']:.3f} {_iv(e.get('recall_assigned_interval'))} vs OT "
                     f"{e['recall_ot']:.3f} {_iv(e.get('recall_ot_interval'))} -> {p.vote or 'no vote'}")
    for name in ("membership", "gradvar"):
        s = d.checks.get(name)
        if s is not None and s.ran:
            parts.append(f"{name}: {s.vote or 'no vote'} ({s.summary})")
    return "; ".join(parts)


def _iv(iv) -> str:
    return "" if not iv else f"[{iv[0]:.3f}, {iv[1]:.3f}]"


def image_cases(kinds, scale: float, log) -> list[dict]:
    t0 = time.perf_counter()
    data = load_images("celeba", resolution=RESOLUTION, limit=LARGE + HELDOUT)
    images = to_tensor(data.images)                                   # uint8 (N, 3, 8, 8)
    held = to_unit(images[LARGE:LARGE + HELDOUT])
    log(f"loaded {tuple(images.shape)} CelebA images in {time.perf_counter() - t0:.1f} s")
    rows = []
    for kind in kinds:
        steps, batch, lr = IMAGE_RUNS[kind]
        steps = max(1, round(steps * scale))
        for n in (SMALL, LARGE):
            train_u8 = images[:n]
            net = _image_net(kind)
            choose_threads(count_parameters(net), batch)
            coupling = IndependentCoupling(GaussianSampler((3, RESOLUTION, RESOLUTION)),
                                           ImageSampler(train_u8, flip=False))
            t = time.perf_counter()
            state = fit(net, coupling, CFMObjective(make_path(0.0)), steps=steps, batch_size=batch, lr=lr, seed=SEED)
            train_s = time.perf_counter() - t
            net = state.model.eval()
            t = time.perf_counter()
            d = diagnose(net, to_unit(train_u8), held, options=IMAGE_OPTIONS)
            diag_s = time.perf_counter() - t
            tail = state.losses[-max(1, len(state.losses) // 20):]
            rows.append({"case": f"CelebA 8x8, {kind} ({count_parameters(net) / 1e6:.2f}M)", "train": n,
                         "steps": steps, "batch": batch, "final_loss": float(sum(tail) / len(tail)),
                         "train_s": train_s, "diagnose_s": diag_s, "verdict": d.label,
                         "decided_by": list(d.verdict.decided_by), "decisive": _decisive(d),
                         "warnings": list(d.warnings), "diagnosis": d.to_dict()})
            log(_line(rows[-1]))
    return rows


def pair_cases(scale: float, log) -> list[dict]:
    p = PAIRS
    g = torch.Generator().manual_seed(SEED)
    x0 = torch.randn(p["n_pairs"], p["dim"], generator=g)
    x1 = torch.randn(p["n_pairs"], p["dim"], generator=g) + p["shift"]
    assigned = torch.randperm(p["n_pairs"], generator=g)
    targets = x1[assigned]                                      # x0[i] is paired with targets[i]
    ot = ot_permutation(x0, targets, "lsa")                     # OT partner of x0[i] among the targets
    held = torch.randn(1000, p["dim"], generator=torch.Generator().manual_seed(SEED + 1)) + p["shift"]
    steps = max(1, round(p["steps"] * scale))
    rows = []
    for sigma in SIGMAS:
        t = time.perf_counter()
        net, losses = train_velocity(p["dim"], FixedPairs(x0, targets), sigma, width=p["width"], depth=p["depth"],
                                     steps=steps, batch_size=p["batch_size"], lr=p["lr"], seed=SEED + 7,
                                     device="cpu")
        train_s = time.perf_counter() - t
        pairs = PairSet(x0, targets, {"assigned": torch.arange(p["n_pairs"]), "ot": ot})
        t = time.perf_counter()
        d = diagnose(net, None, held, pairs=pairs, path=make_path(sigma), options=PAIR_OPTIONS)
        diag_s = time.perf_counter() - t
        tail = losses[-max(1, len(losses) // 20):]
        rows.append({"case": f"fixed pairs d={p['dim']}, sigma={sigma}", "train": p["n_pairs"], "steps": steps,
                     "batch": p["batch_size"], "final_loss": float(sum(tail) / len(tail)), "train_s": train_s,
                     "diagnose_s": diag_s, "verdict": d.label, "decided_by": list(d.verdict.decided_by),
                     "decisive": _decisive(d), "warnings": list(d.warnings), "diagnosis": d.to_dict()})
        log(_line(rows[-1]))
    return rows


def _line(r: dict) -> str:
    return (f"| {r['case']} | {r['train']} | {r['steps']} | {r['final_loss']:.4f} | {r['train_s']:.0f} + "
            f"{r['diagnose_s']:.0f} s | **{r['verdict']}** ({', '.join(r['decided_by']) or '-'}) | {r['decisive']} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="pairs,mlp,unet", help="comma list of pairs, mlp, unet")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every training length (timing runs only)")
    ap.add_argument("--json", default=None, help="write the rows (with each full diagnosis) here")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"pairs", "mlp", "unet"}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}")

    def log(s):
        print(s, flush=True)

    start = time.perf_counter()
    log(f"# diagnose calibration, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or ''} "
        f"{platform.machine()}, torch {torch.__version__}, scale {args.scale}")
    log("| case | training size | steps | final loss | wall (train + diagnose) | verdict | decisive numbers |")
    log("|---|---|---|---|---|---|---|")
    rows = []
    if "pairs" in cases:
        rows += pair_cases(args.scale, log)
    kinds = [k for k in ("mlp", "unet") if k in cases]
    if kinds:
        rows += image_cases(kinds, args.scale, log)
    log(f"total {time.perf_counter() - start:.0f} s")
    for r in rows:
        for w in r["warnings"]:
            log(f"warning ({r['case']}, N={r['train']}): {w}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
