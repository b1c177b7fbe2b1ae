"""Writing a diagnosis: ``results.json`` (:meth:`Diagnosis.to_dict`), ``report.md`` (the verdict, a table of the
checks, each check's evidence and thresholds, what did not run and why) and the figures
(:mod:`flowprobe.report.diagnosis`), all written atomically into one folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write, write_json
from ..report.diagnosis import (plot_copies_images, plot_copies_scatter, plot_gradvar, plot_map_errors,
                                plot_membership, plot_ratio_histogram)
from ..report.probes import plot_pairing_histograms
from .result import Diagnosis
from .verdict import COPY_THRESHOLD, MEMBERSHIP_AUC_MARGIN

__all__ = ["write_diagnosis", "render_markdown", "summary_table"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def summary_table(diagnosis: Diagnosis) -> list[tuple[str, str, str, str]]:
    """(check, role, vote or "did not run", summary) for every check: what the command prints."""
    out = []
    for name, c in diagnosis.checks.items():
        vote = c.vote or ("-" if c.ran else "did not run")
        out.append((name, c.role, vote, c.summary if c.ran else c.reason))
    return out


def _rows_table(rows: list[dict], keys: list[str]) -> list[str]:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return lines


_ROW_KEYS = {
    "membership": ["t", "n", "loss_train", "loss_train_se", "loss_heldout", "loss_heldout_se", "gap", "gap_se", "auc",
                   "auc_se", "auc_lower", "auc_upper"],
    "gradvar": ["t", "gv_train", "gv_train_se", "gv_heldout", "gv_heldout_se", "ratio", "loss_train", "loss_heldout"],
}


def _check_section(name: str, c, figures: dict) -> list[str]:
    lines = [f"## {name} ({c.role})", ""]
    if not c.ran:
        return lines + [f"Did not run: {c.reason}", ""]
    lines += [f"**Vote: {c.vote or 'none'}.** {c.summary}.", "", f"Why: {c.reason}", ""]
    scalars = {k: v for k, v in c.evidence.items() if k not in ("rows", "spaces", "metrics")}
    lines += ["| evidence | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()] + [""]
    for space, ev in (c.evidence.get("spaces") or {}).items():
        if space != "pixels":
            lines += [f"In {space} space: copy fraction {_fmt(ev['copy_fraction'])} vs "
                      f"{_fmt(ev['reference_copy_fraction'])}, excess {_fmt(ev['excess'])} "
                      f"{_fmt(ev['excess_interval'])}: {ev['reason']}", ""]
    if c.evidence.get("rows") and name in _ROW_KEYS:
        lines += _rows_table(c.evidence["rows"], _ROW_KEYS[name]) + [""]
    lines += ["Thresholds: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in c.thresholds.items()), ""]
    lines += [f"![{name}]({fig})" for fig in figures.get(name, [])]
    return lines + [""]


def render_markdown(diagnosis: Diagnosis, figures: dict | None = None) -> str:
    """report.md: verdict, check table, what did not run, each check's evidence, settings and timings."""
    figures = figures or {}
    v = diagnosis.verdict
    lines = [f"# flowprobe diagnose: {v.label}", "", f"**Verdict: {v.label}.** {v.reason}.", ""]
    for label, names in (("Decided by", v.decided_by), ("Supported by", v.supported_by), ("Against", v.against)):
        if names:
            lines.append(f"- {label}: {', '.join(names)}")
    lines += [f"- Warning: {w}" for w in diagnosis.warnings]
    lines += ["", "| check | role | vote | summary |", "|---|---|---|---|"]
    lines += [f"| {n} | {r} | {vote} | {s} |" for n, r, vote, s in summary_table(diagnosis)] + [""]
    not_run = diagnosis.not_run()
    if not_run:
        lines += ["## Checks that did not run", ""] + [f"- **{n}**: {why}" for n, why in not_run.items()] + [""]
    for name, c in diagnosis.checks.items():
        lines += _check_section(name, c, figures)
    doc = diagnosis.to_dict()
    lines += ["## Model, data, settings", "", "```json",
              json.dumps({k: doc[k] for k in ("model", "data", "settings")}, indent=2), "```", ""]
    lines += ["## Timings (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {t:.3f} |" for k, t in diagnosis.timings.items()] + [""]
    return "\n".join(lines)


def _figures(diagnosis: Diagnosis, out: Path) -> dict[str, list[str]]:
    """Draw what the artifacts allow; {check: [file names]}."""
    figs: dict[str, list[str]] = {}
    art = diagnosis.artifacts
    copies = diagnosis.checks.get("copies")
    arrays = art.get("copies") or {}
    if copies is not None and copies.ran and "ratio" in arrays:
        gen = art["generated"][arrays["finite"]]
        train = art["train"]
        names = [plot_ratio_histogram(out / "copies_ratio.png", arrays["ratio"], arrays["reference_ratio"],
                                      COPY_THRESHOLD, copies.evidence.get("baseline", "reference")).name]
        if gen.dim() == 4 and gen.shape[1] in (1, 3):
            neighbours = train[arrays["nn_index"]]
            names.append(plot_copies_images(out / "copies_nearest.png", gen, neighbours, arrays["ratio"],
                                            COPY_THRESHOLD).name)
        elif gen.dim() == 2 and gen.shape[1] == 2:
            names.append(plot_copies_scatter(out / "copies_scatter.png", train, gen, arrays["ratio"], COPY_THRESHOLD,
                                             art.get("heldout")).name)
        figs["copies"] = names
    member = diagnosis.checks.get("membership")
    if member is not None and member.ran and member.evidence.get("rows"):
        figs["membership"] = [plot_membership(out / "membership.png", member.evidence["rows"],
                                              MEMBERSHIP_AUC_MARGIN).name]
    pairing = art.get("pairing")
    if pairing is not None:
        figs["pairing"] = [plot_pairing_histograms(pairing["endpoints"], pairing["targets"], pairing["partners"],
                                                   out / "pairing.png").name]
    mapped, map_check = art.get("map"), diagnosis.checks.get("map")
    if mapped is not None and map_check is not None and map_check.ran and map_check.evidence["tolerance"] > 0:
        figs["map"] = [plot_map_errors(out / "map.png", mapped["train"]["errors"], mapped["heldout"]["errors"],
                                       map_check.evidence["tolerance"]).name]
    gv = diagnosis.checks.get("gradvar")
    if gv is not None and gv.ran and gv.evidence.get("rows"):
        figs["gradvar"] = [plot_gradvar(out / "gradvar.png", gv.evidence["rows"]).name]
    return figs


def write_diagnosis(diagnosis: Diagnosis, out: str | Path, figures: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and (``figures``) the PNGs into ``out``; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(diagnosis, out) if figures else {}
    paths = {"results": write_json(out / "results.json", diagnosis.to_dict())}
    text = render_markdown(diagnosis, figs)
    paths["report"] = atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    for names in figs.values():
        for name in names:
            paths[name] = out / name
    return paths
