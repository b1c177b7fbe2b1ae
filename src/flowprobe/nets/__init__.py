"""Velocity networks. Every net is called ``net(t, x)`` with t of shape (B,); :mod:`.factory` builds one from a spec."""

from .dit import DIT_PRESETS, DiT, dit_preset
from .embedding import timestep_embedding
from .factory import FlatMLP, build_net, model_spec
from .mlp import MLP
from .unet import UNET_PRESETS, UNet, count_parameters, unet_preset

__all__ = ["MLP", "UNet", "FlatMLP", "UNET_PRESETS", "count_parameters", "timestep_embedding", "unet_preset",
           "build_net", "model_spec", "DiT", "DIT_PRESETS", "dit_preset"]
