"""Image datasets (CIFAR-10, CelebA-64, any folder of images), a GPU image sampler and image pairings.

Loading
-------
:func:`load_images` reads, with Pillow and numpy only:

- a gzip/plain **tar of image files** (the offline copies in ``shared/data``: ``celeba/images.tar.gz``,
  flat; ``cifar10/{train,test}.tar.gz``, ``<class>/<NNNN>.jpg``);
- CIFAR-10's official **``cifar-10-batches-py``** folder (pickled batches, read with a *restricted*
  unpickler, see below) and the binary **``cifar-10-batches-bin``** folder (parsed without pickle);
- CelebA's **``img_align_celeba/``** folder (178x218 JPEGs: the standard 178x178 centre crop, then a
  resize to 64x64 with PIL bicubic);
- **any folder of images**, flat or ImageFolder-style (``<root>/<class>/<file>``; labels are the sorted
  class-folder names).

Images come back as a uint8 array of shape (N, H, W, 3) in sorted file-name order (CIFAR batches: the
official order), labels as int64 when the layout has classes. ``limit=N`` keeps the first N;
``resolution=r`` downsamples to r x r (box average when the side divides, else PIL bicubic).

Every decode is cached as a ``.npy`` file (``allow_pickle=False`` on load) in ``$FLOWPROBE_CACHE`` or
``~/.cache/flowprobe``, keyed by the source path, its size and mtime, the preprocessing, the limit and
the resolution; the file is written atomically, so a second load is a memory read.

Dataset names (``"celeba"``, ``"cifar10"``, ``"cifar10-test"``) are looked up under a data root:
the ``root`` argument, else ``$FLOWPROBE_DATA``, else ``../shared/data`` relative to the working
directory or to the repository root.

Pickle policy: the official CIFAR-10 python batches are pickles. They are read by
:class:`RestrictedUnpickler`, whose ``find_class`` allows only numpy's array reconstruction
(``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``) and ``_codecs.encode``
(how a protocol-2 pickle written by Python 3 spells bytes); dicts, lists, bytes, str and ints need no
globals. Any other global (``os.system``, ``builtins.eval``, ...) raises
``pickle.UnpicklingError`` before anything runs. Prefer the binary release, which needs no pickle.

Training side
-------------
:class:`ImageSampler` keeps the uint8 images on the training device (N x 3 x H x W) and returns
float batches in [-1, 1] (x / 127.5 - 1) with an optional random horizontal flip, all drawn from the
caller's generator: no data-loader process in the hot loop. :class:`IndexedPairs` is a fixed coupling
(x0[i], image[partner[i]]) with uint8 targets. Pairings: :func:`fixed_noise` (noise fixed per image
index), :func:`ot_partner` (exact OT assignment), :func:`shuffled_partner` (seeded permutation) and
:func:`generate_pairs` (x0 -> model endpoint, for reflow).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..couplings import Pairing, ot_permutation
from ..io import atomic_write

__all__ = [
    "ImageData", "load_images", "find_data_root", "dataset_path", "cache_dir", "DATASETS",
    "RestrictedUnpickler", "read_cifar_batches", "celeba_preprocess", "downsample",
    "to_tensor", "to_unit", "to_uint8", "ImageSampler", "IndexedPairs",
    "fixed_noise", "shuffled_partner", "ot_partner", "generate_pairs",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
CELEBA_SIZE = 64
_CACHE_VERSION = 1

#: Dataset names: candidate locations under the data root, first existing wins, and the preprocessing.
DATASETS: dict[str, dict] = {
    "celeba": {"paths": ["celeba/images.tar.gz", "celeba/img_align_celeba", "img_align_celeba",
                         "celeba/celeba/img_align_celeba"], "kind": "celeba"},
    "cifar10": {"paths": ["cifar10/train.tar.gz", "cifar10/cifar-10-batches-py", "cifar-10-batches-py",
                          "cifar10/cifar-10-batches-bin", "cifar-10-batches-bin"], "kind": "plain", "split": "train"},
    "cifar10-test": {"paths": ["cifar10/test.tar.gz", "cifar10/cifar-10-batches-py", "cifar-10-batches-py",
                               "cifar10/cifar-10-batches-bin", "cifar-10-batches-bin"], "kind": "plain",
                     "split": "test"},
}


@dataclass
class ImageData:
    """Decoded images: ``images`` uint8 (N, H, W, 3); ``labels`` int64 (N,) or None; ``classes`` the
    class names (label k is classes[k]); ``source`` where they came from."""

    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])


# ----------------------------------------------------------------------------------------------- paths

def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def find_data_root(root: str | Path | None = None) -> Path | None:
    """The data root: ``root`` if given, else ``$FLOWPROBE_DATA``, else the first existing of
    ``./../shared/data`` and ``<repository>/../shared/data``. None when nothing exists."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FLOWPROBE_DATA")
    if env:
        return Path(env).expanduser()
    for cand in (Path.cwd().parent / "shared" / "data", _repo_root().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def dataset_path(name: str, root: str | Path | None = None) -> Path:
    """Where dataset ``name`` (a key of :data:`DATASETS`) lives under the data root."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or give a path")
    base = find_data_root(root)
    if base is None:
        raise FileNotFoundError(f"no data root for {name!r}: pass a path, set FLOWPROBE_DATA, or put the data "
                                "in ../shared/data")
    tried = [base / p for p in DATASETS[name]["paths"]]
    for p in tried:
        if p.exists():
            return p
    raise FileNotFoundError(f"dataset {name!r} not found under {base}; looked for "
                            + ", ".join(str(p) for p in tried) + " (set FLOWPROBE_DATA to the data root)")


def cache_dir(path: str | Path | None = None) -> Path:
    """The decode cache: ``path``, else ``$FLOWPROBE_CACHE``, else ``~/.cache/flowprobe``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("FLOWPROBE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flowprobe"


# ---------------------------------------------------------------------------------------- CIFAR batches

class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild only plain containers and numpy arrays.

    ``find_class`` allows numpy's ndarray reconstruction and nothing else, so a pickle that names any
    other callable (the way malicious pickles run code) raises ``UnpicklingError`` instead.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell a bytes object
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            if name == "_reconstruct":
                try:
                    from numpy._core.multiarray import _reconstruct
                except ImportError:  # numpy < 2
                    from numpy.core.multiarray import _reconstruct
                return _reconstruct
            if module == "_codecs":
                import codecs

                return codecs.encode
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a pickle "
                                     "(only numpy arrays, dicts, lists, bytes, str and ints are allowed)")


def _restricted_load(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = RestrictedUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict (a CIFAR-10 batch), got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar_batches(folder: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 from an official CIFAR-10 folder.

    ``cifar-10-batches-bin``: each record is 1 label byte then 3072 pixel bytes (1024 R, 1024 G, 1024 B,
    row-major), parsed with numpy. ``cifar-10-batches-py``: dicts with ``data`` (N, 3072) uint8 and
    ``labels``, read with :class:`RestrictedUnpickler`. ``split``: "train" (data_batch_1..5) or "test".
    """
    folder = Path(folder)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stems = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    if (folder / (stems[0] + ".bin")).is_file():
        for s in stems:
            raw = np.fromfile(folder / (s + ".bin"), dtype=np.uint8)
            if raw.size % 3073:
                raise ValueError(f"{folder / (s + '.bin')}: size is not a multiple of 3073 bytes")
            rec = raw.reshape(-1, 3073)
            ys.append(rec[:, 0].astype(np.int64))
            xs.append(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    elif (folder / stems[0]).is_file():
        for s in stems:
            d = _restricted_load(folder / s)
            data = np.asarray(d["data"], dtype=np.uint8)
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
    else:
        raise FileNotFoundError(f"{folder}: no CIFAR-10 batches ({stems[0]} or {stems[0]}.bin)")
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _cifar_classes(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if meta.is_file():
        d = _restricted_load(meta)
        return [n.decode() if isinstance(n, bytes) else str(n) for n in d.get("label_names", [])]
    meta_txt = folder / "batches.meta.txt"
    if meta_txt.is_file():
        return [ln.strip() for ln in meta_txt.read_text().splitlines() if ln.strip()]
    return []


# ------------------------------------------------------------------------------------------ decoding

def celeba_preprocess(img, size: int = CELEBA_SIZE):
    """The standard CelebA-64 transform of a PIL image: centre-crop the largest square (178x178 rows
    20..198 of an official 178x218 image) and resize it to size x size with PIL bicubic (antialiased).
    An image that is already size x size is returned unchanged."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return img.resize((size, size), Image.BICUBIC)


def _decode(data: bytes, kind: str, size: int | None):
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "celeba":
        img = celeba_preprocess(img, size or CELEBA_SIZE)
    elif size is not None and img.size != (size, size):
        img = celeba_preprocess(img, size)  # centre square crop + bicubic resize
    return np.asarray(img, dtype=np.uint8)


def _decode_all(blobs: list[bytes], kind: str, size: int | None, progress: bool, what: str) -> np.ndarray:
    if not blobs:
        raise ValueError(f"{what}: no image files found")
    workers = max(1, min(16, os.cpu_count() or 1))
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(lambda b: _decode(b, kind, size), blobs, chunksize=64)
        if progress:
            from rich.progress import track

            it = track(it, total=len(blobs), description=f"decoding {what}", transient=True)
        out = list(it)
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise ValueError(f"{what}: images have different sizes {sorted(shapes)[:4]}...; pass size= to crop "
                         "and resize them to one square size")
    return np.stack(out)


def _labels_from_names(names: list[str]) -> tuple[np.ndarray | None, list[str]]:
    parts = [n.split("/") for n in names]
    if not parts or any(len(p) < 2 for p in parts):
        return None, []
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64), classes


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).name.startswith(".")


def _read_tar(path: Path, limit: int | None) -> tuple[list[str], list[bytes]]:
    with tarfile.open(path, "r:*") as tf:
        found: dict[str, bytes] = {}
        for m in tf:
            if m.isfile() and _is_image(m.name):
                f = tf.extractfile(m)
                if f is not None:
                    found[m.name.lstrip("./")] = f.read()
    names = sorted(found)
    if limit is not None:
        names = names[:limit]
    return names, [found[n] for n in names]


def _folder_files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and _is_image(p.name))


def _fingerprint(path: Path) -> dict:
    """Identity of a source for the cache key: size and mtime of a file; count, total size and latest
    mtime of the image files of a folder (or of the CIFAR batches)."""
    if path.is_file():
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = [p for p in path.rglob("*") if p.is_file()]
    sts = [p.stat() for p in files]
    return {"count": len(files), "size": sum(s.st_size for s in sts), "mtime_ns": max((s.st_mtime_ns for s in sts),
                                                                                      default=0)}


def downsample(images: np.ndarray, resolution: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, r, r, C): the mean over r x r blocks, rounded, when H and W are
    multiples of r (an exact area average); otherwise PIL bicubic per image (after a centre square crop)."""
    n, h, w, c = images.shape
    if (h, w) == (resolution, resolution):
        return images
    if h == w and h % resolution == 0:
        f = h // resolution
        x = images.reshape(n, resolution, f, resolution, f, c).astype(np.float32).mean(axis=(2, 4))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    from PIL import Image

    return np.stack([np.asarray(celeba_preprocess(Image.fromarray(a), resolution)) for a in images])


def _source_kind(path: Path, kind: str | None) -> str:
    if kind:
        return kind
    if "img_align_celeba" in (part.lower() for part in path.parts):
        return "celeba"
    return "plain"


def _decode_source(path: Path, kind: str, size: int | None, limit: int | None, split: str,
                   progress: bool) -> ImageData:
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise ValueError(f"{path}: not a tar archive; give a tar of images or a folder")
        names, blobs = _read_tar(path, limit)
        images = _decode_all(blobs, kind, size, progress, str(path))
        labels, classes = _labels_from_names(names)
        return ImageData(images, labels, classes, str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / "data_batch_1").is_file() or (path / "data_batch_1.bin").is_file() or (path / "test_batch").is_file() \
            or (path / "test_batch.bin").is_file():
        images, labels = read_cifar_batches(path, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        if size is not None and size != 32:
            images = downsample(images, size)
        return ImageData(images, labels, _cifar_classes(path), str(path))
    files = _folder_files(path)
    if not files:
        raise ValueError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    if limit is not None:
        files = files[:limit]
    blobs = [(path / f).read_bytes() for f in files]
    images = _decode_all(blobs, kind, size, progress, str(path))
    labels, classes = _labels_from_names(files)
    return ImageData(images, labels, classes, str(path))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    atomic_write(path, w)


def load_images(source: str | Path, *, root: str | Path | None = None, split: str | None = None,
                resolution: int | None = None, limit: int | None = None, size: int | None = None,
                kind: str | None = None, cache: bool = True, cache_path: str | Path | None = None,
                progress: bool = False) -> ImageData:
    """Decode a dataset (a name of :data:`DATASETS` or a path) to uint8 (N, H, W, 3), with a cache.

    Args:
        source: "celeba", "cifar10", "cifar10-test", or a tar / folder path (see the module docstring).
        root: data root for names (default ``$FLOWPROBE_DATA`` or ``../shared/data``).
        split: "train" or "test" for an official CIFAR-10 folder (names set it).
        resolution: downsample the decoded images to resolution x resolution.
        limit: keep the first ``limit`` images in sorted order.
        size: decode size for arbitrary folders of mixed sizes (centre square crop + bicubic resize).
        kind: "celeba" (centre crop + 64x64 bicubic) or "plain"; when None, "celeba" for a path inside an
            ``img_align_celeba`` folder, else "plain".
        cache / cache_path: use the ``.npy`` cache (folder ``cache_path``, see :func:`cache_dir`).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if isinstance(source, str) and source in DATASETS:
        spec = DATASETS[source]
        path = dataset_path(source, root)
        kind = kind or spec["kind"]
        split = split or spec.get("split", "train")
    else:
        path = Path(source).expanduser()
        kind = _source_kind(path, kind)
        split = split or "train"
    if kind not in ("celeba", "plain"):
        raise ValueError(f"kind must be 'celeba' or 'plain', got {kind!r}")
    if kind == "celeba" and size is None:
        size = CELEBA_SIZE
    path = path.resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")

    fingerprint = {"v": _CACHE_VERSION, "path": str(path), **_fingerprint(path), "kind": kind, "size": size,
                   "split": split}

    def key_for(lim, res) -> str:
        ident = {**fingerprint, "limit": lim, "resolution": res}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    folder = cache_dir(cache_path)
    stem = path.name.replace(".tar.gz", "").replace(".", "_")

    def files(lim, res):
        k = key_for(lim, res)
        return folder / f"{stem}-{k}.npy", folder / f"{stem}-{k}.labels.npy", folder / f"{stem}-{k}.json"

    def read(lim, res) -> ImageData | None:
        img_f, lab_f, meta_f = files(lim, res)
        if not (img_f.is_file() and meta_f.is_file()):
            return None
        try:
            meta = json.loads(meta_f.read_text())
            images = np.load(img_f, allow_pickle=False)
            labels = np.load(lab_f, allow_pickle=False) if lab_f.is_file() else None
        except (OSError, ValueError):
            return None
        return ImageData(images, labels, list(meta.get("classes", [])), str(path))

    def write(data: ImageData, lim, res) -> None:
        img_f, lab_f, meta_f = files(lim, res)
        try:
            _save_npy(img_f, data.images)
            if data.labels is not None:
                _save_npy(lab_f, data.labels)
            meta = {"source": str(path), "classes": data.classes, "shape": list(data.images.shape),
                    "limit": lim, "resolution": res, "fingerprint": fingerprint}
            atomic_write(meta_f, lambda tmp: Path(tmp).write_text(json.dumps(meta)))
        except OSError:
            pass  # an unwritable cache only costs speed

    if cache:
        hit = read(limit, resolution)
        if hit is not None:
            return hit
    base = None
    if cache:  # a cached decode at native resolution of all images, or of a longer prefix, sliced
        base = read(None, None)
        if base is None and limit is not None:
            longer = []
            for meta_f in folder.glob(f"{stem}-*.json"):
                try:
                    meta = json.loads(meta_f.read_text())
                except (OSError, ValueError):
                    continue
                lim = meta.get("limit")
                if meta.get("fingerprint") == fingerprint and meta.get("resolution") is None \
                        and isinstance(lim, int) and lim >= limit:
                    longer.append(lim)
            for lim in sorted(longer):
                base = read(lim, None)
                if base is not None:
                    break
        if base is not None and limit is not None:
            base = ImageData(base.images[:limit], None if base.labels is None else base.labels[:limit],
                             base.classes, base.source)
    if base is None:
        base = _decode_source(path, kind, size, limit, split, progress)
        if cache:
            write(base, limit, None)
    data = base
    if resolution is not None and resolution != base.resolution:
        data = ImageData(downsample(base.images, resolution), base.labels, base.classes, base.source)
        if cache:
            write(data, limit, resolution)
    return data


# ------------------------------------------------------------------------------------ tensors, sampler

def to_tensor(images: np.ndarray | Tensor, device: str | torch.device = "cpu") -> Tensor:
    """uint8 (N, H, W, C) -> uint8 tensor (N, C, H, W) on ``device`` (contiguous)."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).contiguous().to(device)


def to_unit(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels p in {0..255} -> floats p / 127.5 - 1 in [-1, 1]."""
    return x.to(dtype) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Floats in [-1, 1] -> uint8 round((x + 1) * 127.5), clipped to [0, 255]."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _draw_indices(N: int, n: int, generator: torch.Generator) -> Tensor:
    if n <= N:
        return torch.randperm(N, generator=generator, device=generator.device)[:n]
    return torch.randint(N, (n,), generator=generator, device=generator.device)


class ImageSampler:
    """Draws training images from a uint8 tensor (N, C, H, W) kept on its device.

    ``sample(n, generator) -> (x, idx)``: n rows drawn uniformly without replacement (with replacement
    when n > N), scaled to x / 127.5 - 1 in [-1, 1], each flipped left-right with probability 1/2 when
    ``flip``. All randomness comes from ``generator`` (the flip mask too).
    """

    def __init__(self, data: Tensor, flip: bool = True, dtype: torch.dtype = torch.float32):
        if data.dtype != torch.uint8 or data.dim() != 4:
            raise ValueError(f"data must be a uint8 tensor (N, C, H, W), got {data.dtype} {tuple(data.shape)}")
        self.data, self.flip, self.dtype = data, bool(flip), dtype

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = _draw_indices(len(self), n, generator)
        x = to_unit(self.data[idx.to(self.data.device)], self.dtype)
        if self.flip:
            mask = torch.rand(n, generator=generator, device=generator.device) < 0.5
            mask = mask.to(x.device)[:, None, None, None]
            x = torch.where(mask, x.flip(-1), x)
        return x, idx.to(self.data.device)


class IndexedPairs:
    """A fixed coupling of sources x0[i] (float) with uint8 images ``images[partner[i]]``.

    ``sample(n, generator)`` draws rows i and returns a Pairing with x1 = images[partner[i]] scaled to
    [-1, 1] (no flip: the pairing is by index), i0 = i and i1 = partner[i].
    """

    def __init__(self, x0: Tensor, images: Tensor, partner: Tensor | None = None, dtype: torch.dtype = torch.float32):
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        partner = torch.arange(x0.shape[0]) if partner is None else partner
        if partner.shape != (x0.shape[0],):
            raise ValueError(f"partner must have shape ({x0.shape[0]},), got {tuple(partner.shape)}")
        if tuple(x0.shape[1:]) != tuple(images.shape[1:]):
            raise ValueError(f"x0 rows {tuple(x0.shape[1:])} and images {tuple(images.shape[1:])} differ in shape")
        self.x0, self.images, self.dtype = x0, images, dtype
        self.partner = partner.to(images.device, torch.long)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        idx = _draw_indices(len(self), n, generator).to(self.x0.device)
        i1 = self.partner[idx.to(self.partner.device)]
        x1 = to_unit(self.images[i1], self.dtype).to(self.x0.device)
        return Pairing(self.x0[idx], x1, idx, i1)

    def describe(self) -> dict:
        return {"coupling": "indexed_pairs", "n_pairs": len(self)}


# -------------------------------------------------------------------------------------------- pairings

def fixed_noise(n: int, shape: tuple[int, ...], seed: int, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, block: int = 256) -> Tensor:
    """x0[i] ~ N(0, I) of ``shape``, fixed per index: rows are drawn on the CPU in blocks of ``block``
    rows, block b from a generator seeded with (seed, b), so row i is the same for every n > i and on
    every device."""
    rows = []
    for b in range(0, n, block):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b // block)
        rows.append(torch.randn((block, *shape), generator=g, dtype=torch.float32)[:n - b])
    x = torch.cat(rows) if rows else torch.zeros((0, *shape))
    return x.to(device=device, dtype=dtype)


def shuffled_partner(n: int, seed: int) -> Tensor:
    """The adversarial pairing: a uniformly random permutation of range(n) from a generator seeded with
    ``seed`` (x0[i] is paired with image[perm[i]])."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def ot_partner(x0: Tensor, x1: Tensor, method: str = "lsa", device: str | torch.device | None = None) -> Tensor:
    """Exact OT partner: the permutation p minimising sum_i ||x0_i - x1_p(i)||^2 (discrete Monge
    assignment between two equal-size point clouds). The cost matrix is computed in float64 on
    ``device`` (the GPU when given: N = 10^4 images of 12288 values is seconds), the assignment by
    scipy's ``linear_sum_assignment`` (``"lsa"``, fine to N ~ 10^4) or POT's ``emd``. Returns a CPU
    int64 tensor."""
    if device is not None:
        x0, x1 = x0.to(device), x1.to(device)
    x1 = to_unit(x1) if x1.dtype == torch.uint8 else x1
    return ot_permutation(x0, x1, method).cpu()


@torch.no_grad()
def generate_pairs(model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, *, method: str = "euler", steps: int = 100,
                   batch_size: int = 500, device: str | torch.device | None = None,
                   autocast_dtype: torch.dtype | None = None, progress: bool = False) -> Tensor:
    """G(x0): integrate dx/dt = model(t, x) from t = 0 to 1 for every row of x0 (in batches), with
    :func:`flowprobe.solvers.integrate`. Returns float32 endpoints on x0's device (reflow targets)."""
    from ..solvers import integrate

    device = torch.device(device) if device is not None else x0.device
    outs = []
    starts = range(0, x0.shape[0], batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description="integrating", transient=True)
    for s in starts:
        xb = x0[s:s + batch_size].to(device, torch.float32)
        if autocast_dtype is not None and device.type == "cuda":
            def field(t, x):
                with torch.autocast("cuda", dtype=autocast_dtype):
                    return model(t, x).float()
        else:
            field = model
        outs.append(integrate(field, xb, method=method, steps=steps).x.float().to(x0.device))
    return torch.cat(outs)
