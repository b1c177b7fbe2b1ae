"""The one training loop: :func:`fit` is handed a net, a coupling, an objective, its options and its hooks.

One step is one AdamW update on a batch of ``batch_size`` pairs:

    theta <- AdamW(theta, grad_theta L(theta)),   L = mean_i l_i  (the objective's batch loss),

with learning rate lr_k = lr * w(k) * c(k) (:func:`flowprobe.train.schedule.learning_rate`), optional
gradient-norm clipping, an optional EMA copy e <- d e + (1 - d) theta after every update, fp32 / tf32 / bf16,
optional ``torch.compile`` (the step: :mod:`flowprobe.train.step`), and data-parallel training through
``torch.distributed`` when a process group is initialised. Metrics, checkpoints, callbacks and probes are
hooks (:mod:`flowprobe.train.hooks`); a checkpoint given as ``resume_from`` continues the run exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..guidance import conditioned
from ..objectives import AverageVelocityObjective, CFMObjective
from .distributed import distributed_info, mean_over_ranks
from .hooks import DivergenceError, first_nonfinite
from .schedule import LR_SCHEDULES, learning_rate
from .step import PRECISIONS, compile_options, has_conv, make_ema, make_optimizer, make_train_step, prepare_model, \
    set_tf32

__all__ = ["fit", "FitOptions", "TrainState", "describe", "describe_run", "batch_functions"]


@dataclass
class FitOptions:
    """How :func:`fit` trains. ``steps`` is the total number of optimiser steps (the schedule's horizon), not
    the number left after a resume. ``lr_schedule``: constant or cosine, after ``warmup`` linear steps.
    ``grad_clip`` clips the global gradient norm. All training randomness (pairs, times, noise) comes from
    one generator on ``device`` seeded with ``seed``. ``ema_decay`` d keeps e <- d e + (1 - d) theta.
    ``precision``: fp32, tf32 (TF32 products on CUDA) or bf16 (autocast forward; parameters, optimiser and
    EMA stay fp32). ``compile``: False, True, a backend name or a mode (:func:`flowprobe.train.step.compile_options`).
    ``optimizer_kwargs`` go to :func:`flowprobe.train.step.make_optimizer` (e.g. ``fused=True``).
    ``log_every``: how often losses are copied to the host, checked for divergence and shown.
    ``resume_from``: a checkpoint file or folder to continue from."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    seed: int = 0
    lr_schedule: str = "constant"
    warmup: int = 0
    grad_clip: float | None = None
    weight_decay: float = 0.0
    device: str | torch.device = "cpu"
    progress: bool = False
    ema_decay: float | None = None
    precision: str = "fp32"
    compile: bool | str = False
    log_every: int = 100
    optimizer_kwargs: dict | None = None
    resume_from: str | Path | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "warmup", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.steps < 0 or self.batch_size < 1 or self.log_every < 1 or self.warmup < 0:
            raise ValueError(f"need steps >= 0, batch_size >= 1, log_every >= 1, warmup >= 0; got steps={self.steps}, "
                             f"batch_size={self.batch_size}, log_every={self.log_every}, warmup={self.warmup}")
        for name, low, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("grad_clip", 0.0, True)):
            v = getattr(self, name)
            if v is None and name == "grad_clip":
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or (v <= low if strict else v < low):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {v!r}")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        compile_options(self.compile)  # a bad setting stops here, before any work


@dataclass
class TrainState:
    """The run as the loop holds it, returned by :func:`fit` and handed to hooks: the net, its EMA copy (None
    without EMA), the optimiser, the named generators (checkpointed together), the optimiser steps done,
    the per-step training losses (host floats, synced up to ``step`` whenever a hook runs), the options,
    device, world size, the description of path/coupling/objective, the first step of this call and the
    checkpoint it resumed from. ``model`` is what to sample: the EMA when there is one."""

    net: nn.Module
    ema: nn.Module | None = None
    step: int = 0
    losses: list = field(default_factory=list)
    optimizer: Any = None
    generators: dict = field(default_factory=dict)
    options: FitOptions | None = None
    device: torch.device | None = None
    world: int = 1
    description: dict = field(default_factory=dict)
    start: int = 0
    resumed_from: Path | None = None
    wrapped: nn.Module | None = None  # the module the step calls: ``net``, or its DistributedDataParallel wrapper

    @property
    def model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.net


def describe(obj: Any) -> dict | None:
    """``obj.describe()`` when it has one (a failing description never stops training), else its type name."""
    d = getattr(obj, "describe", None)
    if callable(d):
        try:
            return d()
        except Exception:  # a description must never stop training
            return {"type": type(obj).__name__}
    return {"type": type(obj).__name__} if obj is not None else None


def describe_run(coupling, objective) -> dict:
    """``{"path", "coupling", "objective"}``: the descriptions a run records (metrics, checkpoints, run.json)."""
    if isinstance(objective, CFMObjective):
        obj = objective.describe()
    else:
        obj = describe(objective) if hasattr(objective, "describe") else {"objective": type(objective).__name__}
    return {"path": describe(getattr(objective, "path", None)), "coupling": describe(coupling), "objective": obj}


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


def _plain_mean_loss(objective) -> bool:
    """True when the objective's batch loss is mean_i losses_i of draw() (CFMObjective or a few-step objective,
    without overrides of the batch loss)."""
    return any(isinstance(objective, base) and type(objective).__call__ is base.__call__
               for base in (CFMObjective, AverageVelocityObjective))


def batch_functions(objective, coupling, generator, batch_size: int, rank: int, world: int,
                    channels_last: bool = False):
    """(next_batch, loss_fn) of one optimiser step: ``loss_fn(model, *next_batch())`` is the batch loss.

    Drawing (pairs, times, noise: Python control flow, generators, OT solvers) stays outside the
    (possibly compiled) loss function. For a plain CFM objective the batch is (t, x_t, u_t) and the loss
    mean_i l_i(t_i, x_t,i, u_t,i), the same number as ``objective(model, pairing, generator)``. Data-parallel:
    every rank draws the *global* batch from the shared generator (so the generator stays in step
    everywhere), then keeps its slice; the mean over the slice, averaged over ranks by DDP's gradient
    all-reduce, is the single-process batch mean. Other objectives get the pairing and draw the rest
    themselves inside the loss.
    """
    if world == 1 and not _plain_mean_loss(objective):
        def next_pairing():
            return (coupling.sample(batch_size, generator),)

        def pairing_loss(model, pairing):
            return objective(model, pairing, generator)

        return next_pairing, pairing_loss
    per = batch_size // world
    sl = slice(rank * per, (rank + 1) * per)
    weighted = bool(getattr(coupling, "weighted", False))
    labelled = bool(getattr(coupling, "labelled", False))  # class labels ride last (flowprobe.guidance)

    def next_batch():
        pairing = coupling.sample(batch_size, generator)
        batch = objective.draw(pairing, generator)  # (t, x_t, u_t) for CFM
        if weighted:  # w_i B / sum w: the rank means of w_i l_i average to sum_i w_i l_i / sum_i w_i
            w = pairing.weights
            batch = (*batch, w * (w.shape[0] / w.sum()))
        if labelled:
            batch = (*batch, pairing.y)
        if world > 1:
            batch = tuple(v[sl] for v in batch)
        if channels_last:
            batch = tuple(v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in batch)
        return batch

    if weighted:
        def plain_loss(model, *batch):
            return (batch[-1] * objective.losses(model, *batch[:-1])).mean()
    else:
        def plain_loss(model, *batch):
            return objective.losses(model, *batch).mean()

    def cfm_loss(model, *batch):
        return plain_loss(conditioned(model, batch[-1]), *batch[:-1]) if labelled else plain_loss(model, *batch)

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


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _setup(net, coupling, objective, o: FitOptions) -> TrainState:
    """The state before the first step: the net on its device (DDP-wrapped under a process group), the
    optimiser, EMA and the training generator."""
    device = torch.device(o.device)
    rank, world = distributed_info()
    if world > 1:
        if o.batch_size % world:
            raise ValueError(f"batch_size {o.batch_size} must be divisible by the world size {world}")
        if not (hasattr(objective, "draw") and hasattr(objective, "losses")):
            raise ValueError("data-parallel training needs an objective with draw() and losses() (like CFMObjective)")
    # channels_last for conv nets on CUDA (a no-op for MLPs); before the optimiser and EMA see the parameters
    prepare_model(net, device, channels_last=device.type == "cuda").train()
    wrapped = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters and buffers into ``net`` here, before the EMA copy is taken.
        wrapped = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(net.parameters(), lr=o.lr, kind="adamw", weight_decay=o.weight_decay, device=device,
                         **(o.optimizer_kwargs or {}))
    return TrainState(net=net, ema=make_ema(net) if o.ema_decay is not None else None, optimizer=opt,
                      generators={"train": torch.Generator(device=device).manual_seed(o.seed)}, options=o,
                      device=device, world=world, description=describe_run(coupling, objective), wrapped=wrapped)


def _resume(state: TrainState, o: FitOptions) -> None:
    ck = load_checkpoint(o.resume_from, net=state.net, ema=state.ema, optimizer=state.optimizer,
                         generators=state.generators, restore_global_rng=True)
    if ck.step > o.steps:
        raise ValueError(f"checkpoint {ck.path} is at step {ck.step}, beyond steps={o.steps}")
    state.step = state.start = ck.step
    state.losses = list(ck.losses[:ck.step])
    state.resumed_from = ck.path


def fit(net: nn.Module, coupling, objective, options: FitOptions | None = None, *,
        hooks: Sequence[Any] = (), **option_values) -> TrainState:
    """Train ``net`` for ``options.steps`` optimiser steps on batches drawn from ``coupling`` (anything with
    ``sample(n, generator) -> Pairing``) with ``objective`` (a :class:`~flowprobe.objectives.CFMObjective`, a
    few-step objective, or anything called ``objective(net, pairing, generator) -> scalar loss``).

    ``options`` is a :class:`FitOptions`; its fields may instead be given as keywords
    (``fit(net, coupling, objective, steps=100, batch_size=64)``). ``hooks`` (:mod:`flowprobe.train.hooks`:
    metrics log, checkpoints, callbacks, probes) run on rank 0 at their own intervals. With
    ``options.resume_from`` the run continues exactly: N steps straight, or N/2, stopping and resuming to N,
    give the same parameters, losses and generator states.

    Losses stay on the device and are copied to the host every ``log_every`` steps and whenever a hook runs;
    a non-finite loss found then stops training with :class:`~flowprobe.train.hooks.DivergenceError` naming
    the first bad step and the last checkpoint written, before any hook (so before any checkpoint) sees the
    diverged weights.

    Data-parallel: under an initialised process group of W > 1 ranks the net is wrapped in
    DistributedDataParallel, ``batch_size`` is the global batch (divisible by W), each rank draws the
    global batch from the shared generator and trains on its slice, and only rank 0 runs hooks.
    """
    if options is None:
        options = FitOptions(**option_values)
    elif option_values:
        raise TypeError(f"give FitOptions or keywords, not both (got {sorted(option_values)})")
    o = options
    state = _setup(net, coupling, objective, o)
    rank = distributed_info()[0]
    hooks = list(hooks) if rank == 0 else []
    for h in hooks:
        getattr(h, "setup", lambda s: None)(state)
    if o.resume_from is not None:
        _resume(state, o)
    for h in hooks:
        getattr(h, "begin", lambda s: None)(state)
    try:
        _run_steps(state, coupling, objective, hooks)
    except DivergenceError as e:
        if e.last_good is None:
            saved = [h.last_saved for h in hooks if getattr(h, "last_saved", None) is not None]
            e.last_good = saved[-1] if saved else state.resumed_from
        raise
    net.eval()
    return state


def _run_steps(state: TrainState, coupling, objective, hooks: list) -> None:
    o, net, device, world = state.options, state.net, state.device, state.world
    rank = distributed_info()[0]
    next_batch, loss_fn = batch_functions(objective, coupling, state.generators["train"], o.batch_size, rank, world,
                                          channels_last=device.type == "cuda" and has_conv(net))
    train_step = make_train_step(net, state.optimizer, loss_fn, precision=o.precision, compile=o.compile,
                                 grad_clip=o.grad_clip or None, ema=state.ema,
                                 ema_decay=o.ema_decay if o.ema_decay is not None else 0.0, device=device,
                                 model=state.wrapped)
    # float64 so the host copy holds the exact value of a float64 loss (MPS has no float64)
    loss_buf = torch.zeros(max(o.steps, 1), device=device,
                           dtype=torch.float32 if device.type == "mps" else torch.float64)
    intervals = [o.log_every] + [h.every for h in hooks if getattr(h, "every", None)]
    bar = _progress_bar(o.progress and rank == 0)
    with bar, _GracefulInterrupt(world == 1) as interrupt, _tf32_scope(o.precision == "tf32" and device.type == "cuda"):
        task = bar.add_task("training", total=o.steps, completed=state.step, loss=float("nan"))
        for step in range(state.step, o.steps):
            for g in state.optimizer.param_groups:
                g["lr"] = learning_rate(step, lr=o.lr, steps=o.steps, warmup=o.warmup, schedule=o.lr_schedule)
            loss_buf[step] = train_step(*next_batch()).loss
            state.step = done = step + 1
            if done == o.steps or interrupt.requested or any(done % k == 0 for k in intervals):
                shown = _sync(state, loss_buf)
                if done % o.log_every == 0 or done == o.steps:
                    bar.update(task, loss=shown)
                for h in hooks:
                    if getattr(h, "every", None) and done % h.every == 0:
                        h.step(state)
            bar.update(task, completed=done)
            if interrupt.requested:
                for h in hooks:
                    getattr(h, "end", lambda s, i: None)(state, True)
                raise KeyboardInterrupt
    _sync(state, loss_buf)
    for h in hooks:
        getattr(h, "end", lambda s, i: None)(state, False)


def _sync(state: TrainState, loss_buf: torch.Tensor) -> float:
    """Copy the losses of the steps not yet on the host (averaged over ranks), stop on a non-finite one, and
    return the mean loss since the previous log point (what the progress bar shows)."""
    synced, done = len(state.losses), state.step
    if done > synced:
        chunk = mean_over_ranks(loss_buf[synced:done], state.world).tolist()
        bad = first_nonfinite(chunk, synced)
        state.losses.extend(chunk)
        if bad is not None:
            raise DivergenceError(f"training diverged: the loss of step {bad} is not finite", bad)
    last_log = done - (done % state.options.log_every or state.options.log_every)
    window = state.losses[max(last_log, 0):done] or state.losses[-1:]
    return sum(window) / max(len(window), 1)


def option_names() -> tuple[str, ...]:
    """The fields of :class:`FitOptions` (what ``fit`` accepts as keywords)."""
    return tuple(f.name for f in fields(FitOptions))
