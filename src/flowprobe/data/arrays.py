"""Samples named by a DATA argument (``flowprobe diagnose --train / --heldout``), as float tensors in model space.

A DATA argument is one of

- an array file: ``samples.npy`` (read with ``allow_pickle=False``), ``samples.npz`` or ``samples.safetensors``;
  pick an entry with ``file.npz:key`` / ``file.safetensors:key`` (default: the only entry, else the first of
  ``x``, ``samples``, ``images``, ``data``, ``x1``);
- an image folder or a tar of image files (:func:`flowprobe.data.image_files.load_images`);
- a built-in name: ``cifar10``, ``cifar10-test``, ``celeba64`` (``celeba``), optionally with a count
  (``cifar10:5000`` keeps the first 5000); or a 2-D toy with a count, ``moons:2000``
  (:data:`flowprobe.data.toy.TOY_DISTRIBUTIONS`; drawn from a seeded generator, a different stream for
  training and held-out samples);
- a pairs file (``.safetensors`` with ``x0`` and ``x1`` and metadata ``format: flowprobe-pairs-1``), returned as
  ``kind="pairs"`` for :func:`flowprobe.probes.memorization.load_pairs` to read.

Array conventions (the model's space):

- uint8 images are pixels p in {0..255}, channels last (N, H, W, C) with C in {1, 3} (or (N, H, W): grey);
  channels-first uint8 (N, C, H, W) is recognised when the last axis cannot be channels. They become floats
  p / 127.5 - 1 in [-1, 1], channels first (N, C, H, W).
- float arrays are used as they are: images as (N, C, H, W) already in [-1, 1], vectors as (N, D) (any
  (N, ...) shape is passed through). A float array whose values look like pixels in [0, 255] or whose last axis
  looks like channels of a channels-last image is refused with a message saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError
from ..seeds import seeded_generator

__all__ = ["Samples", "load_data", "array_to_samples", "IMAGE_NAMES", "ARRAY_KEYS", "PAIRS_FORMAT_NAME"]

#: Built-in image dataset names -> names of :data:`flowprobe.data.image_files.DATASETS`.
IMAGE_NAMES = {"cifar10": "cifar10", "cifar10-test": "cifar10-test", "celeba64": "celeba", "celeba": "celeba"}
#: Entry names tried, in order, when an array file holds several.
ARRAY_KEYS = ("x", "samples", "images", "data", "x1")
#: The metadata ``format`` of a pairs file (:data:`flowprobe.probes.memorization.PAIRS_FORMAT`).
PAIRS_FORMAT_NAME = "flowprobe-pairs-1"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class Samples:
    """Loaded samples: ``x`` float32 (N, ...) in model space (None for a pairs file, ``kind="pairs"``); ``kind``
    "images", "vectors" or "pairs"; ``source`` the DATA argument; ``info`` how it was read (JSON-able)."""

    x: Tensor | None
    kind: str
    source: str
    info: dict = field(default_factory=dict)
    path: Path | None = None


def _channels_last_uint8(a: np.ndarray) -> bool:
    return a.shape[-1] in (1, 3) or a.shape[1] not in (1, 3)


def array_to_samples(a: np.ndarray | Tensor, source: str) -> tuple[Tensor, str, dict]:
    """(float32 tensor in model space, kind, info) of an array by the conventions of the module docstring;
    ConfigError (naming ``source``) for an array they do not cover."""
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, Tensor) else a
    if t.dim() < 2:
        raise ConfigError(f"{source}: expected samples with a batch axis (N, ...), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        if t.dim() == 3:
            t = t[..., None]
        if t.dim() != 4:
            raise ConfigError(f"{source}: uint8 data must be images (N, H, W, C) or (N, H, W), got {tuple(t.shape)}")
        layout = "NHWC" if _channels_last_uint8(t) else "NCHW"
        if layout == "NHWC":
            t = t.permute(0, 3, 1, 2)
        x = t.contiguous().float() / 127.5 - 1.0
        return x, "images", {"dtype": "uint8", "layout": layout, "scaling": "p / 127.5 - 1"}
    if not t.is_floating_point():
        raise ConfigError(f"{source}: expected uint8 pixels or floats, got {t.dtype}")
    x = t.float()
    if x.dim() == 4:
        lo, hi = float(x.min()), float(x.max())
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            raise ConfigError(f"{source}: float images must be channels-first (N, C, H, W) in [-1, 1], got shape "
                              f"{tuple(x.shape)} (channels last?); transpose them or pass uint8 (N, H, W, C)")
        if hi > 2.0:
            raise ConfigError(f"{source}: float images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                              f"scale them (x / 127.5 - 1 for pixels) or pass uint8")
        return x.contiguous(), "images", {"dtype": str(t.dtype).replace("torch.", ""), "layout": "NCHW",
                                          "range": [lo, hi]}
    return x.contiguous(), "vectors", {"dtype": str(t.dtype).replace("torch.", "")}


def _pick(entries: dict, key: str | None, source: str):
    if key is not None:
        if key not in entries:
            raise ConfigError(f"{source}: no entry {key!r}; it holds {', '.join(sorted(entries)) or 'nothing'}")
        return entries[key], key
    if len(entries) == 1:
        return next(iter(entries.items()))[::-1]
    for k in ARRAY_KEYS:
        if k in entries:
            return entries[k], k
    raise ConfigError(f"{source}: holds several entries ({', '.join(sorted(entries))}); name one as {source}:KEY")


def _read_safetensors(path: Path, key: str | None, source: str):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = list(f.keys())
            if key is None and (meta.get("format") == PAIRS_FORMAT_NAME or {"x0", "x1"} <= set(names)):
                return None, "pairs"
            entries = {n: n for n in names}
            _, chosen = _pick(entries, key, source)
            return f.get_tensor(chosen), chosen
    except ConfigError:
        raise
    except Exception as e:  # safetensors raises its own error types for a foreign file
        raise ConfigError(f"{source}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_array(path: Path, key: str | None, source: str):
    """(array or None, entry name or "pairs") of an array file."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path, key, source)
    try:
        if suffix == ".npy":
            if key is not None:
                raise ConfigError(f"{source}: a .npy file holds one array; drop ':{key}'")
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as z:
            arr, chosen = _pick({k: z[k] for k in z.files}, key, source)
            return arr, chosen
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(f"{source}: cannot read the array ({e})") from None


def _split_key(spec: str) -> tuple[str, str | None]:
    """``file.ext:key`` -> (file.ext, key) when file.ext exists; else (spec, None)."""
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        if Path(head).expanduser().is_file():
            return head, tail
    return spec, None


def _limit(x: Tensor, limit: int | None) -> Tensor:
    return x if limit is None else x[:limit]


def _from_images(source: str, name: str, root, resolution, limit, progress) -> Samples:
    from .image_files import load_images

    try:
        data = load_images(name, root=root, resolution=resolution, limit=limit, progress=progress)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    x, kind, info = array_to_samples(data.images, source)
    return Samples(x, kind, source, {**info, "loader": "images", "images": len(data),
                                     "resolution": data.resolution})


def _from_name(spec: str, root, resolution, limit, seed: int, stream: int, progress) -> Samples | None:
    from .toy import TOY_DISTRIBUTIONS, make_toy

    name, _, count_text = spec.partition(":")
    count = None
    if count_text:
        try:
            count = int(count_text)
        except ValueError:
            count = -1
        if count < 1:
            raise ConfigError(f"{spec}: the count after ':' must be an integer >= 1, got {count_text!r}")
    if name in IMAGE_NAMES:
        n = min(v for v in (count, limit) if v is not None) if (count or limit) else None
        return _from_images(spec, IMAGE_NAMES[name], root, resolution, n, progress)
    if name in TOY_DISTRIBUTIONS:
        if count is None:
            raise ConfigError(f"{spec}: a toy distribution needs a count, e.g. {name}:2000")
        g = seeded_generator(seed, 100 + stream)
        x, _ = make_toy(name).sample(count if limit is None else min(count, limit), g)
        return Samples(x.float(), "vectors", spec, {"loader": "toy", "distribution": name, "count": int(x.shape[0]),
                                                    "seed": seed, "stream": 100 + stream})
    return None


def load_data(spec: str | Path, *, root: str | Path | None = None, resolution: int | None = None,
              limit: int | None = None, seed: int = 0, stream: int = 0, progress: bool = False) -> Samples:
    """The samples a DATA argument names (module docstring). ``resolution``: downsample images to that side;
    ``limit``: keep the first N; ``seed`` / ``stream``: the generator of toy draws (use different streams for
    training and held-out samples). Bad input raises ConfigError with one line naming the file or key."""
    text = str(spec)
    if not text.strip():
        raise ConfigError("DATA is empty: give a file, a folder or a dataset name")
    file_part, key = _split_key(text)
    path = Path(file_part).expanduser()
    if path.is_dir() or (path.is_file() and path.name.lower().endswith(_TAR_SUFFIXES)):
        out = _from_images(text, str(path), root, resolution, limit, progress)
        out.path = path
        return out
    if path.is_file():
        arr, entry = _read_array(path, key, text)
        if entry == "pairs":
            return Samples(None, "pairs", text, {"loader": "pairs"}, path)
        x, kind, info = array_to_samples(arr, text)
        if resolution is not None and kind == "images" and x.shape[-1] != resolution:
            x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="area")
            info["resolution"] = resolution
        x = _limit(x, limit)
        return Samples(x, kind, text, {**info, "loader": "array", "entry": entry, "count": int(x.shape[0])}, path)
    named = _from_name(text, root, resolution, limit, seed, stream, progress)
    if named is not None:
        return named
    raise ConfigError(f"{text}: no such file or folder, and not a dataset name (cifar10, cifar10-test, celeba64, "
                      f"or a 2-D toy with a count such as moons:2000)")
