"""The paper's experiments, one module each, run by ``flowprobe reproduce NAME``.

Each experiment module registers itself with :func:`experiment`::

    @experiment("intersecting-lines", quick={"n_eval": 500}, claim="...")
    def run(cfg: MyConfig, ctx: RunContext) -> dict: ...

``cfg`` is the experiment's config dataclass (defaults = paper scale; ``quick`` overrides give the
CPU version; ``--set key=value`` overrides both). ``run`` returns the metrics dict (the keys named in
the issue), writes its figures through ``ctx.figure(name)`` and reports its criteria through
``ctx.criterion(name, held, detail)``. The runner adds config, version, machine and wall time, and
writes ``results.json`` and ``report.md`` atomically.
"""

from __future__ import annotations

from .registry import REGISTRY, Experiment, RunContext, experiment, register_cli, run_experiment

__all__ = ["REGISTRY", "Experiment", "RunContext", "experiment", "register_cli", "run_experiment"]
