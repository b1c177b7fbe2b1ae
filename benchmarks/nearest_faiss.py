"""Where FAISS pays: the torch and the faiss backends of ``nearest_neighbours`` beside plain search, by pool size.

For Q queries (1000) against pools of N rows at several dimensions D, the k = 2 nearest each (the copy ratio), side
by side in one run, each the best of ``--repeat`` wall times:

- ``torch``: ``nearest_neighbours(..., backend="torch")`` (chunked float32 matmul, exact re-ranking);
- ``faiss``: ``nearest_neighbours(..., backend="faiss")`` (exact ``faiss.IndexFlatL2`` of the centred pool, the same
  exact re-ranking; the index is built inside the call, so its cost is counted);
- ``cdist``: ``torch.cdist`` + ``topk`` (what one writes first; float32 distances with the matmul's cancellation);
- ``faiss-raw``: ``faiss.IndexFlatL2`` of the raw pool + ``search(k)`` (what one writes with faiss; squared float32
  distances, not re-ranked).

Data are image-like: a shared offset plus per-row variation, queries are pool rows plus small noise. It prints
one markdown table per thread count with the seconds, the ratios to ``torch`` and the agreement of the nearest
row with ``torch``, and the load average before and after (the machine may be shared; ``--clock cpu`` times
process CPU seconds instead of wall seconds, steadier under load with one thread).

    python benchmarks/nearest_faiss.py                                   # the full grid, 1 and default threads
    python benchmarks/nearest_faiss.py --dims 64 --sizes 1000 100000 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import torch

from flowprobe.probes.neighbours import nearest_neighbours


def cdist_knn(q, p, k: int, chunk: int = 4096):
    d, i = [], []
    for s in range(0, q.shape[0], chunk):
        v, j = torch.topk(torch.cdist(q[s:s + chunk], p), k, dim=1, largest=False)
        d.append(v)
        i.append(j)
    return torch.cat(d), torch.cat(i)


def faiss_raw_knn(q, p, k: int):
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(p.shape[1])
    index.add(p.numpy())
    d2, i = index.search(q.numpy(), k)
    return torch.from_numpy(d2).clamp_min(0).sqrt(), torch.from_numpy(i)


def best_of(fn, repeat: int, clock=time.perf_counter):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = clock()
        out = fn()
        best = min(best, clock() - start)
    return best, out


def data(n: int, n_query: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(1, dim, generator=gen) * 2 - 1
    pool = torch.rand(n, dim, generator=gen).mul_(0.6).sub_(0.3).add_(0.7 * base)  # 0.7 base + 0.3 U(-1, 1)
    pick = torch.randint(0, n, (n_query,), generator=gen)
    queries = pool[pick] + 0.05 * torch.randn(n_query, dim, generator=gen)
    return queries, pool


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def row(dim: int, n: int, args) -> str:
    queries, pool = data(n, args.queries, dim)
    methods = {"torch": lambda: nearest_neighbours(queries, pool, 2, backend="torch"),
               "faiss": lambda: nearest_neighbours(queries, pool, 2, backend="faiss"),
               "cdist": lambda: cdist_knn(queries, pool, 2),
               "faiss-raw": lambda: faiss_raw_knn(queries, pool, 2)}
    res = {}
    for name, fn in methods.items():
        res[name] = best_of(fn, args.repeat, time.process_time if args.clock == "cpu" else time.perf_counter)
        gc.collect()
    t_torch, (d_ref, i_ref) = res["torch"]
    cells = [f"{res[m][0]:.3f}" for m in methods]
    ratios = [f"{res[m][0] / t_torch:.2f}" for m in ("faiss", "cdist", "faiss-raw")]
    same = [f"{(res[m][1][1][:, 0] == i_ref[:, 0]).double().mean().item():.4f}" for m in ("faiss", "cdist",
                                                                                          "faiss-raw")]
    d_faiss = (res["faiss"][1][0] - d_ref).abs().max().item()
    return f"| {dim} | {n} | " + " | ".join(cells + ratios + same) + f" | {d_faiss:.1e} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 64, 3072])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000, 100_000, 200_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", nargs="+", default=["1", "default"], help="thread counts ('default': torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (steadier on a loaded machine; one thread only)")
    ap.add_argument("--max-gib", type=float, default=1.2, help="skip pools larger than this (GiB of float32)")
    args = ap.parse_args(argv)
    import faiss

    default = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    print(f"{args.queries} queries, k = 2, best of {args.repeat} ({args.clock} seconds); {cpu}, "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}, faiss {faiss.__version__}")
    for threads in args.threads:
        torch.set_num_threads(default if threads == "default" else int(threads))
        print(f"\n{torch.get_num_threads()} thread(s); load average (1/5/15 min) before: {load()}\n")
        print("| D | N | torch s | faiss s | cdist s | faiss-raw s | faiss / torch | cdist / torch | "
              "faiss-raw / torch | same nn: faiss | cdist | faiss-raw | max abs diff of d (faiss vs torch) |")
        print("| --- " * 13 + "|")
        for dim in args.dims:
            for n in args.sizes:
                if n * dim * 4 / 2 ** 30 > args.max_gib:
                    print(f"| {dim} | {n} | skipped: pool over {args.max_gib} GiB |" + " |" * 10)
                    continue
                print(row(dim, n, args), flush=True)
        print(f"\nload average after: {load()}")
    torch.set_num_threads(default)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
