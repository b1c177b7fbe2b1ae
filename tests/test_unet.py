"""The ADM-style UNet and the fast training-step helpers."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.func import functional_call, grad, vmap

from flowprobe.train.step import (autocast, ema_update_, make_ema, make_optimizer, make_train_step, prepare_model,
                            set_tf32)
from flowprobe.nets import UNet, count_parameters, unet_preset
from flowprobe.nets.unet import attention
from flowprobe.objectives import cfm_sample_loss

TORCHCFM_CIFAR10_PARAMS = 35_746_307  # torchcfm UNetModelWrapper(dim=(3,32,32), 128 ch, (1,2,2,2), attn 16)


def _randomise(net: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter random values (the zero-initialised output layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _tiny(**kw) -> UNet:
    return unet_preset("tiny", **kw)


def test_cifar10_preset_parameter_count_matches_torchcfm():
    n = count_parameters(unet_preset("cifar10"))
    print(f"cifar10 UNet parameters: {n:,} (torchcfm UNetModelWrapper: {TORCHCFM_CIFAR10_PARAMS:,})")
    assert abs(n - TORCHCFM_CIFAR10_PARAMS) / TORCHCFM_CIFAR10_PARAMS < 0.02


def test_cifar10_parameter_count_against_torchcfm_model():
    unet_mod = pytest.importorskip("torchcfm.models.unet.unet")
    ref = unet_mod.UNetModelWrapper(dim=(3, 32, 32), num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2],
                                    num_heads=4, num_head_channels=64, attention_resolutions="16", dropout=0.1)
    assert count_parameters(unet_preset("cifar10")) == count_parameters(ref)


def test_scale_shift_adds_the_expected_parameters():
    # Scale-shift doubles each residual block's embedding projection: + (emb_dim + 1) * out_channels per block.
    a = UNet(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, use_scale_shift_norm=False,
             num_head_channels=None)
    b = UNet(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, use_scale_shift_norm=True,
             num_head_channels=None)
    emb_dim = 4 * 32
    # out channels of the residual blocks: down 32, 64; middle 64, 64; up 64, 64, 32, 32.
    outs = [32, 64, 64, 64, 64, 64, 32, 32]
    assert count_parameters(b) - count_parameters(a) == sum((emb_dim + 1) * c for c in outs)


@pytest.mark.parametrize("kw,shape", [
    (dict(), (2, 3, 16, 16)),
    (dict(), (3, 3, 8, 8)),
    (dict(in_channels=1, channel_mult=(1, 2, 2), image_size=16), (2, 1, 16, 16)),
    (dict(resblock_updown=True, use_scale_shift_norm=False), (2, 3, 16, 16)),
    (dict(num_res_blocks=2, attention_resolutions=(16, 8), num_head_channels=8), (2, 3, 16, 16)),
])
def test_output_shape_equals_input_shape(kw, shape):
    net = _randomise(_tiny(**kw)).eval()
    x = torch.randn(shape)
    out = net(torch.rand(shape[0]), x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_out_channels_and_scalar_time():
    net = _randomise(_tiny(out_channels=5)).eval()
    x = torch.randn(3, 3, 16, 16)
    out_scalar = net(torch.tensor(0.3), x)
    out_vec = net(torch.full((3,), 0.3), x)
    assert out_scalar.shape == (3, 5, 16, 16)
    torch.testing.assert_close(out_scalar, out_vec)
    torch.testing.assert_close(net(0.3, x), out_vec)


def test_zero_initialised_output_layer():
    net = _tiny()
    assert torch.count_nonzero(net(torch.rand(2), torch.randn(2, 3, 16, 16))) == 0


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="image_size"):
        UNet(image_size=20, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="num_groups"):
        UNet(model_channels=20, num_groups=32)
    with pytest.raises(ValueError, match="preset"):
        unet_preset("imagenet")


@pytest.mark.parametrize("scale_shift", [True, False])
def test_time_conditioning_changes_the_output(scale_shift):
    net = _randomise(_tiny(use_scale_shift_norm=scale_shift)).eval()
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    out = net(torch.tensor([0.2, 0.7]), x)
    assert (out[0] - out[1]).abs().max() > 1e-3
    # Same t and same x give the same output: the difference above comes from t alone.
    same = net(torch.tensor([0.2, 0.2]), x)
    torch.testing.assert_close(same[0], same[1])


def test_time_embedding_scale_is_used():
    # With scale 0 the sinusoidal embedding is constant in t, so t has no effect at all.
    net = _randomise(_tiny(time_scale=0.0)).eval()
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    out = net(torch.tensor([0.2, 0.7]), x)
    torch.testing.assert_close(out[0], out[1])


def test_channels_last_matches_contiguous():
    net = _randomise(_tiny()).eval()
    x = torch.randn(4, 3, 16, 16)
    t = torch.rand(4)
    ref = net(t, x)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    out = net_cl(t, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu():
    net = _randomise(_tiny()).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.rand(2)
    ref = net(t, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(t, x)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05  # bf16 has 8 significand bits; the bulk of the output must agree


def test_attention_math_path_equals_sdpa():
    q, k, v = torch.randn(3, 2, 2, 10, 8, dtype=torch.float64).unbind(0)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
    torch.testing.assert_close(attention(q, k, v), ref)
    # Under a torch.func transform the explicit path is taken; it must agree as well.
    out = vmap(attention)(q, k, v)
    torch.testing.assert_close(out, ref)


def test_per_sample_gradients_under_vmap_equal_a_loop():
    torch.manual_seed(0)
    net = _randomise(_tiny(image_size=8, attention_resolutions=(4, 8), dropout=0.1), std=0.2).double().eval()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def sample_loss(p, t, x, u):
        return cfm_sample_loss(lambda tt, xx: functional_call(net, p, (tt, xx)), t, x, u)

    n = 3
    t = torch.rand(n, dtype=torch.float64)
    x = torch.randn(n, 3, 8, 8, dtype=torch.float64)
    u = torch.randn_like(x)
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(params, t, x, u)
    for i in range(n):
        net.zero_grad()
        cfm_sample_loss(net, t[i], x[i], u[i]).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    # The per-sample gradients differ between samples (the check above is not vacuous).
    g = per_sample["input_conv.weight"]
    assert (g[0] - g[1]).abs().max() > 1e-6


def test_forward_traces_as_one_graph():
    # fullgraph=True fails on any graph break (data-dependent Python control flow, unsupported calls).
    net = _randomise(_tiny()).eval()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    torch.testing.assert_close(compiled(t, x), net(t, x))


# ---------------------------------------------------------------------------------------------------------------
# flowprobe.train.step


def _cfm_objective(net, x0, x1, t):
    """Mean over batch and dimensions of ||net(t, x_t) - (x1 - x0)||^2 on the straight path."""
    tt = t[:, None, None, None]
    x_t = (1 - tt) * x0 + tt * x1
    return (net(t, x_t) - (x1 - x0)).pow(2).mean()


def test_ema_update_matches_the_formula():
    net = _randomise(_tiny(), seed=1)
    ema = make_ema(net)
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    before = [p.detach().clone() for p in ema.parameters()]
    _randomise(net, seed=2)
    ema_update_(ema, net, decay=0.9)
    for e, b, p in zip(ema.parameters(), before, net.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())
    # Lists of tensors work as well, and decay 1 leaves the average unchanged.
    a, b = [torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]
    a0 = [x.clone() for x in a]
    ema_update_(a, b, decay=1.0)
    for x, y in zip(a, a0):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(a, b, decay=1.5)


def test_train_step_equals_a_plain_eager_step():
    torch.manual_seed(0)
    net = _randomise(_tiny(), seed=3, std=0.05)
    ref = copy.deepcopy(net)
    ema, ref_ema = make_ema(net), make_ema(ref)
    x0, x1, t = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.rand(8)

    opt = make_optimizer(net.parameters(), lr=1e-3, kind="adam")
    step = make_train_step(net, opt, _cfm_objective, precision="fp32", compile=False, grad_clip=0.05, ema=ema,
                           ema_decay=0.9)
    out = step(x0, x1, t)

    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, foreach=False)
    loss = _cfm_objective(ref, x0, x1, t)
    loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters()))
    assert norm > 0.05  # clipping is active
    for p in ref.parameters():
        p.grad.mul_(0.05 / (norm + 1e-6))
    ref_opt.step()
    with torch.no_grad():
        for e, p in zip(ref_ema.parameters(), ref.parameters()):
            e.mul_(0.9).add_(0.1 * p)

    torch.testing.assert_close(out.loss, loss.detach())
    torch.testing.assert_close(out.grad_norm, norm)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(ema.parameters(), ref_ema.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_overfits_a_tiny_problem(precision):
    torch.manual_seed(0)
    net = prepare_model(_tiny(image_size=8, attention_resolutions=(4,)), "cpu", channels_last=True)
    assert net.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x0, x1, t = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g), torch.rand(8, generator=g)
    x0, x1 = (x.contiguous(memory_format=torch.channels_last) for x in (x0, x1))
    opt = make_optimizer(net.parameters(), lr=3e-3)
    step = make_train_step(net, opt, _cfm_objective, precision=precision, grad_clip=1.0)
    losses = torch.stack([step(x0, x1, t).loss for _ in range(60)])
    assert losses[-5:].mean() < 0.5 * losses[:3].mean()


def test_precision_and_optimizer_arguments_are_checked():
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "fp8")
    with pytest.raises(ValueError, match="kind"):
        make_optimizer([torch.zeros(1, requires_grad=True)], kind="sgd")
    assert isinstance(autocast("cpu", "fp32"), contextlib.nullcontext)
    with autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    opt = make_optimizer([torch.zeros(1, requires_grad=True)])
    assert opt.defaults["foreach"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_compiled_step_matches_eager_on_cuda(compile_mode):
    # Compiled (and CUDA-graphed) steps follow the same trajectory as eager steps (fp32, no TF32, no dropout).
    previous = set_tf32(False)
    try:
        torch.manual_seed(0)
        base = _randomise(_tiny(dropout=0.0), seed=5, std=0.05).cuda()
        g = torch.Generator(device="cuda").manual_seed(0)
        batches = [tuple(torch.randn(8, 3, 16, 16, device="cuda", generator=g) for _ in range(2))
                   + (torch.rand(8, device="cuda", generator=g),) for _ in range(4)]
        nets, losses = [], []
        for compile in (False, True):
            net = copy.deepcopy(base)
            ema = make_ema(net)
            opt = make_optimizer(net.parameters(), lr=1e-3)
            step = make_train_step(net, opt, _cfm_objective, grad_clip=1.0, ema=ema, ema_decay=0.9, compile=compile,
                                   compile_mode=compile_mode if compile else None)
            losses.append(torch.stack([step(*b).loss for b in batches]))
            nets.append((net, ema))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        for a, b in zip(nets[1][0].parameters(), nets[0][0].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(nets[1][1].parameters(), nets[0][1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    finally:
        set_tf32(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]
