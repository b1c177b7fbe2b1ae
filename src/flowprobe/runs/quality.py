"""``flowprobe quality``: how generated samples compare with real ones (precision, recall, density, coverage,
Frechet distance, KID), in the samples' own space and in the feature spaces the user names.

GENERATED is a DATA argument (:func:`flowprobe.data.arrays.load_data`: ``.npy`` / ``.npz`` / ``.safetensors``,
an image folder or tar, a built-in name) or a flowprobe checkpoint file or run folder, which is sampled with
:func:`flowprobe.runs.jobs.sample_checkpoint` (``steps`` and ``solver`` of :class:`QualityOptions`; as many
samples as the real set holds unless ``n`` says). REAL is a DATA argument. Both are in model space (images in
[-1, 1], channels first).

The spaces, each with every statistic of :mod:`flowprobe.probes.quality`:

- ``input``: the samples themselves, flattened (pixels for images). The Frechet distance is skipped above
  ``max_frechet_dim`` values (a d x d covariance and its eigendecomposition);
- ``features``: a feature map ``fn(x) -> (N, F)``, given as a callable or ``"package.module:fn"``
  (:func:`flowprobe.runs.diagnose.resolve_features`, the resolver of ``diagnose --features``);
- ``inception``: torch-fidelity's InceptionV3 (the TF-FID network, 2048 pool features of uint8 images resized to
  299 x 299) from a local weights file (``inception_weights``): nothing is downloaded. The file is read without
  unpickling code (:func:`flowprobe.adapters.weights.read_weights`: safetensors or ``torch.load(weights_only=True)``)
  and handed to torch-fidelity as a private copy that its own loader reads with weights-only loading forced.
  Needs ``pip install torch-fidelity`` (the ``fid`` extra); without it, or with a wrong file, a one-line
  ConfigError. Its Frechet distance is the FID, comparable to published numbers under the conditions of
  docs/quality.md.

Generated samples with non-finite values are dropped and counted. Writes ``OUT/results.json`` (atomic).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import __version__
from ..config import ConfigError
from ..device import resolve_device
from ..io import write_json
from ..probes.quality import (QUALITY_K, frechet_distance, kernel_inception_distance,
                              precision_recall_density_coverage)
from ..seeds import seeded_generator

__all__ = ["QualityOptions", "quality", "load_generated", "inception_feature_map", "to_uint8_rgb", "space_metrics",
           "QUALITY_FORMAT", "INCEPTION_LAYER", "METRICS"]

QUALITY_FORMAT = "flowprobe-quality-1"
#: torch-fidelity's name of the InceptionV3 pool features FID is computed on.
INCEPTION_LAYER = "2048"
#: The statistics of every space, in the order the table shows them.
METRICS = ("precision", "recall", "density", "coverage", "frechet_distance", "kid", "kid_std")


@dataclass(frozen=True)
class QualityOptions:
    """``k``: neighbourhood of the k-NN balls; ``n``: at most this many samples of each set (a checkpoint draws
    this many; default: as many as the real set); ``kid_subsets`` / ``kid_subset_size``: KID's subsets (the size is
    capped at the smaller set); ``max_frechet_dim``: skip the Frechet distance in a space with more values;
    ``batch_size``: of feature maps; ``steps`` / ``solver``: of checkpoint sampling; ``seed``: KID subsets and
    checkpoint sampling."""

    k: int = QUALITY_K
    n: int | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    max_frechet_dim: int = 4096
    batch_size: int = 256
    steps: int = 100
    solver: str = "euler"
    seed: int = 0

    def __post_init__(self):
        if self.k < 1 or (self.n is not None and self.n < 2) or self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ConfigError(f"options: need k >= 1, n >= 2, kid_subsets >= 1 and kid_subset_size >= 2, got "
                              f"k={self.k}, n={self.n}, kid_subsets={self.kid_subsets}, "
                              f"kid_subset_size={self.kid_subset_size}")


def _checkpoint_of(spec) -> Path | None:
    """The checkpoint a GENERATED argument names, or None when it names data."""
    from ..checkpoint import resolve_checkpoint

    path = Path(str(spec)).expanduser()
    if not path.exists():
        return None
    try:
        return resolve_checkpoint(path)
    except ConfigError:  # not a checkpoint: an array file, an image folder, ...
        return None


def load_generated(spec, options: QualityOptions, device, draws: int) -> tuple[Tensor, dict]:
    """(samples, info) of GENERATED: DATA read (the first ``options.n``), or a checkpoint sampled (``options.n``
    draws, else ``draws``)."""
    from ..data.arrays import load_data

    if isinstance(spec, Tensor):
        return spec[:options.n], {"source": "in-memory", "kind": "images" if spec.dim() == 4 else "vectors"}
    checkpoint = _checkpoint_of(spec)
    if checkpoint is None:
        samples = load_data(spec, limit=options.n, seed=options.seed, stream=1)
        if samples.kind == "pairs":
            raise ConfigError(f"{spec}: a pairs file is not a set of generated samples")
        return samples.x, {"source": str(spec), "kind": samples.kind, **samples.info}
    from .jobs import sample_checkpoint

    res, info, _ = sample_checkpoint(checkpoint, options.n or draws, options.steps, options.solver, options.seed,
                                     device)
    x = res.x.float()
    return x, {"source": str(spec), "kind": "images" if x.dim() == 4 else "vectors", "loader": "checkpoint", **info}


def _load_real(spec, options: QualityOptions) -> tuple[Tensor, dict]:
    from ..data.arrays import load_data

    if isinstance(spec, Tensor):
        return spec[:options.n], {"source": "in-memory", "kind": "images" if spec.dim() == 4 else "vectors"}
    samples = load_data(spec, limit=options.n, seed=options.seed, stream=0)
    if samples.kind == "pairs":
        raise ConfigError(f"{spec}: a pairs file is not a set of real samples; give an array, folder or name")
    return samples.x, {"source": str(spec), "kind": samples.kind, **samples.info}


def to_uint8_rgb(x: Tensor) -> Tensor:
    """Model-space images (N, C, H, W) in [-1, 1] as the uint8 RGB pixels round((x + 1) 127.5) that Inception reads;
    grey images (C = 1) get three equal channels."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(f"--inception-weights: Inception reads images (N, 1 or 3, H, W), got samples of shape "
                          f"{tuple(x.shape[1:])}")
    pixels = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


@contextmanager
def _weights_only_loads():
    """Every torch.load inside runs with weights_only=True (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD)."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def inception_feature_map(weights: str | Path, device) -> Callable[[Tensor], Tensor]:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with the weights of a local file, as a feature map from
    model-space images to the (N, 2048) pool features (module docstring). ConfigError (one line) when the file is
    missing or unreadable, when torch-fidelity is not installed, or when the weights do not fit the network."""
    from ..adapters.weights import existing_file, one_line, read_weights, select_state_dict, strip_prefixes

    what = "--inception-weights"
    path = existing_file(weights, what)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:  # torch-fidelity, or torchvision which its package imports, is missing
        raise ConfigError(f"{what} needs torch-fidelity (pip install 'flowprobe[fid]'); importing it failed: "
                          f"{one_line(e)}") from None
    state, _ = select_state_dict(read_weights(path, what), f"{what} {path}", ("state_dict",))
    state, _ = strip_prefixes(state)
    with tempfile.TemporaryDirectory(prefix="flowprobe-inception-") as tmp:
        private = Path(tmp) / "inception.pt"
        torch.save(state, private)
        try:
            with _weights_only_loads():
                net = FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_LAYER],
                                                  feature_extractor_weights_path=str(private))
        except Exception as e:  # the weights do not fit torch-fidelity's InceptionV3 (missing keys, shapes, ...)
            raise ConfigError(f"{what} {path}: not torch-fidelity's InceptionV3 weights: {one_line(e)}") from None
    net = net.to(device).eval()

    def features(x: Tensor) -> Tensor:
        return net(to_uint8_rgb(x).to(device))[0]

    return features


def space_metrics(gen: Tensor, real: Tensor, options: QualityOptions, generator: torch.Generator) -> dict:
    """Every statistic of :mod:`flowprobe.probes.quality` between two sets in one space (``dim``: values per
    sample; ``frechet_distance`` None above ``options.max_frechet_dim``)."""
    dim = int(gen[0].numel())
    try:
        out = {"dim": dim, **precision_recall_density_coverage(gen, real, options.k)}
        size = min(options.kid_subset_size, gen.shape[0], real.shape[0])
        out["kid"], out["kid_std"] = kernel_inception_distance(gen, real, options.kid_subsets, size, generator)
    except ValueError as e:  # too few samples for k, or for a KID subset
        raise ConfigError(f"quality: {e}") from None
    out.update(kid_subsets=options.kid_subsets, kid_subset_size=size)
    out["frechet_distance"] = frechet_distance(gen, real) if dim <= options.max_frechet_dim else None
    return out


def _finite(gen: Tensor) -> tuple[Tensor, int]:
    keep = torch.isfinite(gen.reshape(gen.shape[0], -1)).all(1)
    return gen[keep], int((~keep).sum())


def _feature_spaces(features, inception_weights, device) -> dict[str, tuple[Callable, dict]]:
    from .diagnose import resolve_features

    spaces = {}
    fn = resolve_features(features)
    if fn is not None:
        spaces["features"] = (fn, {"map": features if isinstance(features, str) else getattr(fn, "__name__", "")})
    if inception_weights is not None:
        spaces["inception"] = (inception_feature_map(inception_weights, device),
                               {"weights": str(inception_weights), "layer": INCEPTION_LAYER})
    return spaces


def quality(generated, real, out: str | Path | None = None, *, features=None, inception_weights=None,
            options: QualityOptions | None = None, device: str | torch.device | None = "cpu") -> dict:
    """The quality of GENERATED against REAL (module docstring) in every space asked for; writes
    ``out/results.json`` when ``out`` is given and returns the same dict."""
    from ..diagnosis.copies import apply_features

    options = options or QualityOptions()
    dev = resolve_device(device)
    spaces = _feature_spaces(features, inception_weights, dev)  # fail on a bad map before any sampling
    x_real, real_info = _load_real(real, options)
    x_gen, gen_info = load_generated(generated, options, dev, draws=x_real.shape[0])
    x_gen, dropped = _finite(x_gen.to(dev))
    x_real = x_real.to(dev)
    if tuple(x_gen.shape[1:]) != tuple(x_real.shape[1:]):
        raise ConfigError(f"generated samples have shape {tuple(x_gen.shape[1:])}, real ones "
                          f"{tuple(x_real.shape[1:])}")
    if not torch.isfinite(x_real).all():
        raise ConfigError(f"{real_info['source']}: the real samples hold non-finite values")
    g = seeded_generator(options.seed, 0)
    results = {"input": space_metrics(x_gen, x_real, options, g)}
    for name, (fn, info) in spaces.items():
        f_gen = apply_features(fn, x_gen, options.batch_size)
        f_real = apply_features(fn, x_real, options.batch_size)
        results[name] = {**info, **space_metrics(f_gen, f_real, options, g)}
    record = {"format": QUALITY_FORMAT, "version": __version__, "options": asdict(options), "device": str(dev),
              "generated": {**gen_info, "n": int(x_gen.shape[0]), "non_finite_dropped": dropped},
              "real": {**real_info, "n": int(x_real.shape[0])}, "spaces": results}
    if out is not None:
        write_json(Path(out) / "results.json", record)
    return record
