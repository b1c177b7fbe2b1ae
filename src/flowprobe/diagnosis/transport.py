"""Checks 4 to 6: where the training sources go (paired training; pairs of a map with held-out pairs), and how well
the field transports.

Pairing (check 4, with a pairs file). Every training source x0_i is integrated to x_hat_i and matched to its
nearest training target (:func:`flowprobe.probes.memorization.evaluate_pairs`). The recall of the training
partner (x_hat_i nearest to x1_i) is compared with the recall of the OT partner (x_hat_i nearest to x1_{o(i)},
o the exact OT assignment of the sources to the targets: taken from the file's ``ot_index``, else solved here for
up to :data:`PAIRING_OT_MAX_PAIRS` pairs). A net that reproduces its training pairing recalls the training
partner; one that learned a transport map lands near its OT partner, or on neither. The vote is on the contested
pairs (training partner != OT partner): the training-partner recall there against chance, 1/N.

Map (check 5, with held-out pairs of a deterministic map x1 = G(x0), such as reflow's (x0, Phi(x0))). A net
trained on such pairs is meant to reproduce its partners: that is the map. What it should not do is reproduce them
*only* for its training sources. The training sources and the held-out sources are integrated, and each lands on
its partner when its end point is within MAP_TOLERANCE x the root-mean-square norm of the training targets. The
vote is on the excess share of training over held-out sources that land (Newcombe interval; with fewer than
MIN_SAMPLES training pairs, Fisher's exact one-sided test, which can only find memorisation). Non-finite end points
count as not landed (and are counted). A net that learned the map
lands both alike (or, undertrained, neither); one that locked onto its pairs lands the training sources only.

Transport (check 6, informational). Straightness S = E int_0^1 ||(x1 - x0) - v(t, x_t)||^2 dt along the net's own
trajectories (:func:`flowprobe.probes.straightness.straightness_from_trajectory`), and solver agreement: the
fraction of sources whose end points under two solvers are within TRANSPORT_TOLERANCE x the root-mean-square norm
of the data (:func:`flowprobe.probes.consistency.endpoint_distance`). A smooth field gives agreement near 1; an
ill-defined (memorised, crossing-lines) field often does not.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..couplings import ot_permutation
from ..probes.consistency import endpoint_distance, parse_solver
from ..probes.memorization import PairSet, evaluate_pairs, limit_pairs
from ..probes.straightness import straightness_from_trajectory
from ..solvers import integrate, push_forward
from .result import CheckResult
from .stats import exact_greater_p, newcombe_interval, rms_norm, wilson_interval
from .verdict import (DECISIVE, INFORMATIONAL, MAP_TOLERANCE, MIN_SAMPLES, PAIRING_EXCESS_MARGIN, TRANSPORT_TOLERANCE,
                      map_vote, pairing_vote)

__all__ = ["pairing_check", "map_check", "transport_check", "PAIRING_OT_MAX_PAIRS"]

#: Largest number of pairs for which the OT partner is solved here when the pairs file has no ``ot_index``.
PAIRING_OT_MAX_PAIRS = 4096


def pairing_check(net, pairs: PairSet, *, n_max: int = 1000, method: str = "euler", steps: int = 100,
                  batch_size: int = 500, device=None) -> tuple[CheckResult, Tensor, PairSet]:
    """The pairing check on the first ``n_max`` pairs; returns (the check, the end points, the pairs used, with the
    OT partners when known). The vote looks at the contested pairs only (training partner != OT partner): a source
    whose training partner is its OT partner lands there whether the net memorises or transports."""
    thresholds = {"pairing_excess_margin": PAIRING_EXCESS_MARGIN, "min_samples": MIN_SAMPLES}
    pairs, dropped = limit_pairs(pairs, n_max)
    n = pairs.x0.shape[0]
    notes = [f"partner indices {', '.join(dropped)} point beyond the first {n} pairs and were dropped"
             ] if dropped else []
    if "ot" not in pairs.partners and 2 <= n <= PAIRING_OT_MAX_PAIRS:
        ot = ot_permutation(pairs.x0.reshape(n, -1), pairs.x1.reshape(n, -1), "lsa")
        pairs = PairSet(pairs.x0, pairs.x1, {**pairs.partners, "ot": ot.to(pairs.x0.device)}, pairs.metadata)
        notes.append("OT partners solved here (exact assignment, squared Euclidean cost)")
    metrics, endpoints, nearest = evaluate_pairs(net, pairs, method=method, steps=steps, batch_size=batch_size,
                                                 device=device, return_nearest=True)
    nearest = nearest.cpu()
    assigned_idx = pairs.partners["assigned"].cpu()
    contested = torch.ones(n, dtype=torch.bool)
    ot_rec, same = None, None
    if "ot" in pairs.partners:
        ot_idx = pairs.partners["ot"].cpu()
        contested = ot_idx != assigned_idx
        same = 1.0 - contested.double().mean().item()
    else:
        notes.append(f"no OT partners (more than {PAIRING_OT_MAX_PAIRS} pairs and none in the file): every pair "
                     "counts as contested")
    m = int(contested.sum())
    k_assigned = int((nearest == assigned_idx)[contested].sum())
    assigned = (k_assigned / max(m, 1), *wilson_interval(k_assigned, m)) if m else (0.0, 0.0, 1.0)
    if "ot" in pairs.partners and m:
        k_ot = int((nearest == ot_idx)[contested].sum())
        ot_rec = (k_ot / m, *wilson_interval(k_ot, m))
    chance = 1 / n
    vote = pairing_vote(m, chance, assigned, ot_rec)
    summary = (f"{assigned[0]:.1%} of {m} contested training sources land nearest their training partner"
               + (f", {ot_rec[0]:.1%} nearest their OT partner" if ot_rec else "") + f" (chance {chance:.2g})")
    evidence = {"n_pairs": n, "n_contested": m, "solver": method, "steps": steps, "recall_assigned": assigned[0],
                "recall_assigned_interval": list(assigned[1:]), "recall_ot": None if ot_rec is None else ot_rec[0],
                "recall_ot_interval": None if ot_rec is None else list(ot_rec[1:]), "same_as_ot": same,
                "chance": chance, "excess": assigned[0] - chance, "metrics": metrics, "notes": notes}
    check = CheckResult("pairing", DECISIVE, True, vote.vote, summary, vote.reason, evidence, thresholds)
    return check, endpoints, pairs


def map_check(net, pairs: PairSet, heldout_pairs: PairSet, *, n_max: int = 1000, method: str = "euler",
              steps: int = 100, batch_size: int = 500, device=None) -> tuple[CheckResult, dict]:
    """The map check (module docstring) on the first ``n_max`` training pairs and held-out pairs; returns (the check,
    the end points and per-source errors of both groups)."""
    device = pairs.x0.device if device is None else device
    n_all = pairs.x0.shape[0]
    if n_all < 1 or heldout_pairs.x0.shape[0] < 1:
        raise ValueError("the map check needs at least one training pair and one held-out pair")
    scale = rms_norm(pairs.x1)
    tol = MAP_TOLERANCE * scale
    out, counts, non_finite = {}, {}, 0
    for name, ps in (("train", pairs), ("heldout", heldout_pairs)):
        x0, x1 = ps.x0[:n_max].to(device, torch.float32), ps.x1[:n_max].to(device, torch.float32)
        end = push_forward(net, x0, method=method, steps=steps, batch_size=batch_size)
        err = (end - x1).reshape(x1.shape[0], -1).double().norm(dim=1).cpu()
        out[name] = {"endpoints": end.cpu(), "errors": err}
        counts[name] = (int((err <= tol).sum()), int(err.numel()))  # a non-finite error never lands
        non_finite += int((~torch.isfinite(err)).sum())
    (k_tr, n_tr), (k_ho, n_ho) = counts["train"], counts["heldout"]
    excess, lower, upper = newcombe_interval(k_tr, n_tr, k_ho, n_ho)
    p_exact = exact_greater_p(k_tr, n_tr, k_ho, n_ho) if n_tr < MIN_SAMPLES else None
    vote = map_vote(n_tr, n_ho, excess, lower, upper, p_exact)
    med = {k: float(v["errors"].nanmedian()) / scale if scale > 0 else float("nan") for k, v in out.items()}
    summary = (f"{k_tr / n_tr:.1%} of {n_tr} training sources and {k_ho / n_ho:.1%} of {n_ho} held-out sources of the "
               f"map land within {MAP_TOLERANCE} x RMS norm of their partners (excess {excess:+.3f})")
    evidence = {"n_train_pairs": n_tr, "n_heldout_pairs": n_ho, "solver": method, "steps": steps, "tolerance": tol,
                "data_rms": scale, "landed_train": k_tr / n_tr,
                "landed_train_interval": list(wilson_interval(k_tr, n_tr)), "landed_heldout": k_ho / n_ho,
                "landed_heldout_interval": list(wilson_interval(k_ho, n_ho)), "excess": excess,
                "excess_interval": [lower, upper], "exact_p": p_exact, "non_finite_end_points": non_finite,
                "median_relative_error_train": med["train"], "median_relative_error_heldout": med["heldout"]}
    check = CheckResult("map", DECISIVE, True, vote.vote, summary, vote.reason, evidence,
                        {"map_tolerance": MAP_TOLERANCE, "pairing_excess_margin": PAIRING_EXCESS_MARGIN,
                         "min_samples": MIN_SAMPLES})
    return check, out


def transport_check(net, x0: Tensor, data_rms: float, *, solvers=("rk4:8", "rk4:32")) -> CheckResult:
    """The transport check on the sources ``x0``: the end points of the two fixed-step ``solvers`` and their agreement
    within TRANSPORT_TOLERANCE x ``data_rms``; the straightness along the second solver's trajectory (trapezoid
    rule on its grid, :func:`flowprobe.probes.straightness.straightness_from_trajectory`)."""
    tol = TRANSPORT_TOLERANCE * data_rms
    (ma, na), (mb, nb) = parse_solver(solvers[0]), parse_solver(solvers[1])
    if "dopri5" in (ma, mb):
        raise ValueError("transport solvers must be fixed-step (euler, midpoint, heun, rk4)")
    with torch.no_grad():
        x_a = integrate(net, x0, ma, na).x
        sol = integrate(net, x0, mb, nb, return_trajectory=True)
        st = straightness_from_trajectory(net, sol.trajectory, sol.times, method=mb)
    gaps = endpoint_distance(x_a, sol.x)
    finite = torch.isfinite(gaps)
    agreement = (gaps <= tol).double().mean().item()
    rel = gaps[finite] / data_rms if data_rms > 0 else gaps[finite]
    median_gap = rel.median().item() if rel.numel() else float("nan")
    st_dict = st.as_dict()
    scale = st_dict["transport_cost"]
    summary = (f"solvers {solvers[0]} and {solvers[1]} agree on {agreement:.1%} of {x0.shape[0]} end points "
               f"(tolerance {TRANSPORT_TOLERANCE} x data RMS norm); straightness {st_dict['straightness']:.4g}"
               + (f" ({st_dict['straightness'] / scale:.3g} of the transport cost)" if scale > 0 else ""))
    evidence = {"n": int(x0.shape[0]), "solvers": list(solvers), "agreement": agreement,
                "tolerance": tol, "data_rms": data_rms, "median_relative_gap": median_gap,
                "non_finite_end_points": int((~finite).sum()),
                "relative_straightness": st_dict["straightness"] / scale if scale > 0 else float("nan"),
                **{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in st_dict.items()}}
    return CheckResult("transport", INFORMATIONAL, True, None, summary, "informational: does not vote", evidence,
                       {"transport_tolerance": TRANSPORT_TOLERANCE})
