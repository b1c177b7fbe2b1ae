"""A run's training set from a pairs file (``data.pairs``): the pools x0 and x1, row i paired with row i.
Toy runs and image runs (``data.dataset``: x0 noises and x1 images, floats of the run's image shape, e.g. the
(x0, Phi(x0)) pairs of ``flowprobe reflow``). (A checkpoint's weights as the starting point, ``model.init``:
:func:`flowprobe.runs.load.initialise_from`.)"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError

__all__ = ["pairs_pools", "pairs_coupling"]


def pairs_pools(path: str | Path, source, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, x1) of the pairs file ``path`` on ``device`` (float32), checked to hold samples of the shape that
    ``source`` draws (the law the run samples from); a ConfigError naming ``data.pairs`` otherwise."""
    from ..probes.memorization import load_pairs

    try:
        pairs = load_pairs(path, device=device)
    except ConfigError as e:
        raise ConfigError(f"data.pairs: {e}") from None
    probe, _ = source.sample(1, torch.Generator(device=device).manual_seed(0))
    if tuple(pairs.x0.shape[1:]) != tuple(probe.shape[1:]):
        raise ConfigError(f"data.pairs: {path} holds samples of shape {tuple(pairs.x0.shape[1:])}, but the run's "
                          f"source draws shape {tuple(probe.shape[1:])}")
    return pairs.x0.to(device, torch.float32), pairs.x1.to(device, torch.float32)


def pairs_coupling(path: str | Path, source, kind: str, method: str = "exact", reg: float = 0.05, device="cpu"):
    """The coupling ``kind`` (``coupling.kind``) over the pools of the pairs file ``path``
    (:func:`pairs_pools`): ``fixed_pairs`` keeps row i with row i (:class:`~flowprobe.couplings.FixedPairs`);
    ``independent`` and ``minibatch_ot`` draw the two pools separately."""
    from ..couplings import FixedPairs, IndependentCoupling, MinibatchOTCoupling, TensorSampler

    x0, x1 = pairs_pools(path, source, device)
    if kind == "fixed_pairs":
        return FixedPairs(x0, x1)
    src, tgt = TensorSampler(x0), TensorSampler(x1)
    if kind == "minibatch_ot":
        return MinibatchOTCoupling(src, tgt, method, reg)
    return IndependentCoupling(src, tgt)
