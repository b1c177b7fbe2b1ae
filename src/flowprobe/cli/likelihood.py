"""``flowprobe likelihood CHECKPOINT --data DATA``: the log-density a trained run gives to samples (nats; bits/dim
for 8-bit images), by the instantaneous change of variables (docs/likelihood.md).

Prints the mean log-likelihood with its standard error (and bits/dim for images); with ``--out DIR`` writes
DIR/results.json, DIR/log_likelihood.npy (per sample) and DIR/likelihood.png. Exit codes: 0; 2 on bad input (one
line on stderr naming the file or option).
"""

from __future__ import annotations

from ..probes.likelihood import PROBES
from ..runs.likelihood import DEFAULT_PROBES, EXACT_MAX_DIM, METHODS, likelihood

__all__ = ["register", "run_likelihood"]


def register(subparsers) -> None:
    """Add ``flowprobe likelihood``."""
    p = subparsers.add_parser(
        "likelihood", help="log-likelihood (nats, bits/dim) of samples under a trained flow",
        description="Integrate the flow backward from the samples to the source with the divergence (instantaneous "
                    "change of variables, torchdiffeq) and report log p(x) per sample: mean +- standard error, and "
                    "bits per dimension for 8-bit images (uniform dequantisation). See docs/likelihood.md.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="flowprobe checkpoint file, checkpoint folder or run folder")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="samples: .npy/.npz/.safetensors, an image folder or tar, cifar10, celeba64, moons:2000")
    p.add_argument("--n", type=int, default=None, help="use the first N samples (default all)")
    p.add_argument("--divergence", default=None, choices=("exact", "hutchinson"),
                   help=f"exact (one backward pass per dimension) or Hutchinson's estimator (default: exact for "
                        f"D <= {EXACT_MAX_DIM}, hutchinson above)")
    p.add_argument("--probes", type=int, default=DEFAULT_PROBES,
                   help=f"Hutchinson probes per sample, each an independent estimate (default {DEFAULT_PROBES})")
    p.add_argument("--probe", default="rademacher", choices=PROBES, help="Hutchinson probe kind (default rademacher)")
    p.add_argument("--method", default="dopri5", choices=METHODS,
                   help="ODE method: adaptive (dopri5, ...; --rtol/--atol) or fixed-grid with --steps (default dopri5)")
    p.add_argument("--rtol", type=float, default=1e-5, help="adaptive solver relative tolerance (default 1e-5)")
    p.add_argument("--atol", type=float, default=1e-5, help="adaptive solver absolute tolerance (default 1e-5)")
    p.add_argument("--steps", type=int, default=None, help="steps of a fixed-grid --method")
    p.add_argument("--batch-size", type=int, default=None, help="samples per solve (default 1024; images 128)")
    p.add_argument("--out", default=None, help="write results.json, log_likelihood.npy and likelihood.png here")
    p.add_argument("--seed", type=int, default=0, help="seeds the probes, the dequantisation noise and toy draws")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights, not the EMA copy")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--json", action="store_true", help="print results.json instead of the summary")
    p.set_defaults(func=run_likelihood)


def run_likelihood(args) -> int:
    """``flowprobe likelihood``: compute, write, print a short summary."""
    import json

    res = likelihood(args.checkpoint, args.data, args.out, n=args.n, divergence=args.divergence, probes=args.probes,
                     probe=args.probe, method=args.method, rtol=args.rtol, atol=args.atol, steps=args.steps,
                     device=args.device, seed=args.seed, use_ema=not args.no_ema, batch_size=args.batch_size,
                     figures=not args.no_figures)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    how = res["divergence"] + (f" ({res['n_probes']} {res['probe']} probes)" if res["divergence"] == "hutchinson"
                               else "")
    print(f"log p(x): {res['mean_log_likelihood']:.4f} +- {res['stderr']:.4f} nats (mean +- s.e. over "
          f"{res['n']} samples, D = {res['dim']}; {how} divergence, {res['method']}, nfe {res['nfe']}, "
          f"{res['seconds']:.1f} s)")
    if res.get("bits_per_dim") is not None:
        print(f"bits/dim: {res['bits_per_dim']:.4f} +- {res['bits_per_dim_stderr']:.4f} (uniform dequantisation)")
    for key in ("density_of", "note", "note_bits_per_dim"):
        if key in res:
            print(f"note: {res[key]}")
    if args.out:
        print(f"wrote {args.out}/results.json")
    return 0
