"""Checkpoints: a safetensors file of tensors plus a JSON sidecar, written atomically, never unpickled.

A checkpoint ``DIR/step_00001000.safetensors`` holds every tensor of the training state:

- ``net.<name>``: the model's ``state_dict``; ``ema.<name>``: the EMA copy (if any);
- ``optim.<param index>.<key>``: tensor entries of the optimiser state (AdamW: step, exp_avg, exp_avg_sq);
- ``rng.<name>``: states of the run's ``torch.Generator``s and of torch's global CPU/CUDA generators
  (and numpy's global state), as uint8/uint32 tensors;
- ``losses``: the per-step training losses so far (float64).

The sidecar ``DIR/step_00001000.json`` holds everything else: the step (optimiser steps taken), the run
config, the library version, the optimiser's param groups and non-tensor state, python's global RNG
state, and free-form ``extra`` data. The tensor file is written first and the sidecar last, each
atomically (temp file + rename), and the tensor file's metadata repeats the step, so a crash never
leaves a checkpoint that loads as complete but is not: a checkpoint exists once its sidecar does, and
:func:`load_checkpoint` checks that both halves agree.

Integrity: safetensors has no checksum, so each half vouches for the other. The tensor file's metadata holds
the SHA-256 of the sidecar's content (canonical JSON, :func:`flowprobe.io.json_digest`, computed before the
tensors are written), and the sidecar holds the SHA-256 of the tensor file's bytes. :func:`load_checkpoint`
verifies both, so a flipped byte in the weights, the EMA, the optimiser or the RNG state, and an edited
sidecar (a changed config or model spec), are each a one-line :class:`CheckpointError` naming the file.
Checkpoints written before this scheme (no digests) load unverified; :func:`verify_checkpoint` says so.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ConfigError
from .io import atomic_write, json_digest, sha256_file, write_json

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "checkpoint_path",
           "read_sidecar", "resolve_checkpoint", "Checkpoint", "FORMAT", "CheckpointError", "verify_checkpoint",
           "newest_verified_checkpoint", "load_weights", "check_weights"]


class CheckpointError(ConfigError):
    """A checkpoint that is missing, damaged or does not match its other half (one line, naming the file)."""

FORMAT = "flowprobe-checkpoint-1"
_STEP_RE = re.compile(r"^step_(\d+)\.json$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the sidecar fields and the raw tensors (on the CPU)."""

    path: Path
    step: int
    config: Any
    version: str
    extra: dict
    tensors: dict = field(repr=False, default_factory=dict)
    sidecar: dict = field(repr=False, default_factory=dict)

    @property
    def has_ema(self) -> bool:
        return any(k.startswith("ema.") for k in self.tensors)

    @property
    def losses(self) -> list[float]:
        t = self.tensors.get("losses")
        return [] if t is None else t.tolist()

    def state_dict(self, prefix: str = "net") -> dict:
        """The module ``state_dict`` stored under ``prefix`` ("net" or "ema")."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``DIR/step_{step:08d}.safetensors``."""
    return Path(directory) / f"step_{step:08d}.safetensors"


def _sidecar_of(path: Path) -> Path:
    return path.with_suffix(".json")


def _tensor_file_of(path: Path) -> Path:
    return path.with_suffix(".safetensors")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # A private contiguous CPU copy: safetensors refuses tensors that share storage (tied weights).
    return t.detach().to("cpu", copy=True).contiguous()


def _json_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"cannot store optimiser value of type {type(v).__name__} in a checkpoint")


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = _cpu(val)
            else:
                plain.setdefault(str(idx), {})[key] = _json_value(val)
    side = {"param_groups": _json_value(sd["param_groups"]), "state": plain, "type": type(optimizer).__name__}
    return tensors, side


def _restore_types(saved: Any, like: Any) -> Any:
    """JSON turns tuples into lists; give back the container types of the live optimiser's groups."""
    if isinstance(like, tuple) and isinstance(saved, list):
        return tuple(saved)
    if isinstance(like, dict) and isinstance(saved, dict):
        return {k: _restore_types(v, like.get(k)) for k, v in saved.items()}
    return saved


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, side: dict) -> None:
    live = optimizer.state_dict()
    if side.get("type") not in (None, type(optimizer).__name__):
        raise ValueError(f"checkpoint holds {side['type']} state, cannot load it into {type(optimizer).__name__}")
    groups = []
    for i, g in enumerate(side["param_groups"]):
        like = live["param_groups"][i] if i < len(live["param_groups"]) else {}
        groups.append(_restore_types(g, like))
    state: dict = {}
    for key, val in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, st in side.get("state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    _match_parameter_layout(optimizer)


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give per-parameter state (Adam's moments) the memory layout of its parameter again.

    Tensors are stored contiguous; a channels_last parameter's moments are created channels_last, and the
    fused / foreach kernels expect matching strides. Values are unchanged (an exact copy)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for key, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _rng_parts(generators: dict[str, torch.Generator] | None) -> tuple[dict, dict]:
    tensors = {f"rng.gen.{name}": g.get_state() for name, g in (generators or {}).items()}
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.torch_cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).astype(np.int64))
    side = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _json_value(random.getstate()), "generators": sorted(generators or {})}
    return tensors, side


def _restore_rng(tensors: dict, side: dict, generators: dict[str, torch.Generator] | None) -> None:
    for name, g in (generators or {}).items():
        key = f"rng.gen.{name}"
        if key not in tensors:
            raise KeyError(f"checkpoint has no state for generator {name!r} (has {side.get('generators')})")
        g.set_state(tensors[key])
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.torch_cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    if "rng.numpy" in tensors and side.get("numpy"):
        name, pos, has_gauss, cached = side["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if side.get("python"):
        v, internal, gauss = side["python"]
        random.setstate((v, tuple(internal), gauss))


def save_checkpoint(path: str | Path, *, net: nn.Module, step: int, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, config: Any = None,
                    generators: dict[str, torch.Generator] | None = None, losses: list | torch.Tensor | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar atomically; return the tensor file's path.

    ``config`` is stored as given (a dataclass is converted with :func:`flowprobe.config.to_dict`);
    ``generators`` maps names to the run's generators, whose states are restored by name on load.
    """
    from safetensors.torch import save_file

    from .config import to_dict

    path = _tensor_file_of(Path(path))
    tensors = {f"net.{k}": _cpu(v) for k, v in net.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": _cpu(v) for k, v in ema.state_dict().items()})
    optim_side = None
    if optimizer is not None:
        t, optim_side = _optimizer_parts(optimizer)
        tensors.update(t)
    rng_t, rng_side = _rng_parts(generators)
    tensors.update({k: _cpu(v) for k, v in rng_t.items()})
    if losses is not None:
        tensors["losses"] = _cpu(torch.as_tensor(losses, dtype=torch.float64).reshape(-1))
    sidecar = {"format": FORMAT, "step": int(step), "tensors": path.name, "version": __version__,
               "torch_version": torch.__version__, "config": to_dict(config) if config is not None else None,
               "optimizer": optim_side, "rng": rng_side, "has_ema": ema is not None, "extra": extra or {}}
    meta = {"format": FORMAT, "step": str(int(step)), "flowprobe_version": __version__,
            "sidecar_sha256": json_digest(sidecar)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    sidecar["tensors_sha256"] = sha256_file(path)
    write_json(_sidecar_of(path), sidecar)
    return path


def read_sidecar(path: str | Path) -> dict:
    """The JSON sidecar of a checkpoint (``path`` may name either half)."""
    import json

    p = _sidecar_of(Path(path))
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint sidecar not found (a checkpoint is a .safetensors file plus its .json)")
    try:
        side = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{p}: checkpoint sidecar is not valid JSON (damaged, or not a flowprobe sidecar)") \
            from None
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        found = side.get("format") if isinstance(side, dict) else type(side).__name__
        raise CheckpointError(f"{p}: not a flowprobe checkpoint (format {found!r}, expected {FORMAT})")
    step = side.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{p}: checkpoint sidecar has no valid 'step' (got {step!r})")
    return side


def verify_checkpoint(path: str | Path) -> tuple[dict, bool]:
    """Check that both halves of a checkpoint are intact and belong together without loading the tensors:
    the tensor file's SHA-256 against the sidecar's record, and the sidecar's content digest against the
    tensor file's record. Returns (sidecar, verified); ``verified`` is False for a checkpoint written before
    digests existed. Raises :class:`CheckpointError` (one line, naming the file) on any mismatch or damage."""
    from safetensors import safe_open

    path = _tensor_file_of(Path(path))
    side = read_sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint tensor file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'bad header'})") from None
    if meta.get("step") != str(side["step"]):
        raise CheckpointError(f"{path}: tensor file (step {meta.get('step')}) and sidecar (step {side['step']}) "
                              f"disagree")
    recorded = side.get("tensors_sha256")
    if recorded is None and "sidecar_sha256" not in meta:
        return side, False
    content = {k: v for k, v in side.items() if k != "tensors_sha256"}
    if meta.get("sidecar_sha256") != json_digest(content):
        raise CheckpointError(f"{_sidecar_of(path)}: the sidecar does not match the one written with {path.name} "
                              f"(edited or damaged)")
    if recorded != sha256_file(path):
        raise CheckpointError(f"{path}: tensor data does not match its recorded SHA-256 (damaged file)")
    return side, True


def newest_verified_checkpoint(directory: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` (or its ``checkpoints/``) that passes :func:`verify_checkpoint`,
    and the newer ones skipped, each with the reason."""
    d = Path(directory)
    found = list_checkpoints(d) or list_checkpoints(d / "checkpoints")
    skipped = []
    for p in reversed(found):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            skipped.append((p, str(e)))
            continue
        return p, skipped
    return None, skipped


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory`` (those whose sidecar exists), sorted by step."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and _tensor_file_of(p).is_file():
            found.append((int(m.group(1)), _tensor_file_of(p)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory`` (or its ``checkpoints/``), or None."""
    d = Path(directory)
    found = list_checkpoints(d) or list_checkpoints(d / "checkpoints")
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file of either half, a checkpoint folder or a run folder."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise ConfigError(f"{p}: no checkpoint in this folder (looked for step_*.safetensors + .json)")
        return found
    if p.suffix in (".json", ".safetensors") and _sidecar_of(p).is_file() and _tensor_file_of(p).is_file():
        return _tensor_file_of(p)
    raise ConfigError(f"{p}: not a checkpoint; give a step_*.safetensors file (with its .json) or a run folder")


def load_weights(module: nn.Module, state: dict, source: str | Path, strict: bool = True) -> None:
    """``module.load_state_dict(state)``, with a mismatch (missing or unexpected keys, other shapes) reported as
    one :class:`CheckpointError` line naming ``source`` and the first differences (:func:`check_weights`)."""
    check_weights(module, state, source, strict)
    module.load_state_dict(state, strict=strict)


def check_weights(module: nn.Module, state: dict, source: str | Path, strict: bool = True) -> None:
    """Raise :class:`CheckpointError` when ``state`` does not fit ``module`` (which may live on the meta device:
    only names and shapes are compared)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing and strict else []) + \
               ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected and strict else []) + \
               ([f"{len(shapes)} of other shape (e.g. {shapes[0]})"] if shapes else [])
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit this network: " + "; ".join(problems))


def load_checkpoint(path: str | Path, *, net: nn.Module | None = None, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None, restore_global_rng: bool = False,
                    strict: bool = True) -> Checkpoint:
    """Read a checkpoint (safetensors only: nothing is unpickled) and load what is asked for.

    Given modules and an optimiser receive their saved state in place (``net`` from ``net.*``, ``ema``
    from ``ema.*``), given generators get their saved state by name, and ``restore_global_rng`` also
    restores torch's, numpy's and python's global generators. ``path`` may be either half of a checkpoint,
    a checkpoint folder or a run folder (then the latest checkpoint is used). Both halves are verified first
    (:func:`verify_checkpoint`).
    """
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    side, _ = verify_checkpoint(path)
    tensors = load_file(str(path))
    ck = Checkpoint(path=path, step=int(side["step"]), config=side.get("config"), version=side.get("version", "?"),
                    extra=side.get("extra") or {}, tensors=tensors, sidecar=side)
    if net is not None:
        load_weights(net, ck.state_dict("net"), path, strict)
    if ema is not None:
        if not ck.has_ema:
            raise CheckpointError(f"{path}: checkpoint has no EMA weights")
        load_weights(ema, ck.state_dict("ema"), path, strict)
    if optimizer is not None:
        if side.get("optimizer") is None:
            raise ValueError(f"{path}: checkpoint has no optimiser state")
        _load_optimizer(optimizer, tensors, side["optimizer"])
    if generators or restore_global_rng:
        rng_side = side.get("rng") or {}
        if not restore_global_rng:
            tensors_gen = {k: v for k, v in tensors.items() if k.startswith("rng.gen.")}
            _restore_rng(tensors_gen, {}, generators)
        else:
            _restore_rng(tensors, rng_side, generators)
    return ck
