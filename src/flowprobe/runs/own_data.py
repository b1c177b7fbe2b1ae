"""A run's data from the user's own files (``data.kind: array | image_folder``): the samplers of the training split,
the coupling, the held-out split kept aside for the probes, standardisation, and what the run folder records.

The target is ``data.target_path``; the source is ``data.source_path`` (same kind) or, when not given, N(0, I) of
the target's sample shape. With ``data.heldout_fraction`` = f, round(f N) rows of the target (and of a source
file) are held out by a permutation seeded with (seed, :data:`~flowprobe.data.own.SPLIT_STREAM`) (the source file:
the next stream; with ``fixed_pairs`` both files share the target's split, row i of one paired with row i of the
other). The split is a function of (seed, N, fraction), so a run rebuilt from its checkpoint (``flowprobe diagnose
RUN``) finds the same held-out rows; the run folder's ``split.json`` lists them, and the checkpoint sidecar's
``extra["data"]`` carries the SHA-256 of the target file, checked before the held-out rows are trusted.

``data.standardize: true`` (vectors only): each file is standardised per feature with the mean and std of its
training rows; the target's statistics are stored in ``split.json`` and in ``extra["data"]["standardize"]``, and
``flowprobe sample`` maps samples back to data units with x = z * std + mean
(:meth:`flowprobe.data.own.Standardizer.inverse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..config import ConfigError
from ..couplings import FixedPairs, GaussianSampler, IndependentCoupling, MinibatchOTCoupling, TensorSampler
from ..data.images import ImageSampler, IndexedPairs, fixed_noise, to_unit
from ..data.own import (SPLIT_STREAM, OwnData, Standardizer, fit_standardizer, load_array_data, load_image_folder,
                        split_indices)
from .config import TrainConfig

__all__ = ["OWN_KINDS", "OwnSplit", "OwnTensorSampler", "OwnImageSampler", "build_own_data", "own_record",
           "own_source", "unstandardize", "heldout_of", "heldout_rows", "write_split", "with_labels"]

#: ``data.kind`` values read from the user's files.
OWN_KINDS = ("array", "image_folder")


@dataclass
class OwnSplit:
    """The split of one file: sorted row indices ``train`` and ``heldout`` into it, the held-out rows in model
    space (float, standardised like the training rows; images in [-1, 1]) and their labels, the standardiser (or
    None) and how the file was read."""

    train: Tensor
    heldout: Tensor
    heldout_x: Tensor
    heldout_labels: Tensor | None
    standardizer: Standardizer | None
    info: dict = field(default_factory=dict)

    def record(self) -> dict:
        out = {**self.info, "n": int(len(self.train) + len(self.heldout)), "n_train": int(len(self.train)),
               "n_heldout": int(len(self.heldout)), "train": self.train.tolist(), "heldout": self.heldout.tolist()}
        if self.standardizer is not None:
            out["standardize"] = self.standardizer.to_dict()
        return out


class OwnTensorSampler(TensorSampler):
    """Draws from the training rows of a vector (or float image) file; ``labels`` are those rows' labels (or
    None), ``split`` the :class:`OwnSplit` (held-out rows included)."""

    def __init__(self, data: Tensor, labels: Tensor | None, split: OwnSplit):
        super().__init__(data)
        self.labels, self.split = labels, split

    def describe(self) -> dict:
        return {"sampler": "own data", "n_train": int(self.data.shape[0]), "shape": list(self.data.shape[1:]),
                **{k: v for k, v in self.split.info.items() if k in ("file", "format", "entry")}}


class OwnImageSampler(ImageSampler):
    """:class:`ImageSampler` over the training images of an image folder, with ``labels`` and ``split``."""

    def __init__(self, data: Tensor, labels: Tensor | None, split: OwnSplit, flip: bool = True):
        super().__init__(data, flip=flip)
        self.labels, self.split = labels, split

    def describe(self) -> dict:
        return {"sampler": "own images", "n_train": len(self), "shape": list(self.shape),
                "folder": self.split.info.get("folder")}


def _load(cfg: TrainConfig, spec: str, key: str, labels: str | None, progress: bool) -> OwnData:
    if cfg.data.data_kind == "image_folder":
        return load_image_folder(spec, cfg.data.resolution, key, progress)
    return load_array_data(spec, labels, key)


def _split(cfg: TrainConfig, data: OwnData, stream: int, key: str, device, rows=None):
    """(sampler of the training rows, OwnSplit) of loaded data."""
    d = cfg.data
    train, held = rows if rows is not None else split_indices(len(data), d.heldout_fraction, cfg.seed, stream)
    if d.n_train is not None:
        train = train[:d.n_train]
    std = None
    if d.standardize:
        if data.kind == "images":
            raise ConfigError(f"data.standardize: only for vector data; {key} holds images")
        std = fit_standardizer(data.x[train])
    x_train, x_held = data.x[train], data.x[held]
    if std is not None:
        x_train, x_held = std(x_train).float(), std(x_held).float()
    y_train = None if data.labels is None else data.labels[train].to(device)
    y_held = None if data.labels is None else data.labels[held].to(device)
    info = {**data.info, "key": key, "heldout_fraction": d.heldout_fraction, "seed": cfg.seed, "stream": stream}
    if data.classes:
        info["classes"] = data.classes
    split = OwnSplit(train, held, (to_unit(x_held) if data.kind == "images" else x_held).to(device), y_held, std,
                     info)
    if data.kind == "images":
        return OwnImageSampler(x_train.to(device), y_train, split, flip=d.flip), split
    return OwnTensorSampler(x_train.to(device), y_train, split), split


def _source_stream(cfg: TrainConfig) -> int:
    """The split stream of a source file: the target's under fixed_pairs (row i pairs with row i), else the next."""
    return SPLIT_STREAM if cfg.coupling.kind == "fixed_pairs" else SPLIT_STREAM + 1


def build_own_data(cfg: TrainConfig, device, progress: bool = False):
    """(coupling, source, target, sample shape) of an ``array`` / ``image_folder`` run (module docstring)."""
    d, kind = cfg.data, cfg.coupling.kind
    if d.target_path is None:
        raise ConfigError(f"data.target_path: data.kind: {d.data_kind} needs the file or folder of the target")
    tdata = _load(cfg, d.target_path, "data.target_path", None if d.labels is None else str(d.labels), progress)
    rows = split_indices(len(tdata), d.heldout_fraction, cfg.seed, SPLIT_STREAM)
    target, _ = _split(cfg, tdata, SPLIT_STREAM, "data.target_path", device, rows)
    shape = tuple(tdata.x.shape[1:])
    if d.source_path is None:
        source = GaussianSampler(shape, device=device)
    else:
        sdata = _load(cfg, d.source_path, "data.source_path", None, progress)
        if tuple(sdata.x.shape[1:]) != shape:
            raise ConfigError(f"data.source_path: samples of shape {tuple(sdata.x.shape[1:])}, the target's are "
                              f"{shape}")
        if kind == "fixed_pairs" and len(sdata) != len(tdata):
            raise ConfigError(f"data.source_path: fixed_pairs pairs row i with row i: {len(sdata)} source rows, "
                              f"{len(tdata)} target rows")
        source, _ = _split(cfg, sdata, _source_stream(cfg), "data.source_path", device)
    if kind == "independent":
        coupling = IndependentCoupling(source, target)
    elif kind == "minibatch_ot":
        coupling = MinibatchOTCoupling(source, target, cfg.coupling.method, cfg.coupling.reg)
    elif isinstance(target, OwnImageSampler):
        x0 = (source.data.float() / 127.5 - 1 if isinstance(source, ImageSampler) else
              fixed_noise(len(target), shape, seed=cfg.seed + 1, device=device))
        coupling = IndexedPairs(x0, target.data)
    else:
        x0 = source.data if isinstance(source, TensorSampler) else fixed_noise(len(target.data), shape,
                                                                                seed=cfg.seed + 1, device=device)
        coupling = FixedPairs(x0, target.data)
    return coupling, source, target, shape


def with_labels(coupling, cfg: TrainConfig, target):
    """``coupling`` with the target's class labels and label dropout (:class:`flowprobe.guidance.LabelledCoupling`)
    when ``model.num_classes`` is set; the coupling itself otherwise."""
    k = cfg.model.num_classes
    if not k:
        return coupling
    from ..guidance import LabelledCoupling

    labels = getattr(target, "labels", None)
    if labels is None:
        raise ConfigError("model.num_classes: the target has no labels (set data.labels, or use data.kind: "
                          "image_folder with one sub-folder per class)")
    if int(labels.max()) >= k:
        raise ConfigError(f"model.num_classes: {k}, but the labels reach {int(labels.max())} (they must lie in "
                          f"0..{k - 1})")
    dropout = 0.1 if cfg.model.label_dropout is None else cfg.model.label_dropout
    return LabelledCoupling(coupling, labels, k, dropout)


def own_record(target) -> dict:
    """What a checkpoint sidecar keeps of an own-data run (``extra["data"]``): the target file's SHA-256 and
    held-out count, and the standardisation; {} for other runs."""
    split = getattr(target, "split", None)
    if not isinstance(split, OwnSplit):
        return {}
    from ..io import sha256_file

    path = Path(split.info.get("file") or "")
    out = {"n_heldout": int(len(split.heldout)), "n_train": int(len(split.train))}
    if path.is_file():
        out["target_sha256"] = sha256_file(path)
    if split.standardizer is not None:
        out["standardize"] = split.standardizer.to_dict()
    return {"data": out}


def write_split(out: Path, source, target) -> Path | None:
    """Write ``split.json`` (the training and held-out rows of the target and of a source file, and the
    standardisation) into the run folder ``out``; None for runs that are not own-data runs."""
    from ..io import write_json

    record = {role: s.split.record() for role, s in (("target", target), ("source", source))
              if isinstance(getattr(s, "split", None), OwnSplit)}
    if not record:
        return None
    record["format"] = "flowprobe-split-1"
    return write_json(Path(out) / "split.json", record)


def heldout_of(run) -> tuple[Tensor | None, str]:
    """(held-out target rows in model space, description) of a rebuilt own-data run (:func:`heldout_rows`)."""
    return heldout_rows(run.target, run.checkpoint.extra)


def heldout_rows(target, extra: dict | None = None) -> tuple[Tensor | None, str]:
    """(held-out target rows in model space, description) of an own-data run's target sampler, or (None, why not):
    no held-out split, or a target file that changed since training (its SHA-256 differs from the one in the
    checkpoint sidecar's ``extra``, when given)."""
    split = getattr(target, "split", None)
    if not isinstance(split, OwnSplit):
        return None, "not an own-data run"
    if len(split.heldout) == 0:
        return None, "the run kept no held-out rows (set data.heldout_fraction)"
    saved = ((extra or {}).get("data") or {}).get("target_sha256")
    path = Path(split.info.get("file") or "")
    if saved and path.is_file():
        from ..io import sha256_file

        if sha256_file(path) != saved:
            return None, f"{path} changed since training (SHA-256 differs); its held-out rows are not trusted"
    return split.heldout_x, f"the run's held-out split ({len(split.heldout)} rows, data.heldout_fraction)"


def own_source(cfg: TrainConfig, shape, device):
    """The source of an own-data run for sampling: N(0, I) of ``shape``, or the training rows of the source file."""
    if cfg.data.source_path is None:
        return GaussianSampler(tuple(int(s) for s in shape), device=device)
    data = _load(cfg, cfg.data.source_path, "data.source_path", None, False)
    sampler, _ = _split(cfg, data, _source_stream(cfg), "data.source_path", device)
    return sampler


def unstandardize(x: Tensor, extra: dict | None) -> tuple[Tensor, bool]:
    """(samples in data units, whether they were mapped) with the standardisation in a sidecar's ``extra``."""
    d = ((extra or {}).get("data") or {}).get("standardize")
    if not d:
        return x, False
    return Standardizer.from_dict(d).inverse(x).to(x.dtype), True
