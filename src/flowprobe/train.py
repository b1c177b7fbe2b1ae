"""The training loop shared by every model (toy MLPs, image UNets, experiments), and the train/sample CLI.

:func:`fit` is the low-level loop: a net, a coupling (anything with ``sample(n, generator) -> Pairing``),
an objective (:class:`~flowprobe.objectives.CFMObjective` or anything called ``objective(net, pairing,
generator) -> scalar loss``) and a step budget. One step is one AdamW update on a batch of
``batch_size`` pairs:

    theta <- AdamW(theta, grad_theta L(theta)),   L = mean_i l_i  (the objective's batch loss),

with learning rate lr_k = lr * w(k) * c(k) (linear warm-up w, constant or cosine decay c; see
:func:`learning_rate`), optional gradient-norm clipping, an optional EMA copy
e <- d e + (1 - d) theta after every update, fp32 or bf16 autocast, optional ``torch.compile``, checkpoints
(:mod:`flowprobe.checkpoint`) that resume *exactly*, metrics appended to a JSONL file, and data-parallel
training through ``torch.distributed`` (DistributedDataParallel) when a process group is initialised.

:class:`TrainConfig` describes a whole run in YAML (data, model, path, coupling, optimiser, sampling);
:func:`train_from_config` runs it into a folder, and ``flowprobe train`` / ``flowprobe sample`` are the
command-line front ends (registered by :func:`register_cli`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import __version__
from .config import ConfigError, load_config, option, to_dict
from .fast import PRECISIONS, compile_options, ema_update_, has_conv, make_ema, make_optimizer, make_train_step, \
    prepare_model, set_tf32
from .fast import resolve_auto as fast_resolve_auto
from .io import append_jsonl, atomic_write, machine_info, write_json
from .nets.embedding import TIME_SCALE
from .objectives import OBJECTIVES, AverageVelocityObjective, CFMObjective, make_objective
from .solvers import METHODS

#: what ``sample.solver`` / ``--solver`` accept: the ODE methods, and "average" (jumps of a few-step net)
SAMPLE_SOLVERS = METHODS + ("average",)

__all__ = [
    "fit", "TrainState", "learning_rate", "LR_SCHEDULES", "PRECISIONS", "ema_update", "distributed_info",
    "TrainConfig", "DataConfig", "ModelConfig", "PathConfig", "CouplingConfig", "OptimConfig", "SampleConfig",
    "build_run", "train_from_config", "sample_checkpoint", "default_config_path", "register_cli",
    "model_spec", "build_net", "build_data", "build_objective", "load_model", "load_run", "LoadedRun",
    "checkpoint_config", "resolve_auto", "save_image_grid",
]

LR_SCHEDULES = ("constant", "cosine")
#: Default times of the gradient-variance log (0.01, 0.1, ..., 0.9, 0.99: see probes.gradvar.parse_times).
GRADVAR_TIMES = "0:1:11"
#: The gradient-variance probe draws from its own generator, seeded with seed + GRADVAR_SEED_OFFSET.
GRADVAR_SEED_OFFSET = 7919


@dataclass
class TrainState:
    """What ``fit`` returns (and what a callback receives): the trained net, its EMA copy (None without
    EMA), the number of optimiser steps taken and the per-step training losses (host floats; inside a
    callback, the losses up to the current step). ``model`` is what to sample: the EMA when there is one."""

    net: nn.Module
    ema: nn.Module | None = None
    step: int = 0
    losses: list = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.net


def learning_rate(step: int, *, lr: float, steps: int, warmup: int = 0, schedule: str = "constant") -> float:
    """Learning rate of optimiser step ``step`` (0-based) out of ``steps``:

        lr_k = lr * min(1, (k + 1) / warmup) * c(k),   c(k) = 1 (constant) or (1 + cos(pi k / steps)) / 2 (cosine).

    Without warm-up (``warmup = 0``) the first factor is 1.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * step / steps))
    return lr * f


#: e <- decay * e + (1 - decay) * theta for every parameter, buffers copied: one function,
#: :func:`flowprobe.fast.ema_update_` (this name is kept for callers of ``flowprobe.train.ema_update``).
ema_update = ema_update_


def distributed_info() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _describe(obj: Any) -> dict | None:
    d = getattr(obj, "describe", None)
    if callable(d):
        try:
            return d()
        except Exception:  # a description must never stop training
            return {"type": type(obj).__name__}
    return {"type": type(obj).__name__} if obj is not None else None


def _objective_description(objective) -> dict:
    desc = _describe(objective) if hasattr(objective, "describe") else {"objective": type(objective).__name__}
    if isinstance(objective, CFMObjective):
        desc = {"objective": "cfm", "reduction": objective.reduction}
    return desc


class _GracefulInterrupt:
    """First Ctrl-C: finish the current step, checkpoint, then raise KeyboardInterrupt. Second: at once."""

    def __init__(self, active: bool):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._old = None

    def __enter__(self):
        if self.active and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            self.active = False  # SIGINT is ignored (e.g. a background job): leave it so
        if self.active:
            self._old = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self._old)
        return False


def _plain_cfm(objective) -> bool:
    """True when the objective's batch loss is mean_i losses_i of draw() (CFMObjective or a few-step objective,
    without overrides of the batch loss)."""
    return any(isinstance(objective, base) and type(objective).__call__ is base.__call__
               for base in (CFMObjective, AverageVelocityObjective))


def _batch_fns(objective, coupling, generator, batch_size: int, rank: int, world: int, channels_last: bool = False):
    """(next_batch, loss_fn) of one optimiser step: ``loss_fn(model, *next_batch())`` is the batch loss.

    Drawing (pairs, times, noise: Python control flow, generators, OT solvers) stays outside the
    (possibly compiled) loss function. For a plain CFM objective the batch is (t, x_t, u_t) and the loss
    mean_i l_i(t_i, x_t,i, u_t,i), the same number as ``objective(model, pairing, generator)``. Data-parallel:
    every rank draws the *global* batch from the shared generator (so the generator stays in step
    everywhere), then keeps its slice; the mean over the slice, averaged over ranks by DDP's gradient
    all-reduce, is the single-process batch mean. Other objectives get the pairing and draw the rest
    themselves inside the loss.
    """
    if world == 1 and not _plain_cfm(objective):
        def next_pairing():
            return (coupling.sample(batch_size, generator),)

        def pairing_loss(model, pairing):
            return objective(model, pairing, generator)

        return next_pairing, pairing_loss
    per = batch_size // world
    sl = slice(rank * per, (rank + 1) * per)
    weighted = bool(getattr(coupling, "weighted", False))

    def next_batch():
        pairing = coupling.sample(batch_size, generator)
        batch = objective.draw(pairing, generator)  # (t, x_t, u_t) for CFM
        if weighted:  # w_i B / sum w: the rank means of w_i l_i average to sum_i w_i l_i / sum_i w_i
            w = pairing.weights
            batch = (*batch, w * (w.shape[0] / w.sum()))
        if world > 1:
            batch = tuple(v[sl] for v in batch)
        if channels_last:
            batch = tuple(v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in batch)
        return batch

    if weighted:
        def cfm_loss(model, *batch):
            return (batch[-1] * objective.losses(model, *batch[:-1])).mean()
    else:
        def cfm_loss(model, *batch):
            return objective.losses(model, *batch).mean()

    return next_batch, cfm_loss


@contextlib.contextmanager
def _tf32_scope(enabled: bool):
    """TF32 matmuls/convolutions inside the block when ``enabled`` (precision "tf32" on CUDA), restored after."""
    if not enabled:
        yield
        return
    previous = set_tf32(True)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def fit(net: nn.Module, coupling, objective: CFMObjective, *, steps: int, batch_size: int, lr: float = 1e-3,
        seed: int = 0, lr_schedule: str = "constant", warmup: int = 0, grad_clip: float | None = None,
        weight_decay: float = 0.0, device: str | torch.device = "cpu", progress: bool = False,
        ema_decay: float | None = None, precision: str = "fp32", compile: bool | str = False,
        log_path: str | Path | None = None, log_every: int = 100, ckpt_dir: str | Path | None = None,
        ckpt_every: int | None = None, ckpt_keep: int | None = None, resume_from: str | Path | None = None,
        callback: Callable[[TrainState], Any] | None = None, callback_every: int | None = None,
        optimizer_kwargs: dict | None = None, gradvar_every: int | None = None, gradvar_times=None,
        gradvar_samples: int = 256, config: Any = None, ckpt_extra: dict | None = None) -> TrainState:
    """Train ``net`` for ``steps`` AdamW optimiser steps on batches of ``batch_size`` drawn from ``coupling``.

    Learning rate: :func:`learning_rate` (linear warm-up over ``warmup`` steps, then constant or cosine
    decay to 0 at ``steps``). ``grad_clip`` clips the global gradient norm. All randomness (pairs, times,
    noise) comes from one generator on ``device`` seeded with ``seed``; its state is checkpointed, so
    ``resume_from`` (a checkpoint file or folder) continues exactly where the run stopped: training N
    steps straight, or N/2, stopping, and resuming to N, gives the same parameters. ``steps`` is the total
    (the schedule's horizon), not the number of steps left.

    The step is :func:`flowprobe.fast.make_train_step`'s (zero grads, loss under autocast, backward,
    foreach clipping, optimiser step, EMA; no host synchronisation), with the batch drawn outside the loss
    function so that only the network's forward/backward is compiled. Conv nets on CUDA are switched to
    channels_last (:func:`flowprobe.fast.prepare_model`).

    Options: ``ema_decay`` d keeps e <- d e + (1 - d) theta after every step; ``precision="bf16"`` runs
    the forward pass under bf16 autocast (parameters, optimiser and EMA stay fp32), ``"tf32"`` allows TF32
    products on CUDA during training; ``compile`` compiles the loss (forward and backward) with
    ``torch.compile``: True, a backend name ("eager", "inductor", ...) or a mode ("reduce-overhead" = CUDA
    graphs); see :func:`flowprobe.fast.compile_options`. The optimiser is AdamW from
    :func:`flowprobe.fast.make_optimizer` (fused on CUDA, foreach elsewhere); ``optimizer_kwargs`` go to it
    and take precedence (e.g. ``foreach=False``, ``fused=True``, ``betas=(0.9, 0.99)``).
    ``log_path`` receives one JSON line per ``log_every`` steps (mean loss over the window, lr, throughput)
    after a start record describing path, coupling and objective. ``ckpt_dir`` receives a checkpoint
    every ``ckpt_every`` steps and at the end (``ckpt_keep`` keeps only the newest k);
    ``config`` is stored in their sidecars, and ``ckpt_extra`` (e.g. ``{"model": spec}``, see
    :func:`model_spec`) in their ``extra``. ``callback(state)`` runs every ``callback_every`` steps
    (default ``log_every``). ``gradvar_every`` appends the gradient-variance profile
    (:func:`flowprobe.probes.gradvar.gradient_variance`, exact per-sample gradients, sum reduction) at
    ``gradvar_times`` (a list or "a:b:K"; default ``GRADVAR_TIMES``) with ``gradvar_samples`` pairs per time
    to the metrics log (rank 0; its own generator, so training is unchanged).

    Data-parallel: when a ``torch.distributed`` process group is initialised with world size W > 1, the
    net is wrapped in DistributedDataParallel, ``batch_size`` is the global batch (divisible by W), each
    rank draws the global batch from the shared generator and trains on its slice, and only rank 0 writes
    logs and checkpoints. The step counter counts optimiser steps. Per-step losses are accumulated on the
    device and copied to the host only at log, callback and checkpoint times.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if ema_decay is not None and not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay!r}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    for name, v in (("ckpt_every", ckpt_every), ("callback_every", callback_every), ("gradvar_every", gradvar_every),
                    ("ckpt_keep", ckpt_keep)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {v}")

    if gradvar_every is not None and log_path is None:
        raise ValueError("gradvar_every needs log_path (the profile is appended to the metrics log)")
    device = torch.device(device)
    rank, world = distributed_info()
    is_main = rank == 0
    if world > 1:
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world}")
        if not (hasattr(objective, "draw") and hasattr(objective, "losses")):
            raise ValueError("data-parallel training needs an objective with draw() and losses() (like CFMObjective)")

    compile_options(compile)  # a bad setting stops here, before any work
    # channels_last for conv nets on CUDA (a no-op for MLPs); before the optimiser and EMA see the parameters
    prepare_model(net, device, channels_last=device.type == "cuda").train()
    model: nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters and buffers into ``net`` here, before the EMA copy is taken.
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    gen = torch.Generator(device=device).manual_seed(seed)
    gradvar_gen = torch.Generator(device=device).manual_seed(seed + GRADVAR_SEED_OFFSET)
    generators = {"train": gen, "gradvar": gradvar_gen}
    # fused AdamW on CUDA, foreach elsewhere, unless optimizer_kwargs name the implementation
    opt = make_optimizer(net.parameters(), lr=lr, kind="adamw", weight_decay=weight_decay, device=device,
                         **(optimizer_kwargs or {}))
    ema = make_ema(net) if ema_decay is not None else None

    start = 0
    prior_losses: list[float] = []
    if resume_from is not None:
        from .checkpoint import load_checkpoint

        ck = load_checkpoint(resume_from, net=net, ema=ema, optimizer=opt, generators=generators,
                             restore_global_rng=True)
        start = ck.step
        prior_losses = ck.losses[:start]
        if start > steps:
            raise ValueError(f"checkpoint {ck.path} is at step {start}, beyond steps={steps}")

    next_batch, loss_fn = _batch_fns(objective, coupling, gen, batch_size, rank, world,
                                     channels_last=device.type == "cuda" and has_conv(net))
    train_step = make_train_step(net, opt, loss_fn, precision=precision, compile=compile, grad_clip=grad_clip or None,
                                 ema=ema, ema_decay=ema_decay if ema_decay is not None else 0.0, device=device,
                                 model=model)

    # float64 so the host copy holds the exact value of a float64 loss (MPS has no float64)
    loss_buf = torch.zeros(max(steps, 1), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    losses: list[float] = list(prior_losses)  # host copy, extended lazily from loss_buf
    synced = start
    if callback is not None and callback_every is None:
        callback_every = log_every
    if gradvar_every is not None:
        gradvar_fn = _import_gradvar()

    path_desc = _describe(getattr(objective, "path", None))
    run_desc = {"path": path_desc, "coupling": _describe(coupling), "objective": _objective_description(objective)}
    log_path = Path(log_path) if (log_path is not None and is_main) else None
    if log_path is not None:
        append_jsonl(log_path, {"event": "resume" if start else "start", "step": start, "steps": steps,
                                "batch_size": batch_size, "world_size": world, "lr": lr, "lr_schedule": lr_schedule,
                                "warmup": warmup, "grad_clip": grad_clip, "weight_decay": weight_decay,
                                "ema_decay": ema_decay, "precision": precision,
                                "compile": compile if isinstance(compile, str) else bool(compile),
                                "seed": seed, "device": str(device), "version": __version__, **run_desc})

    def sync_losses(upto: int) -> None:
        nonlocal synced
        if upto > synced:
            chunk = loss_buf[synced:upto]
            if world > 1:
                import torch.distributed as dist

                chunk = chunk.clone()
                dist.all_reduce(chunk)
                chunk /= world
            losses.extend(chunk.tolist())
            synced = upto

    def save(step: int) -> None:
        if not (is_main and ckpt_dir is not None):
            return
        from .checkpoint import checkpoint_path, list_checkpoints, save_checkpoint

        save_checkpoint(checkpoint_path(ckpt_dir, step), net=net, ema=ema, optimizer=opt, step=step, config=config,
                        generators=generators, losses=losses[:step],
                        extra={**(ckpt_extra or {}), "descriptions": run_desc, "world_size": world,
                               "batch_size": batch_size})
        if ckpt_keep is not None:
            for old in list_checkpoints(ckpt_dir)[:-ckpt_keep]:
                old.with_suffix(".json").unlink(missing_ok=True)
                old.unlink(missing_ok=True)

    bar = _progress_bar(progress and is_main, steps, start)
    t_window, s_window = time.perf_counter(), start
    last_saved = start if resume_from is not None else -1
    with bar, _GracefulInterrupt(world == 1) as interrupt, _tf32_scope(precision == "tf32" and device.type == "cuda"):
        task = bar.add_task("training", total=steps, completed=start, loss=float("nan"))
        for step in range(start, steps):
            for g in opt.param_groups:
                g["lr"] = learning_rate(step, lr=lr, steps=steps, warmup=warmup, schedule=lr_schedule)
            loss_buf[step] = train_step(*next_batch()).loss
            done = step + 1

            if done % log_every == 0 or done == steps:
                sync_losses(done)
                now = time.perf_counter()
                window = losses[s_window:done]
                mean_loss = sum(window) / max(len(window), 1)
                if log_path is not None:
                    append_jsonl(log_path, {"event": "train", "step": done, "loss": mean_loss,
                                            "lr": opt.param_groups[0]["lr"],
                                            "steps_per_s": (done - s_window) / max(now - t_window, 1e-9),
                                            "samples_seen": done * batch_size})
                bar.update(task, loss=mean_loss)
                t_window, s_window = now, done
            bar.update(task, completed=done)

            if gradvar_every is not None and done % gradvar_every == 0 and is_main:
                record = _gradvar_record(gradvar_fn, net, objective, coupling, gradvar_times, gradvar_samples,
                                         gradvar_gen, done)
                if log_path is not None:
                    append_jsonl(log_path, record)
            if callback is not None and done % callback_every == 0 and is_main:
                sync_losses(done)
                callback(TrainState(net=net, ema=ema, step=done, losses=losses))
                net.train()
            if ckpt_every is not None and done % ckpt_every == 0:
                sync_losses(done)
                save(done)
                last_saved = done
            if interrupt.requested:
                sync_losses(done)
                if last_saved != done:
                    save(done)
                raise KeyboardInterrupt
    sync_losses(steps)
    if last_saved != steps and steps > start:
        save(steps)
    net.eval()
    return TrainState(net=net, ema=ema, step=steps, losses=losses)


def _progress_bar(enabled: bool, steps: int, start: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _import_gradvar():
    try:
        from .probes.gradvar import gradient_variance
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("flowprobe"):
            raise NotImplementedError("gradvar_every needs flowprobe.probes.gradvar, which is not available") from None
        raise
    return gradient_variance


def _gradvar_record(gradient_variance, net, objective, coupling, times, n_samples, generator, step) -> dict:
    """The gradient-variance profile of the current (raw) weights at ``times`` (the probe's own generator,
    so training draws are untouched), as a metrics record. The paper's per-sample loss (sum over
    dimensions) is used, whatever reduction training uses."""
    result = gradient_variance(net, objective.path, coupling, GRADVAR_TIMES if times is None else times,
                               n_samples=n_samples, method="exact", generator=generator, reduction="sum")
    net.train()
    return {"event": "gradvar", "step": step, **result.to_dict()}


# ----------------------------------------------------------------------------------------------------------
# Configs and runs


def _toy_names() -> tuple[str, ...]:
    from .data.toy import TOY_DISTRIBUTIONS

    return tuple(TOY_DISTRIBUTIONS)


def _unet_presets() -> tuple[str, ...]:
    from .nets.unet import UNET_PRESETS

    return tuple(UNET_PRESETS)


@dataclass
class DataConfig:
    """Source (t = 0) and target (t = 1).

    2-D toys (default): ``source`` and ``target`` from :mod:`flowprobe.data.toy`, with their keyword
    parameters; ``n_train`` draws a finite training set of that many source and target points once (a
    fixed pool; with ``coupling.kind: fixed_pairs`` row i of each is a fixed pair).

    Images: ``dataset`` (a name of :data:`flowprobe.data.images.DATASETS` such as "cifar10" or "celeba", or a
    tar / folder path; ``root`` is the data root for names) is the target, kept as uint8 on the device and
    drawn by :class:`~flowprobe.data.images.ImageSampler` (random horizontal flips with ``flip``), at
    ``resolution`` (downsampled; default native); the source is N(0, I) of the image shape. ``n_train``
    keeps the first N images; with ``fixed_pairs`` image i is paired with a fixed noise x0_i."""

    source: str = option("eight_gaussians", choices=_toy_names())
    target: str = option("moons", choices=_toy_names())
    source_params: dict = option(default_factory=dict)
    target_params: dict = option(default_factory=dict)
    n_train: int | None = option(None, ge=1)
    dataset: str | None = option(None, help="image dataset name or path (images instead of 2-D toys)")
    root: str | None = option(None, help="data root for dataset names (default $FLOWPROBE_DATA or ../shared/data)")
    resolution: int | None = option(None, ge=1, help="image side after downsampling (default: native)")
    flip: bool = option(True, help="random horizontal flips of training images")


@dataclass
class ModelConfig:
    """The velocity network.

    ``arch="mlp"``: an MLP on [x, sinusoidal embedding of 1000 t] (``width`` x ``depth``), on the flattened
    sample for images. ``arch="unet"`` (images only): :func:`flowprobe.nets.unet.unet_preset` ``preset`` with
    ``image_size`` and ``in_channels`` set from the data and the optional overrides (None keeps the preset's
    value); attention resolutions the image does not reach are dropped. ``time_scale``: the embedding sees
    ``time_scale`` t (and the step h); MeanFlow's JVP differentiates through it, and 1000 made MeanFlow diverge
    on a 2-D Gaussian where 10 or less trained well (docs/neighbours.md)."""

    arch: str = option("mlp", choices=("mlp", "unet"))
    width: int = option(256, ge=1)
    depth: int = option(3, ge=1)
    time_embed_dim: int = option(32, ge=0)
    activation: str = option("silu", choices=("silu", "relu", "gelu", "tanh", "selu"))
    preset: str = option("cifar10", choices=_unet_presets())
    model_channels: int | None = option(None, ge=1)
    channel_mult: list[int] | None = option(None, ge=1)
    num_res_blocks: int | None = option(None, ge=1)
    attention_resolutions: list[int] | None = option(None, ge=1)
    dropout: float | None = option(None, ge=0, lt=1)
    time_scale: float = option(TIME_SCALE, gt=0)


@dataclass
class PathConfig:
    """The interpolant: sigma = 0 is the straight line (rectified flow); sigma > 0 adds g(t) z with
    g = sigma (constant) or sigma sqrt(t (1 - t)) (bridge)."""

    sigma: float = option(0.0, ge=0)
    schedule: str = option("constant", choices=("constant", "bridge"))


@dataclass
class CouplingConfig:
    """How pairs are drawn: independent, minibatch OT (exact, lsa or sinkhorn with ``reg``), or fixed pairs
    (needs ``data.n_train``). ``weight_epsilon``: weight each pair's loss by exp(-||x0 - x1||^2 / eps) (weighted
    CFM, :class:`flowprobe.couplings.WeightedCoupling`; the trained marginals are tilted, docs/neighbours.md)."""

    kind: str = option("independent", choices=("independent", "minibatch_ot", "fixed_pairs"))
    method: str = option("exact", choices=("exact", "lsa", "sinkhorn"))
    reg: float = option(0.05, gt=0)
    weight_epsilon: float | None = option(None, gt=0)


@dataclass
class OptimConfig:
    """AdamW with warm-up, constant or cosine decay, gradient clipping and weight decay. The implementation
    is fused on CUDA and foreach elsewhere (:func:`flowprobe.fast.make_optimizer`); ``fused: true`` forces
    the fused kernel."""

    lr: float = option(1e-3, gt=0)
    warmup: int = option(0, ge=0)
    lr_schedule: str = option("constant", choices=LR_SCHEDULES)
    grad_clip: float | None = option(None, gt=0)
    weight_decay: float = option(0.0, ge=0)
    fused: bool = False


@dataclass
class ObjectiveConfig:
    """What the net learns: ``cfm`` (the velocity) or a few-step objective that learns the average velocity
    u(t, x, h) over [t, t + h] (``meanflow``: a JVP of the net; ``splitmeanflow``: interval splitting), which
    gives the net a step input (``step_embed``) and samples in a few jumps with ``sample.solver: average``.
    ``jump_fraction``: share of samples with h > 0 (the rest train h = 0, the CFM loss); ``adaptive_power``:
    MeanFlow's loss weight 1 / (loss + 1e-3)^p."""

    kind: str = option("cfm", choices=OBJECTIVES)
    jump_fraction: float = option(0.25, ge=0, le=1)
    adaptive_power: float = option(0.0, ge=0)


@dataclass
class SampleConfig:
    """Samples drawn after training: ``n`` points integrated with ``solver`` over ``steps`` steps;
    ``trajectories`` of them are drawn as paths in the plot (2-D), or the first ``grid`` images are written as
    a PNG grid (images)."""

    n: int = option(2000, ge=1)
    steps: int = option(100, ge=1)
    solver: str = option("euler", choices=SAMPLE_SOLVERS)
    trajectories: int = option(256, ge=0)
    grid: int = option(64, ge=1)
    plot: bool = True


@dataclass
class TrainConfig:
    """A whole training run. Sections: data, model, path, coupling, optim, sample.

    ``precision``: fp32, tf32, bf16 or auto (bf16 on CUDA, else fp32). ``compile``: false, true, a
    ``torch.compile`` mode ("reduce-overhead" = CUDA graphs), a backend name, or auto ("reduce-overhead"
    on CUDA, else off); see :func:`flowprobe.fast.compile_options`."""

    data: DataConfig = option(default_factory=DataConfig)
    model: ModelConfig = option(default_factory=ModelConfig)
    path: PathConfig = option(default_factory=PathConfig)
    coupling: CouplingConfig = option(default_factory=CouplingConfig)
    optim: OptimConfig = option(default_factory=OptimConfig)
    sample: SampleConfig = option(default_factory=SampleConfig)
    objective: ObjectiveConfig = option(default_factory=ObjectiveConfig)
    reduction: str = option("mean", choices=("mean", "sum"))
    ema_decay: float | None = option(None, ge=0, lt=1)
    precision: str = option("fp32", choices=PRECISIONS + ("auto",))
    compile: bool | str = False
    steps: int = option(2000, ge=1)
    batch_size: int = option(256, ge=1)
    seed: int = 0
    log_every: int = option(100, ge=1)
    ckpt_every: int | None = option(None, ge=1)
    ckpt_keep: int | None = option(None, ge=1)
    gradvar_every: int | None = option(None, ge=1)
    gradvar_times: str = GRADVAR_TIMES
    gradvar_samples: int = option(256, ge=2)

    def __post_init__(self):
        if self.coupling.kind == "fixed_pairs" and self.data.n_train is None:
            raise ConfigError("coupling.kind: fixed_pairs needs data.n_train (the number of fixed pairs)")
        if self.sample.solver == "average" and self.objective.kind == "cfm":
            raise ConfigError("sample.solver: average needs a few-step objective (objective.kind: meanflow or "
                              "splitmeanflow); a cfm net has no step input")
        if self.model.arch == "unet" and self.data.dataset is None:
            raise ConfigError("model.arch: unet needs image data (set data.dataset) or use arch: mlp")
        if self.compile != "auto":
            try:
                compile_options(self.compile)
            except ValueError as e:
                raise ConfigError(f"compile: {e}; or auto") from None


def resolve_auto(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with precision/compile "auto" made concrete for ``device``: bf16 and "reduce-overhead" (CUDA
    graphs) on CUDA, fp32 and no compilation elsewhere."""
    precision, compile = fast_resolve_auto(cfg.precision, cfg.compile, device)
    return replace(cfg, precision=precision, compile=compile)


def default_config_path() -> Path:
    """The packaged toy config (``flowprobe/configs/toy.yaml``)."""
    from importlib.resources import files

    return Path(str(files("flowprobe") / "configs" / "toy.yaml"))


def _make_sampler(name: str, params: dict, key: str, device, dtype=torch.float32):
    from .data.toy import make_toy

    try:
        return make_toy(name, device=device, dtype=dtype, **params)
    except TypeError as e:
        raise ConfigError(f"data.{key}_params: {e}") from None
    except ValueError as e:
        raise ConfigError(f"data.{key}_params: {e}") from None


# -------------------------------------------------------------------------------------- networks (one place)

class _FlatMLP(nn.Module):
    """An MLP velocity on flattened samples (images): v(t, x) = MLP(t, x.flatten()).reshape(x.shape)."""

    def __init__(self, dim: int, width: int = 256, depth: int = 3, time_embed_dim: int = 32,
                 activation: str = "silu", **options):
        super().__init__()
        from .nets import MLP

        self.mlp = MLP(dim, width, depth, time_embed_dim, activation, **options)

    def forward(self, t: Tensor, x: Tensor, h: Tensor | None = None) -> Tensor:
        return self.mlp(t, x.reshape(x.shape[0], -1), h).reshape(x.shape)


def model_spec(model: ModelConfig, shape: tuple[int, ...] | list[int], step_embed: bool = False) -> dict:
    """The portable description of a net, ``{"class": "MLP" | "FlatMLP" | "UNet", "kwargs": {...}}``, for
    samples of ``shape`` (``(d,)`` vectors or ``(C, H, W)`` images). It is stored in checkpoint sidecars
    (``extra["model"]``) and :func:`build_net` rebuilds the net from it. ``model`` is a :class:`ModelConfig`
    (or anything with its fields, like the image experiments' ``ImageModelConfig``). ``step_embed``: the net
    takes a step h too (few-step objectives). Keys at their defaults are left out, so older specs still match."""
    shape = tuple(int(s) for s in shape)
    extra = {"step_embed": True} if step_embed else {}
    time_scale = getattr(model, "time_scale", TIME_SCALE)
    if model.arch == "mlp":
        mlp = {"width": model.width, "depth": model.depth, "time_embed_dim": getattr(model, "time_embed_dim", 32),
               "activation": getattr(model, "activation", "silu"), **extra}
        if time_scale != TIME_SCALE:
            mlp["time_scale"] = float(time_scale)
        if len(shape) == 1:
            return {"class": "MLP", "kwargs": {"dim": shape[0], **mlp}}
        return {"class": "FlatMLP", "kwargs": {"dim": math.prod(shape), **mlp}}
    if model.arch != "unet":
        raise ConfigError(f"model.arch: {model.arch!r} is not allowed; choose mlp or unet")
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"model.arch: unet needs square images (C, H, H), got samples of shape {shape}")
    from .nets.unet import UNET_PRESETS

    kw = dict(UNET_PRESETS[model.preset])
    kw.update(image_size=shape[1], in_channels=shape[0])
    for name in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout"):
        v = getattr(model, name, None)
        if v is not None:
            kw[name] = v
    kw.update(extra)
    if time_scale != TIME_SCALE:
        kw["time_embed_scale"] = float(time_scale)
    kw = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items()}
    # attention only where the feature map exists; a preset's resolution may not fit a small image
    sides = {shape[1] // 2 ** i for i in range(len(kw["channel_mult"]))}
    kw["attention_resolutions"] = [r for r in kw["attention_resolutions"] if r in sides]
    return {"class": "UNet", "kwargs": kw}


def run_model_spec(cfg: TrainConfig, shape: tuple[int, ...] | list[int]) -> dict:
    """:func:`model_spec` of a training config: its model, with a step input when its objective needs one."""
    return model_spec(cfg.model, shape, step_embed=cfg.objective.kind != "cfm")


def build_net(spec: dict, seed: int | None = None) -> nn.Module:
    """The net of a :func:`model_spec` (``class`` MLP, FlatMLP or UNet with its ``kwargs``), initialised
    from torch's global RNG seeded with ``seed`` inside a forked RNG scope (the caller's global RNG state is
    left untouched); ``seed=None`` draws from the current global state."""
    from .nets import MLP
    from .nets.unet import UNet

    classes = {"MLP": MLP, "FlatMLP": _FlatMLP, "UNet": UNet}
    cls = classes.get(spec.get("class"))
    if cls is None:
        raise ConfigError(f"model class {spec.get('class')!r} is unknown; allowed: {', '.join(classes)}")
    if seed is None:
        return cls(**spec.get("kwargs", {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**spec.get("kwargs", {}))


def _image_source(shape, device):
    from .couplings import GaussianSampler

    return GaussianSampler(tuple(shape), device=device)


def build_data(cfg: TrainConfig, device: str | torch.device = "cpu", progress: bool = False):
    """(coupling, source, target, sample shape) of a config, on ``device``.

    Toys: with ``data.n_train`` the finite pools are drawn once from a generator seeded with seed + 1.
    Images: the dataset is decoded (cached) to uint8 on ``device``; fixed pairs use noises x0_i fixed per
    index (:func:`flowprobe.data.images.fixed_noise`, seed + 1) paired with image i.
    """
    from .couplings import FixedPairs, IndependentCoupling, MinibatchOTCoupling, TensorSampler

    device = torch.device(device)
    kind = cfg.coupling.kind
    if cfg.data.dataset is not None:
        from .data.images import ImageSampler, IndexedPairs, fixed_noise, load_images, to_tensor

        try:
            data = load_images(cfg.data.dataset, root=cfg.data.root, resolution=cfg.data.resolution,
                               limit=cfg.data.n_train, progress=progress)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.dataset: {e}") from None
        images = to_tensor(data.images, device)
        shape = tuple(images.shape[1:])
        source, target = _image_source(shape, device), ImageSampler(images, flip=cfg.data.flip)
        if kind == "independent":
            coupling = IndependentCoupling(source, target)
        elif kind == "minibatch_ot":
            coupling = MinibatchOTCoupling(source, target, cfg.coupling.method, cfg.coupling.reg)
        else:
            coupling = IndexedPairs(fixed_noise(len(images), shape, seed=cfg.seed + 1, device=device), images)
        return _weighted(coupling, cfg), source, target, shape
    source = _make_sampler(cfg.data.source, cfg.data.source_params, "source", device)
    target = _make_sampler(cfg.data.target, cfg.data.target_params, "target", device)
    src, tgt = source, target
    if cfg.data.n_train is not None:
        g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        x0, _ = source.sample(cfg.data.n_train, g)
        x1, _ = target.sample(cfg.data.n_train, g)
        src, tgt = TensorSampler(x0), TensorSampler(x1)
    if kind == "independent":
        coupling = IndependentCoupling(src, tgt)
    elif kind == "minibatch_ot":
        coupling = MinibatchOTCoupling(src, tgt, cfg.coupling.method, cfg.coupling.reg)
    else:
        coupling = FixedPairs(src.data, tgt.data)
    return _weighted(coupling, cfg), source, target, (2,)


def _weighted(coupling, cfg: TrainConfig):
    from .couplings import WeightedCoupling

    eps = cfg.coupling.weight_epsilon
    return coupling if eps is None else WeightedCoupling(coupling, eps)


def build_objective(cfg: TrainConfig):
    """The objective of the config (``objective.kind``) on its path (sigma, schedule), with its loss reduction."""
    from .paths import make_path

    o = cfg.objective
    options = {} if o.kind == "cfm" else {"jump_fraction": o.jump_fraction, "adaptive_power": o.adaptive_power}
    return make_objective(o.kind, make_path(cfg.path.sigma, cfg.path.schedule), cfg.reduction, **options)


def build_run(cfg: TrainConfig, device: str | torch.device = "cpu"):
    """(net, coupling, objective, source, target) for a config, on ``device``; the net is
    ``build_net(model_spec(cfg.model, shape), cfg.seed)`` (see :func:`build_data` for the data)."""
    coupling, source, target, shape = build_data(cfg, device)
    net = build_net(run_model_spec(cfg, shape), cfg.seed).to(device)
    return net, coupling, build_objective(cfg), source, target


def _weights(ck, use_ema: bool) -> str:
    """Which weights of a checkpoint to use: "ema" when asked and present, else "net"."""
    return "ema" if (use_ema and ck.has_ema) else "net"


def checkpoint_config(ck) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint's sidecar (ConfigError when there is none)."""
    from .config import from_dict

    if ck.config is None:
        raise ConfigError(f"{ck.path}: checkpoint carries no training config; cannot rebuild the run")
    return from_dict(TrainConfig, ck.config)


def load_model(checkpoint, device: str | torch.device = "cpu", use_ema: bool = True):
    """Rebuild the velocity net of a checkpoint and load its weights (the EMA copy when there is one and
    ``use_ema``): the one way every command rebuilds a net. The architecture is the sidecar's
    ``extra["model"]`` spec (:func:`model_spec`; written by ``flowprobe train`` and by code that passes
    ``ckpt_extra`` to :func:`fit`), else derived from its training config (2-D toy runs). ``checkpoint``
    is a path (file, checkpoint folder or run folder) or a loaded :class:`~flowprobe.checkpoint.Checkpoint`.
    Returns (net in eval mode on ``device``, checkpoint)."""
    from .checkpoint import Checkpoint, load_checkpoint

    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    spec = (ck.extra or {}).get("model")
    if not spec:
        if ck.config is None:
            raise ConfigError(f"{ck.path}: the checkpoint says nothing about its architecture")
        cfg = checkpoint_config(ck)
        if cfg.data.dataset is not None:
            raise ConfigError(f"{ck.path}: image checkpoint without a model spec in its sidecar")
        spec = run_model_spec(cfg, (2,))
    net = build_net(spec)
    net.load_state_dict(ck.state_dict(_weights(ck, use_ema)))
    return net.to(device).eval(), ck


@dataclass
class LoadedRun:
    """A training run rebuilt from a checkpoint: the net (weights loaded, eval mode), its config,
    coupling, objective, source and target, and which weights were loaded ("ema" or "net")."""

    net: nn.Module
    config: TrainConfig
    coupling: Any
    objective: CFMObjective
    source: Any
    target: Any
    checkpoint: Any
    weights: str


def load_run(checkpoint, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedRun:
    """:func:`load_model` plus the run's data (:func:`build_data`: loads the images of an image run) and
    objective, from a ``flowprobe train`` checkpoint."""
    net, ck = load_model(checkpoint, device, use_ema)
    cfg = checkpoint_config(ck)
    coupling, source, target, _ = build_data(cfg, device)
    return LoadedRun(net, cfg, coupling, build_objective(cfg), source, target, ck, _weights(ck, use_ema))


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available; use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {device!r} requested but MPS is not available; use cpu")
    return dev


def _fit_kwargs(cfg: TrainConfig) -> dict:
    o = cfg.optim
    return dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=o.lr, seed=cfg.seed, lr_schedule=o.lr_schedule,
                warmup=o.warmup, grad_clip=o.grad_clip, weight_decay=o.weight_decay, ema_decay=cfg.ema_decay,
                precision=cfg.precision, compile=cfg.compile, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                ckpt_keep=cfg.ckpt_keep, gradvar_every=cfg.gradvar_every, gradvar_times=cfg.gradvar_times,
                gradvar_samples=cfg.gradvar_samples, optimizer_kwargs={"fused": True} if o.fused else None)


def _generate(model, source, n: int, solver: str, steps: int, seed: int, device, trajectory: bool = False,
              sde: dict | None = None, grid: Tensor | None = None):
    """Push n source draws (generator seeded ``seed``) through the learned ODE from t = 0 to t = 1, or, with
    ``sde`` = {diffusion, schedule, path, source_std}, through the SDE with the same marginals
    (:func:`flowprobe.solvers.integrate_sde`; its noise continues the same generator). ``grid`` replaces the
    uniform grid of ``steps`` steps."""
    from .solvers import diffusion_schedule, integrate, integrate_average, integrate_sde

    g = torch.Generator(device=device).manual_seed(seed)
    x0, _ = source.sample(n, g)
    steps_or_grid = {"steps": steps} if grid is None else {"grid": grid}
    model.eval()
    with torch.no_grad():
        if solver == "average":
            return integrate_average(model, x0, return_trajectory=trajectory, **steps_or_grid)
        if sde is None:
            return integrate(model, x0, method=solver, return_trajectory=trajectory, **steps_or_grid)
        eps = diffusion_schedule(sde["diffusion"], sde["schedule"])
        return integrate_sde(model, x0, eps, g, path=sde["path"], source_std=sde["source_std"],
                             return_trajectory=trajectory, **steps_or_grid)


#: step schedules of ``flowprobe sample --schedule``
SAMPLE_SCHEDULES = ("uniform", "cosine", "optimal")


def _sample_grid(model, source, schedule: str, steps: int, solver: str, seed: int, device, n_fit: int = 1024):
    """(grid or None, info) for ``--schedule``: None for uniform; the cosine grid; or the Bellman-optimal Euler grid
    (:func:`flowprobe.solvers.optimal_schedule`) fitted on ``n_fit`` other source draws (seed + 1) over
    max(64, 8 steps) candidate intervals, with the evaluations that cost."""
    from .solvers import optimal_schedule, time_grid

    if schedule not in SAMPLE_SCHEDULES:
        raise ConfigError(f"--schedule: {schedule!r} is not allowed; choose from {', '.join(SAMPLE_SCHEDULES)}")
    if schedule == "uniform":
        return None, {}
    if solver == "dopri5":
        raise ConfigError(f"--schedule {schedule}: dopri5 chooses its own steps")
    if schedule == "cosine":
        return time_grid(steps, schedule="cosine"), {"schedule": "cosine"}
    if solver not in ("euler", "euler_maruyama"):
        raise ConfigError(f"--schedule optimal minimises Euler's one-step error; use --solver euler (or --sde), "
                          f"not {solver}")
    x_fit, _ = source.sample(n_fit, torch.Generator(device=device).manual_seed(seed + 1))
    model.eval()
    sched = optimal_schedule(model, x_fit, steps, candidates=max(64, 8 * steps))
    return sched.grid, {"schedule": "optimal", "grid": [round(float(v), 6) for v in sched.grid],
                        "schedule_nfe": sched.nfe, "schedule_fit_samples": n_fit}


def _sde_options(cfg: TrainConfig, diffusion: float, schedule: str) -> dict:
    """What :func:`_generate` needs to sample a run with an SDE, after checking that the velocity-derived score
    applies: independent coupling and a Gaussian source N(0, s^2 I) (images, or the 2-D ``gaussian`` toy)."""
    from .paths import make_path
    from .solvers import DIFFUSION_SCHEDULES

    if schedule not in DIFFUSION_SCHEDULES:
        raise ConfigError(f"--sde-schedule: {schedule!r} is not allowed; choose from {', '.join(DIFFUSION_SCHEDULES)}")
    if not (math.isfinite(diffusion) and diffusion > 0):
        raise ConfigError(f"--sde: the diffusion must be a finite number > 0, got {diffusion!r}")
    if cfg.coupling.kind != "independent" or cfg.coupling.weight_epsilon is not None:
        used = (f"coupling.kind: {cfg.coupling.kind}" if cfg.coupling.kind != "independent"
                else "weighted pairs (coupling.weight_epsilon)")
        raise ConfigError(f"--sde: the score is derived from the velocity, which needs the source drawn independently "
                          f"of the target; this run used {used}")
    if cfg.data.dataset is not None:
        source_std = 1.0
    elif cfg.data.source == "gaussian":
        source_std = float(cfg.data.source_params.get("std", 1.0))
    else:
        raise ConfigError(f"--sde: the score is derived from the velocity, which needs a Gaussian source; this run's "
                          f"source is {cfg.data.source!r}")
    return {"diffusion": float(diffusion), "schedule": schedule, "path": make_path(cfg.path.sigma, cfg.path.schedule),
            "source_std": source_std}


def save_image_grid(path: str | Path, images: Tensor, ncol: int | None = None, pad: int = 2) -> Path:
    """Write images (N, C, H, W) with values in [-1, 1] as one PNG grid (atomically): ``ncol`` columns
    (default ceil(sqrt(N))), ``pad`` white pixels between tiles; pixel = round((x + 1) * 127.5) clipped."""
    import numpy as np
    from PIL import Image

    from .data.images import to_uint8

    x = to_uint8(images.detach().cpu())
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = x.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = x[k].permute(1, 2, 0).numpy()
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    path = Path(path)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def train_from_config(cfg: TrainConfig, out: str | Path, device: str | torch.device | None = None,
                      resume: bool = False, progress: bool = True) -> TrainState:
    """Run ``cfg`` into folder ``out``: config.yaml, run.json, metrics.jsonl, checkpoints/ and samples.png
    (2-D: samples and trajectories; images: a grid of ``sample.grid`` generated images).

    After training, rank 0 draws ``cfg.sample.n`` samples with the configured solver and records in
    metrics.jsonl (event "eval") the energy distance to a fresh target draw, with the solver, steps and
    number of function evaluations (nfe) that produced it, next to the same statistic for the source
    (the untrained baseline). Checkpoint sidecars carry the model spec (:func:`model_spec`) and the
    sample shape, so :func:`load_model` rebuilds the net without the data.
    """
    import yaml

    from .checkpoint import latest_checkpoint
    from .data.toy import energy_distance

    out = Path(out)
    dev = device if isinstance(device, torch.device) else _resolve_device(device)
    cfg = resolve_auto(cfg, dev)
    rank, world = distributed_info()
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} must be divisible by the number of processes ({world})")
    ckpt_dir = out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_dir) if resume else None
    if not resume and latest_checkpoint(ckpt_dir) is not None:
        raise ConfigError(f"out: {out} already holds checkpoints; pass --resume to continue or choose another --out")
    coupling, source, target, shape = build_data(cfg, dev, progress=progress and rank == 0)
    spec = run_model_spec(cfg, shape)
    net = build_net(spec, cfg.seed).to(dev)
    objective = build_objective(cfg)
    images = cfg.data.dataset is not None
    if dev.type == "cuda":
        from .fast import configure_backends

        configure_backends(cfg.precision)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        write_json(out / "run.json", {
            "version": __version__, "device": str(dev), "world_size": world, "machine": machine_info(dev),
            "path": _describe(objective.path), "coupling": _describe(coupling),
            "objective": _objective_description(objective), "source": _describe(source), "target": _describe(target),
            "model": spec, "shape": list(shape), "n_parameters": sum(p.numel() for p in net.parameters()),
            "config": to_dict(cfg)})
        if resume_from is None and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
    state = fit(net, coupling, objective, device=dev, progress=progress, log_path=out / "metrics.jsonl",
                ckpt_dir=ckpt_dir, resume_from=resume_from, config=cfg,
                ckpt_extra={"model": spec, "shape": list(shape)}, **_fit_kwargs(cfg))
    if rank == 0:
        s = cfg.sample
        res = _generate(state.model, source, s.n, s.solver, s.steps, cfg.seed + 2, dev,
                        trajectory=s.plot and not images)
        ref, _ = target.sample(s.n, torch.Generator(device=dev).manual_seed(cfg.seed + 3))
        x0, _ = source.sample(s.n, torch.Generator(device=dev).manual_seed(cfg.seed + 2))  # the draws integrated
        record = {"event": "eval", "step": state.step, "model": "ema" if state.ema is not None else "net",
                  "solver": s.solver, "steps": s.steps, "nfe": res.nfe, "n": s.n,
                  "energy_distance": energy_distance(res.x, ref), "energy_distance_source": energy_distance(x0, ref),
                  "statistic": "squared energy distance to a fresh target draw of the same size"}
        append_jsonl(out / "metrics.jsonl", record)
        if s.plot and images:
            save_image_grid(out / "samples.png", res.x[:s.grid])
        elif s.plot and res.trajectory is not None:
            from .data.toy import plot_flow_2d

            plot_flow_2d(out / "samples.png", res.trajectory, target=ref, n_paths=s.trajectories,
                         title=f"{cfg.data.source} -> {cfg.data.target}, {cfg.coupling.kind}, sigma={cfg.path.sigma}, "
                               f"{s.solver} {s.steps} steps (nfe {res.nfe})")
    return state


def sample_checkpoint(checkpoint: str | Path, n: int, steps: int, solver: str = "euler", seed: int = 0,
                      device: str | torch.device | None = None, use_ema: bool = True, trajectory: bool = False,
                      diffusion: float = 0.0, diffusion_schedule: str = "decay", schedule: str = "uniform"):
    """Load a checkpoint written by ``flowprobe train`` and integrate ``n`` source draws from t = 0 to 1.

    Returns (SolveResult, info dict with checkpoint, step, model, solver, steps, nfe, n, seed, config).
    Image runs need no data: the source is N(0, I) of the sample shape stored in the sidecar; their
    trajectories are not kept (``trajectory`` applies to 2-D runs). ``diffusion`` > 0 samples the SDE with
    the ODE's marginals by Euler-Maruyama (``solver`` is then "euler_maruyama"), with eps(t) = diffusion
    (``"constant"``) or diffusion (1 - t) (``"decay"``) and the score derived from the velocity; this needs
    an independent coupling and a Gaussian source. ``schedule``: uniform, cosine or optimal (a Bellman-optimal
    Euler grid fitted on other source draws; its cost is recorded as ``schedule_nfe``).
    """
    dev = device if isinstance(device, torch.device) else _resolve_device(device)
    if solver not in SAMPLE_SOLVERS:
        raise ConfigError(f"solver: {solver!r} is not allowed; choose from {', '.join(SAMPLE_SOLVERS)}")
    net, ck = load_model(checkpoint, dev, use_ema)
    cfg = checkpoint_config(ck)
    if solver == "average" and cfg.objective.kind == "cfm":
        raise ConfigError(f"--solver average: {ck.path} holds a velocity net without a step input; train with "
                          f"objective.kind: meanflow or splitmeanflow")
    if solver == "average" and diffusion:
        raise ConfigError("--sde and --solver average exclude each other")
    if cfg.data.dataset is not None:
        shape = (ck.extra or {}).get("shape")
        if not shape:
            raise ConfigError(f"{ck.path}: image checkpoint without the sample shape in its sidecar")
        source = _image_source(shape, dev)
    else:
        source = _make_sampler(cfg.data.source, cfg.data.source_params, "source", dev)
    which = _weights(ck, use_ema)
    sde = _sde_options(cfg, diffusion, diffusion_schedule) if diffusion else None
    grid, grid_info = _sample_grid(net, source, schedule, steps, "euler_maruyama" if sde else solver, seed, dev)
    res = _generate(net, source, n, solver, steps, seed, dev, trajectory=trajectory and cfg.data.dataset is None,
                    sde=sde, grid=grid)
    info = {"checkpoint": str(ck.path), "step": ck.step, "model": which, "solver": res.method, "steps": steps,
            "nfe": res.nfe, "n": n, "seed": seed, "version": __version__}
    info.update(grid_info)
    if sde is not None:
        info.update(diffusion=sde["diffusion"], diffusion_schedule=sde["schedule"], source_std=sde["source_std"],
                    score="from the velocity (independent Gaussian source)")
    return res, info, cfg


# ----------------------------------------------------------------------------------------------------------
# Command line


def register_cli(subparsers) -> None:
    """Add ``flowprobe train`` and ``flowprobe sample``."""
    p = subparsers.add_parser("train", help="train a flow from a YAML config (default: the packaged 2-D toy)",
                              description="Train a flow-matching model from a YAML config. Multi-GPU: "
                                          "torchrun --nproc_per_node=N -m flowprobe.cli train CONFIG ...")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: the packaged configs/toy.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="override the config's precision")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_train)

    s = subparsers.add_parser("sample", help="draw samples from a trained checkpoint with an ODE or SDE solver")
    s.add_argument("checkpoint", help="a step_*.safetensors checkpoint, its checkpoints/ folder or the run folder")
    s.add_argument("--n", type=int, default=1000, help="number of samples")
    s.add_argument("--steps", type=int, default=100, help="solver steps (ignored by dopri5)")
    s.add_argument("--solver", default="euler", choices=SAMPLE_SOLVERS,
                   help="an ODE method, or average: jumps x + h u(t, x, h) of a few-step (MeanFlow) net")
    s.add_argument("--sde", type=float, default=0.0, metavar="EPS",
                   help="sample the SDE dX = (v + eps(t) score) dt + sqrt(2 eps(t)) dW, which has the ODE's marginals, "
                        "by Euler-Maruyama (replaces --solver); the score comes from the velocity, so the run must "
                        "use the independent coupling and a Gaussian source")
    s.add_argument("--schedule", default="uniform", choices=SAMPLE_SCHEDULES,
                   help="step times: uniform, cosine (denser at both ends) or optimal (a Bellman-optimal Euler grid "
                        "chosen by dynamic programming on 1024 other source draws; costs 17 x max(64, 8 steps) "
                        "extra evaluations of that batch, recorded as schedule_nfe)")
    s.add_argument("--sde-schedule", default="decay", choices=("constant", "decay"),
                   help="eps(t) = EPS (constant) or EPS (1 - t) (decay, the default: no noise at the data end)")
    s.add_argument("--out", required=True, help="output file: .safetensors, .npy or (images) .png grid, plus a "
                                                ".json record")
    s.add_argument("--plot", default=None, metavar="PNG",
                   help="also plot samples and trajectories (2-D) or write an image grid (images)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--no-ema", action="store_true", help="use the raw weights even when an EMA copy exists")
    s.set_defaults(func=_cli_sample)


def _init_distributed(device: str | None) -> tuple[torch.device | None, bool]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, else gloo) and pick this
    rank's device. Returns (device or None, whether a group was started here)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None, False
    dev = _resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev, True


def _cli_train(args) -> int:
    src = args.config or default_config_path()
    cfg = load_config(TrainConfig, src, args.overrides)
    if args.precision:
        cfg.precision = args.precision
    out = Path(args.out) if args.out else Path("runs") / Path(str(src)).stem
    dev, started = _init_distributed(args.device)
    try:
        state = train_from_config(cfg, out, dev if dev is not None else args.device, resume=args.resume,
                                  progress=not args.no_progress)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    rank, _ = distributed_info()
    if rank == 0:
        last = state.losses[-1] if state.losses else float("nan")
        print(f"trained {state.step} steps (final loss {last:.4g}); wrote {out}/metrics.jsonl, {out}/checkpoints/"
              + (f", {out}/samples.png" if cfg.sample.plot else ""))
    return 0


def _cli_sample(args) -> int:
    import numpy as np

    if args.n < 1 or args.steps < 1:
        raise ConfigError(f"--n and --steps must be >= 1, got n={args.n}, steps={args.steps}")
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy", ".png"):
        raise ConfigError(f"--out: {out.name} must end in .safetensors, .npy or .png (image grid)")
    res, info, cfg = sample_checkpoint(args.checkpoint, args.n, args.steps, args.solver, args.seed, args.device,
                                       use_ema=not args.no_ema, trajectory=args.plot is not None,
                                       diffusion=args.sde, diffusion_schedule=args.sde_schedule,
                                       schedule=args.schedule)
    x = res.x.detach().float().cpu()
    images = x.dim() == 4
    if out.suffix == ".png" and not images:
        raise ConfigError(f"--out: {out.name}: PNG output is for image models; samples have shape {tuple(x.shape[1:])}")
    if out.suffix == ".png":
        save_image_grid(out, x)
    elif out.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {k: str(v) for k, v in info.items()}
        atomic_write(out, lambda tmp: save_file({"samples": x.contiguous()}, tmp, metadata=meta))
    else:
        def w(tmp):
            with open(tmp, "wb") as f:
                np.save(f, x.numpy())

        atomic_write(out, w)
    write_json(out.with_suffix(".json"), {**info, "file": out.name, "shape": list(x.shape)})
    if args.plot is not None:
        if images:
            save_image_grid(args.plot, x)
        elif x.shape[1:] != (2,):
            raise ConfigError(f"--plot: samples have shape {tuple(x.shape[1:])}; plots are for 2-D data and images")
        else:
            from .data.toy import plot_flow_2d

            plot_flow_2d(args.plot, res.trajectory, title=f"{info['solver']} {info['steps']} steps (nfe {info['nfe']})")
    print(f"wrote {args.n} samples to {out} ({info['solver']}, {info['steps']} steps, nfe {info['nfe']}, "
          f"{info['model']} weights of step {info['step']})")
    return 0
