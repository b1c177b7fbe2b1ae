"""``flowprobe likelihood``: the log-density a trained flowprobe run gives to samples, in nats and bits per dimension.

The net of a checkpoint (:func:`flowprobe.runs.load_model`) is integrated backward from the samples (t = 1) to the
source (t = 0) with the divergence along the way (:func:`flowprobe.probes.likelihood.log_likelihood`). The source
density is the run's: N(0, I) for image runs; the 2-D toy source for toy runs when it has a closed form
(``gaussian``, ``eight_gaussians``; other sources are refused). On a path with noise at t = 0 (``path.sigma`` > 0
with the constant schedule, x_0 = x0 + sigma z) the law of x_t at t = 0 is the source convolved with
N(0, sigma^2 I), and what the flow models at t = 1 is the target convolved with N(0, g(1)^2 I); both are recorded.
A few-step net (MeanFlow, SplitMeanFlow) is called with h = 0, its instantaneous velocity.

8-bit images (values on the p / 127.5 - 1 grid) are dequantised uniformly (x = (p + u) / 127.5 - 1) and reported in
bits per dimension as well (:func:`flowprobe.probes.likelihood.bits_per_dim`). The divergence is exact up to
:data:`EXACT_MAX_DIM` dimensions and Hutchinson's estimator above, unless chosen.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor

from ..config import ConfigError
from ..probes.likelihood import (ADAPTIVE_METHODS, DIVERGENCES, FIXED_METHODS, PIXEL_SCALE, PROBES, bits_per_dim,
                                 dequantize, gaussian_log_prob, log_likelihood, on_pixel_grid)

__all__ = ["likelihood", "source_density", "EXACT_MAX_DIM", "DEFAULT_PROBES", "METHODS"]

#: dimensions up to which the divergence is exact by default (D backward passes per evaluation)
EXACT_MAX_DIM = 16
#: Hutchinson probes per sample by default (>= 2 gives each sample a standard error)
DEFAULT_PROBES = 4
METHODS = ADAPTIVE_METHODS + FIXED_METHODS
_TOY_GAUSSIAN_SOURCES = ("gaussian", "eight_gaussians")


def _check_options(n, divergence, probe, probes, method, rtol, atol, steps, batch_size) -> None:
    if n is not None and not (isinstance(n, int) and n >= 1):
        raise ConfigError(f"--n must be an integer >= 1, got {n!r}")
    if divergence not in (None,) + DIVERGENCES:
        raise ConfigError(f"--divergence: {divergence!r} is not allowed; choose from {', '.join(DIVERGENCES)}")
    if probe not in PROBES:
        raise ConfigError(f"--probe: {probe!r} is not allowed; choose from {', '.join(PROBES)}")
    if not (isinstance(probes, int) and probes >= 1):
        raise ConfigError(f"--probes must be an integer >= 1, got {probes!r}")
    if method not in METHODS:
        raise ConfigError(f"--method: {method!r} is not allowed; choose from {', '.join(METHODS)}")
    if not (rtol > 0 and atol > 0 and math.isfinite(rtol) and math.isfinite(atol)):
        raise ConfigError(f"--rtol and --atol must be finite numbers > 0, got rtol={rtol}, atol={atol}")
    if method in FIXED_METHODS and not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"--method {method}: a fixed-grid method needs --steps >= 1")
    if method in ADAPTIVE_METHODS and steps is not None:
        raise ConfigError(f"--steps: {method} chooses its own steps (give --rtol / --atol, or a fixed method)")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}")


def _data_kind(cfg) -> str:
    kind = getattr(cfg.data, "data_kind", None)
    return kind if kind is not None else ("images" if cfg.data.dataset is not None else "toy")


def _ends(path) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """((a, b, g) at t = 0, (a, b, g) at t = 1) of a path."""
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, b, g = (f(ends).tolist() for f in (path.a, path.b, path.g))
    return (a[0], b[0], g[0]), (a[1], b[1], g[1])


def source_density(cfg, device) -> tuple:
    """(log-density of x_t at t = 0, info) of a run config; None (no training config): N(0, I) on the linear path
    assumed. x_t at t = 0 is a(0) x0 + g(0) z (+ b(0) x1, noted when b(0) != 0: VP paths): a Gaussian source
    N(0, s^2 I) gives N(0, (a0^2 s^2 + g0^2) I), a Gaussian-type toy scales and widens in closed form. ConfigError
    for a source without a closed-form density (other toys, a source file)."""
    from ..paths import LinearPath

    if cfg is None:
        return gaussian_log_prob, {"source": "N(0, I) (assumed: the checkpoint has no training config)",
                                   "path": LinearPath().describe()}
    from .build import build_objective, make_sampler

    path = build_objective(cfg).path
    (a0, b0, g0), (a1, b1, g1) = _ends(path)
    info = {"path": path.describe()}
    if abs(b0) > 0:
        info["note_source"] = (f"x_t at t = 0 carries b(0) = {b0:.3g} of the data; its density is taken as the "
                               f"source's (the usual approximation of VP paths)")
    if (abs(a1), b1, g1) != (0.0, 1.0, 0.0):
        info["density_of"] = f"x_t at t = 1 = {a1:.3g} x0 + {b1:.3g} x1 + {g1:.3g} z (the path's end, not x1 alone)"
    kind = _data_kind(cfg)
    if kind != "toy":
        if getattr(cfg.data, "source_path", None):
            raise ConfigError(f"data.source_path: the run's source is samples from {cfg.data.source_path}, which have "
                              f"no closed-form density; the likelihood needs a Gaussian source")
        std = math.sqrt(a0 * a0 + g0 * g0)
        info["source"] = "N(0, I)" if std == 1.0 else f"N(0, {std:.6g}^2 I) (N(0, I) through the path at t = 0)"
        return (lambda x: gaussian_log_prob(x, std)), info
    name, params = cfg.data.source, dict(cfg.data.source_params)
    if name not in _TOY_GAUSSIAN_SOURCES:
        raise ConfigError(f"data.source: the run's source {name!r} has no closed-form density; the likelihood needs "
                          f"one of {', '.join(_TOY_GAUSSIAN_SOURCES)}")
    sampler = make_sampler(name, params, "source", device, torch.float64)
    if (a0, g0) != (1.0, 0.0):  # a0 x0 + g0 z of a Gaussian-type toy: centres times a0, std^2 -> a0^2 std^2 + g0^2
        params["std"] = math.sqrt(a0 * a0 * sampler.std ** 2 + g0 * g0)
        if hasattr(sampler, "radius"):
            params["radius"] = abs(a0) * sampler.radius
        sampler = make_sampler(name, params, "source", device, torch.float64)
    info["source"] = {"distribution": name, **{k: v for k, v in sampler.describe().items() if k != "distribution"}}
    return sampler.log_prob, info


def _load_samples(data, ck, cfg, n, seed, device) -> tuple[Tensor, dict]:
    from ..data.arrays import load_data
    from .load import sample_shape

    images = cfg is not None and _data_kind(cfg) in ("images", "image_folder")
    samples = load_data(data, root=cfg.data.root if cfg is not None else None,
                        resolution=cfg.data.resolution if images else None, limit=n, seed=seed, stream=1)
    if samples.kind == "pairs":
        raise ConfigError(f"{data}: a pairs file; give samples (an array, image folder or dataset name)")
    shape = sample_shape(ck)
    if shape is not None and tuple(samples.x.shape[1:]) != tuple(shape):
        raise ConfigError(f"{data}: samples of shape {tuple(samples.x.shape[1:])}, the model takes {tuple(shape)}")
    if samples.x.shape[0] == 0:
        raise ConfigError(f"{data}: no samples")
    return samples.x.to(device), {"source": str(data), "kind": samples.kind, **samples.info}


def _standardization(ck, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(samples in model space, log |det| of data -> model space per sample or None): a run trained on
    standardised vectors (``data.standardize``, its sidecar's ``extra["data"]["standardize"]`` mean and std) models
    z = (x - mean) / std, so log p(x) = log p_z(z) - sum log std."""
    d = ((ck.extra or {}).get("data") or {}).get("standardize")
    if not d:
        return x, None
    mean = torch.tensor(d["mean"], dtype=torch.float64).reshape(tuple(d.get("shape") or (-1,)))
    std = torch.tensor(d["std"], dtype=torch.float64).reshape(mean.shape)
    if tuple(mean.shape) != tuple(x.shape[1:]):
        raise ConfigError(f"the run standardised samples of shape {tuple(mean.shape)}, the data have "
                          f"{tuple(x.shape[1:])}")
    z = (x.double() - mean.to(x.device)) / std.to(x.device)
    return z.to(x.dtype), -std.log().sum().to(x.device).expand(x.shape[0])


def _net_dtype(net) -> torch.dtype:
    p = next(iter(net.parameters()), None)
    return p.dtype if p is not None else torch.float32


def likelihood(checkpoint, data, out: str | Path | None = None, *, n: int | None = None,
               divergence: str | None = None, probes: int = DEFAULT_PROBES, probe: str = "rademacher",
               method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, steps: int | None = None,
               device=None, seed: int = 0, use_ema: bool = True, batch_size: int | None = None,
               figures: bool = True) -> dict:
    """Per-sample log-likelihood (nats) of ``data`` (a DATA argument, :func:`flowprobe.data.arrays.load_data`;
    the first ``n``) under the run ``checkpoint``; with ``out``, write results.json, log_likelihood.npy and a
    histogram there. ``divergence`` None: exact for D <= :data:`EXACT_MAX_DIM`, else Hutchinson with ``probes``
    probes of kind ``probe``; probes and dequantisation noise come from generators seeded with ``seed``. Samples
    of a run trained on standardised vectors are taken in data units (the standardisation's Jacobian is added).
    Returns the results (JSON-able): mean log-likelihood with its standard error over samples, bits/dim for
    8-bit images, the solver's settings and evaluations, the source density and the timing."""
    from dataclasses import replace

    from ..device import choose_threads, resolve_device
    from ..seeds import seeded_generator
    from .load import checkpoint_config, load_model, weights_name

    _check_options(n, divergence, probe, probes, method, rtol, atol, steps, batch_size)
    dev = resolve_device(device)
    net, ck = load_model(checkpoint, dev, use_ema)
    cfg = checkpoint_config(ck) if ck.config is not None else None
    log_p0, source_info = source_density(cfg, dev)
    x, data_info = _load_samples(data, ck, cfg, n, seed, dev)
    x, log_jac = _standardization(ck, x.to(_net_dtype(net)))
    dim, images = int(x[0].numel()), x.dim() == 4
    quantised = images and on_pixel_grid(x)
    if quantised:
        x = dequantize(x, seeded_generator(seed, 301, dev))
    divergence = divergence or ("exact" if dim <= EXACT_MAX_DIM else "hutchinson")
    batch_size = batch_size or min(x.shape[0], 128 if images else 1024)
    choose_threads(sum(p.numel() for p in net.parameters()), batch_size, dev)
    start = time.perf_counter()
    lk = log_likelihood(net, x, log_p0, divergence=divergence, probe=probe, n_probes=probes, method=method, rtol=rtol,
                        atol=atol, steps=steps, generator=seeded_generator(seed, 302, dev), batch_size=batch_size)
    seconds = time.perf_counter() - start
    if log_jac is not None:  # log p(x) = log p_z(z) + log |dz/dx|
        jac = log_jac.to(lk.log_prob)
        lk = replace(lk, log_prob=lk.log_prob + jac, draws=None if lk.draws is None else lk.draws + jac)
        data_info["standardized"] = "log p in data units: the run's standardisation's log |dz/dx| is added"
    result = {"checkpoint": str(ck.path), "step": ck.step, "weights": weights_name(ck, use_ema), "data": data_info,
              **source_info, **lk.summary(), "seed": seed, "batch_size": batch_size, "seconds": round(seconds, 3)}
    if cfg is not None and cfg.objective.kind != "cfm":
        result["note"] = f"few-step net ({cfg.objective.kind}) evaluated at h = 0: its instantaneous velocity"
    bpd = _bits(result, lk, dim) if quantised else None
    if images and not quantised:
        result["bits_per_dim"] = None
        result["note_bits_per_dim"] = "images not on the 8-bit grid p / 127.5 - 1: no dequantisation, no bits/dim"
    if out is not None:
        _write(Path(out), result, lk, bpd, figures)
    return result


def _bits(result: dict, lk, dim: int) -> Tensor:
    """Bits per dimension per sample, their mean and s.e. into ``result``."""
    bpd = bits_per_dim(lk.log_prob.double(), dim)
    se = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    result.update(bits_per_dim=float(bpd.mean()), bits_per_dim_stderr=se,
                  dequantization=f"x = (p + u) / {PIXEL_SCALE} - 1, u ~ U[0, 1); bpd = -log p(x) / (D ln 2) + "
                                 f"log2({PIXEL_SCALE})")
    return bpd


def _write(out: Path, result: dict, lk, bpd, figures: bool) -> None:
    import numpy as np

    from ..io import atomic_write, write_json

    out.mkdir(parents=True, exist_ok=True)
    values = lk.log_prob.detach().double().cpu().numpy()

    def save(tmp):
        with open(tmp, "wb") as f:
            np.save(f, values)

    atomic_write(out / "log_likelihood.npy", save)
    result["files"] = {"per_sample": "log_likelihood.npy"}
    if figures:
        from ..report.likelihood import plot_likelihood_histogram

        shown, label = (bpd.cpu().numpy(), "bits per dimension") if bpd is not None else (values, "log p(x) (nats)")
        plot_likelihood_histogram(out / "likelihood.png", shown, label,
                                  f"{result['divergence']} divergence, {result['method']}, n = {result['n']}")
        result["files"]["histogram"] = "likelihood.png"
    write_json(out / "results.json", result)
