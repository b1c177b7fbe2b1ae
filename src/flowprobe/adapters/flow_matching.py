"""FAIR ``flow_matching`` (``pip install flow-matching``): its velocity models as flowprobe nets.

``flow_matching.solver.ODESolver`` calls its model as ``velocity_model(x=x, t=t, **model_extras)`` (the
``flow_matching.utils.ModelWrapper`` interface) with t in [0, 1] from the source (noise, t = 0) to the data
(t = 1), and integrates dx/dt = model output: flowprobe's time, called by keyword. Models trained to predict the
data x1 or the noise x0 on an ``AffineProbPath`` (x_t = sigma_t x0 + alpha_t x1) are converted with the path's
formulas; :func:`path_from_flow_matching` turns the library's path or scheduler into flowprobe's ``AffinePath``
(a = sigma_t, b = alpha_t).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import ConfigError
from ..paths import AffinePath, ProbabilityPath
from .convention import Convention, ConventionAdapter
from .module import build_module, load_weights_into
from .weights import count_parameters

__all__ = ["flow_matching_convention", "adapt_flow_matching", "path_from_flow_matching", "load_flow_matching"]


def flow_matching_convention(extra: dict | None = None, output: str = "velocity") -> Convention:
    """``model(x=x, t=t, **extra)``, forward time, scale 1; ``output`` velocity (default), data or noise."""
    return Convention(order="xt", x_keyword="x", t_keyword="t", output=output, extra=dict(extra or {}))


def path_from_flow_matching(path_or_scheduler: Any) -> AffinePath:
    """flowprobe's AffinePath for a flow_matching ``AffineProbPath`` or ``Scheduler``: x_t = sigma_t x0 + alpha_t x1,
    so a = sigma_t and b = alpha_t."""
    scheduler = getattr(path_or_scheduler, "scheduler", path_or_scheduler)
    if not callable(scheduler):
        raise ConfigError(f"path: expected a flow_matching AffineProbPath or Scheduler, got {type(scheduler).__name__}")

    def part(name: str):
        def coefficient(t: Tensor) -> Tensor:
            return getattr(scheduler(t), name)
        return coefficient

    return AffinePath(part("sigma_t"), part("alpha_t"), part("d_sigma_t"), part("d_alpha_t"),
                      name=f"flow_matching.{type(scheduler).__name__}")


def _as_path(path: Any) -> ProbabilityPath | str:
    if isinstance(path, (str, ProbabilityPath)):
        return path
    return path_from_flow_matching(path)


def adapt_flow_matching(model: nn.Module, extra: dict | None = None, output: str = "velocity",
                        path: Any = "linear") -> ConventionAdapter:
    """A flow_matching model (in memory) as flowprobe's ``net(t, x)``. ``path``: ``linear`` (CondOT), ``cosine``,
    a flowprobe path, or a flow_matching AffineProbPath / Scheduler (used for data / noise outputs)."""
    return ConventionAdapter(model, flow_matching_convention(extra, output), _as_path(path))


def load_flow_matching(factory: str, weights: str | Path | None = None, kwargs: str | Path | dict | None = None, *,
                       key: str | None = None, extra: dict | None = None, output: str = "velocity",
                       path: Any = "linear", strip_prefix: bool = True) -> tuple[ConventionAdapter, dict[str, Any]]:
    """A flow_matching model from ``package.module:Factory`` + kwargs + weights (safetensors or a state dict;
    ``key`` picks an entry of a checkpoint dict) as flowprobe's ``net(t, x)`` (eval mode) and an info dict."""
    module, kw = build_module(factory, kwargs)
    loaded = load_weights_into(module, weights, key, strip_prefix) if weights is not None else {"weights": None}
    net = adapt_flow_matching(module.eval(), extra, output, path).eval()
    info = {"kind": "flow_matching", "factory": factory, "kwargs": kw, **loaded,
            "parameters": count_parameters(module), **net.describe()}
    return net, info
