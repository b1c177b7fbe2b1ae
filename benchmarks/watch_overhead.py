"""Cost of the memorisation watch: wall time of :func:`flowprobe.train.fit` with and without
:class:`flowprobe.watch.MemorizationWatch` as a hook, at the watch's defaults (``every=DEFAULT_EVERY``, 64 probe
samples per group, 3 times, 32 gradient-variance samples per time and group, a copy check of 128 samples every
4 readings), on a CPU.


    python benchmarks/watch_overhead.py [--steps 2000] [--repeats 3] [--every N] [--threads 1]

Four workloads: an MLP (3 x 256) on 2-D data (batch 256), the same MLP on 4096 fixed pairs (``mlp-2d-paired``: the
watch also runs the pairing check with each copy check), on 4096 pairs of a map x1 = R x0 + 1 with 1024 held-out
pairs of it (``mlp-2d-map``, reflow's case: the watch runs the map check instead), and a tiny UNet on 8x8
single-channel images (batch 64).
Runs alternate (plain, watched, plain, ...) and the best of ``--repeats`` is kept for each, so a busy neighbour
on a shared machine inflates both alike. Prints ms per step, the watch's seconds per reading (best), the measured
overhead (best watched / best plain - 1) and the time spent inside readings over the plain run's time (the
overhead without the noise of a shared machine).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from flowprobe.couplings import FixedPairs, GaussianSampler, IndependentCoupling
from flowprobe.nets import MLP
from flowprobe.nets.unet import UNet
from flowprobe.objectives import CFMObjective
from flowprobe.paths import make_path
from flowprobe.train import fit
from flowprobe.watch import DEFAULT_EVERY, MemorizationWatch


def workload(name: str):
    g = torch.Generator().manual_seed(0)
    if name.startswith("mlp-2d"):
        shape, batch = (2,), 256
        net = MLP(2, width=256, depth=3)
    else:
        shape, batch = (1, 8, 8), 64
        net = UNet(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(), dropout=0.0, num_heads=1, num_head_channels=None, num_groups=8)
    train = torch.randn((4096, *shape), generator=g) + 1.0
    heldout = torch.randn((1024, *shape), generator=g) + 1.0
    sources = torch.randn((4096, *shape), generator=g) if name in ("mlp-2d-paired", "mlp-2d-map") else None
    heldout_sources = None
    if name == "mlp-2d-map":  # pairs of a map (a 90-degree rotation, shifted) and held-out pairs of the same map
        heldout_sources = torch.randn((1024, *shape), generator=g)
        train, heldout = (torch.stack([-x[:, 1], x[:, 0]], 1) + 1.0 for x in (sources, heldout_sources))
    coupling = (FixedPairs(sources, train) if sources is not None
                else IndependentCoupling(GaussianSampler(shape), GaussianSampler(shape, mean=1.0)))
    return net, coupling, train, heldout, batch, sources, heldout_sources


def timed_fit(name: str, steps: int, watch_every: int | None) -> tuple[float, list]:
    net, coupling, train, heldout, batch, sources, heldout_sources = workload(name)
    objective = CFMObjective(make_path(0.0))
    hooks = ([MemorizationWatch(train, heldout, objective.path, every=watch_every, train_sources=sources,
                                heldout_sources=heldout_sources)] if watch_every else [])
    t0 = time.perf_counter()
    fit(net, coupling, objective, steps=steps, batch_size=batch, lr=1e-3, seed=0, hooks=hooks)
    return time.perf_counter() - t0, [r.seconds for r in hooks[0].readings] if hooks else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workloads", default="mlp-2d,mlp-2d-paired,mlp-2d-map,unet-8x8")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} thread(s), "
          f"{a.steps} steps, watch every {a.every}")
    print(f"{'workload':10} {'plain ms/step':>14} {'watched ms/step':>16} {'s/reading':>10} {'readings':>9} "
          f"{'overhead':>9} {'in readings':>12}")
    for name in a.workloads.split(","):
        timed_fit(name, 20, None)  # warm-up
        plain, watched, per = [], [], []
        for _ in range(a.repeats):
            plain.append(timed_fit(name, a.steps, None)[0])
            w, seconds = timed_fit(name, a.steps, a.every)
            watched.append(w)
            per.extend(seconds)
        p, w = min(plain), min(watched)
        print(f"{name:10} {1e3 * p / a.steps:14.3f} {1e3 * w / a.steps:16.3f} {min(per) if per else 0:10.3f} "
              f"{len(per) // a.repeats:9d} {w / p - 1:+9.1%} {sum(per) / a.repeats / p:12.1%}")


if __name__ == "__main__":
    main()
