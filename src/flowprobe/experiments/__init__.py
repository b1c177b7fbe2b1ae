"""The paper's experiments, one module each, run by ``flowprobe reproduce NAME``.

Each experiment module registers itself with :func:`experiment` (:mod:`.harness`); the harness finds the
modules itself (every module of this package except the shared ``harness``, ``lowdim`` and ``imageflow``)::

    @experiment("intersecting-lines", config=MyConfig, quick={"n_eval": 500}, claim="...")
    def run(cfg: MyConfig, ctx: RunContext) -> dict: ...

``cfg`` is the experiment's config dataclass (defaults = paper scale; ``quick`` overrides give the
CPU version, the default size on CPU; ``--set key=value`` overrides both). ``run`` returns the metrics
dict, writes its figures through ``ctx.figure(name)``, reports its criteria through
``ctx.criterion(name, held, detail)`` and its progress through ``ctx.plan`` / ``ctx.progress``. The runner
adds config, version, machine and wall time, and writes ``results.json`` and ``report.md`` atomically.
"""

from __future__ import annotations

from .harness import (REGISTRY, Experiment, RunContext, RunPlan, derive_seed, execute, experiment, load_all,
                      plan_run, run_experiment)

__all__ = ["REGISTRY", "Experiment", "RunContext", "RunPlan", "derive_seed", "execute", "experiment", "load_all",
           "plan_run", "run_experiment"]
