"""Class conditioning and classifier-free guidance (CFG).

Conventions (the whole library):

- A class-conditional net is built with ``num_classes = K`` and called ``net(t, x, y=labels)`` (few-step nets:
  ``net(t, x, h, y=labels)``), ``labels`` int64 of shape (B,) in 0..K. Index K is the *null label*, the
  unconditional model; ``y=None`` means the null label for every row, so every probe, solver and diagnosis that
  calls ``net(t, x)`` sees the unconditional field.
- Training: :class:`LabelledCoupling` attaches each pair's label (``Pairing.y``, the label of its target row) and
  replaces it by the null label with probability ``dropout`` (label dropout, drawn from the caller's generator);
  the objectives bind the labels with :func:`conditioned`, so the net learns v(t, x | c) and v(t, x | null) at once.
- Sampling: :class:`GuidedField` is the field

      v_w(t, x | c) = (1 + w) v(t, x | c) - w v(t, x | null),

  w = 0 is the conditional field, w > 0 extrapolates away from the unconditional one. This is the ``cfg_scale``
  of FAIR's ``flow_matching`` examples (``CFGScaledModel``: ``(1 + cfg_scale) * conditional - cfg_scale *
  condition_free``). diffusers writes ``v_uncond + s (v_cond - v_uncond)`` with ``guidance_scale`` s: the same
  field for s = 1 + w (:func:`diffusers_guidance_scale`); s = 1 there is w = 0 here.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .couplings import Pairing

__all__ = ["conditioned", "LabelledCoupling", "GuidedField", "diffusers_guidance_scale", "null_labels"]


def conditioned(net, y: Tensor | None):
    """``net`` with its class labels bound (``net(t, x[, h]) -> net(t, x[, h], y=y)``); ``net`` itself when
    ``y`` is None (an unconditional pairing)."""
    return net if y is None else functools.partial(net, y=y)


def null_labels(n: int, num_classes: int, device=None) -> Tensor:
    """n null labels (the index ``num_classes``)."""
    return torch.full((n,), int(num_classes), dtype=torch.int64, device=device)


def diffusers_guidance_scale(w: float) -> float:
    """diffusers' ``guidance_scale`` s of the field :class:`GuidedField` draws with weight w: s = 1 + w."""
    return 1.0 + float(w)


class LabelledCoupling:
    """The pairs of ``base`` with ``Pairing.y`` = ``labels[i1]`` (the label of each target row; ``labels`` indexes
    the base coupling's target pool), each replaced by the null label ``num_classes`` with probability
    ``dropout`` (a uniform draw per pair from the caller's generator, after the base draw)."""

    def __init__(self, base, labels: Tensor, num_classes: int, dropout: float = 0.1):
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in 0..{num_classes - 1} (num_classes={num_classes}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1], got {dropout}")
        self.base, self.labels = base, labels
        self.num_classes, self.dropout = int(num_classes), float(dropout)
        self.weighted = bool(getattr(base, "weighted", False))
        self.labelled = True

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        p = self.base.sample(n, generator)
        y = self.labels.to(p.i1.device)[p.i1].to(p.x1.device)
        if self.dropout > 0:
            drop = torch.rand(n, generator=generator, device=generator.device) < self.dropout
            y = torch.where(drop.to(y.device), torch.full_like(y, self.num_classes), y)
        return Pairing(p.x0, p.x1, p.i0, p.i1, p.weights, y)

    def describe(self) -> dict:
        inner = self.base.describe() if hasattr(self.base, "describe") else {"coupling": type(self.base).__name__}
        return {**inner, "num_classes": self.num_classes, "label_dropout": self.dropout}


class GuidedField(nn.Module):
    """v_w(t, x | c) = (1 + w) v(t, x | c) - w v(t, x | null) of a class-conditional ``net`` (module docstring).

    ``label``: an int or a (B,) tensor of classes (the null index ``num_classes`` gives the unconditional field);
    ``w = 0`` calls the net once with the labels, else once on the doubled batch [x, x] with [c, null]. Called
    ``field(t, x)`` (or ``field(t, x, h)`` for a few-step net), so every solver takes it."""

    def __init__(self, net: nn.Module, label: int | Tensor, w: float, num_classes: int):
        super().__init__()
        self.net, self.label, self.w, self.num_classes = net, label, float(w), int(num_classes)

    def _labels(self, n: int, device) -> Tensor:
        y = torch.as_tensor(self.label, dtype=torch.int64, device=device)
        return y.expand(n) if y.dim() == 0 else y

    def forward(self, t: Tensor, x: Tensor, h: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        y = self._labels(n, x.device)
        extra = () if h is None else (h,)
        if self.w == 0.0:
            return self.net(t, x, *extra, y=y)
        t = torch.as_tensor(t, device=x.device)
        t2 = t.expand(n).repeat(2) if t.dim() == 0 else t.repeat(2)
        extra2 = () if h is None else (torch.as_tensor(h, device=x.device).expand(n).repeat(2),)
        v = self.net(t2, torch.cat([x, x]), *extra2, y=torch.cat([y, null_labels(n, self.num_classes, x.device)]))
        v_cond, v_null = v[:n], v[n:]
        return (1.0 + self.w) * v_cond - self.w * v_null
