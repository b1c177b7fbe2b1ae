"""The ``flowprobe`` command: the only part of the package that parses arguments, prints for a terminal
or maps errors to exit codes.

One module per command group (``train`` and ``sample``: :mod:`.train`; ``reproduce``: :mod:`.reproduce`;
``probe gradvar|memorization``: :mod:`.probe`; ``diagnose``: :mod:`.diagnose`;
``likelihood``: :mod:`.likelihood`; ``quality``: :mod:`.quality`), each with
``register(subparsers)`` that adds its parsers and sets ``func`` (called with the parsed namespace, returning an
exit code). A user error (:class:`~flowprobe.config.ConfigError`, or an OS error on a path the user named) is
printed as one line with exit code 2; a diverged training run exits with 3; ``diagnose --fail-on`` exits with 4
when it fires, and so does ``train`` when its memorisation watch stops it (``watch.on_fire: stop``).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..config import ConfigError
from . import diagnose, likelihood, probe, quality, reflow, reproduce, train

__all__ = ["main", "build_parser"]

#: command-group modules, in the order ``flowprobe --help`` lists them
COMMAND_GROUPS = (train, reproduce, probe, diagnose, likelihood, quality, reflow)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowprobe",
        description="Train flow-matching / rectified-flow models and probe them for failure modes.")
    parser.add_argument("--version", action="version", version=f"flowprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
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
    except OSError as e:  # a path the user named cannot be read or written (a file where a folder belongs, ...)
        if e.filename is None:
            raise
        print(f"flowprobe: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowprobe: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
