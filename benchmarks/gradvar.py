"""Cost of a gradient-variance profile by each method, against the training steps it replaces.

A profile is ``--times`` values of t (default 21) x ``--samples`` per-sample gradients (default 256). The
baseline is one ordinary training step per t on the same batch size: forward + backward of the mean CFM
loss over 256 samples (train mode, no optimiser update), i.e. 21 steps for the profile. The table gives
each method's wall time and its ratio to those 21 steps, and checks that the per-sample-exact methods
(exact, ghost, naive) return the same numbers on the same draws.

    OMP_NUM_THREADS=2 python benchmarks/gradvar.py --model mlp                 # CPU, MLP 3x256 on d = 16
    python benchmarks/gradvar.py --model unet --device cuda                    # CIFAR-10 UNet (35.7M params)

``--naive-times K`` times the naive loop on K of the t values only and scales it to the full profile
(marked "extrapolated"; default 1 on a GPU, 3 elsewhere). Each timing is the minimum over ``--repeat``
runs (default 3; the naive loop runs once), which is the robust choice on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from flowprobe.couplings import GaussianSampler, IndependentCoupling
from flowprobe.objectives import CFMObjective
from flowprobe.paths import LinearPath
from flowprobe.probes.gradvar import gradient_variance


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model: str, device: torch.device, preset: str = "cifar10"):
    """(net, sampler, description) for the benchmark model."""
    if model == "mlp":
        from flowprobe.nets import MLP

        torch.manual_seed(0)
        net = MLP(16, width=256, depth=3, time_embed_dim=32)
        shape = (16,)
        desc = "MLP 3x256, d = 16"
    else:
        from flowprobe.nets.unet import count_parameters, unet_preset

        torch.manual_seed(0)
        net = unet_preset(preset)
        with torch.no_grad():  # leave the zero-initialised output layers, so every layer has a gradient
            for p in net.parameters():
                if p.dim() > 1 and p.abs().max() == 0:
                    p.normal_(0, 1e-3)
        shape = (net.in_channels, net.image_size, net.image_size)
        desc = f"UNet {preset} preset ({count_parameters(net) / 1e6:.2f}M params), {'x'.join(map(str, shape))}"
    net = net.to(device)
    sampler = IndependentCoupling(GaussianSampler(shape, device=device), GaussianSampler(shape, mean=0.5, std=0.5,
                                                                                           device=device))
    return net, sampler, desc


def time_train_steps(net, sampler, times, n, device, repeat: int = 1) -> float:
    """Wall time of one forward + backward of the mean loss on n samples at each t (train mode)."""
    objective = CFMObjective(LinearPath(), reduction="sum")
    gen = torch.Generator(device=device).manual_seed(1)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    for _ in range(2):  # warm-up
        loss = objective(net, sampler.sample(n, gen), gen, t=torch.full((n,), 0.5, device=device))
        torch.autograd.grad(loss, params)
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        for t in times:
            loss = objective(net, sampler.sample(n, gen), gen, t=torch.full((n,), t, device=device))
            torch.autograd.grad(loss, params)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    net.eval()
    return best


def time_profile(net, sampler, times, n, method, chunk_size, device, micro_batch_size,
                 repeat: int = 1) -> tuple[float, object, float]:
    """(best wall time of the profile, its result, wall time of the warm-up call on one t)."""
    # "ghost-unfold" / "ghost-grouped": the ghost method with that convolution rule; "ghost": the default (auto)
    method, _, conv = method.partition("-")
    kw = dict(n_samples=n, method=method, chunk_size=chunk_size, micro_batch_size=micro_batch_size,
              ghost_conv=conv or "auto")
    _sync(device)
    start = time.perf_counter()
    gradient_variance(net, LinearPath(), sampler, times[:1], generator=torch.Generator(device=device).manual_seed(9),
                      **kw)  # warm-up (cudnn autotuning, vmap tracing, the auto conv rule's timing)
    _sync(device)
    warm = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeat):
        gen = torch.Generator(device=device).manual_seed(2)
        _sync(device)
        start = time.perf_counter()
        res = gradient_variance(net, LinearPath(), sampler, times, generator=gen, **kw)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, res, warm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("mlp", "unet"), default="mlp")
    ap.add_argument("--preset", default="cifar10", help="UNet preset (tiny: a CPU smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--times", type=int, default=21)
    ap.add_argument("--methods", default="naive,exact,microbatch,ghost,ghost-grouped,ghost-unfold",
                    help="comma-separated; ghost = ghost norms with the default convolution rule (auto: the faster "
                         "rule per layer shape, timed in the warm-up call); ghost-grouped / ghost-unfold force one")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="samples per chunk (default: all 256 for the MLP and for ghost; 32 for exact on the UNet)")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--naive-times", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.model == "unet":
        try:
            import flowprobe.nets.unet  # noqa: F401
        except ModuleNotFoundError:
            print("flowprobe.nets.unet is not available: skipping the UNet benchmark")
            return 0
    net, sampler, desc = build(args.model, device, args.preset)
    n = args.samples
    times = [round(0.01 + 0.98 * k / (args.times - 1), 4) for k in range(args.times)]
    naive_k = min(len(times), args.naive_times or (1 if device.type == "cuda" else 3))

    base = time_train_steps(net, sampler, times, n, device, args.repeat)
    rows = []
    results = {}
    interrupted = None
    try:
        for method in args.methods.split(","):
            if args.chunk_size is not None:
                chunk = args.chunk_size
            else:
                chunk = 32 if (args.model == "unet" and method == "exact") else n
            ts = times if method != "naive" else times[:naive_k]
            while True:
                try:
                    secs, res, warm = time_profile(net, sampler, ts, n, method, chunk, device,
                                                   args.micro_batch_size, 1 if method == "naive" else args.repeat)
                    break
                except torch.cuda.OutOfMemoryError:
                    if chunk <= 1:
                        raise
                    chunk //= 2  # retry with half the chunk (more chunks: one extra ordinary backward pass)
                    torch.cuda.empty_cache()
                    print(f"{method}: out of GPU memory, retrying with chunk {chunk}")
            if len(ts) < len(times):
                secs *= len(times) / len(ts)
            results[method] = res
            note = f"chunk {chunk}" + (f", m = {args.micro_batch_size}" if method == "microbatch" else "")
            if method == "ghost" and res.extra.get("ghost_conv_choices"):
                picks = list(res.extra["ghost_conv_choices"].values())
                note += (f", auto: {picks.count('grouped')} layer shapes grouped, {picks.count('unfold')} unfold; "
                         f"warm-up call (1 t, includes the timing) {warm:.2f} s")
            if len(ts) < len(times):
                note += f", extrapolated from {len(ts)} of {len(times)} t"
            rows.append({"method": method, "seconds": secs, "ratio": secs / base, "note": note, "warmup_s": warm,
                         "ghost_conv_choices": res.extra.get("ghost_conv_choices"),
                         "profile": [{k: r[k] for k in ("t", "gv", "gv_se", "mean_grad_sq")} for r in res.rows]})
    except KeyboardInterrupt:  # a time limit (timeout --signal=INT): report what finished
        interrupted = method
        print(f"interrupted during {method}: the table has the methods that finished")

    # agreement of the per-sample-exact methods on the same draws (same generator seed)
    ref = results.get("exact")
    checks = {}
    if ref is not None:
        for m in results:
            if m.startswith("ghost") or m == "naive":
                k = len(results[m].rows)
                a, b = ref.gv[:k], results[m].gv[:k]
                checks[m] = float(abs(a - b).max() / abs(a).max())

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    print(f"\n{desc}; {args.times} times x {n} samples; device: {dev_name}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; min of {args.repeat} runs\n")
    print(f"| method | profile (s) | x {args.times} train steps | notes |")
    print("| --- | --- | --- | --- |")
    print(f"| train steps (baseline) | {base:.3f} | 1.00 | fwd+bwd of the mean loss, batch {n}, x {args.times} |")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.3f} | {r['ratio']:.2f} | {r['note']} |")
    for m, err in checks.items():
        print(f"\nmax |GV_{m} - GV_exact| / max GV_exact over the profile: {err:.2e}")
    if ref is not None:  # how hard the variance is to compute: ||g_bar||^2 / tr Cov (cancellation factor)
        ratio = [r["mean_grad_sq"] / r["gv"] for r in ref.rows if r["gv"]]
        print(f"||g_bar||^2 / tr Cov over the profile: {min(ratio):.3g} to {max(ratio):.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": desc, "device": dev_name, "samples": n, "times": args.times, "baseline_s": base,
                       "rows": rows, "agreement": checks, "torch": torch.__version__,
                       "interrupted_during": interrupted}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
