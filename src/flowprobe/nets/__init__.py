"""Velocity networks. Every net is called ``net(t, x)`` with t of shape (B,)."""

from .embedding import timestep_embedding
from .mlp import MLP

__all__ = ["MLP", "timestep_embedding"]
