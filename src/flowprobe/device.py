"""Device and CPU-thread choice, made once per run (``--device``; the thread count from the work's size).

:func:`resolve_device` turns a user's device string into a ``torch.device`` or stops with one line naming
what is wrong; :func:`choose_threads` picks torch's intra-op thread count for small models so that they do
not oversubscribe the cores (a small MLP on 2 threads while another process is busy ran 10x slower than on 1).
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError

__all__ = ["resolve_device", "choose_threads", "THREADS_ENV"]

#: Environment variables through which a user sets the thread count; when one is set, flowprobe leaves it.
THREADS_ENV = ("FLOWPROBE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``, "" or "auto": CUDA when available, else CPU. Otherwise the named device, which must exist
    here: a ConfigError (one line) for a name that is not a device, for "meta", and for CUDA or MPS when this
    machine has none."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device: {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but CUDA is not available; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {device!r} requested but MPS is not available; use cpu")
    return dev


def choose_threads(n_parameters: int, batch_size: int, device: torch.device | str = "cpu") -> int:
    """Set (and return) torch's intra-op thread count for training a net of ``n_parameters`` on batches of
    ``batch_size`` on CPU.

    Work per step ~ 6 * parameters * batch flops. Below ~2e8 flops a step lasts well under a millisecond per
    thread and synchronising threads costs more than it saves; worse, with another busy process on the
    machine every step waits for the descheduled thread. Such work runs on one thread. Larger work keeps
    torch's default (all cores). A user's explicit setting (``FLOWPROBE_THREADS``, ``OMP_NUM_THREADS`` or
    ``MKL_NUM_THREADS``) is respected: then nothing is changed. On CUDA/MPS nothing is changed either.
    """
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    explicit = os.environ.get("FLOWPROBE_THREADS")
    if explicit:
        try:
            n = int(explicit)
        except ValueError:
            raise ConfigError(f"FLOWPROBE_THREADS: {explicit!r} is not a whole number") from None
        if n < 1:
            raise ConfigError(f"FLOWPROBE_THREADS: must be >= 1, got {n}")
        torch.set_num_threads(n)
        return n
    if any(os.environ.get(k) for k in THREADS_ENV[1:]):
        return torch.get_num_threads()
    if 6 * n_parameters * batch_size < SMALL_WORK_FLOPS:
        torch.set_num_threads(1)
    return torch.get_num_threads()


#: Below this many flops per training step, one thread is faster than several (benchmarks/RESULTS.md).
SMALL_WORK_FLOPS = 2e9
