"""Your own data as a training set: arrays (``.npy``, ``.npz``, ``.safetensors``, ``.csv``) and image folders, with
class labels, a seeded held-out split and per-feature standardisation.

- :func:`read_csv`: numeric columns (header optional: a first row with no number in it is a header), an optional
  label column named by its header name or 0-based index (numbers, or names mapped to sorted class indices);
  a non-numeric or non-finite cell is a one-line :class:`~flowprobe.config.ConfigError` naming the file, row
  and column. Read with the ``csv`` module (no pandas).
- :func:`load_array_data`: an array file (:func:`flowprobe.data.arrays.array_to_samples` conventions: float vectors
  as they are, uint8 images to [-1, 1] channels first) or a CSV, with labels from :func:`read_labels`.
- :func:`load_image_folder`: any folder (or tar) of images, labels from the sub-folder names, each image centre-
  cropped to a square and resized to ``resolution`` (:func:`flowprobe.data.image_files.load_images`); kept uint8.
- :func:`split_indices`: the seeded split of N rows into training and held-out rows.
- :func:`fit_standardizer` / :class:`Standardizer`: mean and std of the training rows; ``x -> (x - mean) / std``
  and back.

Every bad input raises ConfigError with one line naming the config key (``key``) and the file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError
from ..seeds import seeded_generator

__all__ = ["OwnData", "read_csv", "read_labels", "load_array_data", "load_image_folder", "split_indices",
           "Standardizer", "fit_standardizer", "SPLIT_STREAM"]

#: The seed stream (:func:`flowprobe.seeds.derive_seed`) of the held-out split of the target; the source file's
#: split uses SPLIT_STREAM + 1.
SPLIT_STREAM = 300


@dataclass
class OwnData:
    """Loaded data: ``x`` float32 (N, ...) in model space, or uint8 (N, C, H, W) images (``kind`` "images" from an
    image folder); ``labels`` int64 (N,) or None; ``classes`` the names of label values when they were names."""

    x: Tensor
    labels: Tensor | None = None
    classes: list[str] | None = None
    kind: str = "vectors"
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _csv_rows(path: Path, key: str) -> list[tuple[int, list[str]]]:
    try:
        with open(path, newline="") as f:
            rows = [(i + 1, [c.strip() for c in row]) for i, row in enumerate(csv.reader(f))]
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not a text CSV file") from None
    except csv.Error as e:
        raise ConfigError(f"{key}: {path}: not a readable CSV file ({e})") from None
    rows = [(n, r) for n, r in rows if any(r)]
    if not rows:
        raise ConfigError(f"{key}: {path} is empty (no rows)")
    return rows


def _label_column(header: list[str] | None, label: str | None, width: int, path: Path) -> int | None:
    if label is None:
        return None
    if header is not None and label in header:
        return header.index(label)
    if label.lstrip("-").isdigit() and -width <= int(label) < width:
        return int(label) % width
    named = f"; its columns are {', '.join(header)}" if header else " (it has no header row)"
    raise ConfigError(f"data.labels: {path} has no column {label!r}{named}")


def read_csv(path: str | Path, label: str | None = None, key: str = "data.target_path"):
    """(float32 array (N, D), labels int64 (N,) or None, class names or None, column names or None) of a CSV
    file; ``label`` names the label column (header name or 0-based index), every other column must be numeric."""
    path = Path(path)
    rows = _csv_rows(path, key)
    first = rows[0][1]
    header = first if all(_number(c) is None for c in first) else None
    if header is not None:
        rows = rows[1:]
        if not rows:
            raise ConfigError(f"{key}: {path} has a header row and no data")
    width = len(header) if header is not None else len(rows[0][1])
    col = _label_column(header, label, width, path)
    values, raw_labels = [], []
    for line, row in rows:
        if len(row) != width:
            raise ConfigError(f"{key}: {path}, row {line}: {len(row)} cells, expected {width}")
        out = []
        for j, cell in enumerate(row):
            if j == col:
                raw_labels.append(cell)
                continue
            v = _number(cell)
            if v is None or not math.isfinite(v):
                name = f" ({header[j]!r})" if header is not None else ""
                what = "is not a number" if v is None else "is not finite"
                raise ConfigError(f"{key}: {path}, row {line}, column {j + 1}{name}: {cell!r} {what}")
            out.append(v)
        values.append(out)
    x = np.asarray(values, dtype=np.float32)
    if x.shape[1] == 0:
        raise ConfigError(f"{key}: {path} has no feature columns besides the label column")
    labels, classes = (None, None) if col is None else _labels_from_values(np.asarray(raw_labels), f"data.labels "
                                                                                                    f"({path})")
    names = None if header is None else [h for j, h in enumerate(header) if j != col]
    return x, labels, classes, names


def _labels_from_values(a: np.ndarray, what: str) -> tuple[Tensor, list[str] | None]:
    """int64 labels of a 1-D array: non-negative integers as they are, names mapped to sorted class indices."""
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ConfigError(f"{what}: labels must be one value per sample (N,), got shape {a.shape}")
    if a.dtype.kind in "US":
        numbers = [_number(str(v)) for v in a]
        if all(v is not None for v in numbers):
            a = np.asarray(numbers, dtype=np.float64)
        else:
            classes = sorted({str(v) for v in a})
            index = {c: i for i, c in enumerate(classes)}
            return torch.tensor([index[str(v)] for v in a], dtype=torch.int64), classes
    if a.dtype.kind not in "iuf" or a.dtype.kind == "b":
        raise ConfigError(f"{what}: labels must be integers or names, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not (np.isfinite(a).all() and (a == np.round(a)).all()):
        raise ConfigError(f"{what}: labels must be whole numbers (class indices), got non-integer values")
    if a.size and a.min() < 0:
        raise ConfigError(f"{what}: labels must be >= 0 (class indices), got {a.min():g}")
    return torch.as_tensor(a.astype(np.int64)), None


def _array_entry(path: Path, entry: str | None, key: str):
    """The array stored in ``path`` (entry ``entry`` of a .npz / .safetensors), with one-line errors."""
    from .arrays import ARRAY_KEYS

    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".safetensors"):
        raise ConfigError(f"{key}: {path}: expected .npy, .npz, .safetensors or .csv")
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            entries = load_file(str(path))
        elif suffix == ".npy":
            if entry is not None:
                raise ConfigError(f"{key}: {path} is a .npy file holding one array; drop ':{entry}'")
            return np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                entries = {k: z[k] for k in z.files}
    except ConfigError:
        raise
    except Exception as e:  # numpy and safetensors raise several error types for a damaged or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}: {path}: cannot read the array ({first})") from None
    if not entries:
        raise ConfigError(f"{key}: {path} holds no arrays")
    if entry is not None:
        if entry not in entries:
            raise ConfigError(f"{key}: {path} has no entry {entry!r}; it holds {', '.join(sorted(entries))}")
        return entries[entry]
    if len(entries) == 1:
        return next(iter(entries.values()))
    for k in ARRAY_KEYS:
        if k in entries:
            return entries[k]
    raise ConfigError(f"{key}: {path} holds several arrays ({', '.join(sorted(entries))}); name one as FILE:KEY")


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``file.ext:key`` -> (file, key) when ``file.ext`` exists, else (spec, None)."""
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        if Path(head).expanduser().is_file():
            return Path(head).expanduser(), tail
    return Path(spec).expanduser(), None


def read_labels(spec: str, data_path: Path, n: int) -> tuple[Tensor, list[str] | None]:
    """Labels named by ``data.labels`` for a non-CSV array file ``data_path`` of ``n`` samples: a file of labels
    (``y.npy``, ``y.npz:key``, ``y.safetensors:key``) or the name of an entry of ``data_path`` itself."""
    path, entry = split_spec(spec)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            a, _, _, _ = read_csv(path, key="data.labels")
            if a.shape[1] != 1:
                raise ConfigError(f"data.labels: {path} must hold one column of labels, got {a.shape[1]}")
            a = a[:, 0]
        else:
            a = _array_entry(path, entry, "data.labels")
    elif data_path.suffix.lower() in (".npz", ".safetensors") and ":" not in spec:
        a = _array_entry(data_path, spec, "data.labels")
    else:
        raise ConfigError(f"data.labels: {spec}: no such file (for a .npz / .safetensors target it may also name "
                          f"one of its entries)")
    labels, classes = _labels_from_values(a, f"data.labels ({spec})")
    if labels.shape[0] != n:
        raise ConfigError(f"data.labels: {labels.shape[0]} labels in {spec} for {n} samples in {data_path}")
    return labels, classes


def load_array_data(spec: str, labels: str | None = None, key: str = "data.target_path") -> OwnData:
    """An array file or CSV (``FILE`` or ``FILE:KEY``) as :class:`OwnData` in model space, with its labels."""
    from .arrays import array_to_samples

    path, entry = split_spec(str(spec))
    if not path.is_file():
        raise ConfigError(f"{key}: {spec}: no such file")
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}: {path} is empty")
    if path.suffix.lower() == ".csv":
        a, y, classes, names = read_csv(path, labels, key)
        return OwnData(torch.from_numpy(a), y, classes, "vectors", {"file": str(path), "format": "csv",
                                                                      "columns": names})
    a = _array_entry(path, entry, key)
    if a.ndim == 0 or a.shape[0] == 0:
        raise ConfigError(f"{key}: {path} holds no samples (shape {a.shape})")
    x, kind, info = array_to_samples(a, key + f" ({path})")
    if kind == "vectors" and not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{key}: {path} holds NaN or infinite values")
    y, classes = (None, None) if labels is None else read_labels(labels, path, x.shape[0])
    return OwnData(x, y, classes, kind, {"file": str(path), "format": path.suffix.lower()[1:], "entry": entry,
                                         **info})


def load_image_folder(spec: str, resolution: int | None = None, key: str = "data.target_path",
                      progress: bool = False) -> OwnData:
    """A folder (or tar) of images as uint8 (N, C, H, W), each centre-cropped to a square and resized to
    ``resolution`` (native size when None: all images must then have one size); labels are the sub-folder names
    (sorted, ``classes``) when every image sits in one."""
    from .image_files import load_images

    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: {spec}: no such folder")
    try:
        data = load_images(path, size=resolution, resolution=resolution, progress=progress)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        text = str(e)
        if "different sizes" in text:
            raise ConfigError(f"{key}: {path}: the images have different sizes; set data.resolution to crop and "
                              f"resize them to one square size") from None
        raise ConfigError(f"{key}: {text}") from None
    x = torch.as_tensor(data.images).permute(0, 3, 1, 2).contiguous()
    y = None if data.labels is None else torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
    return OwnData(x, y, list(data.classes) or None, "images", {"folder": str(path), "resolution": data.resolution,
                                                                "classes": list(data.classes)})


def split_indices(n: int, fraction: float | None, seed: int, stream: int = SPLIT_STREAM,
                  key: str = "data.heldout_fraction") -> tuple[Tensor, Tensor]:
    """(training rows, held-out rows) of N rows: a permutation from the generator seeded (seed, stream), the first
    round(fraction N) rows held out, both index lists sorted. No fraction: all rows train, none held out."""
    if not fraction:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    if not 0 < fraction < 1:
        raise ConfigError(f"{key}: must lie in (0, 1), got {fraction}")
    k = int(round(fraction * n))
    if k < 1 or k > n - 1:
        raise ConfigError(f"{key}: {fraction} of {n} samples leaves {k} held out and {n - k} to train; both need "
                          f"at least one")
    perm = torch.randperm(n, generator=seeded_generator(seed, stream))
    return perm[k:].sort().values, perm[:k].sort().values


@dataclass
class Standardizer:
    """Per-feature standardisation z = (x - mean) / std; ``inverse`` maps model samples back to data units."""

    mean: Tensor
    std: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def inverse(self, z: Tensor) -> Tensor:
        return z * self.std.to(z) + self.mean.to(z)

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean.reshape(-1)], "std": [float(v) for v in self.std.reshape(-1)],
                "shape": list(self.mean.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        shape = tuple(d.get("shape") or (len(d["mean"]),))
        return cls(torch.tensor(d["mean"], dtype=torch.float64).reshape(shape),
                   torch.tensor(d["std"], dtype=torch.float64).reshape(shape))


def fit_standardizer(x: Tensor) -> Standardizer:
    """Mean and (population) std per feature of the rows ``x`` (computed in float64); a constant feature gets
    std 1 (it is only centred)."""
    x64 = x.double()
    mean, std = x64.mean(0), x64.std(0, correction=0)
    return Standardizer(mean, torch.where(std > 0, std, torch.ones_like(std)))
