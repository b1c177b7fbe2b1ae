"""``flowprobe reproduce NAME``: run one of the paper's experiments (:mod:`flowprobe.experiments`).

The size follows the device unless asked for: the quick size on a CPU (minutes), the paper's size on CUDA
(``--full`` / ``--quick`` choose). The command says at its start which size runs, where it writes and how
long it should take; while it runs it shows one overall progress bar over every stage of the experiment (on
a terminal) or plain progress lines (when stderr is not a terminal), with the experiment's log lines; at the
end it lists the criteria.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from ..experiments.harness import RunPlan, default_config_yaml, execute, load_all, plan_run

__all__ = ["register", "run", "announcement", "format_duration", "ProgressDisplay"]

#: Seconds between two plain progress lines (stderr not a terminal).
PLAIN_EVERY_S = 15.0
#: The plain lines give the time left once this fraction of the run is done.
MIN_FRACTION_FOR_ETA = 0.05


def register(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="run one of the paper's experiments (see --list)",
                              description="Run one of the paper's experiments. On a CPU the quick size runs by "
                                          "default (minutes); on CUDA the paper's size. --full / --quick choose.")
    p.add_argument("name", nargs="?", help="experiment name")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the quick size (minutes on a CPU; the default when no CUDA device is used)")
    size.add_argument("--full", action="store_true",
                      help="the paper's size (the default on CUDA; can take an hour or more on a CPU)")
    p.add_argument("--out", default=None, help="output folder (default results/NAME-quick or results/NAME-full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML of config values (e.g. configs/NAME.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the experiment's default config as YAML")
    p.set_defaults(func=run)


def format_duration(seconds: float) -> str:
    """"40 s", "3 min", "1 h 20 min"."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def announcement(plan: RunPlan) -> str:
    """What the command says before it starts: size (and why), device, output folder, expected duration, and how
    to get the other size."""
    why = f"the default on {plan.device.type.upper() if plan.device.type == 'cuda' else plan.device.type}" \
        if plan.size_from_device else f"--{plan.size}"
    lines = [f"{plan.name}: {plan.size} size ({why}) on {plan.device}, seed {plan.seed}; writes {plan.out}/"]
    if plan.estimate_s is not None:
        lines.append(f"Expected to take about {format_duration(plan.estimate_s)}.")
    else:
        lines.append("No time estimate for this experiment before it starts; the progress line shows one.")
    other = "full" if plan.quick else "quick"
    what = "the paper's size" if other == "full" else "the small CPU size"
    tail = (f" (about {format_duration(plan.other_size_estimate_s)} here)"
            if plan.other_size_estimate_s is not None else "")
    lines.append(f"For {what} run it with --{other}{tail}.")
    return "\n".join(lines)


class ProgressDisplay:
    """The run's overall progress and log lines on stderr: a rich bar on a terminal, plain lines otherwise (a
    line per stage change and at most one every ``PLAIN_EVERY_S`` seconds, with the time left)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                            TextColumn("elapsed,"), TimeRemainingColumn(), TextColumn("left"), console=self.console,
                            transient=False, disable=not self.live)
        self.task = None
        self.t0 = time.perf_counter()
        self._last_line, self._last_stage = -1e9, None

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def log(self, text: str) -> None:
        line = Text(time.strftime("%H:%M:%S "), style="dim") + Text(text)
        (self.bar.console if self.live else self.console).print(line, highlight=False, soft_wrap=True)

    def progress(self, stage: str, done: float, total: float) -> None:
        if self.live:
            if self.task is None:
                self.task = self.bar.add_task(stage, total=total or None)
            self.bar.update(self.task, description=stage, completed=done, total=total or None)
            return
        now = time.perf_counter()
        if stage == self._last_stage and now - self._last_line < PLAIN_EVERY_S and done < total:
            return
        self._last_line, self._last_stage = now, stage
        self.console.print(Text(self.plain_line(stage, done, total, now - self.t0)), highlight=False, soft_wrap=True)

    @staticmethod
    def plain_line(stage: str, done: float, total: float, elapsed: float) -> str:
        line = f"{time.strftime('%H:%M:%S')} [{stage}]"
        if total > 0:
            frac = min(done / total, 1.0)
            line += f" {100 * frac:.0f}% of the run done"
            if MIN_FRACTION_FOR_ETA <= frac < 1:  # earlier, the rate is not known well enough
                line += f", about {format_duration(elapsed * (1 - frac) / frac)} left"
        return line


def _list() -> int:
    registry = load_all()
    width = max((len(n) for n in registry), default=0)
    for n in sorted(registry):
        e = registry[n]
        print(f"{n:<{width}}  {e.description.splitlines()[0] if e.description else ''}")
    return 0


def run(args) -> int:
    if args.list or not args.name:
        return _list()
    if args.print_config:
        print(default_config_yaml(args.name), end="")
        return 0
    quick = True if args.quick else False if args.full else None
    plan = plan_run(args.name, args.out, quick, args.seed, args.overrides, args.device, config_file=args.config)
    display = ProgressDisplay()
    display.console.print(Text(announcement(plan)), highlight=False, soft_wrap=True)
    with display:
        res = execute(plan, progress=display.progress, log=display.log)
    held = sum(c["held"] for c in res["criteria"])
    print(f"{plan.name}: {held}/{len(res['criteria'])} criteria held in {res['wall_time_s']:.1f} s; "
          f"wrote {plan.out / 'results.json'} and {plan.out / 'report.md'}")
    for c in res["criteria"]:
        print(f"  [{'x' if c['held'] else ' '}] {c['name']}" + (f"  ({c['detail']})" if c["detail"] else ""))
    return 0
