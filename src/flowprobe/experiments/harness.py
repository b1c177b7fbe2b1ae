"""The experiment harness: registry, discovery, run context and runner (config -> results.json, figures, report.md).

An experiment module registers ``run(cfg, ctx) -> metrics`` with :func:`experiment`; :func:`load_all` finds
every module of this package (the shared ones of :data:`SHARED_MODULES` aside) with :mod:`pkgutil` and imports
it, so adding an experiment is adding a module. :func:`plan_run` settles what a run will do (config, size,
device, output folder, expected duration) and :func:`execute` does it; :func:`run_experiment` is both.

The harness prints nothing: progress goes to a ``progress(stage, done, total)`` callback (one overall count
over every stage of the run), log lines to a ``log(text)`` callback (or the ``flowprobe.experiments`` logger).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .. import __version__
from ..config import ConfigError, apply_overrides, from_dict, read_yaml_mapping, to_dict
from ..device import resolve_device
from ..io import atomic_write, machine_info, write_json
from ..seeds import derive_seed
from ..train.hooks import Hook

__all__ = ["Experiment", "RunContext", "RunPlan", "Progress", "TrainingProgress", "experiment", "REGISTRY",
           "SHARED_MODULES", "load_all", "get_experiment", "derive_seed", "default_quick", "default_out", "plan_run",
           "execute", "run_experiment", "default_config_yaml", "ProgressFn", "LogFn"]

#: ``progress(stage, done, total)``: the run's overall work done and planned (any unit), and the current stage.
ProgressFn = Callable[[str, float, float], None]
#: ``log(text)``: one line of what the run is doing.
LogFn = Callable[[str], None]

#: Modules of this package that are shared machinery, not experiments (never imported by discovery).
SHARED_MODULES = frozenset({"harness", "lowdim", "imageflow"})

_logger = logging.getLogger("flowprobe.experiments")


@dataclass
class Experiment:
    name: str
    config_cls: type
    run: Callable[[Any, "RunContext"], dict]
    quick: dict
    claim: str
    description: str
    #: ``estimate(cfg, device) -> seconds`` of a run (None: no estimate).
    estimate: Callable[[Any, torch.device], float | None] | None = None


REGISTRY: dict[str, Experiment] = {}


def experiment(name: str, config: type, quick: dict | None = None, claim: str = "", description: str = "",
               estimate: Callable[[Any, torch.device], float | None] | None = None):
    """Decorator registering ``run(cfg, ctx) -> metrics`` as experiment ``name``. ``config``: the config
    dataclass (defaults = the paper's size); ``quick``: the overrides of the quick (CPU) size; ``estimate``:
    ``(cfg, device) -> seconds`` the run is expected to take, announced at its start."""

    def deco(fn):
        doc = description or (fn.__doc__ or "").strip()
        REGISTRY[name] = Experiment(name, config, fn, dict(quick or {}), claim, doc, estimate)
        return fn

    return deco


def load_all() -> dict[str, Experiment]:
    """Import every experiment module of this package (found with :func:`pkgutil.iter_modules`); the registry."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in SHARED_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
    return REGISTRY


def get_experiment(name: str) -> Experiment:
    load_all()
    if name not in REGISTRY:
        raise ConfigError(f"{name}: unknown experiment; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """One overall progress count over the stages of a run.

    ``plan`` names the stages and their work (any unit; training steps are a good one), ``update`` sets the
    work done within a stage; each change goes to the callback as ``(stage, done over all stages, total)``.
    A stage not planned adds its work to the total when it is first updated."""

    def __init__(self, callback: ProgressFn | None = None):
        self.callback = callback
        self.work: dict[str, float] = {}
        self.done: dict[str, float] = {}

    @property
    def total(self) -> float:
        return sum(self.work.values())

    def plan(self, stages: Iterable[tuple[str, float]]) -> None:
        for stage, work in stages:
            self.work[stage] = self.work.get(stage, 0.0) + float(work)
        self._emit(next(iter(self.work), ""))

    def update(self, stage: str, done: float) -> None:
        """Work ``done`` so far in ``stage`` (clipped to the stage's planned work)."""
        self.work.setdefault(stage, float(done))
        self.done[stage] = min(float(done), self.work[stage])
        self._emit(stage)

    def finish(self, stage: str) -> None:
        self.update(stage, self.work.get(stage, 1.0))

    def _emit(self, stage: str) -> None:
        if self.callback is not None:
            self.callback(stage, sum(self.done.values()), self.total)


class TrainingProgress(Hook):
    """A :func:`flowprobe.train.fit` hook reporting the training steps done to a :class:`Progress` stage, about
    every 1 % of the ``steps``."""

    def __init__(self, progress: Progress, stage: str, steps: int):
        self.progress, self.stage, self.every = progress, stage, max(1, steps // 100)

    def step(self, state) -> None:
        self.progress.update(self.stage, state.step)


# ------------------------------------------------------------------------------------------------ context


@dataclass
class RunContext:
    """What an experiment gets besides its config: where to write, the device, seed, progress and logging."""

    out: Path
    device: torch.device
    seed: int
    quick: bool
    criteria: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    verbose: bool = True
    progress: Progress = field(default_factory=Progress)
    on_log: LogFn | None = None

    def figure(self, name: str) -> Path:
        """Path for a PNG figure named ``name`` (recorded for the report)."""
        p = self.out / (name if name.endswith(".png") else name + ".png")
        self.figures.append(p.name)
        return p

    def criterion(self, name: str, held: bool, detail: str = "") -> bool:
        """Record whether a criterion of the spec held (with the numbers behind it)."""
        self.criteria.append({"name": name, "held": bool(held), "detail": detail})
        return bool(held)

    def table(self, title: str, rows: list[dict], columns: list[str] | None = None) -> None:
        """A markdown table for the report."""
        self.tables.append({"title": title, "rows": rows, "columns": columns})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def log(self, text: str) -> None:
        """One line of what the run is doing: to the ``log`` callback, else to the logger (when verbose)."""
        if not self.verbose:
            return
        if self.on_log is not None:
            self.on_log(text)
        else:
            _logger.info(text)

    def plan(self, stages: Iterable[tuple[str, float]]) -> None:
        """Announce the stages of the run and their work (:meth:`Progress.plan`)."""
        self.progress.plan(stages)

    def training_hook(self, stage: str, steps: int):
        """A training hook for :func:`flowprobe.train.fit` that counts the ``steps`` of ``stage``."""
        return TrainingProgress(self.progress, stage, steps)

    def generator(self, offset: int = 0, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh generator seeded from the run seed (``offset`` separates independent streams)."""
        return torch.Generator(device=device or self.device).manual_seed(derive_seed(self.seed, offset))

    def save_model(self, name: str, net: torch.nn.Module, spec: dict) -> Path:
        """Write ``net`` as a verified checkpoint ``models/<name>.safetensors`` that
        :func:`flowprobe.runs.load_model` rebuilds from ``spec`` (its architecture), so a reader can recompute
        any number of the run from the trained net itself."""
        from ..checkpoint import save_checkpoint

        return save_checkpoint(self.out / "models" / f"{name}.safetensors", net=net, step=0, extra={"model": spec})

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Write named tensors (the data an experiment measured on) to ``models/<name>.safetensors``."""
        from safetensors.torch import save_file

        path = self.out / "models" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))
        return path


# ------------------------------------------------------------------------------------------------ report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return f"[{len(v)} values]"
    return str(v)


def _markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _report(exp: Experiment, results: dict, ctx: RunContext) -> str:
    import yaml

    held = sum(c["held"] for c in ctx.criteria)
    parts = [f"# {exp.name}\n", f"{exp.description}\n" if exp.description else "",
             f"**Paper's claim.** {exp.claim}\n" if exp.claim else "",
             f"Run: {'quick' if ctx.quick else 'full'}, seed {ctx.seed}, device {ctx.device}, "
             f"{results['wall_time_s']:.1f} s, flowprobe {__version__}.\n",
             f"## Criteria ({held}/{len(ctx.criteria)} held)\n"]
    for c in ctx.criteria:
        detail = f" ({c['detail']})" if c["detail"] else ""
        parts.append(f"- {'HELD' if c['held'] else 'NOT HELD'}: {c['name']}{detail}")
    parts.append("")
    for t in ctx.tables:
        parts += [f"## {t['title']}\n", _markdown_table(t["rows"], t["columns"])]
    if ctx.figures:
        parts.append("## Figures\n")
        parts += [f"![{f}]({f})\n" for f in ctx.figures]
    if ctx.notes:
        parts.append("## Notes\n")
        parts += [f"- {n}" for n in ctx.notes]
        parts.append("")
    parts.append("## Config\n\n```yaml\n" + yaml.safe_dump(results["config"], sort_keys=False) + "```\n")
    return "\n".join(p for p in parts if p is not None)


def default_config_yaml(name: str) -> str:
    """The full-size defaults of experiment ``name`` as YAML (each key's help as a comment), the text of
    ``configs/NAME.yaml``."""
    exp = get_experiment(name)
    cfg = exp.config_cls()
    lines = [f"# Defaults of `flowprobe reproduce {name}` (the full, paper-size run: --full, the default on CUDA); "
             "the quick size (--quick, the default on CPU) applies "
             + (", ".join(f"{k}={v}" for k, v in exp.quick.items()) or "nothing") + ".",
             "# Use with --config FILE; --set key=value overrides any key."]
    for f in dataclasses.fields(cfg):
        text = f"{f.name}: {json.dumps(to_dict(getattr(cfg, f.name)))}"  # JSON is YAML's flow style
        help_ = f.metadata.get("help")
        if help_:
            text += f"  # {help_}"
        lines.append(text)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ running


def default_quick(device: torch.device) -> bool:
    """The size a run takes when none is asked for: the paper's (full) size on CUDA, the quick size elsewhere."""
    return device.type != "cuda"


def default_out(name: str, quick: bool) -> Path:
    """``results/NAME-quick`` or ``results/NAME-full``: the folder a run writes when no ``out`` is given."""
    return Path("results") / f"{name}-{'quick' if quick else 'full'}"


@dataclass
class RunPlan:
    """What a run will do, settled before it starts: the config of the chosen size, the device, the output
    folder and the expected duration (``estimate_s``; ``other_size_estimate_s``: of the other size, same
    overrides, on the same device; None where the experiment gives no estimate)."""

    experiment: Experiment
    config: Any
    quick: bool
    size_from_device: bool
    device: torch.device
    seed: int
    out: Path
    estimate_s: float | None = None
    other_size_estimate_s: float | None = None

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def size(self) -> str:
        return "quick" if self.quick else "full"


def _config(exp: Experiment, quick: bool, config_file, overrides) -> Any:
    data = dict(exp.quick) if quick else {}
    if config_file is not None:
        data.update(read_yaml_mapping(config_file))
    return from_dict(exp.config_cls, apply_overrides(data, overrides))


def plan_run(name: str, out: str | Path | None = None, quick: bool | None = None, seed: int = 0,
             overrides: list[str] | None = None, device: str | torch.device | None = None,
             config_file: str | Path | None = None) -> RunPlan:
    """Settle a run of experiment ``name``. ``quick=None`` chooses the size from the device
    (:func:`default_quick`). Settings, later ones winning: the config class defaults (full size), the quick
    sizes, the YAML ``config_file``, then ``overrides`` (``key=value``)."""
    exp = get_experiment(name)
    dev = resolve_device(device)
    size_from_device = quick is None
    quick = default_quick(dev) if quick is None else bool(quick)
    cfg = _config(exp, quick, config_file, overrides)
    plan = RunPlan(exp, cfg, quick, size_from_device, dev, seed, Path(out) if out else default_out(name, quick))
    if exp.estimate is not None:
        plan.estimate_s = exp.estimate(cfg, dev)
        plan.other_size_estimate_s = exp.estimate(_config(exp, not quick, config_file, overrides), dev)
    return plan


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    p = path.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:  # not empty (partial results are kept) or already gone
            return


def execute(plan: RunPlan, progress: ProgressFn | None = None, log: LogFn | None = None,
            verbose: bool = True) -> dict:
    """Run ``plan`` and write results.json, figures and report.md into ``plan.out``. An interrupted or failed
    run leaves no empty folder behind (partial results it wrote are kept)."""
    exp, cfg, out = plan.experiment, plan.config, plan.out
    created = _missing_dirs(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(out=out, device=plan.device, seed=plan.seed, quick=plan.quick, verbose=verbose,
                     progress=Progress(progress if verbose else None), on_log=log)
    threads = torch.get_num_threads()  # experiments may choose the thread count for their work; restored after
    try:
        t0 = time.perf_counter()
        metrics = exp.run(cfg, ctx)
        wall = time.perf_counter() - t0
        results = {"experiment": exp.name, "quick": plan.quick, "seed": plan.seed, "config": to_dict(cfg),
                   "version": __version__, "machine": machine_info(plan.device), "wall_time_s": wall,
                   "criteria": ctx.criteria, "all_criteria_held": all(c["held"] for c in ctx.criteria),
                   "figures": ctx.figures, **metrics}
        write_json(out / "results.json", results)
        text = _report(exp, results, ctx)
        atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    except BaseException:
        _remove_empty(created)
        raise
    finally:
        torch.set_num_threads(threads)
    return results


def run_experiment(name: str, out: str | Path | None = None, quick: bool | None = None, seed: int = 0,
                   overrides: list[str] | None = None, device: str | torch.device | None = None,
                   verbose: bool = True, config_file: str | Path | None = None, progress: ProgressFn | None = None,
                   log: LogFn | None = None) -> dict:
    """Run experiment ``name`` (:func:`plan_run`, then :func:`execute`); the results dict. ``quick=None``:
    the quick size on CPU, the paper's size on CUDA."""
    plan = plan_run(name, out, quick, seed, overrides, device, config_file)
    return execute(plan, progress=progress, log=log, verbose=verbose)
