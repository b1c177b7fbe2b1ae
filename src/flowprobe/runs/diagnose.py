"""``flowprobe.diagnose``: point it at any flow model and its data, get a verdict on memorisation with the evidence.

This is the Python API behind ``flowprobe diagnose``: it resolves the MODEL (a net in memory, a flowprobe checkpoint
file or run folder, or a model trained elsewhere through :func:`flowprobe.adapters.load_model`), loads the DATA
arguments (:func:`flowprobe.data.arrays.load_data`), runs :func:`flowprobe.diagnosis.diagnose` and writes
``results.json``, ``report.md`` and the figures (:func:`flowprobe.diagnosis.write_diagnosis`).

For a flowprobe checkpoint the path, the source and, when no training data are given, the run's own training set
are rebuilt from the checkpoint (:func:`flowprobe.runs.load_run`): the finite pool of a toy run with
``data.n_train``, the images of an image run, the fixed pairs of a ``fixed_pairs`` run. Held-out samples are then
fresh draws of a toy run's target, CIFAR-10's test split for a CIFAR-10 run, or the images after the first
``n_train`` of an image run that used a subset, or the held-out split of a run on the user's own files
(``data.kind: array | image_folder`` with ``data.heldout_fraction``, :mod:`flowprobe.runs.own_data`). A run trained
on pairs of a map with held-out pairs of the same map (``data.heldout_pairs``, every ``flowprobe reflow`` round) is
diagnosed against those pairs (the map check); ``--heldout`` may also be such a pairs file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import ConfigError
from ..couplings import FixedPairs, TensorSampler
from ..diagnosis import DiagnoseOptions, Diagnosis, write_diagnosis
from ..diagnosis import diagnose as diagnose_net
from ..paths import LinearPath, ProbabilityPath
from ..probes.memorization import PairSet, load_pairs

__all__ = ["diagnose", "resolve_model", "ResolvedModel", "resolve_data", "run_training_data", "training_data_of",
           "heldout_data_of", "heldout_pairs_of", "resolve_features",
           "ADAPTER_MODEL_OPTION"]

#: The adapter option that the positional MODEL argument fills, per adapter kind.
ADAPTER_MODEL_OPTION = {"torchcfm": "checkpoint", "diffusers": "folder", "flow_matching": "weights",
                        "module": "weights"}


@dataclass
class ResolvedModel:
    """A model ready to diagnose: the ``net(t, x)``, its training ``path``, its ``source`` sampler (None: N(0, I) of
    the data's shape), a JSON-able ``info`` and, for a flowprobe checkpoint, the rebuilt ``run``."""

    net: Any
    path: ProbabilityPath
    source: Any = None
    info: dict = field(default_factory=dict)
    run: Any = None


def resolve_model(model, *, adapter: str | None = None, adapter_options: dict | None = None,
                  device: str | torch.device = "cpu", use_ema: bool = True) -> ResolvedModel:
    """MODEL -> :class:`ResolvedModel`: a module or callable as it is (linear path); ``adapter`` (a kind of
    :func:`flowprobe.adapters.load_model`) with ``adapter_options`` (``model`` fills the kind's main option,
    :data:`ADAPTER_MODEL_OPTION`); else a flowprobe checkpoint file, checkpoint folder or run folder."""
    if adapter is not None:
        from ..adapters import load_model as load_adapter

        options = dict(adapter_options or {})
        if model is not None and adapter in ADAPTER_MODEL_OPTION:
            options.setdefault(ADAPTER_MODEL_OPTION[adapter], str(model))
        net, info = load_adapter(adapter, **options)
        path = getattr(net, "path", None)
        return ResolvedModel(net.to(device), path if isinstance(path, ProbabilityPath) else LinearPath(), None,
                             {"kind": adapter, **info})
    if not isinstance(model, (str, Path)):
        if not callable(model):
            raise ConfigError(f"model: expected a net(t, x), a checkpoint path or an adapter, got "
                              f"{type(model).__name__}")
        return ResolvedModel(model, LinearPath(), None, {"kind": "in-memory", "class": type(model).__name__})
    from .load import load_model, load_run

    target = Path(model).expanduser()
    if not target.exists():
        raise ConfigError(f"{target}: no such checkpoint file or run folder (for a model trained elsewhere, add "
                          f"--adapter torchcfm|diffusers|flow_matching|module)")
    try:
        run = load_run(target, device, use_ema)
    except ConfigError as e:  # no training config, or its data cannot be rebuilt here: the net and what is known
        net, ck = load_model(target, device, use_ema)
        resolved = ResolvedModel(net, LinearPath(), None, {"kind": "flowprobe", "checkpoint": str(ck.path),
                                                           "step": ck.step, "note": f"run not rebuilt: {e}",
                                                           "training_warnings": training_warnings(ck.losses)})
        _path_from_config(resolved, ck, device)
        return resolved
    ck = run.checkpoint
    info = {"kind": "flowprobe", "checkpoint": str(ck.path), "step": ck.step, "weights": run.weights,
            "training_warnings": training_warnings(ck.losses)}
    return ResolvedModel(run.net, run.objective.path, run.source, info, run)


#: A warning (not a vote) when a checkpoint's mean training loss over its last tenth of steps is more than this
#: fraction below the mean over the tenth before: the net was still learning when it was saved.
LOSS_STILL_FALLING = 0.05


def training_warnings(losses: list[float]) -> list[str]:
    """Lines about a run's loss history worth reading beside the verdict: the loss still falling at the end
    (:data:`LOSS_STILL_FALLING`), which makes 'generalises' provisional (a net that has not finished fitting its
    training set may still come to copy it)."""
    w = len(losses) // 10
    if w < 10:
        return []
    before, last = sum(losses[-2 * w:-w]) / w, sum(losses[-w:]) / w
    if not (before > 0 and last < (1 - LOSS_STILL_FALLING) * before):
        return []
    return [f"the training loss was still falling when the checkpoint was saved ({before:.4g} -> {last:.4g} over the "
            f"last two tenths of its {len(losses)} steps, {1 - last / before:.0%} lower): the net may be undertrained, "
            f"and a verdict other than memorises may change with more training"]


def _path_from_config(resolved: ResolvedModel, ck, device) -> None:
    """The path and (2-D toys) the source of a checkpoint's training config, when it has one."""
    from .build import build_objective, make_sampler
    from .load import checkpoint_config

    try:
        cfg = checkpoint_config(ck)
    except ConfigError:
        return
    resolved.path = build_objective(cfg).path
    if cfg.data.data_kind == "toy":
        resolved.source = make_sampler(cfg.data.source, cfg.data.source_params, "source", device)


def _unwrap(coupling):
    while hasattr(coupling, "base"):
        coupling = coupling.base
    return coupling


def run_training_data(run, device) -> tuple[Tensor | None, PairSet | None, str]:
    """(training samples, training pairs, description) of a rebuilt flowprobe run (:func:`training_data_of` its
    coupling)."""
    return training_data_of(run.coupling, device)


def training_data_of(coupling, device) -> tuple[Tensor | None, PairSet | None, str]:
    """(training samples, training pairs, description) of a flowprobe run's coupling: fixed pairs (toy
    ``FixedPairs`` or image ``IndexedPairs``), else the target pool (images or a toy's ``n_train`` points).
    (None, None, why) when the run trains on fresh draws."""
    from ..data.images import ImageSampler, IndexedPairs, to_unit

    coupling = _unwrap(coupling)
    n = None
    if isinstance(coupling, IndexedPairs):
        x1 = to_unit(coupling.images[coupling.partner.to(coupling.images.device)]).to(device)
        n = x1.shape[0]
        return None, PairSet(coupling.x0.to(device), x1, {"assigned": torch.arange(n, device=device)}), "run pairs"
    if isinstance(coupling, FixedPairs):
        n = len(coupling)
        return None, PairSet(coupling.x0.to(device), coupling.x1.to(device),
                             {"assigned": torch.arange(n, device=device)}), "run pairs"
    target = getattr(coupling, "target", None)
    if isinstance(target, ImageSampler):
        return to_unit(target.data).to(device), None, "run images"
    if isinstance(target, TensorSampler):
        what = "the run's training rows (own data)" if hasattr(target, "split") else "run pool (data.n_train)"
        return target.data.to(device), None, what
    return None, None, "the run draws fresh training samples every step (no data.n_train): pass --train"


def _run_heldout(run, n: int, seed: int, device) -> tuple[Tensor | None, str]:
    """Held-out samples of a rebuilt flowprobe run (:func:`heldout_data_of`), or (None, why not)."""
    return heldout_data_of(run.config, run.target, n, seed, device, run.checkpoint.extra)


def heldout_data_of(cfg, target, n: int, seed: int, device, extra: dict | None = None) -> tuple[Tensor | None, str]:
    """Held-out samples of a flowprobe run with config ``cfg`` and target sampler ``target`` (module docstring), or
    (None, why not); ``extra``: its checkpoint's sidecar extra (own data: the target file's SHA-256 to check)."""
    if cfg.data.pairs is not None:  # a reflow round or the user's own pairs: the targets are the file's
        return None, (f"the run trained on a pairs file ({cfg.data.pairs}); samples of the law its targets come from "
                      f"are not known here: give them with --heldout")
    if cfg.data.data_kind in ("array", "image_folder"):  # the run's seeded held-out split (runs.own_data)
        from .own_data import heldout_rows

        x, why = heldout_rows(target, extra)
        return (None, why) if x is None else (x.to(device, torch.float32), why)
    if cfg.data.dataset is None:
        if cfg.data.n_train is None:
            return None, "no finite training set"
        from ..seeds import seeded_generator

        x, _ = target.sample(n, seeded_generator(seed, 200, device))
        return x.to(device, torch.float32), f"fresh draws of the run's target ({cfg.data.target})"
    from ..data.images import load_images_for, to_tensor, to_unit

    if cfg.data.dataset == "cifar10":
        data = load_images_for("held-out data", "cifar10-test", root=cfg.data.root, resolution=cfg.data.resolution,
                               limit=n)
        return to_unit(to_tensor(data.images, device)), "cifar10-test"
    if cfg.data.n_train is not None:
        data = load_images_for("data.dataset", cfg.data.dataset, root=cfg.data.root, resolution=cfg.data.resolution,
                               limit=cfg.data.n_train + n)
        if len(data) > cfg.data.n_train:
            return to_unit(to_tensor(data.images[cfg.data.n_train:], device)), "images after the run's n_train"
    return None, "the run trained on the whole dataset"


def heldout_pairs_of(cfg, device, shape: tuple | None = None) -> PairSet | None:
    """The held-out pairs of a run trained on pairs of a map (``data.heldout_pairs``), or None; a ConfigError naming
    the key when the file cannot be read or its samples do not have the sample ``shape`` (the training pairs')."""
    if cfg.data.heldout_pairs is None:
        return None
    try:
        held = load_pairs(cfg.data.heldout_pairs, device)
    except ConfigError as e:
        raise ConfigError(f"data.heldout_pairs: {e}") from None
    if shape is not None and tuple(held.x0.shape[1:]) != tuple(shape):
        raise ConfigError(f"data.heldout_pairs: {cfg.data.heldout_pairs} holds samples of shape "
                          f"{tuple(held.x0.shape[1:])}, the training pairs {tuple(shape)}")
    return held


def resolve_data(spec, *, role: str, device, resolution=None, limit=None, seed=0, root=None,
                 progress: bool = False) -> tuple[Tensor | None, PairSet | None, dict]:
    """A DATA argument (tensor, :class:`PairSet`, or anything :func:`flowprobe.data.arrays.load_data` reads) ->
    (samples, pairs, info); ``role`` is "train" or "heldout" (toy draws use separate streams)."""
    if spec is None:
        return None, None, {}
    if isinstance(spec, PairSet):
        return None, spec, {"source": "pairs (in memory)"}
    if isinstance(spec, Tensor):
        return spec.to(device, torch.float32), None, {"source": "tensor (in memory)"}
    from ..data.arrays import load_data

    samples = load_data(spec, root=root, resolution=resolution, limit=limit, seed=seed,
                        stream=0 if role == "train" else 1, progress=progress)
    if samples.kind == "pairs":  # training pairs, or (held out) pairs of the map the training pairs come from
        return None, load_pairs(samples.path, device), {"source": str(spec), "loader": "pairs"}
    return samples.x.to(device), None, {"source": str(spec), **samples.info}


def resolve_features(features) -> Callable[[Tensor], Tensor] | None:
    """A feature map: None or a callable as it is, or ``"package.module:fn"`` imported (ConfigError when it cannot be
    imported or is not callable)."""
    if features is None or callable(features):
        return features
    from ..adapters.weights import import_object

    fn = import_object(str(features), "features")
    if not callable(fn):
        raise ConfigError(f"features: {features!r} is not callable")
    return fn


def _check_shapes(net, x: Tensor, what: str) -> None:
    """One forward pass on two samples: the net must return the shape it is given."""
    with torch.no_grad():
        try:
            v = net(torch.full((min(2, x.shape[0]),), 0.5, device=x.device), x[:2])
        except Exception as e:  # the model cannot take these samples at all
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"{what}: the model cannot take samples of shape {tuple(x.shape[1:])}: "
                              f"{type(e).__name__}: {first}") from None
    if tuple(v.shape) != tuple(x[:2].shape):
        raise ConfigError(f"{what}: the model maps samples of shape {tuple(x.shape[1:])} to {tuple(v.shape[1:])}")


def diagnose(model, train=None, heldout=None, out: str | Path | None = None, *, pairs=None,
             adapter: str | None = None, adapter_options: dict | None = None, features=None,
             path: ProbabilityPath | None = None, device=None, use_ema: bool = True,
             options: DiagnoseOptions | None = None, resolution: int | None = None, limit: int | None = None,
             root: str | Path | None = None, progress: Callable[[str, int, int], None] | None = None,
             figures: bool = True) -> Diagnosis:
    """Diagnose ``model`` (see :func:`resolve_model`) on ``train`` and ``heldout`` (DATA arguments, tensors or
    None; ``heldout`` may be a pairs file or :class:`PairSet` of held-out pairs of the map the training pairs come
    from) and, with ``out``, write results.json, report.md and the figures there. ``pairs``: a pairs file or
    :class:`PairSet` (paired training); ``features``: a callable or ``"module:fn"`` for a feature-space copies
    check; ``path`` overrides the model's path; ``resolution`` / ``limit`` apply to loaded data. On CPU the thread
    count is chosen as for training (:func:`flowprobe.device.choose_threads`: one thread for small nets, unless
    FLOWPROBE_THREADS / OMP_NUM_THREADS say otherwise). Returns the :class:`~flowprobe.diagnosis.Diagnosis` (its
    ``label`` is the verdict)."""
    from ..device import choose_threads, resolve_device

    device = resolve_device(device)
    options = options or DiagnoseOptions()
    resolved = resolve_model(model, adapter=adapter, adapter_options=adapter_options, device=device, use_ema=use_ema)
    cfg = getattr(resolved.run, "config", None)
    if cfg is not None and options.mirror == "auto":  # a flowprobe run says whether it trained with flips
        options = replace(options, mirror="auto" if cfg.data.flip else "off")
    if resolution is None and cfg is not None and cfg.data.data_kind in ("images", "image_folder"):
        resolution = cfg.data.resolution
    kw = {"device": device, "resolution": resolution, "limit": limit, "seed": options.seed, "root": root}
    x_train, train_pairs, train_info = resolve_data(train, role="train", **kw)
    x_held, held_pairs, held_info = resolve_data(heldout, role="heldout", **kw)
    if pairs is not None:
        _, train_pairs, pair_info = resolve_data(pairs, role="train", **kw)
        train_info["pairs"] = pair_info.get("source")
    from_run = x_train is None and train_pairs is None
    if from_run:
        if resolved.run is None:
            raise ConfigError("--train is required: give the training data (a file, folder, dataset name or pairs "
                              "file)")
        x_train, train_pairs, why = run_training_data(resolved.run, device)
        if x_train is None and train_pairs is None:
            raise ConfigError(why)
        train_info = {"source": why}
    if x_held is None and held_pairs is None and train_pairs is not None and resolved.run is not None:
        held_pairs = heldout_pairs_of(resolved.run.config, device, tuple(train_pairs.x0.shape[1:]))
        if held_pairs is not None:  # a run on pairs of a map (a reflow round): its own held-out pairs
            held_info = {"source": f"held-out pairs of the run's map ({resolved.run.config.data.heldout_pairs})"}
    if from_run and x_held is None and held_pairs is None:
        n_held = max(options.n_generate, options.membership_samples)
        x_held, held_why = _run_heldout(resolved.run, n_held, options.seed, device)
        held_info = {"source": held_why}
    if held_pairs is not None and train_pairs is None:
        raise ConfigError(f"{held_info.get('source', 'heldout')}: held-out pairs of a map need the training pairs "
                          f"(--pairs, or a run trained on a pairs file); give held-out samples instead")
    n_params = sum(p.numel() for p in resolved.net.parameters()) if hasattr(resolved.net, "parameters") else 0
    choose_threads(n_params, options.batch_size, device)  # small nets on CPU: one thread (flowprobe.device)
    probe = x_train if x_train is not None else train_pairs.x1
    held_x = held_pairs.x1 if held_pairs is not None else x_held
    if held_x is not None and held_x.shape[1:] != probe.shape[1:]:
        raise ConfigError(f"{held_info.get('source', 'heldout')}: held-out samples have shape "
                          f"{tuple(held_x.shape[1:])}, the training samples {tuple(probe.shape[1:])}")
    _check_shapes(resolved.net, probe, f"model {model if model is not None else adapter}")
    result = diagnose_net(resolved.net, x_train, x_held, pairs=train_pairs, heldout_pairs=held_pairs,
                          path=path or resolved.path,
                          source=resolved.source, features=resolve_features(features), options=options,
                          progress=progress, device=device, model_info=resolved.info,
                          data_info={"train": train_info, "heldout": held_info or None})
    result.warnings.extend(resolved.info.get("training_warnings", []))
    if out is not None:
        write_diagnosis(result, out, figures=figures)
    return result
