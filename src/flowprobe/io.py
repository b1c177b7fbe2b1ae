"""Atomic file writes and small serialisation helpers. A crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "write_json", "read_json", "append_jsonl", "machine_info", "sha256_file", "json_digest",
           "remove_stale_temp_files", "truncate_jsonl"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``. Parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _default(o: Any):
    try:
        import numpy as np
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (tensors and arrays become lists)."""
    text = json.dumps(obj, indent=2, default=_default, allow_nan=True)

    def w(tmp):
        Path(tmp).write_text(text + "\n")

    return atomic_write(path, w)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (flushed and fsynced, so a crash loses at most the line being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def machine_info(device=None) -> dict:
    """What every result records about where it ran: Python, torch, platform, CPUs, torch threads, the
    GPU's name when CUDA is available, and the device used."""
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if device is not None:
        info["device"] = str(device)
    return info


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces; tensors and arrays as lists), so a value
    and its JSON round trip (what a sidecar reads back) have the same digest."""
    import hashlib

    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def remove_stale_temp_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` leaves when its process is killed mid-write
    (``.NAME.XXXX.tmp`` beside NAME) in ``folder`` (and its sub-folders); returns what was removed. Call it
    only where no other process is writing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def truncate_jsonl(path: str | Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite the JSON-lines file ``path`` atomically with only the records for which ``keep(record)`` is true
    (lines that do not parse, e.g. a line cut by a crash, are dropped). Returns the number of records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict) and keep(rec):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
    return dropped
