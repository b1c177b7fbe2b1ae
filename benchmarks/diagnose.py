"""Wall time of ``flowprobe diagnose`` and its breakdown, and the nearest-neighbour search beside plain torch.

Two diagnoses (the stages come from ``Diagnosis.timings``: sampling, nearest neighbours, membership, gradient
variance, transport):

- ``toy``: a 2-D MLP (3 x 128) on 2000 training and 2000 held-out ``moons`` points, default options
  (1000 samples, Euler 100 steps, membership 512 per group x 5 times, gradient variance 128 x 5 times, exact);
- ``unet``: the ``tiny`` UNet (0.7M parameters) on 16x16 images (CIFAR-10 downsampled when ``../shared/data``
  has it, else synthetic), with ``--unet-samples`` samples and ``--unet-steps`` steps.

The networks are untrained: the cost of a diagnosis depends on the network's size and the options, not on its
weights. The thread count is chosen as ``flowprobe.diagnose`` chooses it (:func:`flowprobe.device.choose_threads`:
one thread for small nets on CPU). Then the nearest-neighbour search of the copies check,
:func:`flowprobe.probes.memorization.nearest_neighbours` (exact distances), beside ``torch.cdist`` + ``topk`` on
the same chunks, k = 2, on images-like rows (a shared offset plus variation; queries = shuffled training rows plus
noise): process CPU time (min over ``--repeat`` interleaved runs) and wall time.

    python benchmarks/diagnose.py                 # CPU, all three parts
    python benchmarks/diagnose.py --device cuda   # a GPU
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from flowprobe.data.toy import make_toy
from flowprobe.device import choose_threads
from flowprobe.diagnosis import DiagnoseOptions, diagnose
from flowprobe.nets import MLP
from flowprobe.nets.unet import count_parameters, unet_preset
from flowprobe.probes.memorization import nearest_neighbours

STAGES = ("sampling", "nearest neighbours", "membership", "gradient variance", "transport")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(n: int, seed: int) -> torch.Tensor:
    """16x16 images in [-1, 1]: CIFAR-10 (train split from offset ``seed * n``) when available, else synthetic."""
    try:
        from flowprobe.data.images import load_images, to_unit

        data = load_images("cifar10", resolution=16, limit=2 * n)
        x = to_unit(torch.as_tensor(data.images).permute(0, 3, 1, 2))
        return x[seed * n:(seed + 1) * n]
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(1, 3, 16, 16, generator=g) * 1.4 - 0.7 + 0.3 * torch.randn(n, 3, 16, 16, generator=g)
                ).clamp(-1, 1)


def run_diagnosis(name: str, net, train, held, options: DiagnoseOptions, device) -> None:
    net = net.to(device)
    threads = torch.get_num_threads()
    choose_threads(count_parameters(net), options.batch_size, device)  # as flowprobe.diagnose does
    _sync(device)
    start = time.perf_counter()
    d = diagnose(net, train.to(device), held.to(device), options=options)
    _sync(device)
    wall = time.perf_counter() - start
    parts = " | ".join(f"{d.timings.get(s, 0.0):.2f}" for s in STAGES)
    print(f"| {name} | {count_parameters(net):,} | {tuple(train.shape[1:])} | {options.n_generate} x "
          f"{options.solver}:{options.steps} | {torch.get_num_threads()} | {wall:.2f} | {parts} | {d.label} |")
    torch.set_num_threads(threads)


def nn_comparison(sizes, repeat: int, device) -> None:
    print("\n| Q = N | D | ours CPU s | cdist CPU s | ours / cdist | ours wall s | cdist wall s | same neighbours |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, dim in sizes:
        g = torch.Generator().manual_seed(0)
        base = torch.rand(1, dim, generator=g) * 2 - 1
        pool = (0.7 * base + 0.3 * (torch.rand(n, dim, generator=g) * 2 - 1)).to(device)
        q = pool[torch.randperm(n, generator=g).to(device)] + 0.05 * torch.randn(n, dim, generator=g).to(device)

        def plain(q=q, pool=pool, n=n):
            return [torch.topk(torch.cdist(q[s:s + 4096], pool), 2, dim=1, largest=False) for s in range(0, n, 4096)]

        fns = {"ours": lambda q=q, pool=pool: nearest_neighbours(q, pool, 2), "cdist": plain}
        cpu, wall = {k: [] for k in fns}, {k: [] for k in fns}
        for _ in range(repeat):
            for k, fn in fns.items():
                _sync(device)
                c, w = time.process_time(), time.perf_counter()
                fn()
                _sync(device)
                cpu[k].append(time.process_time() - c)
                wall[k].append(time.perf_counter() - w)
        ours_i = nearest_neighbours(q, pool, 2)[1]
        ref_i = torch.cat([i for _, i in plain()])
        same = (ours_i[:, 0] == ref_i[:, 0]).float().mean().item()
        co, cc = min(cpu["ours"]), min(cpu["cdist"])
        print(f"| {n} | {dim} | {co:.3f} | {cc:.3f} | {co / cc:.2f} | {min(wall['ours']):.3f} | "
              f"{min(wall['cdist']):.3f} | {same:.4f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--unet-samples", type=int, default=200)
    ap.add_argument("--unet-steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parts", default="toy,unet,nn")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    host = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    print(f"{host}; torch {torch.__version__}; threads {torch.get_num_threads()}\n")
    print("| case | parameters | sample | generation | threads | total s | " + " | ".join(STAGES) + " | verdict |")
    print("|" + " --- |" * (8 + len(STAGES) - 1))
    if "toy" in parts:
        torch.manual_seed(0)
        toy = make_toy("moons")
        train = toy.sample(2000, torch.Generator().manual_seed(1))[0]
        held = toy.sample(2000, torch.Generator().manual_seed(2))[0]
        for label in ("toy 2-D (cold)", "toy 2-D (warm)"):  # cold: includes torch.func's first-use set-up
            run_diagnosis(label, MLP(2, width=128, depth=3), train, held, DiagnoseOptions(), device)
    if "unet" in parts:
        torch.manual_seed(0)
        train, held = _images(2000, 0), _images(2000, 1)
        opts = DiagnoseOptions(n_generate=args.unet_samples, steps=args.unet_steps, membership_samples=256,
                               gradvar_samples=64, transport_samples=32)
        run_diagnosis("UNet 16x16", unet_preset("tiny"), train, held, opts, device)
    if "nn" in parts:
        nn_comparison([(2000, 12288), (4000, 3072), (20000, 2)], args.repeat, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
