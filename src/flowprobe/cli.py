"""The ``flowprobe`` command.

Subcommands are contributed by the modules that own them: each exposes ``register_cli(subparsers)``
which adds its parser and sets ``func`` (called with the parsed namespace, returning an exit code).
A :class:`~flowprobe.config.ConfigError` (or another user error) is printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .config import ConfigError

# (module, attribute) pairs that add top-level subcommands, and those under `flowprobe probe`.
_TOP = [("flowprobe.train", "register_cli"), ("flowprobe.experiments", "register_cli")]
_PROBES = [("flowprobe.probes.gradvar", "register_cli"), ("flowprobe.probes.memorization", "register_cli")]


def _register(subparsers, entries) -> None:
    for mod, attr in entries:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("flowprobe"):
                continue  # that part of the library is not built yet
            raise
        getattr(module, attr)(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowprobe",
        description="Train flow-matching / rectified-flow models and probe them for failure modes.")
    parser.add_argument("--version", action="version", version=f"flowprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register(sub, _TOP)
    probe = sub.add_parser("probe", help="measure a trained model: gradient variance, memorisation, ...")
    probe_sub = probe.add_subparsers(dest="probe", metavar="PROBE")
    _register(probe_sub, _PROBES)
    probe.set_defaults(func=lambda args: (probe.print_help(), 2)[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"flowprobe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowprobe: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
