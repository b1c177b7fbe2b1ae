"""The schema of a training run: typed dataclasses read from YAML (:func:`flowprobe.config.load_config`).

``TrainConfig`` has the sections data, model, path, coupling, optim, objective and sample; every key is
checked where it is read, with a one-line error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import ConfigError, option
from ..nets.embedding import TIME_SCALE
from ..objectives import OBJECTIVES
from ..solvers import METHODS
from ..train.schedule import LR_SCHEDULES
from ..train.step import PRECISIONS, auto_precision_compile, compile_options

__all__ = ["TrainConfig", "DataConfig", "ModelConfig", "PathConfig", "CouplingConfig", "OptimConfig",
           "ObjectiveConfig", "SampleConfig", "resolve_auto", "default_config_path", "SAMPLE_SOLVERS",
           "GRADVAR_TIMES"]

#: what ``sample.solver`` / ``--solver`` accept: the ODE methods, and "average" (jumps of a few-step net)
SAMPLE_SOLVERS = METHODS + ("average",)
#: Upper bounds that keep a typo from allocating the machine away: training steps (the host keeps one float
#: per step), samples / pairs / batch rows, and seeds (derived seeds seed * 1_000_003 + k must fit in 63 bits).
MAX_STEPS = 100_000_000
MAX_ITEMS = 100_000_000
MAX_SEED = 2**40
#: Default times of the gradient-variance log (0.01, 0.1, ..., 0.9, 0.99: see probes.gradvar.parse_times).
GRADVAR_TIMES = "0:1:11"


def _toy_names() -> tuple[str, ...]:
    from ..data.toy import TOY_DISTRIBUTIONS

    return tuple(TOY_DISTRIBUTIONS)


def _unet_presets() -> tuple[str, ...]:
    from ..nets.unet import UNET_PRESETS

    return tuple(UNET_PRESETS)


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
    keeps the first N images; with ``fixed_pairs`` image i is paired with a fixed noise x0_i."""

    source: str = option("eight_gaussians", choices=_toy_names())
    target: str = option("moons", choices=_toy_names())
    source_params: dict = option(default_factory=dict)
    target_params: dict = option(default_factory=dict)
    n_train: int | None = option(None, ge=1, le=MAX_ITEMS)
    dataset: str | None = option(None, help="image dataset name or path (images instead of 2-D toys)")
    root: str | None = option(None, help="data root for dataset names (default $FLOWPROBE_DATA or ../shared/data)")
    resolution: int | None = option(None, ge=1, help="image side after downsampling (default: native)")
    flip: bool = option(True, help="random horizontal flips of training images")


@dataclass
class ModelConfig:
    """The velocity network.

    ``arch="mlp"``: an MLP on [x, sinusoidal embedding of 1000 t] (``width`` x ``depth``), on the flattened
    sample for images. ``arch="unet"`` (images only): :func:`flowprobe.nets.unet.unet_preset` ``preset`` with
    ``image_size`` and ``in_channels`` set from the data and the optional overrides (None keeps the preset's
    value); attention resolutions the image does not reach are dropped. ``time_scale``: the embedding sees
    ``time_scale`` t (and the step h); MeanFlow's JVP differentiates through it, and 1000 made MeanFlow diverge
    on a 2-D Gaussian where 10 or less trained well (docs/neighbours.md)."""

    arch: str = option("mlp", choices=("mlp", "unet"))
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


@dataclass
class PathConfig:
    """The interpolant: sigma = 0 is the straight line (rectified flow); sigma > 0 adds g(t) z with
    g = sigma (constant) or sigma sqrt(t (1 - t)) (bridge)."""

    sigma: float = option(0.0, ge=0, le=1e4)
    schedule: str = option("constant", choices=("constant", "bridge"))


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
    MeanFlow's loss weight 1 / (loss + 1e-3)^p."""

    kind: str = option("cfm", choices=OBJECTIVES)
    jump_fraction: float = option(0.25, ge=0, le=1)
    adaptive_power: float = option(0.0, ge=0)


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
class TrainConfig:
    """A whole training run. Sections: data, model, path, coupling, optim, sample.

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
        if self.coupling.kind == "fixed_pairs" and self.data.n_train is None:
            raise ConfigError("coupling.kind: fixed_pairs needs data.n_train (the number of fixed pairs)")
        if self.sample.solver == "average" and self.objective.kind == "cfm":
            raise ConfigError("sample.solver: average needs a few-step objective (objective.kind: meanflow or "
                              "splitmeanflow); a cfm net has no step input")
        if self.model.arch == "unet" and self.data.dataset is None:
            raise ConfigError("model.arch: unet needs image data (set data.dataset) or use arch: mlp")
        if self.compile != "auto":
            try:
                compile_options(self.compile)
            except ValueError as e:
                raise ConfigError(f"compile: {e}; or auto") from None


def resolve_auto(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with precision/compile "auto" made concrete for ``device``: bf16 and "reduce-overhead" (CUDA
    graphs) on CUDA, fp32 and no compilation elsewhere."""
    precision, compile = auto_precision_compile(cfg.precision, cfg.compile, device)
    return replace(cfg, precision=precision, compile=compile)


def default_config_path() -> Path:
    """The packaged toy config (``flowprobe/configs/toy.yaml``)."""
    from importlib.resources import files

    return Path(str(files("flowprobe") / "configs" / "toy.yaml"))

