"""Training-step throughput of the CIFAR-10 flow-matching UNet: flowprobe against the torchcfm recipe.

Both sides train the same network shape (128 channels, multipliers 1,2,2,2, two residual blocks,
attention at 16x16; 35.75M parameters) with independent-coupling CFM (sigma = 0), batch 128,
Adam 2e-4 with linear warm-up, gradient clipping at 1.0 and an EMA (0.9999) updated every step:

- ``torchcfm-fp32``: torchcfm's ``UNetModelWrapper`` and ``ConditionalFlowMatcher(sigma=0.0)`` as its
  CIFAR-10 example runs them: fp32, PyTorch's default backend flags, ``torch.optim.Adam``, and an EMA
  that loops over the state_dict tensor by tensor;
- ``ours-*``: :func:`flowprobe.nets.unet_preset` ("cifar10") and :func:`flowprobe.train.step.make_train_step`
  (fused Adam, foreach clipping and EMA, SDPA attention), in fp32 with default flags, then TF32, bf16
  autocast, channels_last, ``torch.compile`` and CUDA graphs (compile mode "reduce-overhead").

Data are random tensors already on the device (the data loader is not measured). Timing: warm-up steps
are excluded; the timed steps are bracketed by CUDA events after a synchronisation. Model FLOPs per
image are counted once by ``torch.utils.flop_counter.FlopCounterMode`` on a forward + backward pass;
MFU = FLOP/s achieved / the GPU's dense bf16 peak (``--peak-tflops``, 989 for an H100 SXM).

    python benchmarks/train_step.py                      # GPU, full size (about 3 minutes on an H100)
    python benchmarks/train_step.py --device cpu --tiny  # seconds on a CPU: a smoke test of the code
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
import warnings

import torch
from torch import nn

from flowprobe.train.step import configure_backends, make_ema, make_optimizer, make_train_step, prepare_model
from flowprobe.nets import UNet, count_parameters
from flowprobe.objectives import squared_error
from flowprobe.paths import LinearPath

FULL = dict(image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
            num_head_channels=64)
TINY = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
            num_head_channels=32)
#: --net: the benchmark's network (``cifar10``, the torchcfm comparison), the nets the image experiments
#: train by default (no dropout): ``cifar10-64`` (cifar-gradvar) and ``celeba64`` (celeba-pairs / -reflow),
#: and ``tiny`` (a CPU smoke test). torchcfm's side runs only for cifar10 and tiny, whose shapes it mirrors.
NETS = {"cifar10": FULL, "tiny": TINY,
        "cifar10-64": dict(FULL, model_channels=64, dropout=0.0),
        "celeba64": dict(image_size=64, model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attention_resolutions=(16,), num_head_channels=64, use_scale_shift_norm=True, dropout=0.0)}
VARIANTS = ("torchcfm-fp32", "ours-fp32", "ours-tf32", "ours-bf16", "ours-bf16-cl", "ours-bf16-cl-compile",
            "ours-bf16-cl-compile-cudagraphs")
LR, WARMUP, EMA_DECAY, CLIP = 2e-4, 5000, 0.9999, 1.0


def default_flags() -> None:
    """PyTorch's defaults: no TF32 matmuls, TF32 cuDNN convolutions, no cuDNN autotuning."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = False


def warmup_lr(step: int) -> float:
    return LR * min(step, WARMUP) / WARMUP if WARMUP else LR


def torchcfm_step_fn(cfg: dict, device: torch.device):
    """The torchcfm CIFAR-10 example's step (model, matcher, Adam, clip, LambdaLR warm-up, state_dict EMA)."""
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models.unet.unet import UNetModelWrapper

    side = cfg["image_size"]
    net = UNetModelWrapper(dim=(3, side, side), num_res_blocks=cfg["num_res_blocks"],
                           num_channels=cfg["model_channels"], channel_mult=list(cfg["channel_mult"]), num_heads=4,
                           num_head_channels=cfg["num_head_channels"],
                           attention_resolutions=",".join(str(r) for r in cfg["attention_resolutions"]),
                           dropout=0.1).to(device)
    ema_net = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda s: min(s, WARMUP) / WARMUP)
    matcher = ConditionalFlowMatcher(sigma=0.0)

    def ema_loop(source: nn.Module, target: nn.Module, decay: float) -> None:
        src, tgt = source.state_dict(), target.state_dict()
        for key in src:
            tgt[key].data.copy_(tgt[key].data * decay + src[key].data * (1 - decay))

    def step(x1: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        x0 = torch.randn_like(x1)
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((net(t, xt) - ut) ** 2)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        sched.step()
        ema_loop(net, ema_net, EMA_DECAY)
        return loss.detach()

    return net, step


def cfm_loss(net: nn.Module, x1: torch.Tensor) -> torch.Tensor:
    """Independent-coupling CFM on the straight path: mean over batch and pixels of ||v(t, x_t) - (x1 - x0)||^2."""
    x0 = torch.randn_like(x1)
    t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype)
    x_t, u_t = LinearPath().sample(x0, x1, t)
    return squared_error(net(t, x_t), u_t, "mean").mean()


def ours_step_fn(cfg: dict, device: torch.device, precision: str, channels_last: bool, compile: bool,
                 cudagraphs: bool):
    net = UNet(**{"dropout": 0.1, "use_scale_shift_norm": False, **cfg})
    net = prepare_model(net, device, channels_last=channels_last)
    ema = make_ema(net)
    opt = make_optimizer(net.parameters(), lr=LR, kind="adam")
    train_step = make_train_step(net, opt, cfm_loss, precision=precision, compile=compile, grad_clip=CLIP, ema=ema,
                                 ema_decay=EMA_DECAY, compile_mode="reduce-overhead" if cudagraphs else None)
    counter = {"step": 0}

    def step(x1: torch.Tensor) -> torch.Tensor:
        counter["step"] += 1
        for group in opt.param_groups:
            group["lr"] = warmup_lr(counter["step"])
        return train_step(x1).loss

    return net, step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, x1: torch.Tensor, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per timed step, seconds spent in warm-up incl. compilation)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(x1)
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = step(x1)
        end.record()
        torch.cuda.synchronize(device)
        per_step = start.elapsed_time(end) / 1000.0 / steps
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step(x1)
        per_step = (time.perf_counter() - t0) / steps
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss")
    return per_step, warm_s


def count_sync_warnings(step, x1: torch.Tensor, device: torch.device, show: bool = False) -> int | None:
    """Host-device synchronisations in one step, by torch.cuda.set_sync_debug_mode('warn') (CUDA only)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(x1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [w for w in caught if "called a synchronizing" in str(w.message)]
    if show:
        for w in found:
            print(f"  sync at {w.filename}:{w.lineno}: {w.message}")
    return len(found)


def flops_per_image(cfg: dict, device: torch.device, batch: int) -> float:
    """Model FLOPs of one forward + backward pass per image, by FlopCounterMode (fp32 eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = UNet(**{"dropout": 0.1, "use_scale_shift_norm": False, **cfg}).to(device)
    side = cfg["image_size"]
    x = torch.randn(batch, 3, side, side, device=device)
    t = torch.rand(batch, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        net(t, x).square().mean().backward()
    return counter.get_total_flops() / batch


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a small UNet on 16x16 images (CPU smoke test)")
    parser.add_argument("--net", default=None, choices=sorted(NETS),
                        help="network (default cifar10; --tiny means tiny): cifar10-64 and celeba64 are the nets "
                             "of the image experiments")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (16 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 50, 5 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 10, 2 --tiny)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                        help="cuDNN convolution autotuning in the TF32/bf16 variants")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    net_name = args.net or ("tiny" if args.tiny else "cifar10")
    cfg = NETS[net_name]
    args.tiny = net_name == "tiny"
    batch = args.batch_size or (16 if args.tiny else 128)
    steps = args.steps or (5 if args.tiny else 50)
    warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 10)
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    elif device.type == "cuda":
        variants = list(VARIANTS)
    else:  # compilation on a CPU takes minutes and CUDA graphs need a GPU
        variants = [v for v in VARIANTS if "compile" not in v]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    flops = flops_per_image(cfg, device, min(batch, 8))
    print(f"device: {gpu}; torch {torch.__version__}; batch {batch}; {warmup} warm-up + {steps} timed steps; "
          f"net {net_name}")
    print(f"model FLOPs per image (forward + backward, FlopCounterMode): {flops / 1e9:.2f} GFLOP")

    side = cfg["image_size"]
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for name in variants:
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        channels_last = "-cl" in name
        x1 = torch.rand(batch, 3, side, side, device=device, generator=gen) * 2 - 1
        if channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
        if name in ("torchcfm-fp32", "ours-fp32"):
            default_flags()
        else:
            configure_backends("tf32", cudnn_benchmark=args.cudnn_benchmark)  # TF32 matmuls and convolutions
        if name == "torchcfm-fp32":
            if net_name not in ("cifar10", "tiny"):
                print(f"{name}: skipped (torchcfm's side mirrors only the cifar10 and tiny nets)")
                continue
            try:
                net, step = torchcfm_step_fn(cfg, device)
            except ImportError as err:
                print(f"{name}: skipped ({err})")
                continue
        else:
            precision = "bf16" if "bf16" in name else ("tf32" if "tf32" in name else "fp32")
            net, step = ours_step_fn(cfg, device, precision, channels_last, "compile" in name, "cudagraphs" in name)
        per_step, warm_s = time_steps(step, x1, warmup, steps, device)
        syncs = count_sync_warnings(step, x1, device, show=True) if name.startswith("ours") else None
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        row = dict(variant=name, params=count_parameters(net), ms_per_step=1e3 * per_step,
                   images_per_s=batch / per_step, warmup_s=warm_s, peak_mem_gib=mem, host_syncs=syncs,
                   mfu=flops * batch / per_step / (args.peak_tflops * 1e12) if device.type == "cuda" else None)
        results.append(row)
        print(f"{name:34s} {row['images_per_s']:9.1f} img/s  {row['ms_per_step']:8.2f} ms/step  "
              f"MFU {_pct(row['mfu'])}  warm-up {warm_s:6.1f} s  peak {mem:5.2f} GiB  syncs/step {syncs}",
              flush=True)
        del net, step

    base = next((r for r in results if r["variant"] == "torchcfm-fp32"), None)
    print()
    print(f"| variant | params | images/s | ms/step | vs torchcfm | MFU (bf16 peak {args.peak_tflops:g} TFLOP/s) "
          f"| peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "n/a"
        mem = "n/a" if math.isnan(r["peak_mem_gib"]) else f"{r['peak_mem_gib']:.2f}"
        print(f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['images_per_s']:.1f} | {r['ms_per_step']:.2f} "
              f"| {ratio} | {_pct(r['mfu'])} | {mem} |")
    if args.json:
        from flowprobe.io import write_json

        write_json(args.json, dict(device=gpu, net=net_name, torch=torch.__version__, batch=batch, steps=steps,
                                   warmup=warmup, flops_per_image=flops, peak_tflops=args.peak_tflops, results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
