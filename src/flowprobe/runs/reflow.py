"""The reflow job: K rounds of rectification of a trained toy or image run (``flowprobe reflow``).

Round 0 is the given checkpoint Phi_0. Round k = 1..K draws N source points x0 (seeded, fresh each round), pushes
them through Phi_{k-1} with the run's sampler (``sample.solver``, ``sample.steps``: :func:`flowprobe.solvers.
push_forward`) to x1 = Phi_{k-1}(x0), writes the pairs file ``DIR/round-k/pairs.safetensors`` (format
``flowprobe-pairs-1``, with the OT partner of each x0 among the x1 as ``ot_index``), and trains Phi_k into
``DIR/round-k/`` with the run's own config on those fixed pairs (``data.pairs``, ``coupling.kind: fixed_pairs``),
from scratch or, with ``init="previous"``, from the weights of Phi_{k-1} (``model.init``). With ``heldout`` > 0
(default :data:`HELDOUT_PAIRS`) the round also writes that many held-out pairs of the same map from other sources
(``DIR/round-k/heldout_pairs.safetensors``, seed stream :func:`heldout_seed_stream`), never trained on, named in
the round's config (``data.heldout_pairs``): the memorisation watch (the base run's ``watch:`` section, carried to
every round) and ``flowprobe diagnose DIR/round-k`` compare the training pairs with them (the map check,
``docs/diagnose.md``).

Image runs (``data.dataset``): the sources are N(0, I) of the image shape in the checkpoint's sidecar, pushed in
batches of :data:`IMAGE_BATCH` rows; the pairs file holds x0 and x1 = Phi_{k-1}(x0) as floats (x1 is not
clamped to [-1, 1] or quantised, so round k trains on exactly what the flow produced); each round trains on
them with the run's net spec (``data.pairs`` for images: the dataset is still decoded, as the target that the
round's own evaluation compares with). The reference for the quality number is the real images the base run
held out (rows >= ``data.n_train``, when the dataset has more), else its training images (``energy_distance_
reference`` says which).

Every round's flow is measured on the same fresh sources and target draws (so rounds compare with common random
numbers):

- ``straightness`` S = E int_0^1 ||(x1 - x0) - v(t, x_t)||^2 dt and ``transport_cost`` E||x1 - x0||^2 along the
  flow's own trajectories (:func:`flowprobe.probes.straightness.straightness`, the run's solver when it is a
  fixed-step one, else rk4, with the run's steps);
- ``energy_distance``: the squared energy distance of its samples to held-out target draws (``energy_distance_
  source``: of the source draws, the untrained baseline) -- the sample quality;
- the pairing probe (rounds >= 1): ``pairs_ot_recall``, the share of the round's generated pairs (x0_i, x1_i)
  that the exact OT assignment between the x0 and the x1 also pairs (1: the generated coupling is the OT one);
  and how the trained Phi_k treats its training pairs (:func:`flowprobe.probes.memorization.evaluate_pairs`):
  ``l2_assigned_mean`` = mean ||Phi_k(x0_i) - x1_i||, ``nn_acc_assigned`` = share of i whose endpoint is nearest
  to its own x1_i, and the same against the OT partner (``l2_ot_mean``, ``nn_acc_ot``). The exact assignment
  is cubic in N: above :data:`MAX_OT_PAIRS` pairs (:data:`MAX_OT_PAIRS_IMAGES` for images) it is skipped,
  ``pairs_ot_recall`` is None and ``pairs_ot_note`` says why.

Straightness is integrated in chunks of rows whose trajectories fit :data:`TRAJECTORY_BYTES` (the means are
combined exactly; a toy run's evaluation is one chunk). Results go to ``DIR/results.json`` and ``DIR/report.md``.
Own-data runs (``data.kind: array | image_folder``) are not supported: ``data.pairs`` does not reach them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import ConfigError, apply_overrides, from_dict, to_dict
from ..couplings import ot_permutation
from ..device import resolve_device
from ..io import atomic_write, write_json
from ..metrics import energy_distance
from ..probes.memorization import PairSet, evaluate_pairs, save_pairs
from ..probes.straightness import straightness
from ..seeds import seeded_generator
from ..solvers import push_forward
from .build import image_source, make_sampler
from .config import TrainConfig
from .jobs import train_from_config
from .load import checkpoint_config, load_model

__all__ = ["ReflowOptions", "reflow", "reflow_table", "round_config", "pairs_seed_stream", "heldout_seed_stream",
           "HELDOUT_PAIRS", "INIT_CHOICES",
           "MAX_OT_PAIRS", "MAX_OT_PAIRS_IMAGES", "IMAGE_BATCH", "TRAJECTORY_BYTES", "TABLE_COLUMNS"]

#: How round k >= 1 starts: the run's seeded initialisation, or the weights of the previous round's flow.
INIT_CHOICES = ("scratch", "previous")
#: Above this many pairs the exact OT assignment of the pairing probe is skipped (it is cubic in N).
MAX_OT_PAIRS = 20_000
#: The same for image runs (the N x N cost matrix of flattened images is also N^2 D work).
MAX_OT_PAIRS_IMAGES = 4_096
#: Rows per batch when an image run's flow pushes its sources forward.
IMAGE_BATCH = 256
#: The most bytes of trajectories one chunk of the straightness integral may hold.
TRAJECTORY_BYTES = 2**30
#: Fixed-step solvers (straightness integrates on the solver's grid).
FIXED_STEP = ("euler", "midpoint", "heun", "rk4")
#: The columns of the printed table and of report.md.
TABLE_COLUMNS = ("round", "straightness", "transport_cost", "energy_distance", "pairs_ot_recall", "l2_assigned_mean",
                 "nn_acc_assigned", "final_loss")
#: Seed streams (:func:`flowprobe.seeds.derive_seed`): evaluation sources, target draws, round k's sources.
EVAL_SOURCE_STREAM, EVAL_TARGET_STREAM = 1, 2


#: Held-out pairs of the map written per round by default.
HELDOUT_PAIRS = 1000


def pairs_seed_stream(k: int) -> int:
    """The seed stream of round k's N source points x0."""
    return 100 + k


def heldout_seed_stream(k: int) -> int:
    """The seed stream of the sources of round k's held-out pairs."""
    return 1000 + k


@dataclass
class ReflowOptions:
    """``pairs`` N generated pairs per round, ``rounds`` K >= 1, ``init`` scratch or previous, ``seed`` of the
    source draws, ``overrides`` (``key=value``) applied to every round's training config, ``n_eval`` evaluation
    samples (default: the run's ``sample.n``), ``use_ema``: generate with the EMA weights when a run has them,
    ``heldout``: held-out pairs of the map per round (0: none, and then no watch on the rounds)."""

    pairs: int
    rounds: int
    init: str = "scratch"
    seed: int = 0
    overrides: list = field(default_factory=list)
    n_eval: int | None = None
    use_ema: bool = True
    heldout: int = HELDOUT_PAIRS

    def __post_init__(self):
        if not isinstance(self.pairs, int) or self.pairs < 2:
            raise ConfigError(f"--pairs: need at least 2 pairs, got {self.pairs!r}")
        if not isinstance(self.rounds, int) or not 1 <= self.rounds <= 100:
            raise ConfigError(f"--rounds: need 1 to 100 rounds, got {self.rounds!r}")
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"--init: {self.init!r} is not allowed; choose from {', '.join(INIT_CHOICES)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed: need an integer >= 0, got {self.seed!r}")
        if not isinstance(self.heldout, int) or not (self.heldout == 0 or self.heldout >= 2):
            raise ConfigError(f"--heldout-pairs: need 0 (none) or at least 2 held-out pairs, got {self.heldout!r}")
        if self.n_eval is not None and self.n_eval < 2:
            raise ConfigError(f"--eval-n: need at least 2 evaluation samples, got {self.n_eval}")


def _check_base(cfg: TrainConfig, path) -> None:
    if cfg.data.data_kind not in ("toy", "images"):
        raise ConfigError(f"{path}: reflow supports toy and image (data.dataset) runs; this run's data.kind is "
                          f"{cfg.data.data_kind} (own-data runs are not supported yet)")
    if cfg.objective.kind != "cfm" or cfg.sample.solver == "average":
        raise ConfigError(f"{path}: reflow needs a velocity (objective.kind: cfm) run sampled by an ODE solver")


def round_config(base: TrainConfig, pairs_file: Path, init_from: Path | None, overrides: list,
                 heldout_file: Path | None = None) -> TrainConfig:
    """Round k's training config: ``base`` training on the fixed pairs of ``pairs_file`` (``data.pairs``), from
    ``init_from``'s weights when given, with ``overrides`` applied last. With ``heldout_file`` (held-out pairs of the
    same map, ``data.heldout_pairs``) the base run's memorisation watch is carried over; without, it is dropped and
    asking for one is a ConfigError: the watch would compare the map's pairs with fresh draws and read the map as
    memorised (``docs/detector.md``)."""
    data = to_dict(base)
    data["data"].update(pairs=str(Path(pairs_file).resolve()), n_train=None,
                        heldout_pairs=None if heldout_file is None else str(Path(heldout_file).resolve()))
    data["coupling"]["kind"] = "fixed_pairs"
    data["model"]["init"] = None if init_from is None else str(Path(init_from).resolve())
    if heldout_file is None:
        data["watch"]["every"] = None
    cfg = from_dict(TrainConfig, apply_overrides(data, overrides))
    if cfg.data.pairs != data["data"]["pairs"] or cfg.coupling.kind != "fixed_pairs" or \
            cfg.data.heldout_pairs != data["data"]["heldout_pairs"]:
        raise ConfigError("--set: data.pairs, data.heldout_pairs and coupling.kind are set by reflow (the generated "
                          "pairs)")
    if cfg.watch.every is not None and heldout_file is None:
        raise ConfigError("--set watch.every: the memorisation watch on reflow rounds needs held-out pairs of the map "
                          "(--heldout-pairs N > 0)")
    return cfg


def _chunked_straightness(net, x0, method: str, steps: int) -> tuple[dict, torch.Tensor]:
    """The straightness means over all rows of ``x0`` (chunks whose trajectories fit :data:`TRAJECTORY_BYTES`,
    their means weighted by their sizes) and the endpoints."""
    rows = max(1, TRAJECTORY_BYTES // ((steps + 1) * x0[0].numel() * x0.element_size()))
    parts = [straightness(net, x0[s:s + rows], method=method, steps=steps) for s in range(0, x0.shape[0], rows)]
    names = ("straightness", "transport_cost", "kinetic_energy")
    if len(parts) == 1:
        return {n: getattr(parts[0], n) for n in names}, parts[0].x1
    sizes = [p.x1.shape[0] for p in parts]
    means = {n: sum(getattr(p, n) * m for p, m in zip(parts, sizes)) / x0.shape[0] for n in names}
    return means, torch.cat([p.x1 for p in parts])


def _measure(net, cfg: TrainConfig, x0_eval, ref) -> dict:
    method = cfg.sample.solver if cfg.sample.solver in FIXED_STEP else "rk4"
    means, x1 = _chunked_straightness(net, x0_eval, method, cfg.sample.steps)
    return {**means, "energy_distance": energy_distance(x1, ref),
            "energy_distance_source": energy_distance(x0_eval, ref), "measure_solver": method,
            "measure_steps": cfg.sample.steps}


def _generate_pairs(net, cfg: TrainConfig, source, n: int, seed: int, k: int, dev, stream=pairs_seed_stream,
                    ot: bool = True):
    """(x0, x1 = Phi(x0), OT index or None, why it is None) of round k (sources from seed stream ``stream(k)``;
    ``ot`` False: no OT index)."""
    images = cfg.data.data_kind == "images"
    x0, _ = source.sample(n, seeded_generator(seed, stream(k), dev))
    x1 = push_forward(net, x0, method=cfg.sample.solver, steps=cfg.sample.steps,
                      **({"batch_size": IMAGE_BATCH} if images else {}))
    if not ot:
        return x0, x1, None, None
    limit = MAX_OT_PAIRS_IMAGES if images else MAX_OT_PAIRS
    if n > limit:
        return x0, x1, None, f"exact OT assignment skipped: {n} pairs > {limit} (it is cubic in N)"
    return x0, x1, ot_permutation(x0, x1, "lsa"), None


def _evaluation_data(base: TrainConfig, ck, n: int, seed: int, dev):
    """(source law, n seeded source draws, n reference target draws, what the reference is) of a run."""
    if base.data.data_kind == "toy":
        source = make_sampler(base.data.source, base.data.source_params, "source", dev)
        target = make_sampler(base.data.target, base.data.target_params, "target", dev)
        x0_eval, _ = source.sample(n, seeded_generator(seed, EVAL_SOURCE_STREAM, dev))
        ref, _ = target.sample(n, seeded_generator(seed, EVAL_TARGET_STREAM, dev))
        return source, x0_eval, ref, f"{n} held-out target draws"
    shape = (ck.extra or {}).get("shape")
    if not shape:
        raise ConfigError(f"{ck.path}: image checkpoint without the sample shape in its sidecar")
    source = image_source(tuple(shape), dev)
    x0_eval, _ = source.sample(n, seeded_generator(seed, EVAL_SOURCE_STREAM, dev))
    ref, note = _image_reference(base, tuple(shape), n, seeded_generator(seed, EVAL_TARGET_STREAM, dev))
    return source, x0_eval, ref.to(dev), note


def _image_reference(base: TrainConfig, shape: tuple, n: int, generator) -> tuple[torch.Tensor, str]:
    """Up to n real images in [-1, 1] (a seeded draw without replacement): those the run held out (rows >=
    ``data.n_train``) when the dataset has any, else its training images; and which they are."""
    from ..data.images import load_images_for, to_tensor, to_unit

    d = base.data
    images = to_tensor(load_images_for("data.dataset", d.dataset, root=d.root, resolution=d.resolution).images)
    if tuple(images.shape[1:]) != shape:
        raise ConfigError(f"data.dataset: {d.dataset} now decodes to images of shape {tuple(images.shape[1:])}, but "
                          f"the checkpoint's are {shape}")
    held = d.n_train is not None and images.shape[0] > d.n_train
    pool = images[d.n_train:] if held else images
    idx = torch.randperm(pool.shape[0], generator=generator, device=generator.device)[:n].cpu()
    what = "held-out real images (rows >= data.n_train)" if held else "training images (no held-out rows)"
    return to_unit(pool[idx]), f"{idx.numel()} {what}"


def _pairing_probe(net, cfg: TrainConfig, x0, x1, ot) -> dict:
    n = x0.shape[0]
    partners = {"assigned": torch.arange(n, device=x0.device)}
    if ot is not None:
        partners["ot"] = ot
    metrics, _ = evaluate_pairs(net, PairSet(x0, x1, partners), method=cfg.sample.solver, steps=cfg.sample.steps)
    out = {k: v for k, v in metrics.items() if k.startswith(("l2_", "nn_acc_"))}
    out["pairs_ot_recall"] = None if ot is None else (ot == partners["assigned"]).double().mean().item()
    return out


def reflow(checkpoint: str | Path, out: str | Path, options: ReflowOptions, device: str | torch.device | None = None,
           progress: Callable[[str], None] | None = None) -> dict:
    """Run ``options.rounds`` rounds of reflow from ``checkpoint`` into ``out`` (module docstring); returns the
    results (also in ``out/results.json`` and ``out/report.md``). ``progress`` gets one line per step of a round."""
    say = progress or (lambda line: None)
    out, dev = Path(out), resolve_device(device)
    if out.exists() and (not out.is_dir() or any(out.glob("round-*"))):
        raise ConfigError(f"--out: {out} is a file or already holds reflow rounds; choose another folder")
    net, ck = load_model(checkpoint, dev, options.use_ema)
    base = checkpoint_config(ck)
    _check_base(base, ck.path)
    round_config(base, out / "round-1" / "pairs.safetensors", None, options.overrides,  # bad --set stops here
                 out / "round-1" / "heldout_pairs.safetensors" if options.heldout else None)
    n_eval = options.n_eval or base.sample.n
    source, x0_eval, ref, reference = _evaluation_data(base, ck, n_eval, options.seed, dev)
    rows = [{"round": 0, "checkpoint": str(ck.path), "step": ck.step, **_measure(net, base, x0_eval, ref)}]
    say(f"round 0 ({ck.path}): straightness {rows[0]['straightness']:.4g}, energy distance "
        f"{rows[0]['energy_distance']:.4g}")
    previous = ck.path
    for k in range(1, options.rounds + 1):
        rows.append(_round(k, net, previous, base, source, options, out, dev, x0_eval, ref, say))
        net, ck = load_model(out / f"round-{k}", dev, options.use_ema)
        previous = ck.path
    results = {"version": __version__, "checkpoint": str(checkpoint), "out": str(out), "pairs": options.pairs,
               "heldout_pairs": options.heldout, "rounds": options.rounds, "init": options.init, "seed": options.seed,
               "overrides": options.overrides,
               "n_eval": n_eval, "solver": base.sample.solver, "steps": base.sample.steps,
               "data_kind": base.data.data_kind, "energy_distance_reference": reference, "per_round": rows}
    write_json(out / "results.json", results)
    text = _report(results)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    return results


def _round(k, net, previous, base, source, options, out, dev, x0_eval, ref, say) -> dict:
    """Round k: generate the pairs with ``net`` (the flow of round k - 1, ``previous``), train, measure."""
    run_dir = out / f"round-{k}"
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x0, x1, ot, ot_note = _generate_pairs(net, base, source, options.pairs, options.seed, k, dev)
    pairs_file = save_pairs(run_dir / "pairs.safetensors", x0, x1, ot_index=ot, metadata={
        "generator": str(previous), "round": k, "solver": base.sample.solver, "steps": base.sample.steps,
        "seed": options.seed, "seed_stream": pairs_seed_stream(k)})
    say(f"round {k}: {options.pairs} pairs from {previous} -> {pairs_file}")
    heldout_file = None
    if options.heldout:
        h0, h1, _, _ = _generate_pairs(net, base, source, options.heldout, options.seed, k, dev,
                                       stream=heldout_seed_stream, ot=False)
        heldout_file = save_pairs(run_dir / "heldout_pairs.safetensors", h0, h1, metadata={
            "generator": str(previous), "round": k, "role": "held-out pairs of the round's map (never trained on)",
            "solver": base.sample.solver, "steps": base.sample.steps, "seed": options.seed,
            "seed_stream": heldout_seed_stream(k)})
        say(f"round {k}: {options.heldout} held-out pairs of the same map -> {heldout_file}")
    cfg = round_config(base, pairs_file, previous if options.init == "previous" else None, options.overrides,
                       heldout_file)
    result = train_from_config(cfg, run_dir, dev, progress=False)
    trained, ck = load_model(run_dir, dev, options.use_ema)
    row = {"round": k, "checkpoint": str(ck.path), "step": ck.step, "pairs_file": str(pairs_file),
           "heldout_pairs_file": None if heldout_file is None else str(heldout_file),
           "final_loss": result.final_loss, **_measure(trained, cfg, x0_eval, ref),
           **_pairing_probe(trained, cfg, x0, x1, ot), "seconds": time.perf_counter() - t0}
    if ot_note is not None:
        row["pairs_ot_note"] = ot_note
    say(f"round {k}: trained {ck.step} steps (loss {row['final_loss']:.4g}); straightness {row['straightness']:.4g}, "
        f"energy distance {row['energy_distance']:.4g}, pairs OT recall {_fmt(row['pairs_ot_recall'])}")
    return row


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def reflow_table(results: dict) -> str:
    """The per-round table (markdown) of a :func:`reflow` result."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    for r in results["per_round"]:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def _report(results: dict) -> str:
    r0 = results["per_round"][0]
    return "\n".join([
        "# Reflow", "",
        f"From `{results['checkpoint']}`: {results['rounds']} rounds of {results['pairs']} generated pairs "
        f"({results['solver']}, {results['steps']} steps), init {results['init']}, seed {results['seed']}.", "",
        reflow_table(results), "",
        f"straightness and transport cost on {results['n_eval']} fresh sources ({r0['measure_solver']} "
        f"{r0['measure_steps']} steps); energy_distance: squared energy distance of their endpoints (flattened) to "
        f"{results['energy_distance_reference']} (the source draws: {r0['energy_distance_source']:.4g}); "
        "pairs_ot_recall: share of the round's generated pairs that the exact OT assignment keeps; "
        "l2_assigned_mean / nn_acc_assigned: how closely the trained flow reproduces its training pairs.", "",
        *[f"round {r['round']}: {r['pairs_ot_note']}" for r in results["per_round"] if r.get("pairs_ot_note")]])
