"""``flowprobe reflow CHECKPOINT --pairs N --rounds K --out DIR``: rectify a trained toy or image flow K times.

Each round generates N pairs (x0, Phi(x0)) with the current flow, trains the next flow on them with the run's own
config (into DIR/round-k/), and measures straightness, the pairing probe and sample quality; DIR/results.json and
DIR/report.md hold the numbers (:mod:`flowprobe.runs.reflow`). Exit 2 on bad input, with one line.
"""

from __future__ import annotations

import sys

from ..runs.reflow import HELDOUT_PAIRS, INIT_CHOICES, ReflowOptions, reflow, reflow_table

__all__ = ["register", "run_reflow"]


def register(subparsers) -> None:
    """Add ``flowprobe reflow``."""
    p = subparsers.add_parser(
        "reflow", help="rectify a trained toy or image flow: generate pairs, retrain on them, measure, K rounds",
        description="Rectified flow (reflow) from a trained toy or image run: round k generates N pairs "
                    "(x0, Phi_{k-1}(x0)) with the run's sampler, trains Phi_k on them with the run's config into "
                    "OUT/round-k/, and reports straightness, the pairing probe (OT recall of the generated pairs; how "
                    "the new flow reproduces them) and the energy distance to held-out target samples (images: the "
                    "real images the run held out, else its training images).")
    p.add_argument("checkpoint", help="a flowprobe toy or image run: checkpoint file, checkpoints/ folder or run "
                                      "folder")
    p.add_argument("--pairs", type=int, required=True, metavar="N", help="generated pairs per round")
    p.add_argument("--rounds", type=int, required=True, metavar="K", help="reflow rounds")
    p.add_argument("--out", required=True, help="output folder (round-k/ runs, results.json, report.md)")
    p.add_argument("--init", default="scratch", choices=INIT_CHOICES,
                   help="start each round from the run's seeded initialisation (scratch) or the previous flow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of every round's training config, e.g. --set steps=5000 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated pairs' sources and the evaluation")
    p.add_argument("--eval-n", type=int, default=None, help="evaluation samples (default: the run's sample.n)")
    p.add_argument("--heldout-pairs", type=int, default=HELDOUT_PAIRS, metavar="N",
                   help=f"held-out pairs of each round's map, never trained on, for the memorisation watch and "
                        f"flowprobe diagnose OUT/round-k (default {HELDOUT_PAIRS}; 0: none)")
    p.add_argument("--no-ema", action="store_true", help="generate with the raw weights even when an EMA copy exists")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_reflow)


def run_reflow(args) -> int:
    options = ReflowOptions(pairs=args.pairs, rounds=args.rounds, init=args.init, seed=args.seed,
                            overrides=list(args.overrides), n_eval=args.eval_n, use_ema=not args.no_ema,
                            heldout=args.heldout_pairs)
    results = reflow(args.checkpoint, args.out, options, device=args.device,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(reflow_table(results))
    print(f"wrote {args.out}/results.json, {args.out}/report.md, {args.out}/round-1 .. round-{args.rounds}")
    return 0
