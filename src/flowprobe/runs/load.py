"""Loading a model or a whole run from a checkpoint: the one model loader of the library."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, check_weights
from ..config import ConfigError
from ..nets.factory import build_net
from ..objectives import CFMObjective
from .build import build_data, build_objective, run_model_spec
from .config import TrainConfig

__all__ = ["load_model", "load_run", "LoadedRun", "checkpoint_config", "weights_name", "sample_shape",
           "initialise_from"]


def weights_name(ck, use_ema: bool) -> str:
    """Which weights of a checkpoint to use: "ema" when asked and present, else "net"."""
    return "ema" if (use_ema and ck.has_ema) else "net"


def checkpoint_config(ck) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint's sidecar (ConfigError when there is none)."""
    from ..config import from_dict

    if ck.config is None:
        raise ConfigError(f"{ck.path}: checkpoint carries no training config; cannot rebuild the run")
    return from_dict(TrainConfig, ck.config)


def load_model(checkpoint, device: str | torch.device = "cpu", use_ema: bool = True):
    """Rebuild the velocity net of a checkpoint and load its weights (the EMA copy when there is one and
    ``use_ema``): the one way every command rebuilds a net. The architecture is the sidecar's
    ``extra["model"]`` spec (:func:`model_spec`; written by ``flowprobe train`` and by code that passes
    ``ckpt_extra`` to :func:`fit`), else derived from its training config (2-D toy runs). ``checkpoint``
    is a path (file, checkpoint folder or run folder) or a loaded :class:`~flowprobe.checkpoint.Checkpoint`.
    Returns (net in eval mode on ``device``, checkpoint)."""
    from ..checkpoint import Checkpoint, load_checkpoint

    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    spec = (ck.extra or {}).get("model")
    if not spec:
        if ck.config is None:
            raise ConfigError(f"{ck.path}: the checkpoint says nothing about its architecture")
        cfg = checkpoint_config(ck)
        if cfg.data.dataset is not None:
            raise ConfigError(f"{ck.path}: image checkpoint without a model spec in its sidecar")
        spec = run_model_spec(cfg, (2,))
    which = weights_name(ck, use_ema)
    state = ck.state_dict(which)
    with torch.device("meta"):  # the architecture's shapes, checked against the file before anything is allocated
        shell = build_net(spec)
    check_weights(shell, state, ck.path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{ck.path}: the {which} weights hold NaN or infinite values ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})")
    net = build_net(spec)
    net.load_state_dict(state)
    return net.to(device).eval(), ck


@dataclass
class LoadedRun:
    """A training run rebuilt from a checkpoint: the net (weights loaded, eval mode), its config,
    coupling, objective, source and target, and which weights were loaded ("ema" or "net")."""

    net: nn.Module
    config: TrainConfig
    coupling: Any
    objective: CFMObjective
    source: Any
    target: Any
    checkpoint: Any
    weights: str


def load_run(checkpoint, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedRun:
    """:func:`load_model` plus the run's data (:func:`build_data`: loads the images of an image run) and
    objective, from a ``flowprobe train`` checkpoint."""
    net, ck = load_model(checkpoint, device, use_ema)
    cfg = checkpoint_config(ck)
    coupling, source, target, _ = build_data(cfg, device)
    return LoadedRun(net, cfg, coupling, build_objective(cfg), source, target, ck, weights_name(ck, use_ema))


def sample_shape(ck) -> tuple[int, ...] | None:
    """The shape of one sample of a checkpoint's model: the sidecar's ``extra["shape"]``, else the vector size of
    an MLP spec, else the 2-D toy shape of a run config without a spec; None when the checkpoint does not say."""
    extra = ck.extra or {}
    if extra.get("shape"):
        return tuple(int(v) for v in extra["shape"])
    spec = extra.get("model") or {}
    if spec.get("class") == "MLP" and "dim" in spec.get("kwargs", {}):
        return (int(spec["kwargs"]["dim"]),)
    if not spec and isinstance(ck.config, dict) and not (ck.config.get("data") or {}).get("dataset"):
        return (2,)
    return None


def initialise_from(net: nn.Module, checkpoint, device) -> None:
    """Load into ``net`` the weights of ``checkpoint`` (file, checkpoints/ folder or run folder; its EMA copy when
    it has one): ``model.init``. A ConfigError naming ``model.init`` when they do not fit ``net``."""
    try:
        previous, ck = load_model(checkpoint, device, use_ema=True)
        state = previous.state_dict()
        check_weights(net, state, ck.path)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        raise ConfigError(f"model.init: {e}") from None
    net.load_state_dict(state)
