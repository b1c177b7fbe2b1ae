"""diffusers (``pip install diffusers``): flow-matching models saved with ``save_pretrained`` as flowprobe nets.

The convention of ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, ... and any model trained for it):

- the flow variable sigma runs from noise (sigma = 1) to data (sigma = 0): x_sigma = (1 - sigma) x1 + sigma x0;
- the model is called ``model(x, timestep=sigma * num_train_timesteps, **extra)`` and returns noise minus data,
  x0 - x1 = dx/dsigma = -dx/dt (the output object's ``.sample``);
- ``scheduler.step`` is an Euler step in sigma: ``x_next = x + (sigma_next - sigma) * model_output``.

flowprobe time is t = 1 - sigma (the unshifted flow variable of the model itself), so flowprobe's field
v(t, x) = -model(x, 1000 (1 - t)) is exactly the model's ODE and one flowprobe Euler step from t = 1 - sigma to
t' = 1 - sigma_next is one ``scheduler.step``. The ``shift`` of the scheduler, sigma -> shift sigma / (1 + (shift - 1)
sigma), does not change the field: it only changes which sigmas the scheduler visits. :func:`flow_match_time_grid`
and :meth:`DiffusersAdapter.time_grid` give those visited times as a flowprobe grid (t_k = 1 - sigma_k) for
``integrate(net, x, grid=...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError
from .convention import Convention, ConventionAdapter
from .weights import count_parameters, existing_file, one_line

__all__ = ["diffusers_convention", "DiffusersAdapter", "adapt_diffusers", "flow_match_time_grid", "shift_sigmas",
           "scheduler_time_grid", "read_scheduler_config", "load_diffusers", "MODEL_SUBFOLDERS"]

#: Subfolders of a pipeline folder searched for the denoiser, in order.
MODEL_SUBFOLDERS = ("transformer", "unet")


def _require_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ConfigError("the diffusers adapter needs the package diffusers (pip install diffusers)") from e
    return diffusers


def diffusers_convention(num_train_timesteps: int = 1000, extra: dict | None = None, channels: int | None = None,
                         scale: float | None = None) -> Convention:
    """x positionally, ``timestep=scale * (1 - t)`` (scale defaults to num_train_timesteps), output -dx/dt."""
    return Convention(order="xt", t_keyword="timestep", time="reverse",
                      scale=float(num_train_timesteps if scale is None else scale), output="minus_velocity",
                      extra=dict(extra or {}), channels=channels)


def shift_sigmas(sigma: Tensor, shift: float) -> Tensor:
    """The scheduler's static shift: shift sigma / (1 + (shift - 1) sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_match_time_grid(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The flowprobe times (float64) ``t_k = 1 - sigma_k`` of ``FlowMatchEulerDiscreteScheduler(shift=shift,
    num_train_timesteps=N).set_timesteps(steps)``, its terminal sigma = 0 included (t from 0 to 1, steps + 1 times).

    Written out from diffusers 0.42 (static shift, no Karras / exponential / beta sigmas, no shift_terminal) with
    the scheduler's own float32 / float64 arithmetic, so the sigmas agree bit for bit.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps: expected an integer >= 1, got {steps!r}")
    n = num_train_timesteps
    ends = torch.tensor([float(n), 1.0], dtype=torch.float32) / n    # __init__: float32 sigmas, max and min
    ends = shift * ends / (1 + (shift - 1) * ends)
    sigma_max, sigma_min = ends[0].item(), ends[1].item()
    timesteps = np.linspace(sigma_max * n, sigma_min * n, steps)        # set_timesteps: float64
    sigmas = timesteps / n
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])
    return 1 - sigmas.to(torch.float64)


def scheduler_time_grid(scheduler: Any, steps: int, mu: float | None = None) -> Tensor:
    """The flowprobe times ``1 - sigma_k`` a diffusers flow-match scheduler visits (calls ``set_timesteps``)."""
    if getattr(scheduler.config, "invert_sigmas", False):
        raise ConfigError("scheduler: invert_sigmas=True is not supported (its sigmas run the other way)")
    if getattr(scheduler.config, "use_dynamic_shifting", False) and mu is None:
        raise ConfigError("mu: the scheduler uses dynamic (resolution-dependent) shifting; give mu")
    kwargs = {"mu": mu} if mu is not None else {}
    scheduler.set_timesteps(steps, **kwargs)
    return 1 - scheduler.sigmas.to(torch.float64).cpu()


def _channels(model: nn.Module) -> int | None:
    """The channels to keep when the model also predicts a variance (out_channels = 2 in_channels)."""
    config = getattr(model, "config", None)
    cin, cout = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
    if isinstance(cin, int) and isinstance(cout, int) and cout == 2 * cin:
        return cin
    return None


class DiffusersAdapter(ConventionAdapter):
    """flowprobe's ``net(t, x)`` around a diffusers flow-matching model; knows its scheduler's time grid."""

    def __init__(self, module: nn.Module, convention: Convention, scheduler_config: dict | None = None):
        super().__init__(module, convention)
        self.scheduler_config = dict(scheduler_config or {})

    def time_grid(self, steps: int, mu: float | None = None) -> Tensor:
        """The flowprobe times (float64, 0 -> 1) the scheduler of this model visits in ``steps`` steps."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        return scheduler_time_grid(FlowMatchEulerDiscreteScheduler.from_config(config), steps, mu)


def adapt_diffusers(model: nn.Module, *, shift: float | None = None, num_train_timesteps: int | None = None,
                    extra: dict | None = None, channels: int | None = None, scale: float | None = None,
                    scheduler_config: dict | None = None) -> DiffusersAdapter:
    """A diffusers model (in memory) as flowprobe's ``net(t, x)``. ``shift`` / ``num_train_timesteps`` override the
    scheduler config (defaults 1.0 / 1000); ``channels`` defaults to in_channels for a learned-variance model."""
    config = dict(scheduler_config or {})
    if shift is not None:
        config["shift"] = float(shift)
    if num_train_timesteps is not None:
        config["num_train_timesteps"] = int(num_train_timesteps)
    n = int(config.get("num_train_timesteps", 1000))
    conv = diffusers_convention(n, extra, channels if channels is not None else _channels(model), scale)
    return DiffusersAdapter(model, conv, config)


def read_scheduler_config(folder: Path, given: str | Path | None = None) -> tuple[dict, Path | None]:
    """The scheduler config: ``given``, else ``scheduler/scheduler_config.json`` in the folder or its parent."""
    if given is not None:
        path: Path | None = existing_file(given, "scheduler_config")
    else:
        candidates = [folder / "scheduler" / "scheduler_config.json", folder.parent / "scheduler" /
                      "scheduler_config.json"]
        path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return {}, None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"scheduler_config: cannot read JSON from {str(path)!r}: {one_line(e)}") from e
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name.startswith("FlowMatch"):
        raise ConfigError(f"scheduler_config {str(path)!r}: scheduler {name!r} is not a flow-match scheduler; "
                          "use kind 'module' with output='noise' or 'data' and a path for other models")
    return config, path


def _model_folder(folder: Path, subfolder: str | None) -> Path:
    if not folder.is_dir():
        raise ConfigError(f"diffusers folder: no such folder {str(folder)!r}")
    if subfolder is not None:
        candidates = [folder / subfolder]
    else:
        candidates = [folder] + [folder / s for s in MODEL_SUBFOLDERS]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise ConfigError(f"diffusers folder {str(folder)!r}: no config.json in "
                      f"{' or '.join(repr(str(c)) for c in candidates)}")


def _model_class(diffusers: Any, model_dir: Path, class_name: str | None) -> type:
    config_path = model_dir / "config.json"
    if class_name is None:
        try:
            class_name = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"diffusers model: cannot read {str(config_path)!r}: {one_line(e)}") from e
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ConfigError(f"diffusers model {str(config_path)!r}: unknown model class {class_name!r} "
                          f"(diffusers {diffusers.__version__})")
    return cls


def load_diffusers(folder: str | Path, *, subfolder: str | None = None, class_name: str | None = None,
                   shift: float | None = None, scheduler_config: str | Path | None = None,
                   extra: dict | None = None, channels: int | None = None,
                   scale: float | None = None) -> tuple[DiffusersAdapter, dict[str, Any]]:
    """A local diffusers model folder (``save_pretrained``; or a pipeline folder with ``transformer/`` or ``unet/``)
    as flowprobe's ``net(t, x)`` (in eval mode), loaded offline, and an info dict.

    ``shift`` overrides the scheduler config's; ``scale`` the timestep scale (default num_train_timesteps);
    ``extra``: keyword arguments on every call (``class_labels``, ``encoder_hidden_states``, ...).
    """
    diffusers = _require_diffusers()
    root = Path(folder).expanduser()
    model_dir = _model_folder(root, subfolder)
    cls = _model_class(diffusers, model_dir, class_name)
    config, config_path = read_scheduler_config(model_dir, scheduler_config)
    try:
        model = cls.from_pretrained(str(model_dir), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # one line: the library's messages run over several
        raise ConfigError(f"diffusers model {str(model_dir)!r}: {cls.__name__}.from_pretrained failed: "
                          f"{one_line(e)}") from e
    net = adapt_diffusers(model.eval(), shift=shift, extra=extra, channels=channels, scale=scale,
                          scheduler_config=config).eval()
    info = {"kind": "diffusers", "folder": str(root), "model_folder": str(model_dir), "class": cls.__name__,
            "scheduler_config": str(config_path) if config_path else None,
            "num_train_timesteps": int(net.scheduler_config.get("num_train_timesteps", 1000)),
            "shift": float(net.scheduler_config.get("shift", 1.0)),
            "use_dynamic_shifting": bool(net.scheduler_config.get("use_dynamic_shifting", False)),
            "parameters": count_parameters(model), "convention": net.convention.describe()}
    return net, info
