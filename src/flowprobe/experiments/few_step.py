"""Few-step objectives (MeanFlow, SplitMeanFlow) against CFM: the flow they learn, and whether they memorise.

Part 1, the Gaussian oracle. Source N(0, I_d), target N(m1, S1), independent coupling. The marginal field's
flow is known in closed form (:meth:`flowprobe.gaussian.IndependentGaussianCoupling.flow_map`), so the error of
k jumps x -> x + h u(t, x, h) of a trained average-velocity net, and of the ODE of its h = 0 field, is measured
against the exact end point Phi_{0->1}(x0), as a fraction of the spread of the target (the error of sending
every point to the target mean). CFM nets are jumped with their velocity (one jump = one Euler step).

Part 2, memorisation (an open question beside the paper: does a one-step objective memorise deterministic pairs
more?). The protocol of ``pair-memorization``: N fixed pairs (x0_i, x1_pi(i)) of two Gaussian point sets with a
random (adversarial) assignment pi, trained with each objective and noise level sigma; training sources are
pushed through the ODE (rk4) and through one jump, and we report the nearest-target accuracy for the assigned
partner and for the OT partner, and the gradient variance of each net's own loss on its training pairs (the
paper's signature of memorisation is its collapse; few-step nets are probed at the jump to the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import option
from ..couplings import FixedPairs, ot_permutation
from ..gaussian import IndependentGaussianCoupling
from ..objectives import OBJECTIVES, make_objective
from ..paths import make_path
from ..probes.gradvar import gradient_variance
from ..probes.memorization import pairing_metrics
from ..report import plt, save_figure
from ..solvers import push_forward
from .harness import derive_seed, experiment
from .lowdim import mlp_spec, train_velocity

__all__ = ["FewStepConfig", "run"]

CLAIM = ("An average-velocity objective (MeanFlow, SplitMeanFlow) learns the flow map, so one jump lands where "
         "the ODE does; measured against the closed-form Gaussian flow, and probed for memorisation of fixed "
         "pairs like the velocity objective.")


@dataclass
class FewStepConfig:
    objectives: list[str] = option(default_factory=lambda: list(OBJECTIVES), choices=OBJECTIVES)
    jump_fraction: float = option(0.5, ge=0, le=1, help="share of training samples with h > 0")
    time_scale: float = option(10.0, gt=0, help="the MLP's time embedding sees time_scale * t (and h)")
    extra_time_scales: list[float] = option(default_factory=lambda: [1000.0], gt=0, min_len=0,
                                            help="Gaussian part: MeanFlow also trained at these time scales")
    width: int = option(128, ge=1)
    depth: int = option(3, ge=1)
    batch_size: int = option(256, ge=1)
    lr: float = option(2e-3, gt=0)
    gauss_dim: int = option(2, ge=1)
    gauss_shift: float = option(2.0, help="target mean: gauss_shift * (1, -1, 1, ...) / sqrt(d) * sqrt(2)")
    gauss_steps: int = option(3000, ge=1)
    jumps: list[int] = option(default_factory=lambda: [1, 2, 4, 8], ge=1)
    n_eval: int = option(4000, ge=2)
    memorization: bool = option(True, help="run part 2 (fixed pairs)")
    dim: int = option(16, ge=1)
    n_pairs: int = option(256, ge=2)
    shift: float = option(3.0)
    sigmas: list[float] = option(default_factory=lambda: [0.0, 0.5, 1.0, 2.0], ge=0)
    mem_width: int = option(256, ge=1)
    mem_steps: int = option(4000, ge=1)
    gv_times: list[float] = option(default_factory=lambda: [0.1, 0.5, 0.9], gt=0, lt=1,
                                   help="part 2: gradient variance of each net's own loss at these times")
    gv_samples: int = option(64, ge=2)
    solver: str = option("rk4", choices=("euler", "midpoint", "heun", "rk4"))
    solver_steps: int = option(50, ge=1)
    one_jump_tolerance: float = option(0.3, gt=0, help="criterion: one jump within this fraction of the spread")
    save_models: bool = option(False, help="write every trained net and the data it was measured on to models/")


def _gaussian_target(cfg: FewStepConfig, ctx) -> IndependentGaussianCoupling:
    """N(m1, S1): eigenvalues spread over [0.2, 1] in a random (seeded) basis, so the flow is anisotropic."""
    d = cfg.gauss_dim
    g = ctx.generator(1, device="cpu")
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.2, 1.0, d, dtype=torch.float64) if d > 1 else torch.tensor([0.5], dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** i for i in range(d)], dtype=torch.float64)
    m1 = cfg.gauss_shift * math.sqrt(2 / d) * signs
    return IndependentGaussianCoupling(m1, q @ torch.diag(lam) @ q.T, dtype=torch.float32, device=ctx.device)


def _gaussian_plans(cfg: FewStepConfig) -> list[tuple[str, float]]:
    """(objective, time scale) of every net of the Gaussian part."""
    plans = [(o, cfg.time_scale) for o in cfg.objectives]
    if "meanflow" in cfg.objectives:
        plans += [("meanflow", s) for s in cfg.extra_time_scales if s != cfg.time_scale]
    return plans


def _stages(cfg: FewStepConfig) -> list[tuple[str, float]]:
    """The progress plan, in training steps."""
    plan = [(f"gaussian {o} (time scale {s:g})", cfg.gauss_steps) for o, s in _gaussian_plans(cfg)]
    if cfg.memorization:
        plan += [(f"pairs {o} sigma={s}", cfg.mem_steps) for o in cfg.objectives for s in sorted(set(cfg.sigmas))]
    return plan


def _gaussian_part(cfg: FewStepConfig, ctx) -> list[dict]:
    cpl = _gaussian_target(cfg, ctx)
    dev = ctx.device
    x0 = torch.randn(cfg.n_eval, cfg.gauss_dim, generator=ctx.generator(2, device="cpu")).to(dev)
    exact = cpl.flow_map(torch.zeros(cfg.n_eval, device=dev), x0, torch.ones(cfg.n_eval, device=dev)).float()
    spread = (exact - exact.mean(0)).norm(dim=1).mean().item()
    plans = _gaussian_plans(cfg)
    if cfg.save_models:
        ctx.save_tensors("gaussian-data", {"x0": x0, "m1": cpl.m1, "S1": cpl.S11})
    rows = []
    for i, (obj, scale) in enumerate(plans):
        stage = f"gaussian {obj} (time scale {scale:g})"
        net, losses = train_velocity(cfg.gauss_dim, cpl, 0.0, width=cfg.width, depth=cfg.depth, steps=cfg.gauss_steps,
                                     batch_size=cfg.batch_size, lr=cfg.lr, seed=derive_seed(ctx.seed, 10 + i),
                                     device=dev, objective=obj, jump_fraction=cfg.jump_fraction, time_scale=scale,
                                     hooks=[ctx.training_hook(stage, cfg.gauss_steps)])
        if cfg.save_models:
            ctx.save_model(f"gaussian-{obj}-scale{scale:g}", net, mlp_spec(
                cfg.gauss_dim, cfg.width, cfg.depth, step_embed=obj != "cfm", time_scale=scale))
        jump_method = "euler" if obj == "cfm" else "average"
        errs = {k: (push_forward(net, x0, method=jump_method, steps=k) - exact).norm(dim=1).mean().item() / spread
                for k in sorted(set(cfg.jumps))}
        ode_x1 = push_forward(net, x0, method=cfg.solver, steps=cfg.solver_steps)
        ode = (ode_x1 - exact).norm(dim=1).mean().item() / spread
        tail = losses[-max(1, len(losses) // 20):]
        row = {"objective": obj, "time_scale": scale, "jumps": list(errs), "jump_error": list(errs.values()),
               "ode_error": ode, "final_loss": sum(tail) / len(tail), "spread": spread,
               "finite": all(math.isfinite(e) for e in errs.values()) and math.isfinite(ode)}
        ctx.log(f"gaussian {obj} (time scale {scale:g}): 1 jump {errs.get(1, float('nan')):.3f}, "
                f"ODE {ode:.3f} of the spread")
        rows.append(row)
    return rows


def _memorization_part(cfg: FewStepConfig, ctx) -> list[dict]:
    dev = ctx.device
    g = ctx.generator(3, device="cpu")
    x0 = torch.randn(cfg.n_pairs, cfg.dim, generator=g)
    x1 = torch.randn(cfg.n_pairs, cfg.dim, generator=g) + cfg.shift
    assigned = torch.randperm(cfg.n_pairs, generator=g)
    ot = ot_permutation(x0, x1, "lsa")
    x0, x1, assigned, ot = x0.to(dev), x1.to(dev), assigned.to(dev), ot.to(dev)
    partners = {"assigned": assigned, "ot": ot}
    if cfg.save_models:
        ctx.save_tensors("pairs-data", {"x0": x0, "x1": x1, "assigned": assigned})
    rows = []
    for i, obj in enumerate(cfg.objectives):
        for j, sigma in enumerate(sorted(set(cfg.sigmas))):
            pairs = FixedPairs(x0, x1[assigned])
            net, losses = train_velocity(cfg.dim, pairs, sigma, width=cfg.mem_width,
                                         depth=cfg.depth, steps=cfg.mem_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                         seed=derive_seed(ctx.seed, 100 + 10 * i + j), device=dev, objective=obj,
                                         jump_fraction=cfg.jump_fraction, time_scale=cfg.time_scale,
                                         hooks=[ctx.training_hook(f"pairs {obj} sigma={sigma}", cfg.mem_steps)])
            if cfg.save_models:
                ctx.save_model(f"pairs-{obj}-sigma{sigma:g}", net, mlp_spec(
                    cfg.dim, cfg.mem_width, cfg.depth, step_embed=obj != "cfm", time_scale=cfg.time_scale))
            path = make_path(sigma)
            n_gv = min(cfg.gv_samples, cfg.n_pairs)
            # the CFM loss of the h = 0 field (every net has one), on common draws ...
            gv0 = gradient_variance(net, path, pairs, list(cfg.gv_times), n_samples=n_gv,
                                    generator=ctx.generator(200 + 10 * i + j, device=dev))
            # ... and a few-step net's own loss at the jump to the end
            gv = gv0 if obj == "cfm" else gradient_variance(
                net, path, pairs, list(cfg.gv_times), n_samples=n_gv, objective=make_objective(obj, path, "sum"),
                step="to_end", generator=ctx.generator(200 + 10 * i + j, device=dev))
            ode = pairing_metrics(push_forward(net, x0, method=cfg.solver, steps=cfg.solver_steps), x1, partners)
            jump_method = "euler" if obj == "cfm" else "average"
            jump = pairing_metrics(push_forward(net, x0, method=jump_method, steps=1), x1, partners)
            tail = losses[-max(1, len(losses) // 20):]
            row = {"objective": obj, "sigma": sigma, "nn_acc_assigned_ode": ode["nn_acc_assigned"],
                   "nn_acc_ot_ode": ode["nn_acc_ot"], "l2_assigned_ode": ode["l2_assigned_mean"],
                   "l2_ot_ode": ode["l2_ot_mean"], "nn_acc_assigned_jump": jump["nn_acc_assigned"],
                   "nn_acc_ot_jump": jump["nn_acc_ot"], "l2_assigned_jump": jump["l2_assigned_mean"],
                   "l2_ot_jump": jump["l2_ot_mean"], "final_loss": sum(tail) / len(tail), "chance": ode["chance"],
                   "gv_times": [r["t"] for r in gv.rows], "gv": [r["gv"] for r in gv.rows],
                   "gv_se": [r["gv_se"] for r in gv.rows], "gv_loss": [r["loss"] for r in gv.rows],
                   "gv_h0": [r["gv"] for r in gv0.rows], "gv_h0_se": [r["gv_se"] for r in gv0.rows],
                   "loss_h0": [r["loss"] for r in gv0.rows]}
            ctx.log(f"pairs {obj} sigma={sigma}: nn_acc assigned ODE {row['nn_acc_assigned_ode']:.3f}, one jump "
                    f"{row['nn_acc_assigned_jump']:.3f}")
            rows.append(row)
    return rows


@experiment("few-step", config=FewStepConfig, claim=CLAIM,
            quick={"gauss_steps": 1200, "n_eval": 2000, "n_pairs": 128, "mem_steps": 1500, "sigmas": [0.0, 1.0],
                   "jumps": [1, 2, 4], "extra_time_scales": []})
def run(cfg: FewStepConfig, ctx) -> dict:
    """MeanFlow and SplitMeanFlow against CFM: k-jump error on a Gaussian, and memorisation of fixed pairs."""
    ctx.plan(_stages(cfg))
    gauss = _gaussian_part(cfg, ctx)
    main = {r["objective"]: r for r in gauss if r["time_scale"] == cfg.time_scale}
    tol = cfg.one_jump_tolerance
    if 1 in cfg.jumps:
        for obj in ("meanflow", "splitmeanflow"):
            if obj in main:
                e = main[obj]["jump_error"][main[obj]["jumps"].index(1)]
                ctx.criterion(f"{obj}: one jump within {tol} of the spread of the exact flow map", e <= tol,
                              f"error {e:.3f} of the spread")
        if "cfm" in main:
            e = main["cfm"]["jump_error"][main["cfm"]["jumps"].index(1)]
            ctx.criterion("cfm: one Euler step is not: error >= 0.8 of the spread (the exact field's first step "
                          "sends every x0 to the target mean, error = the spread)", e >= 0.8,
                          f"error {e:.3f} of the spread")
    ctx.table(f"Gaussian (d = {cfg.gauss_dim}): error of k jumps and of the ODE ({cfg.solver} {cfg.solver_steps}) "
              "against the closed-form flow map, as a fraction of the target's spread",
              [{"objective": r["objective"], "time_scale": r["time_scale"],
                **{f"{k} jump": e for k, e in zip(r["jumps"], r["jump_error"])}, "ode": r["ode_error"],
                "final_loss": r["final_loss"]} for r in gauss])
    mem = _memorization_part(cfg, ctx) if cfg.memorization else []
    if mem:
        zero = [r for r in mem if r["sigma"] == 0.0]
        for r in zero:
            ctx.criterion(f"{r['objective']}, sigma = 0: the ODE memorises the pairs (nn_acc_assigned >= 0.95)",
                          r["nn_acc_assigned_ode"] >= 0.95, f"{r['nn_acc_assigned_ode']:.3f}")
        ctx.table(f"fixed pairs (d = {cfg.dim}, N = {cfg.n_pairs}, random assignment): nearest-target accuracy of "
                  f"the ODE and of one jump", [{k: r[k] for k in (
                      "objective", "sigma", "nn_acc_assigned_ode", "nn_acc_ot_ode", "nn_acc_assigned_jump",
                      "nn_acc_ot_jump", "l2_assigned_jump", "l2_ot_jump", "final_loss")} for r in mem])
        ctx.table("gradient variance on the training pairs (exact per-sample gradients, sum over dimensions): of the "
                  "CFM loss of the h = 0 field, and of a few-step net's own loss at the jump to the end (h = 1 - t)",
                  [{"objective": r["objective"], "sigma": r["sigma"],
                    **{f"GV h=0 (t={t:g})": v for t, v in zip(r["gv_times"], r["gv_h0"])},
                    **({} if r["objective"] == "cfm" else
                       {f"GV own (t={t:g})": v for t, v in zip(r["gv_times"], r["gv"])}),
                    **{f"loss h=0 (t={t:g})": v for t, v in zip(r["gv_times"], r["loss_h0"])}} for r in mem])
    _figure(ctx, cfg, gauss, mem)
    ctx.note("CFM nets are jumped with their velocity (k jumps = k Euler steps). Every net has the same MLP; the "
             "few-step nets add a step input h whose first-layer weights start at zero.")
    return {"gaussian": gauss, "memorization": mem}


def _figure(ctx, cfg, gauss, mem) -> None:
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(10 if mem else 5, 3.6), squeeze=False)
    a = axes[0][0]
    for r in gauss:
        label = f"{r['objective']} (scale {r['time_scale']:g})"
        (line,) = a.plot(r["jumps"], r["jump_error"], "o-", label=label)
        a.axhline(r["ode_error"], color=line.get_color(), ls=":", lw=1)
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("jumps (dotted: ODE of the h = 0 field)")
    a.set_ylabel("error / spread")
    a.set_title(f"Gaussian, d = {cfg.gauss_dim}")
    a.legend(fontsize=7)
    if mem:
        b = axes[0][1]
        for obj in dict.fromkeys(r["objective"] for r in mem):
            rs = sorted((r for r in mem if r["objective"] == obj), key=lambda r: r["sigma"])
            sig = [r["sigma"] for r in rs]
            (line,) = b.plot(sig, [r["nn_acc_assigned_ode"] for r in rs], "o-", label=f"{obj}, ODE")
            b.plot(sig, [r["nn_acc_assigned_jump"] for r in rs], "s--", color=line.get_color(), label=f"{obj}, 1 jump")
        b.set_xlabel("sigma")
        b.set_ylabel("nn accuracy, assigned partner")
        b.set_title(f"fixed pairs, d = {cfg.dim}, N = {cfg.n_pairs}")
        b.legend(fontsize=7)
    save_figure(fig, ctx.figure("few_step"))
