"""Memorisation of training pairings.

For paired training, every training source x0_i was paired with an assigned target x1_{a(i)}; its
integrated endpoint x_hat_i is compared with the assigned partner and with another reference partner
(typically the OT partner o(i)):

- ``l2_*``: ||x_hat_i - x1_partner||, mean and std over i;
- ``nn_acc_*``: fraction of i whose nearest training target (over all N targets) is that partner
  (chance = 1/N).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nearest_neighbours", "pairing_metrics"]


def nearest_neighbours(queries: Tensor, pool: Tensor, k: int = 1, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Euclidean k nearest neighbours of each query row in ``pool`` (flattened samples), chunked over
    queries so memory stays at chunk_size x N. Returns (distances, indices), each (Q, k)."""
    q = queries.reshape(queries.shape[0], -1)
    p = pool.reshape(pool.shape[0], -1).to(q.device, q.dtype)
    p_sq = p.pow(2).sum(1)
    dists, idxs = [], []
    for s in range(0, q.shape[0], chunk_size):
        qc = q[s:s + chunk_size]
        d2 = (qc.pow(2).sum(1, keepdim=True) + p_sq[None, :] - 2 * qc @ p.T).clamp_min(0)
        d, i = torch.topk(d2, k, dim=1, largest=False)
        dists.append(d.sqrt())
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def pairing_metrics(outputs: Tensor, targets: Tensor, partners: dict[str, Tensor], chunk_size: int = 4096) -> dict:
    """Distances of outputs to named partners among ``targets``.

    ``outputs[i]`` is the integrated endpoint of training source i; ``partners[name][i]`` is the index
    in ``targets`` of its partner under pairing ``name`` (e.g. "assigned", "ot"). Returns, for each
    name, ``l2_{name}_mean``, ``l2_{name}_std`` and ``nn_acc_{name}``, plus ``chance`` = 1/N.
    """
    _, nn_idx = nearest_neighbours(outputs, targets, 1, chunk_size)
    nn_idx = nn_idx[:, 0]
    flat_out = outputs.reshape(outputs.shape[0], -1)
    flat_tgt = targets.reshape(targets.shape[0], -1).to(flat_out.device, flat_out.dtype)
    res = {"chance": 1.0 / targets.shape[0]}
    for name, idx in partners.items():
        idx = idx.to(flat_out.device)
        l2 = (flat_out - flat_tgt[idx]).norm(dim=1)
        res[f"l2_{name}_mean"] = l2.mean().item()
        res[f"l2_{name}_std"] = l2.std().item() if l2.numel() > 1 else 0.0
        res[f"nn_acc_{name}"] = (nn_idx == idx).double().mean().item()
    return res
