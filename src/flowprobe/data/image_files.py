"""Reading image datasets (CIFAR-10, CelebA-64, any folder of images) into uint8 arrays, with a cache.

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
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .image_cache import DecodeCache, ImageData, cache_dir

__all__ = [
    "ImageData", "load_images", "load_images_for", "DecodeCache", "find_data_root", "dataset_path", "cache_dir",
    "DATASETS",
    "RestrictedUnpickler", "read_cifar_batches", "celeba_preprocess", "downsample",
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


# ---------------------------------------------------------------------------------------- CIFAR batches

def _bounded_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` for pickles, which allocates ``shape`` before the data arrives: numpy itself always
    pickles shape (0,) and sets the real shape with the data (whose size numpy checks), so a larger shape here can
    only be a file built to make a few bytes allocate gigabytes; it is refused before any allocation."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dims = shape if isinstance(shape, tuple) else (shape,)
    if not all(isinstance(d, int) for d in dims) or int(np.prod(dims, dtype=np.float64)) > 1:
        raise pickle.UnpicklingError(f"refusing a pickled array that asks for shape {shape!r} before its data "
                                     "(numpy writes (0,) there)")
    return _reconstruct(subtype, shape, dtype)


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
                return _bounded_reconstruct
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


def _decode(item: tuple[str, bytes], kind: str, size: int | None):
    """One image file's bytes -> uint8 (H, W, 3); a damaged, empty, non-image or decompression-bomb file is a
    ValueError naming the file (Pillow's own size guard stays on)."""
    from PIL import Image, UnidentifiedImageError

    name, data = item
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = img.convert("RGB")
    except Image.DecompressionBombError:
        raise ValueError(f"{name}: refused, its pixel count exceeds Pillow's decompression-bomb limit") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        why = "empty file" if not data else (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ValueError(f"{name}: not a readable image ({why})") from None
    if kind == "celeba":
        img = celeba_preprocess(img, size or CELEBA_SIZE)
    elif size is not None and img.size != (size, size):
        img = celeba_preprocess(img, size)  # centre square crop + bicubic resize
    return np.asarray(img, dtype=np.uint8)


def _decode_all(blobs: list[bytes], kind: str, size: int | None, progress: bool, what: str,
                names: list[str] | None = None) -> np.ndarray:
    if not blobs:
        raise ValueError(f"{what}: no image files found")
    names = [f"{what}/{n}" for n in names] if names is not None else [f"{what} (image {i})" for i in range(len(blobs))]
    workers = max(1, min(16, os.cpu_count() or 1))
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(lambda item: _decode(item, kind, size), zip(names, blobs), chunksize=64)
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
        images = _decode_all(blobs, kind, size, progress, str(path), names)
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
    images = _decode_all(blobs, kind, size, progress, str(path), files)
    labels, classes = _labels_from_names(files)
    return ImageData(images, labels, classes, str(path))


def _resolve_source(source: str | Path, root, split, kind, size) -> tuple[Path, str, str, int | None]:
    """(path, kind, split, decode size) of a dataset name or path."""
    if isinstance(source, str) and source in DATASETS:
        spec = DATASETS[source]
        path = dataset_path(source, root)
        kind = kind or spec["kind"]
        split = split or spec.get("split", "train")
    else:
        if isinstance(source, str) and not source.strip():
            raise ValueError("the dataset is an empty string; give a dataset name or a path")
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
    return path, kind, split, size


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
    path, kind, split, size = _resolve_source(source, root, split, kind, size)
    fingerprint = {"v": _CACHE_VERSION, "path": str(path), **_fingerprint(path), "kind": kind, "size": size,
                   "split": split}
    store = DecodeCache(path, fingerprint, cache_path) if cache else None
    if store is not None:
        hit = store.read(limit, resolution)
        if hit is not None:
            return hit
    base = store.native(limit) if store is not None else None
    if base is None:
        base = _decode_source(path, kind, size, limit, split, progress)
        if store is not None:
            store.write(base, limit, None)
    data = base
    if resolution is not None and resolution != base.resolution:
        data = ImageData(downsample(base.images, resolution), base.labels, base.classes, base.source)
        if store is not None:
            store.write(data, limit, resolution)
    return data


def load_images_for(key: str, source: str | Path, **options) -> ImageData:
    """:func:`load_images` for a value the user gave as ``key`` (a config key or a flag): a missing file, a bad
    archive or a damaged image becomes a one-line :class:`~flowprobe.config.ConfigError` naming the key."""
    from ..config import ConfigError

    try:
        return load_images(source, **options)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
