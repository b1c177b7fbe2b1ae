"""An ADM-style UNet velocity network for images: ``net(t, x)`` with x of shape (B, C, H, W).

Architecture (the "guided diffusion" family of Dhariwal & Nichol, 2021):

- time: e = MLP(sinusoidal(time_scale * t)), an MLP d -> 4d -> 4d with SiLU, d = model_channels;
- an input 3x3 convolution, then ``len(channel_mult)`` resolution levels going down, each with
  ``num_res_blocks`` residual blocks (plus self-attention at the resolutions in ``attention_resolutions``)
  and a 2x downsampling between levels;
- a middle block: residual block, self-attention, residual block;
- the same levels going up, each with ``num_res_blocks + 1`` residual blocks fed with the concatenated
  skip activations of the way down, and a 2x upsampling between levels;
- GroupNorm(32), SiLU and a zero-initialised 3x3 convolution to the output.

A residual block computes h = conv(SiLU(GN(x))); then, with scale-shift conditioning,
h = GN(h) * (1 + s) + b with (s, b) = Linear(SiLU(e)), else h = GN(h + Linear(SiLU(e)));
h = conv(dropout(SiLU(h))) (zero-initialised); out = skip(x) + h, skip a 1x1 convolution when the
channel count changes. Self-attention is multi-head softmax(q k^T / sqrt(d_head)) v over the H*W
positions (``scaled_dot_product_attention``), with a residual connection and zero-initialised output
projection.

The forward pass has no data-dependent Python control flow, so it runs under ``torch.compile``,
``torch.func.vmap`` (per-sample gradients: take them in eval mode when dropout > 0), bf16 autocast and
channels_last memory format.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embedding import TIME_SCALE, label_embedding, timestep_embedding

__all__ = ["UNet", "unet_preset", "UNET_PRESETS", "count_parameters", "attention"]


def count_parameters(net: nn.Module) -> int:
    """Number of scalar parameters of ``net`` (sum of numel over all parameters)."""
    return sum(p.numel() for p in net.parameters())


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"GroupNorm needs channels divisible by num_groups={groups}; got {channels} channels")
    return nn.GroupNorm(groups, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution (``use_conv``) or 2x2 average pooling."""

    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, followed by a 3x3 convolution when ``use_conv``."""

    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("upsampling without convolution cannot change the channel count")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding e (see the module docstring for the math).

    ``updown``: "up" or "down" resamples inside the block (nearest / average pool, no convolution),
    before the first convolution and on the skip path; None keeps the resolution.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, updown: str | None = None, num_groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm_in = _norm(channels, num_groups)
        self.conv_in = nn.Conv2d(channels, out_channels, 3, padding=1)
        if updown == "up":
            self.resample_h, self.resample_x = Upsample(channels, use_conv=False), Upsample(channels, use_conv=False)
        elif updown == "down":
            self.resample_h = Downsample(channels, use_conv=False)
            self.resample_x = Downsample(channels, use_conv=False)
        elif updown is None:
            self.resample_h, self.resample_x = nn.Identity(), nn.Identity()
        else:
            raise ValueError(f"updown must be 'up', 'down' or None, got {updown!r}")
        self.emb = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm_out = _norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm_in(x))
        h = self.conv_in(self.resample_h(h))
        x = self.resample_x(x)
        e = self.emb(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm_out(h) * (1 + scale) + shift
        else:
            h = self.norm_out(h + e)
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _under_functorch(x: Tensor) -> bool:
    """True when x is wrapped by a torch.func transform (vmap, grad, jvp), outside torch.compile tracing."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dimensions (q, k, v of shape (..., N, d)).

    Uses ``scaled_dot_product_attention`` (fused kernels), except under torch.func transforms, where
    the explicit product is used: the fused kernels have no vmap batching rule and would fall back to a
    slow per-sample loop.
    """
    if _under_functorch(q):
        weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)
        return weights @ v
    return F.scaled_dot_product_attention(q, k, v)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions: x + proj(SDPA(q, k, v)), q, k, v = Linear(GN(x))."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int | None = None,
                 num_groups: int = 32):
        super().__init__()
        if num_head_channels:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            num_heads = channels // num_head_channels
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = _norm(channels, num_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(b, hgt * wid, 3, self.num_heads, c // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, d_head)
        a = attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, hgt * wid, c)
        out = self.proj(a).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + out.to(x.dtype)


class _Level(nn.Module):
    """A residual block optionally followed by self-attention (one step of a UNet level)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """ADM-style UNet velocity field v(t, x) for images (see the module docstring).

    Args:
        image_size: side of the (square) input images; only used to place attention (the net is
            fully convolutional otherwise) and checked against the number of downsamplings.
        in_channels, out_channels: image channels in and out (out defaults to in).
        model_channels: base width d; level i has d * channel_mult[i] channels; time embedding 4d.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sides (e.g. (16,)) at which self-attention follows each block.
        dropout: dropout probability inside residual blocks.
        num_heads / num_head_channels: heads of attention; num_head_channels (if set) overrides num_heads.
        use_scale_shift_norm: FiLM-style GN(h)(1 + s) + b time conditioning instead of additive.
        resblock_updown: resample with residual blocks instead of (de)convolutions.
        time_scale: t is multiplied by this before the sinusoidal embedding (1000 by default).
        num_groups: GroupNorm groups (32 in ADM; smaller for very narrow nets).
        conv_resample: use convolutions in the plain up/down-sampling layers.
        step_embed: also take a step h (``net(t, x, h)``, the average velocity over [t, t + h] of few-step
            objectives such as MeanFlow): a second embedding MLP of h, added to the time embedding. Its last
            layer starts at zero, so the new net starts as a velocity field; h = 0 (or None) is the
            instantaneous velocity.
        num_classes: K > 0 makes the net class-conditional, ``net(t, x, y=labels)``: an ``nn.Embedding(K + 1,
            4d)`` of the label is added to the time embedding; index K (or ``y=None``) is the null label, the
            unconditional field (:mod:`flowprobe.guidance`).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, model_channels: int = 128,
                 out_channels: int | None = None, channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Iterable[int] = (16,), dropout: float = 0.1, num_heads: int = 4,
                 num_head_channels: int | None = 64, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = False, time_scale: float = TIME_SCALE, num_groups: int = 32,
                 conv_resample: bool = True, step_embed: bool = False, num_classes: int = 0):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
        if num_res_blocks < 1 or model_channels < 1 or in_channels < 1:
            raise ValueError("num_res_blocks, model_channels and in_channels must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if image_size % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2^(len(channel_mult)-1) = "
                             f"{2 ** (len(channel_mult) - 1)}")
        self.image_size, self.in_channels = image_size, in_channels
        self.out_channels = out_channels or in_channels
        self.model_channels, self.channel_mult = model_channels, channel_mult
        self.num_res_blocks, self.attention_resolutions = num_res_blocks, attention_resolutions
        self.time_scale = float(time_scale)
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.step_embed = None
        if step_embed:
            self.step_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                            _zero(nn.Linear(emb_dim, emb_dim)))
        self.num_classes = int(num_classes)
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        def res(cin: int, cout: int, updown: str | None = None) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, dropout, use_scale_shift_norm, updown, num_groups)

        def attn(ch: int, side: int) -> AttentionBlock | None:
            if side not in attention_resolutions:
                return None
            return AttentionBlock(ch, num_heads, num_head_channels, num_groups)

        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [model_channels]
        ch, side = model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(_Level(res(ch, model_channels * mult), attn(model_channels * mult, side)))
                ch = model_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(res(ch, ch, "down") if resblock_updown else Downsample(ch, use_conv=conv_resample))
                skip_channels.append(ch)
                side //= 2
        self.middle = nn.ModuleList([res(ch, ch), AttentionBlock(ch, num_heads, num_head_channels, num_groups),
                                     res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                cin = ch + skip_channels.pop()
                ch = model_channels * mult
                self.up.append(_Level(res(cin, ch), attn(ch, side)))
                if level and i == num_res_blocks:
                    self.up.append(res(ch, ch, "up") if resblock_updown else Upsample(ch, use_conv=conv_resample))
                    side *= 2
        self.out = nn.Sequential(_norm(ch, num_groups), nn.SiLU(), _zero(nn.Conv2d(ch, self.out_channels, 3,
                                                                                   padding=1)))

    def _embed(self, t: Tensor | float, x: Tensor, mlp: nn.Sequential) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = timestep_embedding(t, self.model_channels, scale=self.time_scale)
        return mlp(emb.to(mlp[0].weight.dtype))

    def forward(self, t: Tensor | float, x: Tensor, h: Tensor | float | None = None, y: Tensor | None = None) -> Tensor:
        """v(t, x): t of shape (B,) (or a scalar, broadcast to the batch), x of shape (B, C, H, W); with
        ``step_embed``, u(t, x, h), the average velocity over [t, t + h] (h = None means 0); with ``num_classes``,
        v(t, x | y) for labels y (B,) (None: the null label, :mod:`flowprobe.guidance`)."""
        emb = self._embed(t, x, self.time_embed)
        emb = emb + label_embedding(self.label_embed, self.num_classes, y, emb)
        if self.step_embed is not None:
            emb = emb + self._embed(0.0 if h is None else h, x, self.step_embed)
        elif h is not None:
            raise ValueError("this net has no step input (build it with step_embed=True)")
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, (_Level, ResBlock)) else block(h)
            skips.append(h)
        h = self.middle[2](self.middle[1](self.middle[0](h, emb)), emb)
        for block in self.up:
            if isinstance(block, _Level):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return self.out(h)


#: Named configurations. "cifar10" is the standard CIFAR-10 flow-matching UNet (the torchcfm recipe:
#: additive time conditioning, 35.75M parameters); "celeba64" a narrower net for 64x64 faces; "tiny" a
#: small net for CPU tests and quick runs on 16x16 images.
UNET_PRESETS: dict[str, dict] = {
    "cifar10": dict(image_size=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), dropout=0.1, num_heads=4, num_head_channels=64,
                    use_scale_shift_norm=False),
    "celeba64": dict(image_size=64, in_channels=3, model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                     attention_resolutions=(16,), dropout=0.1, num_heads=4, num_head_channels=64,
                     use_scale_shift_norm=True),
    "tiny": dict(image_size=16, in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), dropout=0.0, num_heads=2, num_head_channels=None,
                 use_scale_shift_norm=True, num_groups=8),
}


def unet_preset(name: str, **overrides) -> UNet:
    """A :class:`UNet` built from the preset ``name`` (one of UNET_PRESETS), with keyword ``overrides``."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(UNET_PRESETS)}")
    return UNet(**{**UNET_PRESETS[name], **overrides})
