"""Memorisation of training pairings, and copies of training images.

Paired training. Every training source x0_i was paired with an assigned target x1_{a(i)}; its
integrated endpoint x_hat_i is compared with the assigned partner and with another reference partner
(typically the OT partner o(i)) by :func:`pairing_metrics`:

- ``l2_*``: ||x_hat_i - x1_partner||, mean and std over i;
- ``nn_acc_*``: fraction of i whose nearest training target (over all N targets) is that partner
  (chance = 1/N).

Fresh samples (held-out sources or fresh noise). :func:`copy_metrics` measures, for each sample s,
the distances d1 <= d2 to its two nearest training images and the ratio d1 / d2. A ratio below 1/3
counts as a copy (Yoon et al., 2023): the sample is much closer to one training image than to any
other. The same quantities for held-out real images are the reference level of an honest model.

Distances are Euclidean over flattened samples, found with a chunked float32 matmul
||q||^2 + ||p||^2 - 2 q.p (on the queries' device, so the GPU when they live there; TF32 is switched
off for it), then the best candidates are re-ranked with distances recomputed directly as
sqrt(sum (q - p)^2) (float32, or float64 for float64 queries), free of that formula's cancellation, so an
exact copy gives distance 0, not a rounding residue.

Pairs files. :func:`save_pairs` / :func:`load_pairs` read and write the ``.safetensors`` format used by
``flowprobe probe memorization``: tensors ``x0`` (N, ...) float32 sources and ``x1`` (N, ...) targets
(float32 in model space, or uint8 pixels meaning x / 127.5 - 1), x0[i] assigned to x1[i]; optional
``ot_index`` (N,) int64, x1[ot_index[i]] being x0[i]'s OT partner (and any other ``<name>_index``
tensors, compared in the same way); metadata ``{"format": "flowprobe-pairs-1", ...}``.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..io import atomic_write, write_json

__all__ = ["nearest_neighbours", "pairing_metrics", "copy_statistics", "copy_metrics", "save_pairs",
           "load_pairs", "PairSet", "integrate_sources", "evaluate_pairs", "plot_pairing_histograms",
           "load_model", "PAIRS_FORMAT", "COPY_THRESHOLD", "register_cli"]

PAIRS_FORMAT = "flowprobe-pairs-1"
#: d1 / d2 below this counts as a copy of the nearest training image.
COPY_THRESHOLD = 1.0 / 3.0


@contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _flat(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1)
    return x if x.is_floating_point() else x.float()


def nearest_neighbours(queries: Tensor, pool: Tensor, k: int = 1, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Euclidean k nearest neighbours of each query row in ``pool`` (flattened samples), chunked over
    queries so memory stays at chunk_size x N. Returns (distances, indices), each (Q, k), ascending.

    Candidates come from float32 matmul distances (||q||^2 + ||p||^2 - 2 q.p, which loses digits to
    cancellation when a distance is small beside the norms, e.g. for a copy); the best min(N, k + 8) are
    re-ranked with direct distances ||q - p|| (no cancellation), which are the distances returned.
    """
    if k < 1 or k > pool.shape[0]:
        raise ValueError(f"k must be in [1, {pool.shape[0]}] (the pool size), got {k}")
    q = _flat(queries)
    p = _flat(pool).to(q.device)
    out_dtype = q.dtype
    q32, p32 = q.float(), p.float()
    # re-ranking precision: the queries' own for float64, float32 otherwise
    q_re, p_re = (q, p.to(q.dtype)) if q.dtype == torch.float64 else (q32, p32)
    p_sq = p32.pow(2).sum(1)
    n_cand = min(p.shape[0], k + 8)
    dists, idxs = [], []
    with _no_tf32():
        for s in range(0, q.shape[0], chunk_size):
            qc = q32[s:s + chunk_size]
            d2 = qc.pow(2).sum(1, keepdim=True) + p_sq[None, :] - 2 * qc @ p32.T
            _, cand = torch.topk(d2, n_cand, dim=1, largest=False)
            exact = torch.empty(cand.shape, dtype=q_re.dtype, device=q.device)
            sub = max(1, (1 << 24) // max(1, n_cand * q.shape[1]))
            q_rows = q_re[s:s + chunk_size]
            for r in range(0, cand.shape[0], sub):
                # direct differences: no cancellation, so float32 gives ~1e-7 relative accuracy
                diff = q_rows[r:r + sub, None, :] - p_re[cand[r:r + sub]]
                exact[r:r + sub] = torch.linalg.vector_norm(diff, dim=-1)
            d, order = torch.topk(exact, k, dim=1, largest=False)
            dists.append(d.to(out_dtype))
            idxs.append(torch.gather(cand, 1, order))
    return torch.cat(dists), torch.cat(idxs)


def pairing_metrics(outputs: Tensor, targets: Tensor, partners: dict[str, Tensor], chunk_size: int = 4096) -> dict:
    """Distances of outputs to named partners among ``targets``.

    ``outputs[i]`` is the integrated endpoint of training source i; ``partners[name][i]`` is the index
    in ``targets`` of its partner under pairing ``name`` (e.g. "assigned", "ot"). Returns, for each
    name, ``l2_{name}_mean``, ``l2_{name}_std`` and ``nn_acc_{name}``, plus ``chance`` = 1/N.
    """
    _, nn_idx = nearest_neighbours(outputs, targets, 1, chunk_size)
    nn_idx = nn_idx[:, 0]
    flat_out = _flat(outputs)
    flat_tgt = _flat(targets).to(flat_out.device, flat_out.dtype)
    res = {"chance": 1.0 / targets.shape[0]}
    for name, idx in partners.items():
        idx = idx.to(flat_out.device)
        l2 = (flat_out - flat_tgt[idx]).norm(dim=1)
        res[f"l2_{name}_mean"] = l2.mean().item()
        res[f"l2_{name}_std"] = l2.std().item() if l2.numel() > 1 else 0.0
        res[f"nn_acc_{name}"] = (nn_idx == idx).double().mean().item()
    return res


def copy_statistics(samples: Tensor, train: Tensor, chunk_size: int = 4096) -> dict[str, Tensor]:
    """Per-sample nearest-neighbour statistics against the training set.

    Returns tensors (on the samples' device): ``d1`` and ``d2``, the distances to the nearest and
    second-nearest training images; ``ratio`` = d1 / d2 (0 when d1 = 0, so an exact copy has ratio 0
    even next to a duplicate); ``nn_index``, the index of the nearest training image.
    """
    if train.shape[0] < 2:
        raise ValueError("copy statistics need at least two training images")
    d, i = nearest_neighbours(samples, train, 2, chunk_size)
    d1, d2 = d[:, 0].double(), d[:, 1].double()
    ratio = torch.where(d1 == 0, torch.zeros_like(d1), d1 / d2.clamp_min(torch.finfo(torch.float64).tiny))
    return {"d1": d1, "d2": d2, "ratio": ratio, "nn_index": i[:, 0]}


def _summary(stats: dict[str, Tensor], threshold: float) -> dict:
    d1, ratio = stats["d1"], stats["ratio"]
    return {"n": int(d1.numel()), "nn_dist_mean": d1.mean().item(), "nn_dist_median": d1.median().item(),
            "nn_dist_std": d1.std().item() if d1.numel() > 1 else 0.0, "ratio_mean": ratio.mean().item(),
            "ratio_median": ratio.median().item(), "copy_fraction": (ratio < threshold).double().mean().item()}


def copy_metrics(samples: Tensor, train: Tensor, reference: Tensor | None = None,
                 threshold: float = COPY_THRESHOLD, chunk_size: int = 4096) -> dict:
    """How much ``samples`` copy the ``train`` images.

    For each sample: d1, d2 = distances to the two nearest training images, ratio = d1 / d2. Returns
    ``n``, ``nn_dist_mean`` / ``_median`` / ``_std`` (of d1), ``ratio_mean`` / ``_median`` and
    ``copy_fraction`` = P(ratio < threshold) (threshold 1/3 by default), and, when held-out real images
    ``reference`` are given, the same keys under ``"reference"`` (the level an honest generator should
    match) plus ``copy_fraction_excess`` = copy_fraction - reference copy_fraction.
    """
    res = {"threshold": threshold, **_summary(copy_statistics(samples, train, chunk_size), threshold)}
    if reference is not None:
        ref = _summary(copy_statistics(reference.to(samples.device), train, chunk_size), threshold)
        res["reference"] = ref
        res["copy_fraction_excess"] = res["copy_fraction"] - ref["copy_fraction"]
    return res


# ----------------------------------------------------------------------------------------- pairs files

@dataclass
class PairSet:
    """A pairs file: sources ``x0``, targets ``x1`` (float, model space), named partner indices
    (``partners["assigned"]`` is always arange(N); ``partners["ot"]`` when the file has ``ot_index``),
    and the string metadata."""

    x0: Tensor
    x1: Tensor
    partners: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def save_pairs(path: str | Path, x0: Tensor, x1: Tensor, *, ot_index: Tensor | None = None,
               extra_index: dict[str, Tensor] | None = None, metadata: dict | None = None) -> Path:
    """Write a pairs file (see the module docstring) atomically. ``x1`` may be uint8 pixels (stored as
    such, 4x smaller) or floats; ``extra_index`` adds ``<name>_index`` tensors; ``metadata`` values are
    stored as JSON strings."""
    from safetensors.torch import save_file

    n = x0.shape[0]
    if x1.shape[0] != n:
        raise ValueError(f"x0 and x1 must have the same number of rows, got {n} and {x1.shape[0]}")
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be floating point, got {x0.dtype}")
    tensors = {"x0": x0.detach().float().cpu().contiguous(),
               "x1": (x1.detach().cpu() if x1.dtype == torch.uint8 else x1.detach().float().cpu()).contiguous()}
    indices = dict(extra_index or {})
    if ot_index is not None:
        indices["ot"] = ot_index
    for name, idx in indices.items():
        idx = torch.as_tensor(idx).long().cpu().contiguous()
        if idx.shape != (n,) or (n and (idx.min() < 0 or idx.max() >= n)):
            raise ValueError(f"{name}_index must have shape ({n},) with values in [0, {n}), got {tuple(idx.shape)}")
        tensors[f"{name}_index"] = idx
    meta = {"format": PAIRS_FORMAT, **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_pairs(path: str | Path, device: str | torch.device = "cpu") -> PairSet:
    """Read a pairs file written by :func:`save_pairs` (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pairs file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for a foreign file
        raise ConfigError(f"{path}: not a safetensors pairs file ({e})") from None
    if "x0" not in tensors or "x1" not in tensors:
        raise ConfigError(f"{path}: a pairs file needs tensors 'x0' and 'x1', found {sorted(tensors)}")
    x0, x1 = tensors.pop("x0").float(), tensors.pop("x1")
    x1 = x1.float() / 127.5 - 1.0 if x1.dtype == torch.uint8 else x1.float()
    if x0.shape != x1.shape:
        raise ConfigError(f"{path}: x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} must have the same shape")
    partners = {"assigned": torch.arange(x0.shape[0], device=x0.device)}
    for k, v in tensors.items():
        if k.endswith("_index"):
            partners[k[:-len("_index")]] = v.long()
    metadata = {}
    for k, v in meta.items():
        try:
            metadata[k] = json.loads(v) if k != "format" else v
        except ValueError:
            metadata[k] = v
    return PairSet(x0, x1, partners, metadata)


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def integrate_sources(model, x0: Tensor, *, method: str = "euler", steps: int = 100, batch_size: int = 500,
                      device: str | torch.device | None = None, precision: str = "fp32") -> Tensor:
    """x_hat_i = Phi(x0_i): integrate dx/dt = model(t, x) from t = 0 to 1 with
    :func:`flowprobe.solvers.integrate`, in batches, optionally under bf16 autocast on CUDA; float32
    endpoints on ``device`` (default x0's device)."""
    from ..solvers import integrate

    device = torch.device(device) if device is not None else x0.device
    if precision == "bf16" and device.type == "cuda":
        def field(t, x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(t, x).float()
    else:
        field = model
    outs = [integrate(field, x0[s:s + batch_size].to(device, torch.float32), method=method, steps=steps).x.float()
            for s in range(0, x0.shape[0], batch_size)]
    return torch.cat(outs) if outs else x0.new_zeros((0, *x0.shape[1:]))


def evaluate_pairs(model, pairs: PairSet, *, method: str = "euler", steps: int = 100, batch_size: int = 500,
                   device: str | torch.device | None = None, precision: str = "fp32") -> tuple[dict, Tensor]:
    """Integrate every training source of ``pairs`` and compare the endpoints with each named partner
    (:func:`pairing_metrics`). Returns (metrics, endpoints); metrics also record the solver."""
    outputs = integrate_sources(model, pairs.x0, method=method, steps=steps, batch_size=batch_size, device=device,
                                precision=precision)
    targets = pairs.x1.to(outputs.device)
    partners = {k: v.to(outputs.device) for k, v in pairs.partners.items()}
    metrics = pairing_metrics(outputs, targets, partners)
    metrics.update({"n": int(pairs.x0.shape[0]), "solver": method, "steps": steps})
    return metrics, outputs


def plot_pairing_histograms(outputs: Tensor, targets: Tensor, partners: dict[str, Tensor], path: str | Path,
                            title: str = "distance of each endpoint to its partners") -> Path:
    """Histograms of ||x_hat_i - x1_partner(i)|| for each named partner, saved as a PNG."""
    from ..report import plt, save_figure

    flat_out = _flat(outputs).cpu()
    flat_tgt = _flat(targets).cpu()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, idx in partners.items():
        l2 = (flat_out - flat_tgt[idx.cpu()]).norm(dim=1).numpy()
        ax.hist(l2, bins=40, alpha=0.55, label=f"to {name} partner (mean {l2.mean():.3g})")
    ax.set_xlabel("L2 distance")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ CLI

def load_model(checkpoint: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
    """Rebuild the velocity net of a checkpoint (:mod:`flowprobe.checkpoint`) and load its weights
    (the EMA copy when there is one and ``use_ema``): :func:`flowprobe.train.load_model`, which reads the
    sidecar's ``extra["model"] = {"class": "UNet" | "MLP" | "FlatMLP", "kwargs": {...}}``, else the
    ``flowprobe train`` config. Returns (net in eval mode, checkpoint)."""
    from ..train import load_model as rebuild

    return rebuild(checkpoint, device, use_ema)


def register_cli(subparsers) -> None:
    """``flowprobe probe memorization CHECKPOINT --pairs FILE --out DIR``."""
    p = subparsers.add_parser(
        "memorization", help="integrate the training sources of a pairs file; distance to each partner",
        description="Integrate every x0 of a pairs file with the checkpoint's model and report, for the assigned "
                    "partner (x1[i]) and every other partner index in the file (e.g. ot_index), the mean/std L2 "
                    "distance and the nearest-target accuracy (chance 1/N). Writes memorization.json and "
                    "memorization.png into --out.")
    p.add_argument("checkpoint", help="checkpoint .safetensors file (with its .json) or run folder")
    p.add_argument("--pairs", required=True, help="pairs .safetensors file (tensors x0, x1, optional ot_index)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--solver", default="euler", choices=("euler", "midpoint", "heun", "rk4", "dopri5"))
    p.add_argument("--steps", type=int, default=100, help="solver steps (default 100)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if an EMA copy exists")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    if args.steps < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 2):
        raise ConfigError("--steps and --batch-size must be >= 1 and --limit >= 2")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, ck = load_model(args.checkpoint, device, use_ema=not args.no_ema)
    pairs = load_pairs(args.pairs)
    if args.limit is not None and args.limit < pairs.x0.shape[0]:
        n = args.limit
        keep = {k: v[:n] for k, v in pairs.partners.items() if bool((v[:n] < n).all())}
        dropped = sorted(set(pairs.partners) - set(keep))
        pairs = PairSet(pairs.x0[:n], pairs.x1[:n], keep, pairs.metadata)
        if dropped:
            print(f"note: --limit drops partners pointing beyond the first {n}: {', '.join(dropped)}")
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
