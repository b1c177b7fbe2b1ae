"""Velocity networks. Every net is called ``net(t, x)`` with t of shape (B,)."""

from .embedding import timestep_embedding
from .mlp import MLP
from .unet import UNET_PRESETS, UNet, count_parameters, unet_preset

__all__ = ["MLP", "UNet", "UNET_PRESETS", "count_parameters", "timestep_embedding", "unet_preset"]
