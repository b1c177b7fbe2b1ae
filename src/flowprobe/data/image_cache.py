"""The decode cache of image datasets: ``.npy`` files keyed by the source's identity and the preprocessing."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_write

__all__ = ["DecodeCache", "cache_dir", "ImageData"]


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


def cache_dir(path: str | Path | None = None) -> Path:
    """The decode cache: ``path``, else ``$FLOWPROBE_CACHE``, else ``~/.cache/flowprobe``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("FLOWPROBE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flowprobe"


def save_npy(path: Path, arr: np.ndarray) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    atomic_write(path, w)


class DecodeCache:
    """The ``.npy`` decode cache of one source: files keyed by the source's fingerprint (path, size, mtime,
    preprocessing, split), the image limit and the resolution; written atomically, read with
    ``allow_pickle=False``. An unreadable entry is a miss; an unwritable cache only costs speed."""

    def __init__(self, path: Path, fingerprint: dict, cache_path: str | Path | None = None):
        self.path, self.fingerprint = path, fingerprint
        self.folder = cache_dir(cache_path)
        self.stem = path.name.replace(".tar.gz", "").replace(".", "_")

    def files(self, limit: int | None, resolution: int | None) -> tuple[Path, Path, Path]:
        ident = {**self.fingerprint, "limit": limit, "resolution": resolution}
        k = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        f = self.folder / f"{self.stem}-{k}"
        return f.with_suffix(".npy"), f.with_suffix(".labels.npy"), f.with_suffix(".json")

    def read(self, limit: int | None, resolution: int | None) -> ImageData | None:
        img_f, lab_f, meta_f = self.files(limit, resolution)
        if not (img_f.is_file() and meta_f.is_file()):
            return None
        try:
            meta = json.loads(meta_f.read_text())
            images = np.load(img_f, allow_pickle=False)
            labels = np.load(lab_f, allow_pickle=False) if lab_f.is_file() else None
        except (OSError, ValueError):
            return None
        return ImageData(images, labels, list(meta.get("classes", [])), str(self.path))

    def write(self, data: ImageData, limit: int | None, resolution: int | None) -> None:
        img_f, lab_f, meta_f = self.files(limit, resolution)
        try:
            save_npy(img_f, data.images)
            if data.labels is not None:
                save_npy(lab_f, data.labels)
            meta = {"source": str(self.path), "classes": data.classes, "shape": list(data.images.shape),
                    "limit": limit, "resolution": resolution, "fingerprint": self.fingerprint}
            atomic_write(meta_f, lambda tmp: Path(tmp).write_text(json.dumps(meta)))
        except OSError:
            pass  # an unwritable cache only costs speed

    def native(self, limit: int | None) -> ImageData | None:
        """A cached decode at native resolution of all images, or of the shortest longer prefix, sliced."""
        base = self.read(None, None)
        if base is None and limit is not None:
            longer = []
            for meta_f in self.folder.glob(f"{self.stem}-*.json"):
                try:
                    meta = json.loads(meta_f.read_text())
                except (OSError, ValueError):
                    continue
                lim = meta.get("limit")
                if meta.get("fingerprint") == self.fingerprint and meta.get("resolution") is None \
                        and isinstance(lim, int) and lim >= limit:
                    longer.append(lim)
            for lim in sorted(longer):
                base = self.read(lim, None)
                if base is not None:
                    break
        if base is not None and limit is not None:
            base = ImageData(base.images[:limit], None if base.labels is None else base.labels[:limit],
                             base.classes, base.source)
        return base
