"""Building a run from its config: the data and coupling, the net, the objective."""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..nets.factory import build_net, model_spec
from ..objectives import make_objective
from .config import TrainConfig

__all__ = ["build_data", "build_objective", "build_path", "build_run", "build_config_net", "run_model_spec",
           "make_sampler", "image_source"]


def make_sampler(name: str, params: dict, key: str, device, dtype=torch.float32):
    from ..data.toy import make_toy

    try:
        return make_toy(name, device=device, dtype=dtype, **params)
    except TypeError as e:
        raise ConfigError(f"data.{key}_params: {e}") from None
    except ValueError as e:
        raise ConfigError(f"data.{key}_params: {e}") from None




def run_model_spec(cfg: TrainConfig, shape: tuple[int, ...] | list[int]) -> dict:
    """:func:`model_spec` of a training config: its model, with a step input when its objective needs one."""
    return model_spec(cfg.model, shape, step_embed=cfg.objective.kind != "cfm")


def image_source(shape, device):
    from ..couplings import GaussianSampler

    return GaussianSampler(tuple(shape), device=device)


def build_data(cfg: TrainConfig, device: str | torch.device = "cpu", progress: bool = False):
    """(coupling, source, target, sample shape) of a config, on ``device``.

    Toys: with ``data.n_train`` the finite pools are drawn once from a generator seeded with seed + 1; with
    ``data.pairs`` they are the rows of that pairs file.
    Images: the dataset is decoded (cached) to uint8 on ``device``; fixed pairs use noises x0_i fixed per
    index (:func:`flowprobe.data.images.fixed_noise`, seed + 1) paired with image i; with ``data.pairs`` the
    training set is that file's (x0, x1) (:func:`flowprobe.runs.reuse.pairs_coupling`) and the dataset is only
    the target that evaluation compares with.
    Own files (``data.kind: array | image_folder``): :func:`flowprobe.runs.own_data.build_own_data`.
    """
    from ..couplings import FixedPairs, IndependentCoupling, MinibatchOTCoupling, TensorSampler

    device = torch.device(device)
    kind = cfg.coupling.kind
    if cfg.data.data_kind in ("array", "image_folder"):  # the user's own files (runs.own_data)
        from .own_data import build_own_data, with_labels

        coupling, source, target, shape = build_own_data(cfg, device, progress)
        return with_labels(_weighted(coupling, cfg), cfg, target), source, target, shape
    if cfg.data.dataset is not None:
        from ..data.images import ImageSampler, IndexedPairs, fixed_noise, load_images, to_tensor

        try:
            data = load_images(cfg.data.dataset, root=cfg.data.root, resolution=cfg.data.resolution,
                               limit=cfg.data.n_train, progress=progress)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.dataset: {e}") from None
        images = to_tensor(data.images, device)
        shape = tuple(images.shape[1:])
        source, target = image_source(shape, device), ImageSampler(images, flip=cfg.data.flip)
        if cfg.data.pairs is not None:  # a pairs file is the training set; the dataset stays the reference
            from .reuse import pairs_coupling

            coupling = pairs_coupling(cfg.data.pairs, source, kind, cfg.coupling.method, cfg.coupling.reg, device)
            return _weighted(coupling, cfg), source, target, shape
        if kind == "independent":
            coupling = IndependentCoupling(source, target)
        elif kind == "minibatch_ot":
            coupling = MinibatchOTCoupling(source, target, cfg.coupling.method, cfg.coupling.reg)
        else:
            coupling = IndexedPairs(fixed_noise(len(images), shape, seed=cfg.seed + 1, device=device), images)
        return _weighted(coupling, cfg), source, target, shape
    source = make_sampler(cfg.data.source, cfg.data.source_params, "source", device)
    target = make_sampler(cfg.data.target, cfg.data.target_params, "target", device)
    src, tgt = source, target
    if cfg.data.n_train is not None:
        g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        x0, _ = source.sample(cfg.data.n_train, g)
        x1, _ = target.sample(cfg.data.n_train, g)
        src, tgt = TensorSampler(x0), TensorSampler(x1)
    elif cfg.data.pairs is not None:  # a pairs file is the training set (runs.reuse)
        from .reuse import pairs_pools

        x0, x1 = pairs_pools(cfg.data.pairs, source, device)
        src, tgt = TensorSampler(x0), TensorSampler(x1)
    if kind == "independent":
        coupling = IndependentCoupling(src, tgt)
    elif kind == "minibatch_ot":
        coupling = MinibatchOTCoupling(src, tgt, cfg.coupling.method, cfg.coupling.reg)
    else:
        coupling = FixedPairs(src.data, tgt.data)
    return _weighted(coupling, cfg), source, target, (2,)


def _weighted(coupling, cfg: TrainConfig):
    from ..couplings import WeightedCoupling

    eps = cfg.coupling.weight_epsilon
    return coupling if eps is None else WeightedCoupling(coupling, eps)


def build_path(cfg: TrainConfig):
    """The path of the config: ``path.kind`` with ``path.params``, noise ``path.sigma`` / ``path.schedule``."""
    from ..affine_paths import make_scheduled_path

    p = cfg.path
    return make_scheduled_path(p.kind, p.params, p.sigma, p.schedule)


def build_objective(cfg: TrainConfig):
    """The objective of the config (``objective.kind``) on its path (:func:`build_path`), with its loss reduction
    and its time density (``objective.time_sampling``, ``objective.time_params``)."""
    from ..timesampling import TimeSampler

    o = cfg.objective
    options = {} if o.kind == "cfm" else {"jump_fraction": o.jump_fraction, "adaptive_power": o.adaptive_power}
    sampler = TimeSampler(o.time_sampling, **o.time_params)
    return make_objective(o.kind, build_path(cfg), cfg.reduction, time_sampler=sampler, **options)


def build_config_net(cfg: TrainConfig, spec: dict) -> torch.nn.Module:
    """``build_net(spec, cfg.seed)``, with an architecture the settings cannot build (channels that GroupNorm or the
    attention heads cannot divide, a patch size that does not tile the image, ...) as a one-line ConfigError."""
    try:
        return build_net(spec, cfg.seed)
    except (ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"model: the {spec.get('class', 'net')} cannot be built from these settings: "
                          f"{first}") from None


def build_run(cfg: TrainConfig, device: str | torch.device = "cpu"):
    """(net, coupling, objective, source, target) for a config, on ``device``; the net is
    ``build_net(model_spec(cfg.model, shape), cfg.seed)`` (see :func:`build_data` for the data)."""
    coupling, source, target, shape = build_data(cfg, device)
    net = build_config_net(cfg, run_model_spec(cfg, shape)).to(device)
    return net, coupling, build_objective(cfg), source, target
