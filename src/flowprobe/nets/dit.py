"""A DiT velocity network for images (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023):
``net(t, x)`` with x of shape (B, C, H, H) (``net(t, x, y=labels)`` when class-conditional).

- patchify: a ``patch_size`` x ``patch_size`` convolution with stride ``patch_size`` (one token per patch,
  T = (H / p)^2 tokens of width ``hidden_size``), plus a fixed 2-D sin-cos positional embedding (a buffer);
- conditioning: c = MLP(sinusoidal(time_scale * t)) (256 frequencies -> hidden -> hidden, SiLU), plus the same
  embedding of the step h for few-step nets (its last layer starts at zero), plus, for a class-conditional net
  (``num_classes`` = K > 0), a label embedding: an ``nn.Embedding(K + 1, hidden_size)`` row (DiT's
  c = t_emb + y_emb; the row K, or ``y=None``, is the null label of :mod:`flowprobe.guidance`), N(0, 0.02) as in
  the DiT code; c only enters through the zero-initialised adaLN modulations, so the new net still outputs 0;
- ``depth`` adaLN-Zero blocks: (shift, scale, gate) x 2 = Linear(SiLU(c)) (zero-initialised), then
  x = x + gate_1 * Attn(LN(x) (1 + scale_1) + shift_1) and x = x + gate_2 * MLP(LN(x) (1 + scale_2) + shift_2),
  LayerNorm without affine parameters, multi-head softmax attention through ``scaled_dot_product_attention``,
  a GELU(tanh) MLP of width ``mlp_ratio * hidden_size``;
- final layer: LN(x) (1 + scale) + shift (adaLN, zero-initialised), a zero-initialised Linear to p * p * C
  values per token, unpatchified to (B, C, H, H). The initial net outputs 0.

Every parameter belongs to an nn.Linear or the patch nn.Conv2d, so the ghost-norm probe covers all of them
(the label table of a class-conditional net, an nn.Embedding, goes through its exact per-sample fallback).
The attention takes the explicit softmax(q k^T / sqrt(d)) v path under torch.func transforms (vmap, jvp,
grad) and under forward-mode AD: the fused CPU kernel has no forward-mode derivative (torch 2.13) and no vmap
batching rule. The forward pass has no data-dependent control flow, so it runs under ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .embedding import TIME_SCALE, label_embedding, timestep_embedding
from .unet import attention as _fused_or_explicit

__all__ = ["DiT", "DIT_PRESETS", "dit_preset", "sincos_pos_embed_2d", "attention"]

#: sinusoidal frequencies fed to the time embedding MLP (DiT's frequency_embedding_size)
FREQ_DIM = 256


def sincos_pos_embed_2d(dim: int, grid: int, dtype=torch.float32) -> Tensor:
    """(grid * grid, dim) fixed 2-D sin-cos embedding of token k = i * grid + j (row i, column j), as in
    DiT / MAE: [sin(j w), cos(j w), sin(i w), cos(i w)] with w_m = 10000^(-m / (dim / 4)), m < dim / 4."""
    if dim % 4:
        raise ValueError(f"the positional embedding needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    col, row = pos.repeat(grid), pos.repeat_interleave(grid)

    def one_axis(p: Tensor) -> Tensor:
        a = p[:, None] * omega[None, :]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([one_axis(col), one_axis(row)], dim=1).to(dtype)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dimensions: ``scaled_dot_product_attention``, except under
    torch.func transforms and forward-mode AD (dual tensors), where the explicit product is used."""
    if not torch.compiler.is_compiling() and fwAD.unpack_dual(q).tangent is not None:
        return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v
    return _fused_or_explicit(q, k, v)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """c = Linear(SiLU(Linear(sinusoidal(time_scale * t)))) of width ``hidden_size``; ``zero_out`` starts the
    last layer at zero (the step embedding of a few-step net)."""

    def __init__(self, hidden_size: int, time_scale: float, zero_out: bool = False):
        super().__init__()
        self.time_scale = float(time_scale)
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.0 if zero_out else 0.02)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = timestep_embedding(t, FREQ_DIM, scale=self.time_scale)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (see the module docstring)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        width = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(approximate="tanh"),
                                 nn.Linear(width, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def attend(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attend(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """LN(x) (1 + scale) + shift with (shift, scale) = Linear(SiLU(c)), then a Linear to p * p * C per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT velocity field v(t, x) for square images (see the module docstring).

    Args:
        image_size: side H of the input images (a multiple of ``patch_size``).
        in_channels, out_channels: image channels in and out (out defaults to in).
        patch_size: side p of a patch; T = (H / p)^2 tokens.
        hidden_size: token width (a multiple of 4 and of ``num_heads``).
        depth: number of adaLN-Zero blocks.
        num_heads: attention heads (head width hidden_size / num_heads).
        mlp_ratio: hidden width of each block's MLP over ``hidden_size``.
        time_scale: t (and h) is multiplied by this before the sinusoidal embedding (1000 by default).
        step_embed: also take a step h (``net(t, x, h)``, the average velocity over [t, t + h] of few-step
            objectives such as MeanFlow): a second embedding of h added to c, its last layer zero-initialised,
            so the new net starts as a velocity field; h = 0 (or None) is the instantaneous velocity.
        num_classes: K > 0 makes the net class-conditional, ``net(t, x, y=labels)``: an ``nn.Embedding(K + 1,
            hidden_size)`` of the label is added to c; index K (or ``y=None``) is the null label, the
            unconditional field of classifier-free guidance (:mod:`flowprobe.guidance`).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, patch_size: int = 2, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, out_channels: int | None = None,
                 time_scale: float = TIME_SCALE, step_embed: bool = False, num_classes: int = 0):
        super().__init__()
        if min(image_size, in_channels, patch_size, hidden_size, depth, num_heads) < 1 or mlp_ratio <= 0:
            raise ValueError("image_size, in_channels, patch_size, hidden_size, depth, num_heads and mlp_ratio "
                             "must be positive")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 and by num_heads {num_heads}")
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.out_channels = out_channels or in_channels
        self.time_scale = float(time_scale)
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale)
        self.h_embedder = TimestepEmbedder(hidden_size, time_scale, zero_out=True) if step_embed else None
        self.num_classes = int(num_classes)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform Linear layers and patch projection, zero biases, zero adaLN
        modulations and output layer, N(0, 0.02) label table (the time embedders initialise themselves)."""
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear) and "embedder" not in name:
                nn.init.xavier_uniform_(mod.weight)
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                nn.init.zeros_(mod.bias)
        w = self.patch_embed.weight
        bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))  # Xavier on the weight as a (hidden, C p p) matrix
        nn.init.uniform_(w, -bound, bound)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
        for mod in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p * p * C) tokens -> (B, C, H, H) images."""
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.out_channels
        return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, t: Tensor | float, x: Tensor, h: Tensor | float | None = None, y: Tensor | None = None) -> Tensor:
        """v(t, x): t of shape (B,) (or a scalar, broadcast to the batch), x of shape (B, C, H, H); with
        ``step_embed``, u(t, x, h), the average velocity over [t, t + h] (h = None means 0); with ``num_classes``,
        v(t, x | y) for labels y (B,) (None: the null label, :mod:`flowprobe.guidance`)."""
        c = self.t_embedder(t, x)
        c = c + label_embedding(self.y_embedder, self.num_classes, y, c)
        if self.h_embedder is not None:
            c = c + self.h_embedder(0.0 if h is None else h, x)
        elif h is not None:
            raise ValueError("this net has no step input (build it with step_embed=True)")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = c.to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


#: Named configurations; each has about the parameter count of the UNet preset of the same name and 256 tokens
#: (64 for "tiny") at the image size it is named after. "cifar10" is DiT-S/2 of the paper (32x32 images in 2x2
#: patches, 32.5M parameters; the UNet has 35.7M); "celeba64" 64x64 images in 4x4 patches, 9.76M (the UNet
#: 9.59M); "tiny" 0.18M for CPU tests and quick runs on 16x16 images (the UNet 0.19M).
DIT_PRESETS: dict[str, dict] = {
    "cifar10": dict(image_size=32, in_channels=3, patch_size=2, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "celeba64": dict(image_size=64, in_channels=3, patch_size=4, hidden_size=256, depth=8, num_heads=4,
                     mlp_ratio=4.0),
    "tiny": dict(image_size=16, in_channels=3, patch_size=2, hidden_size=64, depth=2, num_heads=2, mlp_ratio=4.0),
}


def dit_preset(name: str, **overrides) -> DiT:
    """A :class:`DiT` built from the preset ``name`` (one of DIT_PRESETS), with keyword ``overrides``."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
    return DiT(**{**DIT_PRESETS[name], **overrides})
