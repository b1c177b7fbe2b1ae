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

Distances are Euclidean over flattened samples, found by :func:`flowprobe.probes.neighbours.nearest_neighbours`
(re-exported here): a float32 candidate search (a chunked matmul on the queries' device with TF32 off, or an
exact FAISS flat index), then the best candidates are re-ranked with distances recomputed directly as
sqrt(sum (q - p)^2) (float32, or float64 for float64 queries), free of that formula's cancellation, so an
exact copy gives distance 0, not a rounding residue.

Pairs files. :func:`save_pairs` / :func:`load_pairs` read and write the ``.safetensors`` format used by
``flowprobe probe memorization``: tensors ``x0`` (N, ...) float32 sources and ``x1`` (N, ...) targets
(float32 in model space, or uint8 pixels meaning x / 127.5 - 1), x0[i] assigned to x1[i]; optional
``ot_index`` (N,) int64, x1[ot_index[i]] being x0[i]'s OT partner (and any other ``<name>_index``
tensors, compared in the same way); metadata ``{"format": "flowprobe-pairs-1", ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..io import atomic_write
from ..solvers import push_forward
from .neighbours import nearest_neighbours

__all__ = ["nearest_neighbours", "nearest_targets", "pairing_metrics", "copy_statistics", "copy_metrics", "save_pairs",
           "load_pairs", "PairSet", "evaluate_pairs", "limit_pairs", "PAIRS_FORMAT",
           "COPY_THRESHOLD"]

PAIRS_FORMAT = "flowprobe-pairs-1"
#: d1 / d2 below this counts as a copy of the nearest training image.
COPY_THRESHOLD = 1.0 / 3.0


def _flat(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1)
    return x if x.is_floating_point() else x.float()


def nearest_targets(outputs: Tensor, targets: Tensor, chunk_size: int = 4096) -> Tensor:
    """The index in ``targets`` of each output's nearest target, shape (N,)."""
    return nearest_neighbours(outputs, targets, 1, chunk_size)[1][:, 0]


def pairing_metrics(outputs: Tensor, targets: Tensor, partners: dict[str, Tensor], chunk_size: int = 4096,
                    nearest: Tensor | None = None) -> dict:
    """Distances of outputs to named partners among ``targets``.

    ``outputs[i]`` is the integrated endpoint of training source i; ``partners[name][i]`` is the index
    in ``targets`` of its partner under pairing ``name`` (e.g. "assigned", "ot"); ``nearest``: the outputs'
    nearest targets when already known (:func:`nearest_targets`). Returns, for each name, ``l2_{name}_mean``,
    ``l2_{name}_std`` and ``nn_acc_{name}``, plus ``chance`` = 1/N.
    """
    nn_idx = nearest_targets(outputs, targets, chunk_size) if nearest is None else nearest.to(outputs.device)
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


def copy_statistics(samples: Tensor, train: Tensor, chunk_size: int = 4096,
                    mirrored: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample nearest-neighbour statistics against the training set.

    Returns tensors (on the samples' device): ``d1`` and ``d2``, the distances to the nearest and
    second-nearest training images; ``ratio`` = d1 / d2 (0 when d1 = 0, so an exact copy has ratio 0
    even next to a duplicate); ``nn_index``, the index of the nearest training image.

    ``mirrored``: a second form of the same training items, row for row (the left-right mirror images of a set
    trained with random flips, or their features). The distance to training item j is then
    min(||s - train_j||, ||s - mirrored_j||), so an item and its mirror count as one: a mirrored copy is a copy,
    and an item's own mirror is never its second neighbour. The two best of each form hold the two best items
    of the minimum (an item beaten by two others in one form is beaten by them in the minimum too).
    """
    if train.shape[0] < 2:
        raise ValueError("copy statistics need at least two training images")
    d, i = nearest_neighbours(samples, train, 2, chunk_size)
    if mirrored is not None:
        if mirrored.shape != train.shape:
            raise ValueError(f"mirrored must have the training set's shape {tuple(train.shape)}, "
                             f"got {tuple(mirrored.shape)}")
        dm, im = nearest_neighbours(samples, mirrored, 2, chunk_size)
        d_all, order = torch.cat([d, dm.to(d.dtype)], 1).sort(dim=1, stable=True)
        i_all = torch.cat([i, im.to(i.device)], 1).gather(1, order)
        second = (i_all != i_all[:, :1]).to(torch.int8).argmax(dim=1, keepdim=True)  # first other item
        d = torch.cat([d_all[:, :1], d_all.gather(1, second)], 1)
        i = torch.cat([i_all[:, :1], i_all.gather(1, second)], 1)
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
    if x0.dim() < 2 or x0.shape[0] < 2:
        raise ConfigError(f"{path}: x0 and x1 must hold at least 2 rows of samples (shape (N, ...)), got "
                          f"{tuple(x0.shape)}")
    if not (bool(torch.isfinite(x0).all()) and bool(torch.isfinite(x1).all())):
        raise ConfigError(f"{path}: x0 or x1 holds NaN or infinite values")
    n = x0.shape[0]
    partners = {"assigned": torch.arange(n, device=x0.device)}
    for k, v in tensors.items():
        if k.endswith("_index"):
            if v.shape != (n,) or v.is_floating_point() or v.dtype == torch.bool:
                raise ConfigError(f"{path}: {k} must be {n} integers (one partner per row), got {v.dtype} "
                                  f"{tuple(v.shape)}")
            if n and (int(v.min()) < 0 or int(v.max()) >= n):
                raise ConfigError(f"{path}: {k} must index rows 0..{n - 1}, got values in [{int(v.min())}, "
                                  f"{int(v.max())}]")
            partners[k[:-len("_index")]] = v.long()
    metadata = {}
    for k, v in meta.items():
        try:
            metadata[k] = json.loads(v) if k != "format" else v
        except ValueError:
            metadata[k] = v
    return PairSet(x0, x1, partners, metadata)


# ------------------------------------------------------------------------------------------ evaluation

def _autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision: bfloat16 for "bf16" (applied on CUDA only, by
    :func:`~flowprobe.solvers.push_forward`), none for anything else (float32)."""
    return torch.bfloat16 if precision == "bf16" else None


def evaluate_pairs(model, pairs: PairSet, *, method: str = "euler", steps: int = 100, batch_size: int = 500,
                   device: str | torch.device | None = None, precision: str = "fp32", return_nearest: bool = False):
    """Integrate every training source of ``pairs`` on ``device`` (default the sources' device; with
    :func:`flowprobe.solvers.push_forward`, ``precision="bf16"`` meaning bf16 autocast on CUDA) and compare the
    endpoints with each named partner (:func:`pairing_metrics`). Returns (metrics, endpoints on ``device``), and
    with ``return_nearest`` also each endpoint's nearest target; metrics also record the solver."""
    x0 = pairs.x0 if device is None else pairs.x0.to(device)
    outputs = push_forward(model, x0, method=method, steps=steps, batch_size=batch_size,
                           autocast_dtype=_autocast_dtype(precision))
    targets = pairs.x1.to(outputs.device)
    partners = {k: v.to(outputs.device) for k, v in pairs.partners.items()}
    nearest = nearest_targets(outputs, targets)
    metrics = pairing_metrics(outputs, targets, partners, nearest=nearest)
    metrics.update({"n": int(pairs.x0.shape[0]), "solver": method, "steps": steps})
    return (metrics, outputs, nearest) if return_nearest else (metrics, outputs)


def limit_pairs(pairs: PairSet, n: int) -> tuple[PairSet, list[str]]:
    """The first ``n`` pairs, and the names of the partner indices dropped because they point beyond them."""
    if n >= pairs.x0.shape[0]:
        return pairs, []
    keep = {k: v[:n] for k, v in pairs.partners.items() if bool((v[:n] < n).all())}
    dropped = sorted(set(pairs.partners) - set(keep))
    return PairSet(pairs.x0[:n], pairs.x1[:n], keep, pairs.metadata), dropped
