"""The judgement: how each check's numbers become a vote, and how the votes become a verdict.

Every threshold is a module-level constant below, fixed before looking at any one model (docs/diagnose.md gives
the reasons). Each check votes ``memorises``, ``generalises`` or nothing (``None``: the evidence is too weak, or
the check did not run), and carries a role:

- decisive (``copies``, ``pairing``, ``map``): direct evidence. A generated sample that is a copy of a training
  sample, a training source carried to its own training partner rather than to its optimal-transport partner, or
  (pairs of a deterministic map, with held-out pairs of the same map) training sources carried to their partners
  far more often than held-out sources are, is memorisation by definition.
- supporting (``membership``, ``gradvar``): indirect evidence. A lower loss or a collapsed gradient variance on
  the training samples shows the net fits them better than fresh samples, which goes with memorisation but also
  with mere overfitting.
- informational (``transport``): straightness and solver agreement describe the field; they do not vote.

The verdict (:func:`decide`):

1. ``memorises`` when a decisive check votes memorises: a copy is a copy, whatever else is seen (a disagreeing
   check is listed under ``against``).
2. ``generalises`` when every decisive check that ran votes generalises and no supporting check votes memorises.
3. ``inconclusive`` otherwise: no decisive check reached a conclusion (too few samples, an interval straddling
   its threshold, no check could run), or a supporting check contradicts a decisive ``generalises``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..probes.memorization import COPY_THRESHOLD
from .stats import normal_quantile

__all__ = ["MIN_SAMPLES", "CONFIDENCE", "COPY_THRESHOLD", "COPY_EXCESS_MARGIN", "MEMBERSHIP_AUC_MARGIN",
           "GRADVAR_COLLAPSE_RATIO", "GRADVAR_PARITY_RATIO", "PAIRING_EXCESS_MARGIN", "MAP_TOLERANCE",
           "MAP_LEARNED_SHARE",
           "TRANSPORT_TOLERANCE", "FAR_FROM_DATA_FACTOR", "MEMORISES", "GENERALISES", "INCONCLUSIVE", "DECISIVE",
           "SUPPORTING", "INFORMATIONAL", "Vote", "Verdict", "copies_vote", "membership_vote", "gradvar_vote",
           "pairing_vote", "map_vote", "decide", "interval_z", "thresholds"]

MEMORISES, GENERALISES, INCONCLUSIVE = "memorises", "generalises", "inconclusive"
DECISIVE, SUPPORTING, INFORMATIONAL = "decisive", "supporting", "informational"

#: Fewest samples per group for a check to vote (the normal approximations behind the intervals need it).
MIN_SAMPLES = 30
#: Two-sided confidence of every interval (Bonferroni-corrected where a check looks at several times).
CONFIDENCE = 0.95
#: Copies decide when the copy fraction of generated samples exceeds that of held-out real samples by more than
#: this, with the whole interval of the difference above it; generalises when the whole interval lies below it.
COPY_EXCESS_MARGIN = 0.05
#: Membership supports memorisation when the AUC of the per-sample loss (train vs held-out) has its lower bound
#: above this at some t; supports generalisation when its upper bound is below this at every t.
MEMBERSHIP_AUC_MARGIN = 0.6
#: Gradient variance supports memorisation when the geometric mean over t of GV(train) / GV(held-out) has its
#: upper bound below this (a collapse on the training samples) ...
GRADVAR_COLLAPSE_RATIO = 0.25
#: ... and supports generalisation when its lower bound is above this.
GRADVAR_PARITY_RATIO = 0.5
#: Pairing is judged on the contested pairs (training partner != OT partner; all pairs when the OT partners are
#: unknown): it decides memorisation when the recall of the training partner exceeds chance (1/N) by more than this,
#: with the whole interval of the excess above it, and generalisation when the whole interval lies below it (the
#: margin of the copies check: a model that returns more than 5% of its training sources to their own partner,
#: beyond what landing near a random target would give, reproduces its pairing).
PAIRING_EXCESS_MARGIN = 0.05
#: Solver agreement tolerance, as a fraction of the root-mean-square norm of the data (informational).
TRANSPORT_TOLERANCE = 0.1
#: The map check (pairs of a deterministic map x1 = G(x0), with held-out pairs of the same map): a source lands on
#: its partner when its end point is within this fraction of the root-mean-square norm of the training targets (the
#: transport check's tolerance). The check decides memorisation when the share of training sources that land on
#: their partners exceeds the share of held-out sources by more than PAIRING_EXCESS_MARGIN, with the whole interval
#: of the excess above it, and generalisation when the whole interval lies below it; with fewer than MIN_SAMPLES
#: training pairs (and enough held-out ones) it decides memorisation only, when the excess exceeds the margin and
#: Fisher's exact one-sided test gives p below (1 - CONFIDENCE) / 2.
MAP_TOLERANCE = TRANSPORT_TOLERANCE
#: A warning (not a vote) when fewer than this share of the held-out sources of a map land on their partners: the
#: net has not learned the map, and the map check's "generalises" only means it does not favour its training pairs.
MAP_LEARNED_SHARE = 0.5
#: A warning (not a vote) when the generated samples' median distance to the training set exceeds this multiple of
#: the held-out samples': "generalises" then only means "does not copy"; the samples may be poor.
FAR_FROM_DATA_FACTOR = 3.0


def thresholds() -> dict:
    """Every constant of the rule, for results.json."""
    return {"min_samples": MIN_SAMPLES, "confidence": CONFIDENCE, "copy_ratio_threshold": COPY_THRESHOLD,
            "copy_excess_margin": COPY_EXCESS_MARGIN, "membership_auc_margin": MEMBERSHIP_AUC_MARGIN,
            "gradvar_collapse_ratio": GRADVAR_COLLAPSE_RATIO, "gradvar_parity_ratio": GRADVAR_PARITY_RATIO,
            "pairing_excess_margin": PAIRING_EXCESS_MARGIN, "map_tolerance": MAP_TOLERANCE,
            "map_learned_share": MAP_LEARNED_SHARE,
            "transport_tolerance": TRANSPORT_TOLERANCE, "far_from_data_factor": FAR_FROM_DATA_FACTOR}


def interval_z(comparisons: int = 1) -> float:
    """z of a two-sided interval at :data:`CONFIDENCE`, Bonferroni-corrected over ``comparisons``."""
    alpha = (1 - CONFIDENCE) / max(1, comparisons)
    return normal_quantile(1 - alpha / 2)


@dataclass
class Vote:
    """What one check concludes: ``vote`` (memorises / generalises / None) and why, in one line."""

    vote: str | None
    reason: str


def copies_vote(n_generated: int, n_reference: int, excess: float, lower: float, upper: float) -> Vote:
    """Copies: the interval [lower, upper] of copy_fraction(generated) - copy_fraction(reference) against
    :data:`COPY_EXCESS_MARGIN`."""
    n_min = min(n_generated, n_reference)
    if n_min < MIN_SAMPLES:
        return Vote(None, f"too few samples ({n_min} < {MIN_SAMPLES})")
    span = f"excess {excess:+.3f}, {CONFIDENCE:.0%} interval [{lower:+.3f}, {upper:+.3f}]"
    if lower > COPY_EXCESS_MARGIN:
        return Vote(MEMORISES, f"{span} lies above the margin {COPY_EXCESS_MARGIN}")
    if upper < COPY_EXCESS_MARGIN:
        return Vote(GENERALISES, f"{span} lies below the margin {COPY_EXCESS_MARGIN}")
    return Vote(None, f"{span} straddles the margin {COPY_EXCESS_MARGIN}")


def membership_vote(n_train: int, n_heldout: int, rows: list[dict]) -> Vote:
    """Membership: per-time AUC intervals (``auc_lower``, ``auc_upper``) against :data:`MEMBERSHIP_AUC_MARGIN`."""
    n_min = min(n_train, n_heldout)
    if n_min < MIN_SAMPLES:
        return Vote(None, f"too few samples ({n_min} < {MIN_SAMPLES})")
    if not rows:
        return Vote(None, "no time could be measured")
    best = max(rows, key=lambda r: r["auc_lower"])
    if best["auc_lower"] > MEMBERSHIP_AUC_MARGIN:
        return Vote(MEMORISES, f"at t = {best['t']:.3g} the AUC {best['auc']:.3f} has its lower bound "
                               f"{best['auc_lower']:.3f} above {MEMBERSHIP_AUC_MARGIN}")
    worst = max(rows, key=lambda r: r["auc_upper"])
    if worst["auc_upper"] < MEMBERSHIP_AUC_MARGIN:
        return Vote(GENERALISES, f"every AUC upper bound is below {MEMBERSHIP_AUC_MARGIN} "
                                 f"(largest {worst['auc_upper']:.3f} at t = {worst['t']:.3g})")
    return Vote(None, f"the AUC interval at t = {worst['t']:.3g} ([{worst['auc_lower']:.3f}, "
                      f"{worst['auc_upper']:.3f}]) straddles {MEMBERSHIP_AUC_MARGIN}")


def gradvar_vote(n_samples: int, ratio: float, lower: float, upper: float) -> Vote:
    """Gradient variance: the interval of the geometric-mean ratio GV(train) / GV(held-out)."""
    if n_samples < MIN_SAMPLES:
        return Vote(None, f"too few samples per time ({n_samples} < {MIN_SAMPLES})")
    if not all(math.isfinite(v) for v in (ratio, lower, upper)):
        return Vote(None, "the ratio is not finite (a gradient variance of 0 or a failed estimate)")
    span = f"ratio {ratio:.3g}, interval [{lower:.3g}, {upper:.3g}]"
    if upper < GRADVAR_COLLAPSE_RATIO:
        return Vote(MEMORISES, f"{span}: the training samples' gradient variance collapsed "
                               f"(upper bound below {GRADVAR_COLLAPSE_RATIO})")
    if lower > GRADVAR_PARITY_RATIO:
        return Vote(GENERALISES, f"{span}: lower bound above {GRADVAR_PARITY_RATIO}")
    return Vote(None, f"{span} lies neither below {GRADVAR_COLLAPSE_RATIO} nor above {GRADVAR_PARITY_RATIO}")


def pairing_vote(n: int, chance: float, assigned: tuple[float, float, float],
                 ot: tuple[float, float, float] | None = None) -> Vote:
    """Pairing: the recall of the training partner on the ``n`` contested pairs (value, lower, upper) against
    ``chance`` (1 / the number of targets), with :data:`PAIRING_EXCESS_MARGIN`; the OT partner's recall on the same
    pairs (value, lower, upper) is named in the reason, not voted on."""
    if n < MIN_SAMPLES:
        return Vote(None, f"too few pairs whose training partner is not their OT partner ({n} < {MIN_SAMPLES})")
    rec, lo, hi = assigned
    span = (f"training-partner recall {rec:.3f} [{lo:.3f}, {hi:.3f}] against chance {chance:.3g}"
            + (f" (OT partner {ot[0]:.3f} [{ot[1]:.3f}, {ot[2]:.3f}])" if ot is not None else ""))
    if lo - chance > PAIRING_EXCESS_MARGIN:
        return Vote(MEMORISES, f"{span}: the excess over chance lies above the margin {PAIRING_EXCESS_MARGIN}")
    if hi - chance < PAIRING_EXCESS_MARGIN:
        return Vote(GENERALISES, f"{span}: the excess over chance lies below the margin {PAIRING_EXCESS_MARGIN}")
    return Vote(None, f"{span}: the excess over chance straddles the margin {PAIRING_EXCESS_MARGIN}")


def map_vote(n_train: int, n_heldout: int, excess: float, lower: float, upper: float,
             p_exact: float | None = None) -> Vote:
    """Map: the interval [lower, upper] (Newcombe) of the excess share of training sources over held-out sources that
    land on their partners, against :data:`PAIRING_EXCESS_MARGIN`; with fewer than :data:`MIN_SAMPLES` training pairs,
    the excess and ``p_exact`` (Fisher's exact one-sided p-value that the training share is the larger) instead, which
    can only find memorisation."""
    if n_heldout < MIN_SAMPLES:
        return Vote(None, f"too few held-out pairs ({n_heldout} < {MIN_SAMPLES})")
    alpha = (1 - CONFIDENCE) / 2
    if n_train < MIN_SAMPLES:
        exact = "no exact test" if p_exact is None else f"exact one-sided p = {p_exact:.3g}"
        said = f"excess {excess:+.3f} with {n_train} < {MIN_SAMPLES} training pairs, {exact}"
        if p_exact is not None and excess > PAIRING_EXCESS_MARGIN and p_exact < alpha:
            return Vote(MEMORISES, f"{said} (below {alpha:.3g}), excess above the margin {PAIRING_EXCESS_MARGIN}: "
                                   f"the net carries its training sources to their partners, not the map's held-out "
                                   f"sources")
        return Vote(None, f"{said}: too few training pairs for an interval, and the exact test finds no memorisation")
    span = f"excess {excess:+.3f}, {CONFIDENCE:.0%} interval [{lower:+.3f}, {upper:+.3f}]"
    if lower > PAIRING_EXCESS_MARGIN:
        return Vote(MEMORISES, f"{span} lies above the margin {PAIRING_EXCESS_MARGIN}: the net carries its training "
                               f"sources to their partners, not the map's held-out sources")
    if upper < PAIRING_EXCESS_MARGIN:
        return Vote(GENERALISES, f"{span} lies below the margin {PAIRING_EXCESS_MARGIN}")
    return Vote(None, f"{span} straddles the margin {PAIRING_EXCESS_MARGIN}")


@dataclass
class Verdict:
    """``label`` (memorises / generalises / inconclusive), the checks that ``decided`` it, those that ``support``
    it, those ``against`` it, and the ``reason`` in one sentence."""

    label: str
    decided_by: list[str] = field(default_factory=list)
    supported_by: list[str] = field(default_factory=list)
    against: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return {"label": self.label, "decided_by": list(self.decided_by), "supported_by": list(self.supported_by),
                "against": list(self.against), "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        return cls(d["label"], list(d.get("decided_by", [])), list(d.get("supported_by", [])),
                   list(d.get("against", [])), d.get("reason", ""))


def decide(checks) -> Verdict:
    """The verdict from checks (objects with ``name``, ``role``, ``ran`` and ``vote``), by the rule of the module
    docstring."""
    ran = [c for c in checks if c.ran and c.role in (DECISIVE, SUPPORTING)]
    decisive = [c for c in ran if c.role == DECISIVE]
    supporting = [c for c in ran if c.role == SUPPORTING]

    def names(cs, vote):
        return [c.name for c in cs if c.vote == vote]

    if names(decisive, MEMORISES):
        by = names(decisive, MEMORISES)
        return Verdict(MEMORISES, by, names(supporting, MEMORISES),
                       names(ran, GENERALISES), f"{' and '.join(by)} found direct evidence of memorisation")
    if not decisive:
        return Verdict(INCONCLUSIVE, [], [], [], "no decisive check (copies, pairing, map) could run")
    open_checks = [c.name for c in decisive if c.vote is None]
    if open_checks:
        return Verdict(INCONCLUSIVE, [], names(supporting, MEMORISES) or names(supporting, GENERALISES), [],
                       f"{' and '.join(open_checks)} reached no conclusion (see their evidence)")
    by = names(decisive, GENERALISES)
    contra = names(supporting, MEMORISES)
    if contra:
        return Verdict(INCONCLUSIVE, [], [], contra, f"{' and '.join(by)} found no memorisation but "
                                                     f"{' and '.join(contra)} points to it: the checks disagree")
    return Verdict(GENERALISES, by, names(supporting, GENERALISES), [],
                   f"{' and '.join(by)} found no memorisation, and no other check points to it")
