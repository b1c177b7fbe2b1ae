"""The schema of a training run: typed dataclasses read from YAML (:func:`flowprobe.config.load_config`).

``TrainConfig`` has the sections data, model, path, coupling, optim, objective and sample; every key is
checked where it is read, with a one-line error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..affine_paths import PATH_KINDS, check_path_params
from ..config import ConfigError, option
from ..nets.embedding import TIME_SCALE
from ..objectives import OBJECTIVES
from ..solvers import METHODS
from ..timesampling import TIME_SAMPLERS, TimeSampler
from ..train.schedule import LR_SCHEDULES
from ..train.step import PRECISIONS, auto_precision_compile, compile_options

__all__ = ["TrainConfig", "DataConfig", "ModelConfig", "PathConfig", "CouplingConfig", "OptimConfig",
           "ObjectiveConfig", "SampleConfig", "LogConfig", "WatchConfig", "resolve_auto", "default_config_path",
           "SAMPLE_SOLVERS", "GRADVAR_TIMES"]

#: what ``sample.solver`` / ``--solver`` accept: the ODE methods, and "average" (jumps of a few-step net)
SAMPLE_SOLVERS = METHODS + ("average",)
#: Upper bounds that keep a typo from allocating the machine away: training steps (the host keeps one float
#: per step), samples / pairs / batch rows, and seeds (derived seeds seed * 1_000_003 + k must fit in 63 bits).
MAX_STEPS = 100_000_000
MAX_ITEMS = 100_000_000
MAX_SEED = 2**40
#: ``data.kind`` values: 2-D toys, image datasets, and the user's own arrays / image folders (runs.own_data).
DATA_KINDS = ("toy", "images", "array", "image_folder")
#: Default times of the gradient-variance log (0.01, 0.1, ..., 0.9, 0.99: see probes.gradvar.parse_times).
GRADVAR_TIMES = "0:1:11"


def _toy_names() -> tuple[str, ...]:
    from ..data.toy import TOY_DISTRIBUTIONS

    return tuple(TOY_DISTRIBUTIONS)


def _unet_presets() -> tuple[str, ...]:
    """The preset names of the UNet and the DiT (each arch checks its own in :func:`flowprobe.nets.model_spec`)."""
    from ..nets.dit import DIT_PRESETS
    from ..nets.unet import UNET_PRESETS

    return tuple(dict.fromkeys([*UNET_PRESETS, *DIT_PRESETS]))


@dataclass
class DataConfig:
    """Source (t = 0) and target (t = 1).

    2-D toys (default): ``source`` and ``target`` from :mod:`flowprobe.data.toy`, with their keyword
    parameters; ``n_train`` draws a finite training set of that many source and target points once (a
    fixed pool; with ``coupling.kind: fixed_pairs`` row i of each is a fixed pair).

    Images: ``dataset`` (a name of :data:`flowprobe.data.images.DATASETS` such as "cifar10" or "celeba", or a
    tar / folder path; ``root`` is the data root for names) is the target, kept as uint8 on the device and
    drawn by :class:`~flowprobe.data.images.ImageSampler` (random horizontal flips with ``flip``), at
    ``resolution`` (downsampled; default native); the source is N(0, I) of the image shape. ``n_train``
    keeps the first N images; with ``fixed_pairs`` image i is paired with a fixed noise x0_i.

    Your own data (:mod:`flowprobe.runs.own_data`): ``kind: array`` reads ``target_path``, a ``.npy``, ``.npz``,
    ``.safetensors`` (``FILE:KEY`` picks an entry) or ``.csv`` of vectors (or images); ``kind: image_folder`` reads
    a folder (or tar) of images, labels from the sub-folder names, centre-cropped and resized to ``resolution``.
    ``source_path`` (same kind) is the source, else N(0, I) of the target's shape. ``labels``: a label file
    (``y.npy``, ``y.npz:key``), an entry of the target's .npz / .safetensors, or a CSV column (name or index).
    ``heldout_fraction``: that share of the rows is held out by a seeded split, never trained on, recorded in the
    run's ``split.json`` and used by ``flowprobe diagnose RUN``. ``standardize: true``: vectors standardised per
    feature with the training rows' mean and std (``flowprobe sample`` maps samples back). ``kind`` unset: toy,
    or images when ``dataset`` is set.

    ``pairs`` (toys, images): a pairs file (:func:`flowprobe.probes.memorization.save_pairs`) as the training
    set instead of ``n_train`` draws: its ``x0`` and ``x1`` are the source and target pools (with ``fixed_pairs``
    row i is a pair, e.g. the (x0, Phi(x0)) pairs of ``flowprobe reflow``); ``source`` and ``target`` still name
    the laws that evaluation and sampling draw from, so the rows must have their sample shape. Images (``dataset``
    set): x0 noises and x1 images (floats in [-1, 1]) of the run's image shape (after ``resolution``); the
    dataset is still decoded, as the target that evaluation compares with. ``heldout_pairs`` (with ``pairs`` whose
    rows come from a deterministic map x1 = G(x0), such as reflow's): a pairs file of held-out pairs of the same map,
    never trained on; the memorisation watch and ``flowprobe diagnose RUN`` compare the training pairs with them
    (``flowprobe reflow`` writes them for every round)."""

    source: str = option("eight_gaussians", choices=_toy_names())
    target: str = option("moons", choices=_toy_names())
    source_params: dict = option(default_factory=dict)
    target_params: dict = option(default_factory=dict)
    n_train: int | None = option(None, ge=1, le=MAX_ITEMS)
    dataset: str | None = option(None, help="image dataset name or path (images instead of 2-D toys)")
    root: str | None = option(None, help="data root for dataset names (default $FLOWPROBE_DATA or ../shared/data)")
    resolution: int | None = option(None, ge=1, help="image side after downsampling (default: native)")
    flip: bool = option(True, help="random horizontal flips of training images")
    pairs: str | None = option(None, help="toys, images: a pairs file (x0, x1) as the training set")
    heldout_pairs: str | None = option(None, help="with data.pairs from a map: held-out pairs of the same map")
    kind: str | None = option(None, choices=DATA_KINDS, help="toy, images, array or image_folder (default: toy, or "
                                                             "images when dataset is set)")
    target_path: str | None = option(None, help="kind array / image_folder: the target's file or folder")
    source_path: str | None = option(None, help="kind array / image_folder: the source's (default N(0, I))")
    labels: str | int | None = option(None, help="kind array: a label file, FILE:KEY, an entry name or a CSV column "
                                                 "(name or 0-based index)")
    heldout_fraction: float | None = option(None, ge=0, lt=1, help="share of rows held out (seeded split)")
    standardize: bool | None = option(None, help="true: standardise vectors with the training rows' mean/std")

    @property
    def data_kind(self) -> str:
        """The kind in effect: ``kind``, else "images" when ``dataset`` is set, else "toy"."""
        return self.kind or ("images" if self.dataset is not None else "toy")


@dataclass
class ModelConfig:
    """The velocity network.

    ``arch="mlp"``: an MLP on [x, sinusoidal embedding of 1000 t] (``width`` x ``depth``), on the flattened
    sample for images. ``arch="unet"`` (images only): :func:`flowprobe.nets.unet.unet_preset` ``preset`` with
    ``image_size`` and ``in_channels`` set from the data and the optional overrides (None keeps the preset's
    value); attention resolutions the image does not reach are dropped. ``time_scale``: the embedding sees
    ``time_scale`` t (and the step h); MeanFlow's JVP differentiates through it, and 1000 made MeanFlow diverge
    on a 2-D Gaussian where 10 or less trained well (docs/neighbours.md). ``arch="dit"`` (images only):
    :func:`flowprobe.nets.dit.dit_preset` ``preset`` (same names as the UNet's) with the overrides ``patch_size``,
    ``hidden_size``, ``num_blocks`` (its depth) and ``num_heads`` (docs/dit.md). ``init``: a checkpoint (file,
    checkpoints/ folder or run folder) of the same architecture whose weights, the EMA copy when it has one,
    training starts from instead of the seeded initialisation (e.g. ``flowprobe reflow --init previous``).
    ``num_classes`` = K: a class-conditional net (mlp, unet, dit) trained on the data's labels (``data.labels`` or an
    image folder's sub-folders), each label replaced by the null label with probability ``label_dropout`` (default
    0.1), so that ``flowprobe sample --label K --guidance W`` draws with classifier-free guidance
    (:mod:`flowprobe.guidance`)."""

    arch: str = option("mlp", choices=("mlp", "unet", "dit"))
    width: int = option(256, ge=1, le=65536)
    depth: int = option(3, ge=1, le=1024)
    time_embed_dim: int = option(32, ge=0, le=65536, help="0 (raw t) or an even number >= 2")
    activation: str = option("silu", choices=("silu", "relu", "gelu", "tanh", "selu"))
    preset: str = option("cifar10", choices=_unet_presets())
    model_channels: int | None = option(None, ge=1)
    channel_mult: list[int] | None = option(None, ge=1)
    num_res_blocks: int | None = option(None, ge=1)
    attention_resolutions: list[int] | None = option(None, ge=1, min_len=0)
    dropout: float | None = option(None, ge=0, lt=1)
    time_scale: float = option(TIME_SCALE, gt=0, le=1e6)
    num_classes: int | None = option(None, ge=1, le=1_000_000, help="class-conditional net over labels 0..K-1")
    label_dropout: float | None = option(None, ge=0, le=1, help="share of labels replaced by the null label "
                                                                "(default 0.1 with num_classes)")
    init: str | None = option(None, help="checkpoint whose weights (the EMA copy when present) training starts from")
    patch_size: int | None = option(None, ge=1, help="DiT: patch side")
    hidden_size: int | None = option(None, ge=4, le=65536, help="DiT: token width")
    num_blocks: int | None = option(None, ge=1, le=1024, help="DiT: number of transformer blocks")
    num_heads: int | None = option(None, ge=1, help="DiT: attention heads")


@dataclass
class PathConfig:
    """The interpolant x_t = a(t) x0 + b(t) x1 + g(t) z. ``kind`` sets (a, b) (:mod:`flowprobe.affine_paths`,
    docs/schedules.md): linear (rectified flow), cosine, polynomial (``params.n``), vp (``params.beta_min``,
    ``params.beta_max``) or linear_vp. ``sigma`` and ``schedule`` set the noise: sigma = 0 none; sigma > 0 adds
    g(t) z with g = sigma (constant) or sigma sqrt(t (1 - t)) (bridge)."""

    sigma: float = option(0.0, ge=0, le=1e4)
    schedule: str = option("constant", choices=("constant", "bridge"))
    kind: str = option("linear", choices=PATH_KINDS)
    params: dict = option(default_factory=dict)

    def __post_init__(self):
        try:
            check_path_params(self.kind, self.params)
        except ValueError as e:
            raise ConfigError(f"path.params: {e}") from None


@dataclass
class CouplingConfig:
    """How pairs are drawn: independent, minibatch OT (exact, lsa or sinkhorn with ``reg``), or fixed pairs
    (needs ``data.n_train``). ``weight_epsilon``: weight each pair's loss by exp(-||x0 - x1||^2 / eps) (weighted
    CFM, :class:`flowprobe.couplings.WeightedCoupling`; the trained marginals are tilted, docs/neighbours.md)."""

    kind: str = option("independent", choices=("independent", "minibatch_ot", "fixed_pairs"))
    method: str = option("exact", choices=("exact", "lsa", "sinkhorn"))
    reg: float = option(0.05, gt=0)
    weight_epsilon: float | None = option(None, gt=0)


@dataclass
class OptimConfig:
    """AdamW with warm-up, constant or cosine decay, gradient clipping and weight decay. The implementation
    is fused on CUDA and foreach elsewhere (:func:`flowprobe.train.step.make_optimizer`); ``fused: true`` forces
    the fused kernel."""

    lr: float = option(1e-3, gt=0)
    warmup: int = option(0, ge=0)
    lr_schedule: str = option("constant", choices=LR_SCHEDULES)
    grad_clip: float | None = option(None, gt=0)
    weight_decay: float = option(0.0, ge=0)
    fused: bool = False


@dataclass
class ObjectiveConfig:
    """What the net learns: ``cfm`` (the velocity) or a few-step objective that learns the average velocity
    u(t, x, h) over [t, t + h] (``meanflow``: a JVP of the net; ``splitmeanflow``: interval splitting), which
    gives the net a step input (``step_embed``) and samples in a few jumps with ``sample.solver: average``.
    ``jump_fraction``: share of samples with h > 0 (the rest train h = 0, the CFM loss); ``adaptive_power``:
    MeanFlow's loss weight 1 / (loss + 1e-3)^p. ``time_sampling`` (uniform, logit_normal, mode, u_shaped) with
    ``time_params``: the density of the training time t (:mod:`flowprobe.timesampling`, docs/schedules.md)."""

    kind: str = option("cfm", choices=OBJECTIVES)
    jump_fraction: float = option(0.25, ge=0, le=1)
    adaptive_power: float = option(0.0, ge=0)
    time_sampling: str = option("uniform", choices=TIME_SAMPLERS,
                                help="density of the training t (docs/schedules.md); few-step: both interval ends")
    time_params: dict = option(default_factory=dict, help="logit_normal: m, s; mode: s; u_shaped: a")

    def __post_init__(self):
        try:
            TimeSampler(self.time_sampling, **self.time_params)
        except ValueError as e:
            raise ConfigError(f"objective.time_params: {e}") from None
        except TypeError:  # a non-string key
            raise ConfigError(f"objective.time_params: keys must be names, got {self.time_params!r}") from None


@dataclass
class SampleConfig:
    """Samples drawn after training: ``n`` points integrated with ``solver`` over ``steps`` steps;
    ``trajectories`` of them are drawn as paths in the plot (2-D), or the first ``grid`` images are written as
    a PNG grid (images)."""

    n: int = option(2000, ge=1, le=MAX_ITEMS)
    steps: int = option(100, ge=1, le=100_000)
    solver: str = option("euler", choices=SAMPLE_SOLVERS)
    trajectories: int = option(256, ge=0)
    grid: int = option(64, ge=1)
    plot: bool = True


@dataclass
class LogConfig:
    """Where the metrics go besides ``metrics.jsonl`` (the record of the run; how often: the top-level
    ``log_every``). ``tensorboard``: also write them as TensorBoard scalars into ``<run>/tensorboard/``
    (:class:`flowprobe.train.tensorboard.TensorBoardLog`; needs the ``tensorboard`` package)."""

    tensorboard: bool = False


@dataclass
class WatchConfig:
    """The memorisation watch (:class:`flowprobe.watch.MemorizationWatch`, ``docs/detector.md``) on the run:
    off unless ``every`` is set (steps between readings). Its readings go to metrics.jsonl (event "watch") and,
    with ``log.tensorboard``, to TensorBoard. ``on_fire``: warn, or stop training (the command exits with 4, the
    checkpoints written so far kept). ``n_probe`` training and held-out samples a group; ``copy_every`` steps
    between copy checks (default 4 ``every``; 0: none); ``n_heldout`` held-out samples drawn or loaded (the probes
    and the copy check's baseline); ``early``: the early-warning thresholds per kind of training (earlier flags on
    copying, more late false alarms; ``docs/detector.md``). The training samples are the run's (its pool, images or
    fixed pairs); the held-out ones are those ``flowprobe diagnose`` would use for the run."""

    every: int | None = option(None, ge=1)
    on_fire: str = option("warn", choices=("warn", "stop"))
    n_probe: int = option(64, ge=2, le=100_000)
    copy_every: int | None = option(None, ge=0)
    n_heldout: int = option(512, ge=2, le=1_000_000)
    early: bool = False


@dataclass
class TrainConfig:
    """A whole training run. Sections: data, model, path, coupling, optim, sample, objective, log, watch.

    ``precision``: fp32, tf32, bf16 or auto (bf16 on CUDA, else fp32). ``compile``: false, true, a
    ``torch.compile`` mode ("reduce-overhead" = CUDA graphs), a backend name, or auto ("reduce-overhead"
    on CUDA, else off); see :func:`flowprobe.train.step.compile_options`."""

    data: DataConfig = option(default_factory=DataConfig)
    model: ModelConfig = option(default_factory=ModelConfig)
    path: PathConfig = option(default_factory=PathConfig)
    coupling: CouplingConfig = option(default_factory=CouplingConfig)
    optim: OptimConfig = option(default_factory=OptimConfig)
    sample: SampleConfig = option(default_factory=SampleConfig)
    objective: ObjectiveConfig = option(default_factory=ObjectiveConfig)
    log: LogConfig = option(default_factory=LogConfig)
    watch: WatchConfig = option(default_factory=WatchConfig)
    reduction: str = option("mean", choices=("mean", "sum"))
    ema_decay: float | None = option(None, ge=0, lt=1)
    precision: str = option("fp32", choices=PRECISIONS + ("auto",))
    compile: bool | str = False
    steps: int = option(2000, ge=1, le=MAX_STEPS)
    batch_size: int = option(256, ge=1, le=MAX_ITEMS)
    seed: int = option(0, ge=0, le=MAX_SEED)
    log_every: int = option(100, ge=1)
    ckpt_every: int | None = option(None, ge=1)
    ckpt_keep: int | None = option(None, ge=1)
    gradvar_every: int | None = option(None, ge=1)
    gradvar_times: str = GRADVAR_TIMES
    gradvar_samples: int = option(256, ge=2)

    def __post_init__(self):
        from ..probes.gradvar import parse_times

        if self.model.time_embed_dim not in (0,) and (self.model.time_embed_dim < 2 or self.model.time_embed_dim % 2):
            raise ConfigError(f"model.time_embed_dim: must be 0 (raw t) or an even number >= 2, got "
                              f"{self.model.time_embed_dim}")
        if self.data.dataset is not None and not self.data.dataset.strip():
            raise ConfigError("data.dataset: empty; give a dataset name (cifar10, celeba) or a path, or leave it unset")
        try:
            parse_times(self.gradvar_times)
        except ValueError as e:
            raise ConfigError(f"gradvar_times: {e}") from None
        _data_checks(self)
        _pairs_and_init_checks(self)
        if self.coupling.kind == "fixed_pairs" and self.data.n_train is None and self.data.pairs is None and \
                self.data.data_kind in ("toy", "images"):
            raise ConfigError("coupling.kind: fixed_pairs needs data.n_train (the number of fixed pairs)")
        if self.sample.solver == "average" and self.objective.kind == "cfm":
            raise ConfigError("sample.solver: average needs a few-step objective (objective.kind: meanflow or "
                              "splitmeanflow); a cfm net has no step input")
        if self.model.label_dropout is not None and not self.model.num_classes:
            raise ConfigError("model.label_dropout: only read by a class-conditional net (set model.num_classes)")
        if self.model.num_classes and self.data.data_kind not in ("array", "image_folder"):
            raise ConfigError("model.num_classes: a class-conditional net needs labelled data (data.kind: array with "
                              "data.labels, or image_folder)")
        if self.model.arch in ("unet", "dit") and self.data.data_kind == "toy":
            raise ConfigError(f"model.arch: {self.model.arch} needs image data (set data.dataset) or use arch: mlp")
        if self.compile != "auto":
            try:
                compile_options(self.compile)
            except ValueError as e:
                raise ConfigError(f"compile: {e}; or auto") from None


def _data_checks(cfg: TrainConfig) -> None:
    """The data keys that belong together: a kind's file, and the keys no other kind reads."""
    d, kind = cfg.data, cfg.data.data_kind
    if kind in ("array", "image_folder"):
        if not (d.target_path or "").strip():
            raise ConfigError(f"data.target_path: data.kind: {kind} needs the target's "
                              f"{'file' if kind == 'array' else 'folder'}")
        if d.dataset is not None:
            raise ConfigError(f"data.dataset: not read with data.kind: {kind}; give the data as data.target_path")
        if kind == "image_folder" and d.labels is not None:
            raise ConfigError("data.labels: an image folder's labels are its sub-folder names; remove data.labels")
        return
    if kind == "toy" and d.dataset is not None:
        raise ConfigError("data.kind: toy does not read data.dataset; set data.kind: images or remove data.dataset")
    if kind == "images" and d.dataset is None:
        raise ConfigError("data.dataset: data.kind: images needs a dataset name or path")
    for name in ("target_path", "source_path", "labels", "heldout_fraction", "standardize"):
        if getattr(d, name) not in (None, False):
            raise ConfigError(f"data.{name}: only read with data.kind: array or image_folder (this run's kind is "
                              f"{kind})")



def _pairs_and_init_checks(cfg: TrainConfig) -> None:
    """``data.pairs`` (a toy or image run's training set from a pairs file) and ``model.init`` (starting
    weights)."""
    for key, value in (("data.pairs", cfg.data.pairs), ("data.heldout_pairs", cfg.data.heldout_pairs),
                       ("model.init", cfg.model.init)):
        if value is not None and not value.strip():
            raise ConfigError(f"{key}: empty; give a file path or leave it unset")
    if cfg.data.heldout_pairs is not None and (cfg.data.pairs is None or cfg.coupling.kind != "fixed_pairs"):
        raise ConfigError("data.heldout_pairs: held-out pairs of a map go with its training pairs (data.pairs with "
                          "coupling.kind: fixed_pairs)")
    if cfg.data.pairs is not None and cfg.data.data_kind not in ("toy", "images"):
        raise ConfigError(f"data.pairs: a pairs file is the training set of a toy or image (data.dataset) run; this "
                          f"run's data.kind is {cfg.data.data_kind}")
    if cfg.data.pairs is not None and cfg.data.n_train is not None:
        raise ConfigError("data.pairs and data.n_train exclude each other: the pairs file is the training set")


def resolve_auto(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with precision/compile "auto" made concrete for ``device``: bf16 and "reduce-overhead" (CUDA
    graphs) on CUDA, fp32 and no compilation elsewhere."""
    precision, compile = auto_precision_compile(cfg.precision, cfg.compile, device)
    return replace(cfg, precision=precision, compile=compile)


def default_config_path() -> Path:
    """The packaged toy config (``flowprobe/configs/toy.yaml``)."""
    from importlib.resources import files

    return Path(str(files("flowprobe") / "configs" / "toy.yaml"))

