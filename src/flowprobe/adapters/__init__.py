"""Models trained elsewhere as flowprobe velocity nets ``net(t, x)``, so that every probe can judge them.

One entry point, :func:`load_model` (``kind`` = ``torchcfm``, ``diffusers``, ``flow_matching`` or ``module``);
the :class:`Convention` / :class:`ConventionAdapter` pair underneath handles any other model. The peer libraries
are optional and imported only when their kind is used. See docs/adapters.md.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ..config import ConfigError
from .convention import OUTPUTS, Convention, ConventionAdapter, named_path, to_velocity
from .diffusers import (DiffusersAdapter, adapt_diffusers, diffusers_convention, flow_match_time_grid,
                        load_diffusers, scheduler_time_grid, shift_sigmas)
from .flow_matching import adapt_flow_matching, flow_matching_convention, load_flow_matching, path_from_flow_matching
from .module import load_module
from .torchcfm import adapt_torchcfm, build_torchcfm, load_torchcfm, torchcfm_convention

__all__ = ["load_model", "LOADERS", "Convention", "ConventionAdapter", "OUTPUTS", "named_path", "to_velocity",
           "DiffusersAdapter", "adapt_diffusers", "diffusers_convention", "flow_match_time_grid", "load_diffusers",
           "scheduler_time_grid", "shift_sigmas", "adapt_flow_matching", "flow_matching_convention",
           "load_flow_matching", "path_from_flow_matching", "load_module", "adapt_torchcfm", "build_torchcfm",
           "load_torchcfm", "torchcfm_convention"]

#: kind -> loader; each returns (net, info).
LOADERS: dict[str, Callable[..., tuple[Any, dict]]] = {
    "torchcfm": load_torchcfm,
    "diffusers": load_diffusers,
    "flow_matching": load_flow_matching,
    "module": load_module,
}


def load_model(kind: str, **options: Any) -> tuple[ConventionAdapter, dict[str, Any]]:
    """A model trained elsewhere as flowprobe's ``net(t, x)`` (an nn.Module in eval mode, on the CPU) and a JSON-able
    info dict. ``options`` are the keyword arguments of the kind's loader:

    - ``torchcfm``: ``checkpoint``, ``arch``, ``use_ema=True``, ``extra``, ``strip_prefix`` (:func:`load_torchcfm`);
    - ``diffusers``: ``folder``, ``subfolder``, ``class_name``, ``shift``, ``scheduler_config``, ``extra``,
      ``channels``, ``scale`` (:func:`load_diffusers`);
    - ``flow_matching``: ``factory``, ``weights``, ``kwargs``, ``key``, ``extra``, ``output``, ``path``
      (:func:`load_flow_matching`);
    - ``module``: ``factory``, ``weights``, ``kwargs``, ``key`` and the :class:`Convention` fields ``order``,
      ``time``, ``scale``, ``output``, ``x_keyword``, ``t_keyword``, ``extra``, ``channels``, ``eps``, and ``path``
      (:func:`load_module`).

    Bad input (a missing file or option, wrong keys, weights that do not fit, an unknown class) raises
    :class:`~flowprobe.config.ConfigError` with a one-line message naming the file or option.
    """
    if kind not in LOADERS:
        raise ConfigError(f"kind: expected one of {', '.join(LOADERS)}, got {kind!r}")
    loader = LOADERS[kind]
    params = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(f"{kind}: unknown option(s) {', '.join(unknown)} (allowed: {', '.join(params)})")
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if required:
        raise ConfigError(f"{kind}: missing option(s) {', '.join(required)}")
    return loader(**options)
