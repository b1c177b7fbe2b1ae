"""Parts shared by the image experiments (celeba-pairs, celeba-reflow, cifar-gradvar): the velocity network's
config, the training settings, a seeded image flow trained with CFM(sigma), and the image-grid figure.

Data stays on the device as uint8 (:class:`~flowprobe.data.images.ImageSampler`); pixels are scaled to
[-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..config import ConfigError, option
from ..nets.factory import build_net
from ..nets.factory import model_spec as net_model_spec
from ..objectives import CFMObjective
from ..paths import make_path
from ..report import plt, save_figure
from ..runs.config import ModelConfig
from ..train import fit
from ..train.step import auto_precision_compile, compile_options, configure_backends

__all__ = ["ImageModelConfig", "ImageTrainOptions", "QUICK_MODEL", "model_spec", "resolve_precision",
           "train_image_flow", "image_grid"]


@dataclass
class ImageModelConfig(ModelConfig):
    """The velocity network: :class:`flowprobe.runs.config.ModelConfig` with image defaults. ``arch="unet"``:
    :func:`flowprobe.nets.unet.unet_preset` ``preset`` with ``image_size`` set to the data resolution and
    the optional overrides (``dropout`` 0 unless set); ``arch="mlp"``: an MLP on the flattened image
    (``width`` x ``depth``), for the smallest CPU runs; ``arch="dit"``: :func:`flowprobe.nets.dit.dit_preset`
    ``preset`` (docs/dit.md)."""

    arch: str = option("unet", choices=("unet", "mlp", "dit"))
    preset: str = option("celeba64", choices=("celeba64", "cifar10", "tiny"))
    dropout: float | None = option(0.0, ge=0, lt=1)
    width: int = option(512, ge=1, help="MLP width")


#: The CPU model of the quick runs: the "tiny" UNet preset, 16 channels, levels (1, 2), no attention.
QUICK_MODEL = {"preset": "tiny", "model_channels": 16, "channel_mult": [1, 2], "attention_resolutions": []}


@dataclass
class ImageTrainOptions:
    """Training settings shared by the image experiments (same meaning and defaults in each)."""

    batch_size: int = option(128, ge=1)
    lr: float = option(2e-4, gt=0)
    warmup: int = option(0, ge=0)
    grad_clip: float | None = option(1.0, gt=0)
    ema_decay: float | None = option(None, ge=0, lt=1)
    precision: str = option("auto", choices=("auto", "fp32", "bf16"))
    compile: bool | str = option(False, help="torch.compile of the training step: false, true, a mode "
                                 "(reduce-overhead = CUDA graphs) or a backend name")
    reduction: str = option("mean", choices=("mean", "sum"), help="training loss over dimensions")

    def __post_init__(self):
        try:
            compile_options(self.compile)
        except ValueError as e:
            raise ConfigError(f"compile: {e}") from None


def model_spec(cfg: ImageModelConfig, image_size: int, channels: int = 3) -> dict:
    """{"class": "UNet" | "DiT" | "FlatMLP", "kwargs": {...}}: enough to rebuild the net (stored in checkpoints);
    :func:`flowprobe.nets.factory.model_spec` for (channels, image_size, image_size) images."""
    return net_model_spec(cfg, (channels, image_size, image_size))


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on CUDA, "fp32" elsewhere (:func:`flowprobe.train.step.auto_precision_compile`)."""
    return auto_precision_compile(precision, False, device)[0]


def train_image_flow(spec: dict, coupling, sigma: float, *, steps: int, batch_size: int, lr: float, seed: int,
                     device: torch.device, precision: str, grad_clip: float | None, ema_decay: float | None,
                     compile: bool | str = False, hooks: Sequence = (), log_every: int | None = None,
                     warmup: int = 0, reduction: str = "mean"):
    """Train a fresh net (:func:`flowprobe.nets.factory.build_net` of ``spec``, initialised from ``seed``) with
    CFM(sigma) (constant sigma) on ``coupling`` through :func:`flowprobe.train.fit` with ``hooks``; returns the
    TrainState (``.model`` is the EMA when there is one)."""
    net = build_net(spec, seed)
    if device.type == "cuda":
        configure_backends(precision)
    objective = CFMObjective(make_path(sigma, "constant"), reduction=reduction)
    # fit moves the net, switches conv nets to channels_last on CUDA and picks fused / foreach AdamW
    kwargs = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, lr_schedule="constant", warmup=warmup,
                  grad_clip=grad_clip, device=device, ema_decay=ema_decay, precision=precision, compile=compile)
    if log_every is not None:
        kwargs["log_every"] = log_every
    return fit(net, coupling, objective, hooks=hooks, **kwargs)


def image_grid(rows: list[list[Tensor]], col_titles: list[str], path, row_titles: list[str] | None = None):
    """A grid of images (each (3, H, W) in [-1, 1]) saved as a PNG."""
    n_r, n_c = len(rows), len(col_titles)
    fig, axes = plt.subplots(n_r, n_c, figsize=(1.3 * n_c, 1.3 * n_r + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(((img.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=7)
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
