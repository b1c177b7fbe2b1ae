"""``flowprobe diagnose MODEL --train DATA [--heldout DATA] --out DIR``: a verdict on memorisation, with the evidence.

MODEL is a flowprobe checkpoint (file, checkpoint folder or run folder), or a model trained elsewhere with
``--adapter torchcfm|diffusers|flow_matching|module`` and its options (``--adapter-option KEY=VALUE``, repeated;
MODEL fills the adapter's checkpoint / folder / weights option). DATA is an image folder or tar, a ``.npy`` /
``.npz`` / ``.safetensors`` array (uint8 pixels channels-last, or floats in model space: images (N, C, H, W) in
[-1, 1]), a built-in name (``cifar10``, ``celeba64``, ``moons:2000``) or a pairs file (paired training).

Writes OUT/results.json, OUT/report.md and the figures, prints a table of the checks and the verdict. Exit codes:
0; 4 when ``--fail-on`` names the verdict (``memorises``; ``inconclusive`` fails on memorises or inconclusive);
2 on bad input (one line on stderr naming the file or option).
"""

from __future__ import annotations

import json
import sys

from ..config import ConfigError
from ..diagnosis import CHECKS, INCONCLUSIVE, MEMORISES, DiagnoseOptions, summary_table
from ..paths import make_path
from ..runs.diagnose import ADAPTER_MODEL_OPTION, diagnose
from ..solvers import METHODS

__all__ = ["register", "run_diagnose", "parse_adapter_options", "FAIL_EXIT_CODE"]

#: Exit code when --fail-on is met.
FAIL_EXIT_CODE = 4


def register(subparsers) -> None:
    """Add ``flowprobe diagnose``."""
    p = subparsers.add_parser(
        "diagnose", help="does a flow model memorise its training data? a verdict with the evidence",
        description="Run the memorisation checks (copies, membership gap, gradient variance, pairing, transport) on "
                    "a flow model and write OUT/results.json, OUT/report.md and figures. See docs/diagnose.md.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="flowprobe checkpoint file or run folder; with --adapter, the adapter's "
                        + ", ".join(f"{k}: {v}" for k, v in ADAPTER_MODEL_OPTION.items()))
    p.add_argument("--train", default=None, metavar="DATA",
                   help="training data: folder, tar, .npy/.npz/.safetensors, cifar10, celeba64, moons:2000, or a pairs "
                        "file (default for a flowprobe run: its own training set)")
    p.add_argument("--heldout", default=None, metavar="DATA",
                   help="real samples the model never saw (same forms), or, for a model trained on pairs of a map "
                        "(reflow), a pairs file of held-out pairs of the same map")
    p.add_argument("--pairs", default=None, metavar="FILE", help="pairs file of a paired run (probes.memorization)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adapter", default=None, choices=tuple(ADAPTER_MODEL_OPTION),
                   help="load MODEL with flowprobe.adapters (a model trained elsewhere)")
    p.add_argument("--adapter-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the adapter (VALUE read as JSON when it parses, else as text); repeatable")
    p.add_argument("--features", default=None, metavar="MODULE:FN",
                   help="feature map fn(x) -> (N, F) for a second copies check in feature space")
    _add_work_options(p)
    p.add_argument("--fail-on", default=None, choices=(MEMORISES, INCONCLUSIVE),
                   help=f"exit with {FAIL_EXIT_CODE} when the verdict is memorises (or, with inconclusive, memorises "
                        "or inconclusive)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_diagnose)


def _add_work_options(p) -> None:
    d = DiagnoseOptions()
    p.add_argument("--samples", type=int, default=d.n_generate, help=f"generated samples (default {d.n_generate})")
    p.add_argument("--solver", default=d.solver, choices=METHODS, help=f"ODE solver (default {d.solver})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"solver steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--membership-samples", type=int, default=d.membership_samples,
                   help=f"samples per group for the membership gap (default {d.membership_samples})")
    p.add_argument("--membership-repeats", type=int, default=d.membership_repeats,
                   help="noise draws averaged per sample (default 1)")
    p.add_argument("--gradvar-samples", type=int, default=d.gradvar_samples,
                   help=f"samples per time for the gradient variance (default {d.gradvar_samples})")
    p.add_argument("--gradvar-method", default=d.gradvar_method,
                   choices=("auto", "exact", "ghost", "microbatch", "naive"),
                   help="per-sample gradient estimator (auto: ghost, exact if ghost fails on the net)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--sigma", type=float, default=None, help="override the path noise level (default: the model's)")
    p.add_argument("--schedule", default="constant", choices=("constant", "bridge"), help="with --sigma")
    p.add_argument("--resolution", type=int, default=None, help="downsample loaded images to this side")
    p.add_argument("--limit", type=int, default=None, help="keep the first N samples of each DATA")
    p.add_argument("--mirror", default=d.mirror, choices=("auto", "on", "off"),
                   help="copies check: count a training image and its left-right mirror as one (auto: on for "
                        "images, off for vectors; a flowprobe run follows its data.flip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no-ema", action="store_true", help="flowprobe checkpoints: the raw weights, not the EMA copy")


def parse_adapter_options(items: list[str]) -> dict:
    """["key=value", ...] -> {key: value}, each value parsed as JSON when it parses (numbers, true, {...}), else
    kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--adapter-option: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _options(args) -> DiagnoseOptions:
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    try:
        return DiagnoseOptions(n_generate=args.samples, solver=args.solver, steps=args.steps,
                               batch_size=args.batch_size, membership_samples=args.membership_samples,
                               membership_repeats=args.membership_repeats, gradvar_samples=args.gradvar_samples,
                               gradvar_method=args.gradvar_method, checks=checks, seed=args.seed,
                               mirror=args.mirror)
    except ValueError as e:
        raise ConfigError(f"options: {e}") from None


def _progress(enabled: bool):
    if not enabled:
        return None
    seen = set()

    def report(stage: str, done: int, total: int) -> None:
        if stage not in seen:
            seen.add(stage)
            print(f"flowprobe diagnose: {stage} ...", file=sys.stderr, flush=True)
    return report


def run_diagnose(args) -> int:
    """``flowprobe diagnose``: diagnose, write, print the table and the verdict; the exit code of --fail-on."""
    if args.model is None and args.adapter is None:
        raise ConfigError("MODEL is required (a flowprobe checkpoint or run folder, or use --adapter)")
    if args.sigma is not None and not args.sigma >= 0:
        raise ConfigError(f"--sigma must be >= 0, got {args.sigma}")
    path = None if args.sigma is None else make_path(args.sigma, args.schedule)
    result = diagnose(args.model, args.train, args.heldout, args.out, pairs=args.pairs, adapter=args.adapter,
                      adapter_options=parse_adapter_options(args.adapter_option), features=args.features, path=path,
                      device=args.device, use_ema=not args.no_ema, options=_options(args), resolution=args.resolution,
                      limit=args.limit, progress=_progress(not args.no_progress), figures=not args.no_figures)
    if args.json:
        print(result.to_json())
    else:
        rows = summary_table(result)
        width = max(len(r[0]) for r in rows)
        for name, role, vote, summary in rows:
            print(f"{name:<{width}}  {role:<13}  {vote:<11}  {summary}")
        for w in result.warnings:
            print(f"warning: {w}")
        v = result.verdict
        by = f" (decided by {', '.join(v.decided_by)})" if v.decided_by else ""
        print(f"\nverdict: {v.label.upper()}{by}: {v.reason}")
        print(f"wrote {args.out}/results.json and {args.out}/report.md")
    fail = {MEMORISES: {MEMORISES}, INCONCLUSIVE: {MEMORISES, INCONCLUSIVE}}.get(args.fail_on, set())
    return FAIL_EXIT_CODE if result.label in fail else 0
