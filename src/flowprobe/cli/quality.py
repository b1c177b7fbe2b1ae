"""``flowprobe quality GENERATED --real DATA``: precision, recall, density, coverage, Frechet distance and KID of
generated samples against real ones, in the samples' own space, in a feature space ``--features MODULE:FN`` and,
with ``--inception-weights FILE`` (torch-fidelity's InceptionV3 weights, a local file), FID / KID in Inception space.

GENERATED is an array file, image folder or tar, a built-in name, or a flowprobe checkpoint or run folder (sampled
with ``--steps`` and ``--solver``); DATA the same, without checkpoints. Prints a table, writes OUT/results.json
with ``--out``. Exit codes: 0; 2 on bad input (one line on stderr). See docs/quality.md.
"""

from __future__ import annotations

import json

from ..runs.config import SAMPLE_SOLVERS
from ..runs.quality import QualityOptions, quality

__all__ = ["register", "run_quality", "quality_table"]


def register(subparsers) -> None:
    """Add ``flowprobe quality``."""
    p = subparsers.add_parser(
        "quality", help="precision / recall / density / coverage, Frechet distance and KID of generated samples",
        description="Compare generated samples with real ones: k-NN precision, recall, density and coverage, the "
                    "Frechet distance and KID, in the samples' own space and in the feature spaces asked for. "
                    "See docs/quality.md.")
    p.add_argument("generated", metavar="GENERATED",
                   help="generated samples: .npy/.npz/.safetensors, image folder or tar, or a flowprobe checkpoint "
                        "or run folder to sample from")
    p.add_argument("--real", required=True, metavar="DATA",
                   help="real samples: .npy/.npz/.safetensors, image folder or tar, cifar10, celeba64, moons:2000")
    p.add_argument("--features", default=None, metavar="MODULE:FN", help="feature map fn(x) -> (N, F)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="torch-fidelity's InceptionV3 weights (.pth or .safetensors), read locally, never downloaded; "
                        "adds FID / KID in Inception space (needs pip install torch-fidelity)")
    p.add_argument("--k", type=int, default=QualityOptions.k, help="neighbours of the k-NN balls (default 5)")
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help="use at most N samples of each set; a checkpoint draws N (default: as many as DATA holds)")
    p.add_argument("--kid-subsets", type=int, default=QualityOptions.kid_subsets)
    p.add_argument("--kid-subset-size", type=int, default=QualityOptions.kid_subset_size,
                   help="rows per KID subset (capped at the smaller set; default 1000)")
    p.add_argument("--steps", type=int, default=QualityOptions.steps, help="solver steps when sampling a checkpoint")
    p.add_argument("--solver", default=QualityOptions.solver, choices=SAMPLE_SOLVERS)
    p.add_argument("--seed", type=int, default=0, help="KID subsets and checkpoint sampling")
    p.add_argument("--batch-size", type=int, default=QualityOptions.batch_size, help="batch of the feature maps")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, auto (default cpu)")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/results.json")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.set_defaults(func=run_quality)


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def quality_table(record: dict) -> list[str]:
    """The lines of the table: one row per space."""
    head = ("space", "dim", "precision", "recall", "density", "coverage", "frechet", "kid +- std")
    rows = [head]
    for name, m in record["spaces"].items():
        rows.append((name, str(m["dim"]), *(_cell(m[k]) for k in ("precision", "recall", "density", "coverage",
                                                                    "frechet_distance")),
                     f"{m['kid']:.4g} +- {m['kid_std']:.2g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def run_quality(args) -> int:
    """``flowprobe quality``: compute, write, print."""
    options = QualityOptions(k=args.k, n=args.n, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                             batch_size=args.batch_size, steps=args.steps, solver=args.solver, seed=args.seed)
    record = quality(args.generated, args.real, args.out, features=args.features,
                     inception_weights=args.inception_weights, options=options, device=args.device)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    gen, real = record["generated"], record["real"]
    print(f"{gen['n']} generated ({gen['source']}) vs {real['n']} real ({real['source']}), k = {options.k}")
    if gen["non_finite_dropped"]:
        print(f"warning: {gen['non_finite_dropped']} generated samples with non-finite values were left out")
    for line in quality_table(record):
        print(line)
    if args.out:
        print(f"wrote {args.out}/results.json")
    return 0
