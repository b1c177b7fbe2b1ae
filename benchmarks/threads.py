"""Intra-op threads for small models on a CPU: step time of the CFM training step with 1 thread and with all
cores, on an idle machine and with one busy process per other core, for MLPs of the sizes the low-dimensional
experiments train. It is the measurement behind :func:`flowprobe.device.choose_threads` (one thread below
``SMALL_WORK_FLOPS`` flops per step).

    python benchmarks/threads.py [--steps 150]

Prints one row per (model, threads, load) with ms per step, and the busy/idle and 1-thread/all-threads ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch

from flowprobe.couplings import GaussianSampler, IndependentCoupling
from flowprobe.device import SMALL_WORK_FLOPS
from flowprobe.nets import MLP
from flowprobe.objectives import CFMObjective
from flowprobe.paths import make_path
from flowprobe.train import fit


def _spin(stop):
    while not stop.is_set():
        pass


def step_ms(width: int, depth: int, threads: int, steps: int, batch: int = 256) -> tuple[float, int]:
    torch.set_num_threads(threads)
    coupling = IndependentCoupling(GaussianSampler((2,)), GaussianSampler((2,)))
    net = MLP(2, width, depth, time_embed_dim=0)
    n_params = sum(p.numel() for p in net.parameters())
    objective = CFMObjective(make_path(0.0))
    fit(net, coupling, objective, steps=10, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    fit(net, coupling, objective, steps=steps, batch_size=batch)
    return 1e3 * (time.perf_counter() - t0) / steps, n_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores; SMALL_WORK_FLOPS = {SMALL_WORK_FLOPS:.1e}")
    print("| MLP (width x depth) | params | flops/step | threads | idle ms/step | busy ms/step | busy/idle |")
    print("|---|---|---|---|---|---|---|")
    for width, depth in ((128, 3), (256, 3), (512, 4)):
        idle = {th: step_ms(width, depth, th, args.steps) for th in (1, cores)}
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,)) for _ in range(max(cores - 1, 1))]
        for s in spinners:
            s.start()
        try:
            busy = {th: step_ms(width, depth, th, args.steps) for th in (1, cores)}
        finally:
            stop.set()
            for s in spinners:
                s.join()
        for th in (1, cores):
            (ms_idle, n), (ms_busy, _) = idle[th], busy[th]
            print(f"| {width} x {depth} | {n:,} | {6 * n * 256:.1e} | {th} | {ms_idle:.2f} | {ms_busy:.2f} | "
                  f"{ms_busy / ms_idle:.2f} |")


if __name__ == "__main__":
    main()
