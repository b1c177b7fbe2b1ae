"""The memorisation watch's detector: a reading (:class:`WatchReading`), the memorisation score it gets
(:func:`memorisation_score` of :func:`score_inputs`), and the judgement (:func:`detect`); the constants were fitted
on the tune half of ``benchmarks/detector.py`` (``docs/detector.md``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..diagnosis.verdict import COPY_EXCESS_MARGIN

__all__ = ["WatchReading", "memorisation_score", "score_terms", "score_inputs", "detect", "finite_number", "has_ratio",
           "WATCH_SCORE_WEIGHTS", "WATCH_SCORE_WEIGHTS_MEMBERSHIP", "NULL_INPUTS", "WATCH_SCORE_THRESHOLD",
           "WATCH_SCORE_THRESHOLD_MEMBERSHIP", "WATCH_COPY_EXCESS", "WATCH_SCORE_THRESHOLDS", "score_threshold",
           "KINDS"]

#: The memorisation score of a reading, score = b + w_auc * (max_t membership AUC) + w_gv * (-log GV(train) /
#: GV(held-out)) + w_close * (copy closeness) + w_pair * (pairing excess): (b, w_auc, w_gv, w_close, w_pair), the
#: log-odds that a run memorises fitted by logistic regression on the tune half (seed 0) of benchmarks/detector.py
#: (``report`` refits and prints them; docs/detector.md). Weights missing at the end of a tuple are 0.
WATCH_SCORE_WEIGHTS = (-6.346, 0.0, 1.5596, 7.0698, 7.0801)
#: ... and (b, w_auc, w_close, w_pair) without the gradient variance, for readings without it (a net torch.func cannot
#: map, or ``gradvar=False``), fitted the same way.
WATCH_SCORE_WEIGHTS_MEMBERSHIP = (-9.7092, 6.9197, 4.967, 16.1846)
#: The score's inputs before any copy check (or, for the pairing excess, without paired training sources): a copy
#: closeness of 0.5 (the generated samples stand to the training set as fresh data do) and no pairing excess.
NULL_INPUTS = {"closeness": 0.5, "pairing": 0.0}
#: The detector fires when a reading's score reaches this (the threshold with the best balanced accuracy on the tune
#: half, averaged over 25, 50 and 100% of training) ...
WATCH_SCORE_THRESHOLD = 0.4379
#: The early-warning thresholds per kind of training (``MemorizationWatch(early=True)``), chosen the same way on the
#: tune half's runs of that kind alone (one number each; the score's weights stay common): "independent" (fresh sources
#: against a training set, where memorising means copying) and "paired" (fixed pairs with a pairing check). Pairs of a
#: map ("map", reflow) and readings without gradient variance use the pooled thresholds. They flag copying under an
#: independent coupling much earlier, at the price of late false alarms on small training sets (docs/detector.md).
WATCH_SCORE_THRESHOLDS = {"independent": -2.1635, "paired": 1.7525}
#: ... or, for a membership-only score, this.
WATCH_SCORE_THRESHOLD_MEMBERSHIP = -0.5782
#: The kinds of training the watch tells apart (by what it is given: no sources; training sources; also held-out
#: sources of a map).
KINDS = ("independent", "paired", "map")


def score_threshold(kind: str | None, early: bool = False) -> float:
    """The score threshold: the pooled :data:`WATCH_SCORE_THRESHOLD`, or with ``early`` the early-warning threshold
    of the kind of training (:data:`WATCH_SCORE_THRESHOLDS`; the pooled one for a kind it lacks)."""
    return WATCH_SCORE_THRESHOLDS.get(kind, WATCH_SCORE_THRESHOLD) if early else WATCH_SCORE_THRESHOLD
#: Copies fire when the lower bound of the excess copy fraction is above this (the diagnosis margin).
WATCH_COPY_EXCESS = COPY_EXCESS_MARGIN


@dataclass
class WatchReading:
    """One reading at optimiser step ``step``. Membership: ``auc`` (max over t), its lower bound ``auc_lower`` and time
    ``auc_t`` (the t with the largest lower bound), ``rows`` (per t: auc, bounds, losses). Gradient variance:
    ``gradvar_ratio`` and its interval (None when it was not measured). Copies (only every ``copy_every`` steps, else
    None): ``copy_fraction``, ``copy_reference_fraction``, ``copy_excess`` and its lower bound, ``copy_left_out``
    (generated samples non-finite or far from the data, left out), ``copy_closeness`` (the chance a generated sample
    is relatively nearer a training sample than a held-out one is). Pairing (paired training, with the copies):
    ``pairing_recall`` of the training partner on the ``pairing_contested`` probe pairs, ``pairing_chance``,
    ``pairing_excess`` = recall - chance. Map (pairs of a map with held-out pairs, with the copies;
    :func:`~flowprobe.diagnosis.transport.map_check` on the probe pairs): the shares of training and held-out sources
    that land on their partners, the excess, its lower bound and the check's ``map_vote``. ``inputs``: what the score
    read (:func:`score_inputs`); ``score``: the memorisation score (:func:`memorisation_score`). ``signals``: which
    detector conditions held at this reading ("score", "copies", "map"); ``fired``: the detector fires; ``stop``: a
    stop is requested (``on_fire="stop"``); ``message``: the one line saying why."""

    step: int
    auc: float = float("nan")
    auc_lower: float = float("nan")
    auc_t: float = float("nan")
    rows: list = field(default_factory=list)
    gradvar_ratio: float | None = None
    gradvar_lower: float | None = None
    gradvar_upper: float | None = None
    gradvar_method: str | None = None
    copy_fraction: float | None = None
    copy_reference_fraction: float | None = None
    copy_excess: float | None = None
    copy_excess_lower: float | None = None
    copy_left_out: int | None = None
    copy_closeness: float | None = None
    pairing_recall: float | None = None
    pairing_chance: float | None = None
    pairing_contested: int | None = None
    pairing_excess: float | None = None
    map_landed_train: float | None = None
    map_landed_heldout: float | None = None
    map_excess: float | None = None
    map_excess_lower: float | None = None
    map_vote: str | None = None
    inputs: dict = field(default_factory=dict)
    score: float = float("nan")
    signals: list = field(default_factory=list)
    fired: bool = False
    stop: bool = False
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"event": "watch", **asdict(self)}


def finite_number(v) -> bool:
    """A finite int or float (not None, not nan or inf)."""
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def has_ratio(gradvar_ratio) -> bool:
    """A gradient-variance ratio the score can use (a positive finite number)."""
    return finite_number(gradvar_ratio) and gradvar_ratio > 0


def memorisation_score(auc: float, gradvar_ratio: float | None, closeness: float | None = None,
                       pairing: float | None = None, weights: Sequence[float] = WATCH_SCORE_WEIGHTS,
                       weights_membership: Sequence[float] = WATCH_SCORE_WEIGHTS_MEMBERSHIP) -> float:
    """The memorisation score: ``b + w_auc * auc + w_gv * (-log gradvar_ratio) + w_close * closeness + w_pair *
    pairing`` with ``weights`` = (b, w_auc, w_gv, w_close, w_pair), or without the ratio term with
    ``weights_membership`` = (b, w_auc, w_close, w_pair) when the ratio is missing (None or not a positive finite
    number); weights missing at the end of a tuple are 0; ``closeness`` and ``pairing`` None read as their
    :data:`NULL_INPUTS`; nan when ``auc`` is not finite."""
    if not finite_number(auc):
        return float("nan")
    terms = score_terms(auc, gradvar_ratio, closeness, pairing)
    if has_ratio(gradvar_ratio):
        names, w = ("auc", "gradvar", "closeness", "pairing"), weights
    else:
        names, w = ("auc", "closeness", "pairing"), weights_membership
    return w[0] + sum(wi * terms[n] for wi, n in zip(w[1:], names))


def score_terms(auc: float, gradvar_ratio: float | None, closeness: float | None = None,
                pairing: float | None = None) -> dict:
    """The numbers the score weighs: ``auc``, ``gradvar`` = -log ``gradvar_ratio`` (nan without a usable ratio),
    ``closeness`` and ``pairing`` (their :data:`NULL_INPUTS` when None or not finite)."""
    return {"auc": auc, "gradvar": -math.log(gradvar_ratio) if has_ratio(gradvar_ratio) else float("nan"),
            "closeness": closeness if finite_number(closeness) else NULL_INPUTS["closeness"],
            "pairing": pairing if finite_number(pairing) else NULL_INPUTS["pairing"]}


def score_inputs(r: "WatchReading", previous: dict | None = None) -> dict:
    """What the score reads at reading ``r``: its membership AUC and GV ratio, and the latest copy closeness and
    pairing excess measured so far: ``r``'s own when it measured them, else those of ``previous`` (the inputs of the
    reading before; None before any)."""
    previous = previous or {}
    return {"auc": r.auc, "gradvar_ratio": r.gradvar_ratio,
            "closeness": r.copy_closeness if finite_number(r.copy_closeness) else previous.get("closeness"),
            "pairing": r.pairing_excess if finite_number(r.pairing_excess) else previous.get("pairing")}


def detect(r: "WatchReading", previous: dict | None = None, weights: Sequence[float] = WATCH_SCORE_WEIGHTS,
           weights_membership: Sequence[float] = WATCH_SCORE_WEIGHTS_MEMBERSHIP,
           threshold: float = WATCH_SCORE_THRESHOLD, threshold_membership: float = WATCH_SCORE_THRESHOLD_MEMBERSHIP,
           copy_excess: float = WATCH_COPY_EXCESS) -> list[str]:
    """The detector on one reading (module docstring), ``previous`` the inputs of the reading before
    (:func:`score_inputs`): sets ``r.inputs``, ``r.score`` and ``r.signals`` (which conditions hold: "score",
    "copies", and "map" when the map check votes memorises) and returns what it saw, a phrase per condition that
    holds. The benchmark replays stored readings through it with other constants."""
    r.inputs = score_inputs(r, previous)
    r.score = memorisation_score(**r.inputs, weights=weights, weights_membership=weights_membership)
    with_gv = has_ratio(r.gradvar_ratio)
    bar = threshold if with_gv else threshold_membership
    r.signals, said = [], []
    if finite_number(r.score) and r.score >= bar:
        r.signals.append("score")
        gv = f", GV(train)/GV(held-out) {r.gradvar_ratio:.3g}" if with_gv else " (no gradient variance measured)"
        close = r.inputs["closeness"]
        close = f", copy closeness {close:.3f}" if finite_number(close) else ""
        pair = r.inputs["pairing"]
        pair = f", pairing recall {pair:+.3f} over chance" if finite_number(pair) else ""
        said.append(f"memorisation score {r.score:.2f} >= {bar:.2f}: membership AUC {r.auc:.3f} (lower bound "
                    f"{r.auc_lower:.3f} at t = {r.auc_t:.2g}){gv}{close}{pair}")
    if finite_number(r.copy_excess_lower) and r.copy_excess_lower > copy_excess:
        r.signals.append("copies")
        said.append(f"{r.copy_fraction:.0%} of generated samples copy training samples vs "
                    f"{r.copy_reference_fraction:.0%} of held-out samples")
    if r.map_vote == "memorises":
        r.signals.append("map")
        said.append(f"{r.map_landed_train:.0%} of training sources land on their partners vs "
                    f"{r.map_landed_heldout:.0%} of held-out sources of the same map")
    return said
