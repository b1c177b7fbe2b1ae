"""Cost of one training step by objective: CFM against MeanFlow (a JVP) and SplitMeanFlow (two extra forwards).

The same net (with a step input for all three, so the parameter count is equal), the same batch and AdamW;
each objective's step is forward + loss + backward + optimiser step. Printed: ms per step and the ratio to CFM.
Timing: ``--warmup`` steps excluded, then the median of ``--repeat`` blocks of ``--steps`` steps (CUDA
synchronised around each block).

    python benchmarks/objectives.py --net mlp  --device cpu
    python benchmarks/objectives.py --net tiny --device cpu      # the small UNet on 16x16 images
    python benchmarks/objectives.py --net cifar10-64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from flowprobe.couplings import GaussianSampler, IndependentCoupling
from flowprobe.nets import MLP
from flowprobe.nets.unet import unet_preset
from flowprobe.objectives import OBJECTIVES, make_objective
from flowprobe.paths import LinearPath


def build(net_name: str, device: torch.device):
    """(net, sample shape, batch size) for ``net_name``."""
    if net_name == "mlp":
        return MLP(2, width=256, depth=3, step_embed=True, time_scale=10.0).to(device), (2,), 256
    if net_name == "tiny":
        return unet_preset("tiny", step_embed=True, time_scale=10.0).to(device), (3, 16, 16), 64
    if net_name == "cifar10-64":
        return (unet_preset("cifar10", model_channels=64, dropout=0.0, step_embed=True, time_scale=10.0)
                .to(device), (3, 32, 32), 128)
    raise SystemExit(f"unknown --net {net_name!r}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_objective(kind: str, net_name: str, device: torch.device, steps: int, warmup: int, repeat: int) -> float:
    torch.manual_seed(0)
    net, shape, batch = build(net_name, device)
    coupling = IndependentCoupling(GaussianSampler(shape, device=device), GaussianSampler(shape, mean=1.0,
                                                                                         device=device))
    options = {} if kind == "cfm" else {"jump_fraction": 0.5}
    objective = make_objective(kind, LinearPath(), "mean", **options)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        loss = objective(net, coupling.sample(batch, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    blocks = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        blocks.append((time.perf_counter() - t0) / steps)
    return statistics.median(blocks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="mlp", choices=("mlp", "tiny", "cifar10-64"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {kind: time_objective(kind, args.net, device, args.steps, args.warmup, args.repeat)
               for kind in OBJECTIVES}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"net {args.net}, device {machine}, threads {torch.get_num_threads()}")
    print(f"{'objective':<14} {'ms/step':>9} {'x cfm':>7}")
    for kind, sec in results.items():
        print(f"{kind:<14} {1e3 * sec:9.2f} {sec / results['cfm']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"net": args.net, "device": machine, "seconds_per_step": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
