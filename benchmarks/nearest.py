"""Nearest-training-image search of the memorisation probe: flowprobe against the obvious ways.

The probe needs, for Q generated images, the two nearest of N training images (Euclidean over all
pixels: the copy ratio d1/d2 and the nearest-partner accuracy). Compared side by side on the same data:

- ``flowprobe``: :func:`flowprobe.probes.memorization.nearest_neighbours` (chunked float32 matmul
  distances ||q||^2 + ||p||^2 - 2 q.p, top k + 8 candidates re-ranked with exact float64 differences);
- ``cdist``: ``torch.cdist`` + ``topk`` over the same query chunks (what one writes first);
- ``scipy``: ``scipy.spatial.distance.cdist`` + ``argpartition`` (CPU only; skipped above 4k x 4k).

It prints the wall time of each, the ratio to flowprobe, and whether the neighbours agree.

    OMP_NUM_THREADS=2 python benchmarks/nearest.py --n 2000            # CPU, 2k x 2k CelebA-64-sized
    python benchmarks/nearest.py --n 10000 --device cuda               # the issue's 10k x 10k on a GPU
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from flowprobe.probes.memorization import nearest_neighbours


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cdist_knn(q, p, k: int, chunk: int):
    d, i = [], []
    for s in range(0, q.shape[0], chunk):
        dd = torch.cdist(q[s:s + chunk], p)
        v, j = torch.topk(dd, k, dim=1, largest=False)
        d.append(v)
        i.append(j)
    return torch.cat(d), torch.cat(i)


def scipy_knn(q, p, k: int):
    import numpy as np
    from scipy.spatial.distance import cdist

    d = cdist(q.double().numpy(), p.double().numpy())
    i = np.argpartition(d, k, axis=1)[:, :k]
    dk = np.take_along_axis(d, i, 1)
    order = np.argsort(dk, 1)
    return torch.from_numpy(np.take_along_axis(dk, order, 1)), torch.from_numpy(np.take_along_axis(i, order, 1))


def timed(fn, device, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="queries = training images = N")
    ap.add_argument("--dim", type=int, default=3 * 64 * 64, help="dimensions (3 x 64 x 64: CelebA-64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    # images-like data: a shared mean plus per-image variation, in [-1, 1]
    base = torch.rand(1, args.dim, generator=gen) * 2 - 1
    train = (0.7 * base + 0.3 * (torch.rand(args.n, args.dim, generator=gen) * 2 - 1)).to(device)
    queries = (train[torch.randperm(args.n, generator=gen).to(device)]
               + 0.05 * torch.randn(args.n, args.dim, generator=gen).to(device))

    methods = {"flowprobe": lambda: nearest_neighbours(queries, train, 2, args.chunk),
               "cdist": lambda: cdist_knn(queries, train, 2, args.chunk)}
    if device.type == "cpu" and args.n <= 4000:
        methods["scipy"] = lambda: scipy_knn(queries.cpu(), train.cpu(), 2)
    results = {}
    for name, fn in methods.items():
        fn() if name != "scipy" else None  # warm-up
        results[name] = timed(fn, device, args.repeat if name != "scipy" else 1)
    ours_s, (ours_d, ours_i) = results["flowprobe"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    print(f"\n{args.n} queries x {args.n} training images x {args.dim} dims, 2 nearest; {dev_name}; "
          f"torch {torch.__version__}; threads {torch.get_num_threads()}; best of {args.repeat}\n")
    print("| method | seconds | x flowprobe | same nearest | max rel. diff of d1 |")
    print("| --- | --- | --- | --- | --- |")
    for name, (secs, (d, i)) in results.items():
        same = (i[:, 0].cpu() == ours_i[:, 0].cpu()).float().mean().item()
        rel = ((d[:, 0].double().cpu() - ours_d[:, 0].double().cpu()).abs() / ours_d[:, 0].double().cpu()).max().item()
        print(f"| {name} | {secs:.3f} | {secs / ours_s:.2f} | {same:.4f} | {rel:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
