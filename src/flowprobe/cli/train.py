"""``flowprobe train`` and ``flowprobe sample``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..config import ConfigError, load_config
from ..device import resolve_device
from ..io import atomic_write, write_json
from ..report.flows import plot_flow_2d
from ..report.images import save_image_grid
from ..runs.config import SAMPLE_SOLVERS, TrainConfig, default_config_path
from ..runs.jobs import sample_checkpoint, train_from_config
from ..runs.sampling import SAMPLE_SCHEDULES
from ..train.distributed import distributed_info, init_distributed
from ..train.hooks import DivergenceError
from ..train.step import PRECISIONS
from ..watch import MemorizationDetected

__all__ = ["register", "run_train", "run_sample"]


def register(subparsers) -> None:
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
    p.set_defaults(func=run_train)

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
    s.add_argument("--label", type=int, default=None, metavar="K",
                   help="class-conditional models (model.num_classes): draw class K (default: unconditional)")
    s.add_argument("--guidance", type=float, default=0.0, metavar="W",
                   help="classifier-free guidance weight w: integrate (1 + w) v(x | K) - w v(x | null); 0 is the "
                        "plain conditional field; diffusers' guidance_scale is 1 + w")
    s.add_argument("--device", default=None)
    s.add_argument("--no-ema", action="store_true", help="use the raw weights even when an EMA copy exists")
    s.set_defaults(func=run_sample)



def run_train(args) -> int:
    src = args.config or default_config_path()
    cfg = load_config(TrainConfig, src, args.overrides)
    if args.precision:
        cfg.precision = args.precision
    out = Path(args.out) if args.out else Path("runs") / Path(str(src)).stem
    dev, started = init_distributed(resolve_device(args.device))
    try:
        result = train_from_config(cfg, out, dev if dev is not None else args.device, resume=args.resume,
                                   progress=not args.no_progress)
    except DivergenceError as e:
        last = f"the last good checkpoint is {e.last_good}" if e.last_good else "no checkpoint was written before it"
        print(f"flowprobe: error: {e}; {last}", file=sys.stderr)
        return 3
    except MemorizationDetected as e:  # watch.on_fire: stop
        print(f"flowprobe: stopped: {e}; the checkpoints written so far are in {out / 'checkpoints'}, the readings "
              f"in {out / 'metrics.jsonl'} and {out / 'watch.png'}", file=sys.stderr)
        return 4
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if distributed_info()[0] == 0:
        _report_training(result, out, cfg)
    return 0


def _report_training(result, out: Path, cfg: TrainConfig) -> None:
    state, ev = result.state, result.evaluation
    for path, why in result.skipped:
        print(f"skipped damaged checkpoint {path.name}: {why}")
    if state.resumed_from is not None:
        print(f"resumed from {state.resumed_from} (step {state.start})")
    print(f"trained {state.step} steps; final loss {result.final_loss:.4g} (mean of the last {result.final_window} "
          f"steps, as the progress bar showed)")
    if ev is not None:
        print(f"evaluation: squared energy distance to the target {ev['energy_distance']:.4g} (source: "
              f"{ev['energy_distance_source']:.4g}), {ev['n']} samples, {ev['solver']} {ev['steps']} steps, "
              f"{ev['model']} weights")
    plotted = cfg.sample.plot and (out / "samples.png").is_file()  # vectors of other than 2 dims are not plotted
    extra = [f"{out}/{name}" for name, ok in (("samples.png", plotted), ("tensorboard/", cfg.log.tensorboard),
                                               ("watch.png", (out / "watch.png").is_file()),
                                               ("split.json", (out / "split.json").is_file())) if ok]
    print(f"wrote {out}/metrics.jsonl, {out}/checkpoints/" + "".join(f", {e}" for e in extra))


def run_sample(args) -> int:
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy", ".png"):
        raise ConfigError(f"--out: {out.name} must end in .safetensors, .npy or .png (image grid)")
    res, info, cfg = sample_checkpoint(args.checkpoint, args.n, args.steps, args.solver, args.seed, args.device,
                                       use_ema=not args.no_ema, trajectory=args.plot is not None,
                                       diffusion=args.sde, diffusion_schedule=args.sde_schedule,
                                       schedule=args.schedule, label=args.label, guidance=args.guidance)
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
            plot_flow_2d(args.plot, res.trajectory, title=f"{info['solver']} {info['steps']} steps (nfe {info['nfe']})")
    print(f"wrote {args.n} samples to {out} ({info['solver']}, {info['steps']} steps, nfe {info['nfe']}, "
          f"{info['model']} weights of step {info['step']})")
    return 0
