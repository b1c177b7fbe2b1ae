"""Diagnosis: does a flow model memorise its training data? The checks, their evidence, the verdict.

:func:`diagnose` runs the checks on a velocity net ``net(t, x)`` and its data (tensors); the verdict rule and
every threshold are in :mod:`.verdict`; :func:`write_diagnosis` writes ``results.json``, ``report.md`` and the
figures. Loading a model or data from files is :func:`flowprobe.runs.diagnose.diagnose` (also
``flowprobe.diagnose``); the command is ``flowprobe diagnose``. See docs/diagnose.md.

- :mod:`.copies`: generated samples that copy training samples, against a held-out baseline (decisive);
- :mod:`.membership`: per-sample loss gap and AUC, gradient variance, train vs held-out (supporting);
- :mod:`.transport`: training sources carried to their training partners (decisive, paired training);
  straightness and solver agreement (informational);
- :mod:`.calibration`: the exact memorising fields used to check the verdict on known answers;
- :mod:`.stats`: Wilson and Newcombe intervals, the Mann-Whitney AUC with DeLong's standard error.
"""

from .calibration import EmpiricalMarginalField, EmpiricalPairField
from .core import CHECKS, DiagnoseOptions, diagnose
from .report import render_markdown, summary_table, write_diagnosis
from .result import RESULT_FORMAT, CheckResult, Diagnosis
from .stats import auc, auc_brute_force, newcombe_interval, wilson_interval
from .verdict import GENERALISES, INCONCLUSIVE, MEMORISES, Verdict, decide, thresholds

__all__ = ["diagnose", "DiagnoseOptions", "CHECKS", "Diagnosis", "CheckResult", "Verdict", "RESULT_FORMAT",
           "decide", "thresholds", "write_diagnosis", "render_markdown", "summary_table", "EmpiricalMarginalField",
           "EmpiricalPairField", "auc", "auc_brute_force", "wilson_interval", "newcombe_interval", "MEMORISES",
           "GENERALISES", "INCONCLUSIVE"]
