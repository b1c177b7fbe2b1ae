"""The result of a diagnosis: each check with its evidence, the verdict, and how it converts to JSON and back."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .verdict import Verdict

__all__ = ["CheckResult", "Diagnosis", "RESULT_FORMAT", "json_clean"]

RESULT_FORMAT = "flowprobe-diagnosis-1"


def json_clean(value: Any) -> Any:
    """``value`` as plain JSON: tuples become lists, numpy / torch scalars and small tensors become numbers and
    lists, non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_clean(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "__fspath__"):
        return str(value)
    return str(value)


@dataclass
class CheckResult:
    """One check: its ``name``, ``role`` (decisive / supporting / informational), whether it ``ran`` (and if not,
    ``reason`` says why), its ``vote`` (memorises / generalises / None), a one-line ``summary``, the ``evidence``
    (numbers) and the ``thresholds`` it was judged against."""

    name: str
    role: str
    ran: bool
    vote: str | None = None
    summary: str = ""
    reason: str = ""
    evidence: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)

    @classmethod
    def skipped(cls, name: str, role: str, reason: str) -> "CheckResult":
        return cls(name, role, False, None, f"did not run: {reason}", reason)

    def to_dict(self) -> dict:
        return json_clean({"name": self.name, "role": self.role, "ran": self.ran, "vote": self.vote,
                           "summary": self.summary, "reason": self.reason, "evidence": self.evidence,
                           "thresholds": self.thresholds})

    @classmethod
    def from_dict(cls, d: dict) -> "CheckResult":
        return cls(d["name"], d["role"], bool(d["ran"]), d.get("vote"), d.get("summary", ""), d.get("reason", ""),
                   dict(d.get("evidence") or {}), dict(d.get("thresholds") or {}))


@dataclass
class Diagnosis:
    """What :func:`flowprobe.diagnosis.diagnose` found: the ``verdict``, the ``checks`` by name (in the order they
    ran), what was diagnosed (``model``, ``data``), the ``settings`` used, the wall time of each stage
    (``timings``, seconds), ``warnings`` (lines worth reading beside the verdict) and ``artifacts`` (tensors for
    the figures: generated samples, their neighbours, ...; not part of the JSON)."""

    verdict: Verdict
    checks: dict[str, CheckResult]
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    artifacts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        """The verdict's label: memorises, generalises or inconclusive."""
        return self.verdict.label

    def not_run(self) -> dict[str, str]:
        """{check name: why it did not run} for the checks that did not run."""
        return {name: c.reason for name, c in self.checks.items() if not c.ran}

    def to_dict(self) -> dict:
        """Plain JSON (non-finite numbers become null)."""
        return json_clean({"format": RESULT_FORMAT, "verdict": self.verdict.to_dict(),
                           "checks": {k: c.to_dict() for k, c in self.checks.items()}, "not_run": self.not_run(),
                           "model": self.model, "data": self.data, "settings": self.settings,
                           "timings": self.timings, "warnings": self.warnings})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Diagnosis":
        """The inverse of :meth:`to_dict` (the artifacts are not stored, so they come back empty)."""
        if d.get("format") != RESULT_FORMAT:
            raise ValueError(f"not a diagnosis result (format {d.get('format')!r}, expected {RESULT_FORMAT!r})")
        checks = {k: CheckResult.from_dict(v) for k, v in d["checks"].items()}
        return cls(Verdict.from_dict(d["verdict"]), checks, dict(d.get("model") or {}), dict(d.get("data") or {}),
                   dict(d.get("settings") or {}), dict(d.get("timings") or {}), list(d.get("warnings") or []))

    @classmethod
    def from_json(cls, text: str) -> "Diagnosis":
        return cls.from_dict(json.loads(text))
