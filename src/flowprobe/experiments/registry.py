"""Experiment registry and runner: config -> results.json, figures, report.md."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..config import ConfigError, apply_overrides, from_dict, read_yaml_mapping, to_dict
from ..io import atomic_write, machine_info, write_json

__all__ = ["Experiment", "RunContext", "experiment", "REGISTRY", "run_experiment", "register_cli", "machine_info",
           "default_config_yaml"]

#: Modules that define experiments; imported on first use of the registry.
EXPERIMENT_MODULES = [
    "flowprobe.experiments.gaussian_gradvar",
    "flowprobe.experiments.intersecting_lines",
    "flowprobe.experiments.pair_memorization",
    "flowprobe.experiments.gmm",
    "flowprobe.experiments.reflow",
    "flowprobe.experiments.forward_backward",
    "flowprobe.experiments.celeba",
    "flowprobe.experiments.cifar_gradvar",
    "flowprobe.experiments.few_step",
]


@dataclass
class Experiment:
    name: str
    config_cls: type
    run: Callable[[Any, "RunContext"], dict]
    quick: dict
    claim: str
    description: str


REGISTRY: dict[str, Experiment] = {}


def experiment(name: str, config: type, quick: dict | None = None, claim: str = "", description: str = ""):
    """Decorator registering ``run(cfg, ctx) -> metrics`` as experiment ``name``."""

    def deco(fn):
        doc = description or (fn.__doc__ or "").strip()
        REGISTRY[name] = Experiment(name, config, fn, dict(quick or {}), claim, doc)
        return fn

    return deco


def _load_all() -> None:
    for mod in EXPERIMENT_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


@dataclass
class RunContext:
    """What an experiment gets besides its config: where to write, the device, seed and logging."""

    out: Path
    device: torch.device
    seed: int
    quick: bool
    criteria: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    verbose: bool = True

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
        if self.verbose:
            from rich.console import Console

            Console(stderr=True).print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")

    def generator(self, offset: int = 0, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh generator seeded from the run seed (``offset`` separates independent streams)."""
        return torch.Generator(device=device or self.device).manual_seed(self.seed * 1_000_003 + offset)


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
    parts.append("## Config\n\n```yaml\n" + __import__("yaml").safe_dump(results["config"], sort_keys=False) + "```\n")
    return "\n".join(p for p in parts if p is not None)


def _get(name: str) -> Experiment:
    _load_all()
    if name not in REGISTRY:
        raise ConfigError(f"{name}: unknown experiment; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def default_config_yaml(name: str) -> str:
    """The full-size defaults of experiment ``name`` as YAML (each key's help as a comment), the text of
    ``configs/NAME.yaml``."""
    import dataclasses
    import json

    exp = _get(name)
    cfg = exp.config_cls()
    lines = [f"# Defaults of `flowprobe reproduce {name}` (the full-size run); --quick applies "
             + (", ".join(f"{k}={v}" for k, v in exp.quick.items()) or "nothing") + ".",
             "# Use with --config FILE; --set key=value overrides any key."]
    for f in dataclasses.fields(cfg):
        text = f"{f.name}: {json.dumps(to_dict(getattr(cfg, f.name)))}"  # JSON is YAML's flow style
        help_ = f.metadata.get("help")
        if help_:
            text += f"  # {help_}"
        lines.append(text)
    return "\n".join(lines) + "\n"


def run_experiment(name: str, out: str | Path | None = None, quick: bool = False, seed: int = 0,
                   overrides: list[str] | None = None, device: str | None = None, verbose: bool = True,
                   config_file: str | Path | None = None) -> dict:
    """Run experiment ``name`` and write results.json, figures and report.md into ``out``.

    Settings, later ones winning: the config class defaults (full size), the ``--quick`` sizes, the YAML
    ``config_file``, then ``overrides`` (``key=value``)."""
    exp = _get(name)
    data = dict(exp.quick) if quick else {}
    if config_file is not None:
        data.update(read_yaml_mapping(config_file))
    data = apply_overrides(data, overrides)
    cfg = from_dict(exp.config_cls, data)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out or Path("results") / (name + ("-quick" if quick else "")))
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(out=out, device=dev, seed=seed, quick=quick, verbose=verbose)
    t0 = time.perf_counter()
    metrics = exp.run(cfg, ctx)
    wall = time.perf_counter() - t0
    results = {"experiment": name, "quick": quick, "seed": seed, "config": to_dict(cfg),
               "version": __version__, "machine": machine_info(dev), "wall_time_s": wall,
               "criteria": ctx.criteria, "all_criteria_held": all(c["held"] for c in ctx.criteria),
               "figures": ctx.figures, **metrics}
    write_json(out / "results.json", results)
    text = _report(exp, results, ctx)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    return results


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="run one of the paper's experiments (see --list)")
    p.add_argument("name", nargs="?", help="experiment name")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--quick", action="store_true", help="small CPU version (seconds to a minute or two)")
    p.add_argument("--out", default=None, help="output folder (default results/NAME)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML of config values (e.g. configs/NAME.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the experiment's default config as YAML")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    _load_all()
    if args.list or not args.name:
        width = max((len(n) for n in REGISTRY), default=0)
        for n in sorted(REGISTRY):
            e = REGISTRY[n]
            print(f"{n:<{width}}  {e.description.splitlines()[0] if e.description else ''}")
        return 0
    if args.print_config:
        print(default_config_yaml(args.name), end="")
        return 0
    res = run_experiment(args.name, args.out, args.quick, args.seed, args.overrides, args.device,
                         config_file=args.config)
    held = sum(c["held"] for c in res["criteria"])
    out = Path(args.out or Path("results") / (args.name + ("-quick" if args.quick else "")))
    print(f"{args.name}: {held}/{len(res['criteria'])} criteria held in {res['wall_time_s']:.1f} s; "
          f"wrote {out / 'results.json'} and {out / 'report.md'}")
    for c in res["criteria"]:
        print(f"  [{'x' if c['held'] else ' '}] {c['name']}" + (f"  ({c['detail']})" if c["detail"] else ""))
    return 0

