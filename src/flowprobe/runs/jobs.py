"""The train and sample jobs: a config run into a folder, and a checkpoint sampled into a file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .. import __version__
from ..checkpoint import list_checkpoints, newest_verified_checkpoint, read_sidecar
from ..config import ConfigError, to_dict
from ..device import choose_threads, resolve_device
from ..metrics import energy_distance
from ..io import append_jsonl, atomic_write, machine_info, remove_stale_temp_files, truncate_jsonl, write_json
from ..report.flows import plot_flow_2d
from ..report.images import save_image_grid
from ..train import (Checkpointer, FitOptions, MetricsLog, TrainState, describe, describe_run, distributed_info,
                     fit)
from ..train.step import configure_backends
from ..train.tensorboard import TensorBoardLog
from .build import build_config_net, build_data, build_objective, image_source, make_sampler, run_model_spec
from .config import SAMPLE_SOLVERS, TrainConfig, resolve_auto
from .hooks import GradVarHook, config_watch
from .own_data import own_record, own_source, unstandardize, write_split
from .load import checkpoint_config, initialise_from, load_model, weights_name
from .sampling import generate, guided_net, sample_grid, sde_options

__all__ = ["train_from_config", "sample_checkpoint", "fit_options", "TrainResult"]


@dataclass
class TrainResult:
    """What :func:`train_from_config` returns: the final training state, the evaluation record written to
    metrics.jsonl (None on ranks other than 0), the run folder and the damaged checkpoints a resume skipped."""

    state: TrainState
    evaluation: dict | None
    out: Path
    skipped: list = field(default_factory=list)  # (checkpoint, reason) of damaged checkpoints a resume passed over

    @property
    def final_loss(self) -> float:
        """The mean training loss over the last logging window (what the progress bar showed last)."""
        window = self.state.losses[-self.final_window:] if self.final_window else []
        return sum(window) / len(window) if window else float("nan")

    @property
    def final_window(self) -> int:
        """How many steps :attr:`final_loss` averages: the last logging window (shorter when steps is not a multiple
        of log_every, or when fewer steps were taken)."""
        o = self.state.options
        return min(o.steps % o.log_every or o.log_every, len(self.state.losses))


#: What one sample call may hold in memory (samples and solver states), and the most solver steps it may take.
MAX_SAMPLE_BYTES = 8 * 2**30
MAX_SOLVER_STEPS = 100_000


def fit_options(cfg: TrainConfig, device: torch.device, progress: bool, resume_from: Path | None) -> FitOptions:
    """The :class:`~flowprobe.train.FitOptions` of a config."""
    o = cfg.optim
    return FitOptions(steps=cfg.steps, batch_size=cfg.batch_size, lr=o.lr, seed=cfg.seed, lr_schedule=o.lr_schedule,
                      warmup=o.warmup, grad_clip=o.grad_clip, weight_decay=o.weight_decay, ema_decay=cfg.ema_decay,
                      precision=cfg.precision, compile=cfg.compile, log_every=cfg.log_every, device=device,
                      progress=progress, optimizer_kwargs={"fused": True} if o.fused else None,
                      resume_from=resume_from)


#: Config keys a resume may change: they do not alter the training trajectory up to the checkpoint's step.
RESUME_MAY_CHANGE = ("steps", "log_every", "log", "watch", "ckpt_every", "ckpt_keep", "gradvar_every", "gradvar_times",
                     "gradvar_samples", "sample", "data.root", "compile")


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b, name = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, name + "."))
        elif a != b:
            out.append(name)
    return out


def _check_resume_config(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint under a config that would not continue it exactly."""
    from ..checkpoint import read_sidecar

    side = read_sidecar(checkpoint)
    saved = side.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {checkpoint} carries no training config to compare with")
    changed = [k for k in config_differences(saved, to_dict(cfg))
               if not any(k == a or k.startswith(a + ".") for a in RESUME_MAY_CHANGE)]
    if changed:
        raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(changed)}; these change "
                          f"the training itself, so the run would not continue exactly (only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change); start a new run with another --out")
    if side["step"] > cfg.steps:
        raise ConfigError(f"--resume: steps={cfg.steps} is below the checkpoint's step {side['step']} ({checkpoint})")


def _start_folder(cfg: TrainConfig, out: Path, resume: bool) -> tuple[Path | None, list]:
    """(checkpoint to resume from or None, newer checkpoints skipped as damaged), after checking that ``out``
    fits the request. Stale temporary files of killed writes are removed first."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file, not a folder")
    remove_stale_temp_files(out)
    ckpt_dir = out / "checkpoints"
    if not resume:
        if list_checkpoints(ckpt_dir):
            raise ConfigError(f"out: {out} already holds checkpoints; pass --resume to continue or choose another "
                              f"--out")
        return None, []
    latest, skipped = newest_verified_checkpoint(ckpt_dir)
    if latest is None:
        why = f" ({len(skipped)} damaged: {skipped[0][1]})" if skipped else ""
        raise ConfigError(f"--resume: {ckpt_dir} holds no intact checkpoint to continue from{why}; run without "
                          f"--resume to start")
    _check_resume_config(cfg, latest)
    return latest, skipped


def _write_run_files(cfg, out, dev, world, objective, coupling, source, target, spec, shape, net) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    write_json(out / "run.json", {
        "version": __version__, "device": str(dev), "world_size": world, "machine": machine_info(dev),
        **describe_run(coupling, objective), "source": describe(source), "target": describe(target),
        "model": spec, "shape": list(shape), "n_parameters": sum(p.numel() for p in net.parameters()),
        "config": to_dict(cfg)})


def train_from_config(cfg: TrainConfig, out: str | Path, device: str | torch.device | None = None,
                      resume: bool = False, progress: bool = True) -> TrainResult:
    """Run ``cfg`` into folder ``out``: config.yaml, run.json, metrics.jsonl, checkpoints/ and samples.png
    (2-D: samples and trajectories; images: a grid of ``sample.grid`` generated images); with
    ``log.tensorboard``, the metrics.jsonl records also as TensorBoard scalars in tensorboard/.

    After training, rank 0 draws ``cfg.sample.n`` samples with the configured solver and records in
    metrics.jsonl (event "eval") the energy distance to a fresh target draw, with the solver, steps and
    number of function evaluations (nfe) that produced it, next to the same statistic for the source
    (the untrained baseline). Checkpoint sidecars carry the model spec and the sample shape, so
    :func:`~flowprobe.runs.load.load_model` rebuilds the net without the data. On CPU the intra-op thread
    count is chosen from the size of the work (:func:`flowprobe.device.choose_threads`).
    """
    out = Path(out)
    dev = resolve_device(device)
    cfg = resolve_auto(cfg, dev)
    rank, world = distributed_info()
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} must be divisible by the number of processes ({world})")
    resume_from, skipped = _start_folder(cfg, out, resume)
    coupling, source, target, shape = build_data(cfg, dev, progress=progress and rank == 0)
    spec = run_model_spec(cfg, shape)
    net = build_config_net(cfg, spec).to(dev)
    if cfg.model.init is not None and resume_from is None:  # start from another run's weights
        initialise_from(net, cfg.model.init, dev)
    choose_threads(sum(p.numel() for p in net.parameters()), cfg.batch_size, dev)
    objective = build_objective(cfg)
    if dev.type == "cuda":
        configure_backends(cfg.precision)
    log = out / "metrics.jsonl"
    if rank == 0:
        _write_run_files(cfg, out, dev, world, objective, coupling, source, target, spec, shape, net)
        write_split(out, source, target)  # own data: the training / held-out rows (runs.own_data)
        if resume_from is None:  # a new run: its log and TensorBoard folder hold only its own records
            log.unlink(missing_ok=True)
            for old in (out / "tensorboard").glob("events.out.tfevents.*"):
                old.unlink()
        else:  # the log reads as one run: drop what came after the checkpoint
            step = read_sidecar(resume_from)["step"]
            truncate_jsonl(log, lambda r: r.get("step", 0) <= step and r.get("event") != "eval")
    hooks = [MetricsLog(log)]
    if cfg.gradvar_every is not None:
        hooks.append(GradVarHook(log, objective, coupling, cfg.gradvar_every, cfg.gradvar_times, cfg.gradvar_samples,
                                 seed=cfg.seed))
    board = TensorBoardLog(out / "tensorboard", log) if cfg.log.tensorboard and rank == 0 else None
    hooks += [board] if board is not None else []
    hooks.append(Checkpointer(out / "checkpoints", every=cfg.ckpt_every, keep=cfg.ckpt_keep, config=cfg,
                              extra={"model": spec, "shape": list(shape), **own_record(target)}))
    watch = None
    if cfg.watch.every is not None:  # built on every rank (the same errors everywhere), read on rank 0, after the
        watch = config_watch(cfg, coupling, source, target, objective.path, log, dev, world)  # checkpoint
        hooks += [watch] if rank == 0 else []
    try:
        state = fit(net, coupling, objective, fit_options(cfg, dev, progress, resume_from), hooks=hooks)
        evaluation = _evaluate(cfg, state, source, target, dev, out) if rank == 0 else None
    finally:
        if board is not None:
            board.close()  # copies the evaluation record too
        if watch is not None and rank == 0:  # also when it stopped the run
            watch.plot(out / "watch.png")
    return TrainResult(state, evaluation, out, skipped)


def _data_name(cfg: TrainConfig) -> str:
    d = cfg.data
    return f"{d.source} -> {d.target}" if d.data_kind == "toy" else f"{d.source_path or 'N(0, I)'} -> {d.target_path}"


def _evaluate(cfg: TrainConfig, state: TrainState, source, target, dev, out: Path) -> dict:
    """Sample the trained model, record the energy distance to a fresh target draw in metrics.jsonl, plot."""
    s = cfg.sample
    ref, _ = target.sample(s.n, torch.Generator(device=dev).manual_seed(cfg.seed + 3))
    images, planar = ref.dim() == 4, tuple(ref.shape[1:]) == (2,)  # own vectors of other sizes are not plotted
    res = generate(state.model, source, s.n, s.solver, s.steps, cfg.seed + 2, dev, trajectory=s.plot and planar)
    x0, _ = source.sample(s.n, torch.Generator(device=dev).manual_seed(cfg.seed + 2))  # the draws integrated
    record = {"event": "eval", "step": state.step, "model": "ema" if state.ema is not None else "net",
              "solver": s.solver, "steps": s.steps, "nfe": res.nfe, "n": s.n,
              "energy_distance": energy_distance(res.x, ref), "energy_distance_source": energy_distance(x0, ref),
              "statistic": "squared energy distance to a fresh target draw of the same size"}
    append_jsonl(out / "metrics.jsonl", record)
    if s.plot and images:
        save_image_grid(out / "samples.png", res.x[:s.grid])
    elif s.plot and res.trajectory is not None:
        plot_flow_2d(out / "samples.png", res.trajectory, target=ref, n_paths=s.trajectories,
                     title=f"{_data_name(cfg)}, {cfg.coupling.kind}, sigma={cfg.path.sigma}, "
                           f"{s.solver} {s.steps} steps (nfe {res.nfe})")
    return record


def sample_checkpoint(checkpoint: str | Path, n: int, steps: int, solver: str = "euler", seed: int = 0,
                      device: str | torch.device | None = None, use_ema: bool = True, trajectory: bool = False,
                      diffusion: float = 0.0, diffusion_schedule: str = "decay", schedule: str = "uniform",
                      label: int | None = None, guidance: float = 0.0):
    """Load a checkpoint written by ``flowprobe train`` and integrate ``n`` source draws from t = 0 to 1.

    Returns (SolveResult, info dict with checkpoint, step, model, solver, steps, nfe, n, seed, config).
    Image runs need no data: the source is N(0, I) of the sample shape stored in the sidecar; their
    trajectories are not kept (``trajectory`` applies to 2-D runs). ``diffusion`` > 0 samples the SDE with
    the ODE's marginals by Euler-Maruyama (``solver`` is then "euler_maruyama"), with eps(t) = diffusion
    (``"constant"``) or diffusion (1 - t) (``"decay"``) and the score derived from the velocity; this needs
    an independent coupling and a Gaussian source. ``schedule``: uniform, cosine or optimal (a Bellman-optimal
    Euler grid fitted on other source draws; its cost is recorded as ``schedule_nfe``). ``label`` / ``guidance``
    (class-conditional nets): integrate (1 + w) v(t, x | label) - w v(t, x | null) with w = ``guidance``
    (:func:`flowprobe.runs.sampling.guided_net`); no label: the unconditional field.
    """
    dev = resolve_device(device)
    if not (1 <= n and 1 <= steps <= MAX_SOLVER_STEPS):
        raise ConfigError(f"--n and --steps: need n >= 1 and 1 <= steps <= {MAX_SOLVER_STEPS}, got n={n}, "
                          f"steps={steps}")
    if solver not in SAMPLE_SOLVERS:
        raise ConfigError(f"solver: {solver!r} is not allowed; choose from {', '.join(SAMPLE_SOLVERS)}")
    net, ck = load_model(checkpoint, dev, use_ema)
    cfg = checkpoint_config(ck)
    net, guide_info = guided_net(net, label, guidance)
    if solver == "average" and cfg.objective.kind == "cfm":
        raise ConfigError(f"--solver average: {ck.path} holds a velocity net without a step input; train with "
                          f"objective.kind: meanflow or splitmeanflow")
    if solver == "average" and diffusion:
        raise ConfigError("--sde and --solver average exclude each other")
    if cfg.data.data_kind in ("array", "image_folder"):
        shape = (ck.extra or {}).get("shape") or ()
        source = own_source(cfg, shape, dev)
    elif cfg.data.dataset is not None:
        shape = (ck.extra or {}).get("shape")
        if not shape:
            raise ConfigError(f"{ck.path}: image checkpoint without the sample shape in its sidecar")
        source = image_source(shape, dev)
    else:
        shape = (2,)
        source = make_sampler(cfg.data.source, cfg.data.source_params, "source", dev)
    need = n * math.prod(int(v) for v in shape) * 4 * (steps + 1 if trajectory else 2)
    if need > MAX_SAMPLE_BYTES:
        raise ConfigError(f"--n {n}: {n} samples of shape {tuple(shape)} need about {need / 2**30:.0f} GiB "
                          f"(limit {MAX_SAMPLE_BYTES / 2**30:.0f} GiB); draw them in several calls with other --seed")
    sde = sde_options(cfg, diffusion, diffusion_schedule) if diffusion else None
    grid, grid_info = sample_grid(net, source, schedule, steps, "euler_maruyama" if sde else solver, seed, dev)
    res = generate(net, source, n, solver, steps, seed, dev, trajectory=trajectory and len(shape) == 1,
                   sde=sde, grid=grid)
    info = {"checkpoint": str(ck.path), "step": ck.step, "model": weights_name(ck, use_ema), "solver": res.method,
            "steps": steps, "nfe": res.nfe, "n": n, "seed": seed, "version": __version__}
    info.update(grid_info, **guide_info)
    res.x, mapped = unstandardize(res.x, ck.extra)
    if mapped:  # data.standardize: samples back in data units, x = z * std + mean (runs.own_data)
        info["unstandardized"] = "x = z * std + mean, the training rows' statistics in the sidecar"
    if sde is not None:
        info.update(diffusion=sde["diffusion"], diffusion_schedule=sde["schedule"], source_std=sde["source_std"],
                    score="from the velocity (independent Gaussian source)")
    return res, info, cfg
