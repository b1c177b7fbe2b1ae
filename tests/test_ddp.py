"""Data-parallel training (two CPU processes, gloo) equals single-process training on the same global batch.

The harness is built to hold under load: the ranks meet through a file rendezvous in the test's tmp_path (no free
port to race for), with a generous collective timeout; each rank writes its results to tmp_path before a final
barrier, and then destroys its process group, so neither rank tears its group down while the other is still in a
collective, and the parent reads files that were complete before either rank began to exit."""

import datetime
import gc
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import make_tiny_problem
from flowprobe.checkpoint import list_checkpoints
from flowprobe.train import Checkpointer, MetricsLog, fit

KW = dict(steps=8, batch_size=16, lr=0.02, warmup=2, lr_schedule="cosine", grad_clip=1.0, ema_decay=0.9, seed=3,
          log_every=4)
WORLD = 2
# how long a rank waits for its peer (rendezvous, each collective, the final barrier); a loaded machine can stall a
# rank for many seconds, and a real hang still ends in a timeout error (then the parent's deadline below)
TIMEOUT = datetime.timedelta(minutes=5)
DEADLINE_S = TIMEOUT.total_seconds() + 120


def _write(path: str, write) -> None:
    """Write a result file whole or not at all: into a temporary name, then renamed into place."""
    tmp = path + ".part"
    write(tmp)
    os.replace(tmp, path)


def _worker(rank: int, world: int, init_file: str, out: str, kind: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world, timeout=TIMEOUT)
    done = False
    try:
        # rank 1 starts from other weights: DDP must broadcast rank 0's before the first step
        net, coupling, objective = _problem(rank, kind)
        rows = []
        net.net[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
        state = fit(net, coupling, objective, hooks=[MetricsLog(os.path.join(out, "metrics.jsonl")),
                                                     Checkpointer(os.path.join(out, "ckpt"))], **KW)
        tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
        tensors.update({f"ema.{k}": v.contiguous() for k, v in state.ema.state_dict().items()})
        info = {"losses": state.losses, "step": state.step, "rows": rows}
        _write(os.path.join(out, f"rank{rank}.safetensors"), lambda p: save_file(tensors, p))
        _write(os.path.join(out, f"rank{rank}.json"), lambda p: Path(p).write_text(json.dumps(info)))
        gc.collect()  # the DDP wrapper inside fit (and its reducer's hold on the group) goes now, not at exit
        done = True
    finally:
        try:
            # every rank has finished its collectives and written its results before any rank destroys the group;
            # a rank that failed skips the barrier (its peer may be stuck in a collective it will never join) and
            # exits with its error, which mp.spawn's join reports
            if done:
                dist.barrier()
        finally:
            dist.destroy_process_group()


# forward passes of the net per optimiser step: CFM one; MeanFlow two under DDP (the JVP on the inner module,
# the prediction through DDP); SplitMeanFlow three (the prediction and the two halves of the split target)
FORWARDS = {"cfm": 1, "meanflow": 2, "splitmeanflow": 3, "cfm-weighted": 1}


def _problem(seed, kind):
    """The tiny problem for ``kind``: an objective name, or cfm-weighted (W-CFM weights, normalised over the
    global batch so that the ranks' means average to the single-process loss)."""
    return make_tiny_problem(seed=seed, dtype=torch.float64, objective=kind.removesuffix("-weighted"),
                             weighted=kind.endswith("-weighted"))


@pytest.mark.parametrize("kind", list(FORWARDS))
def test_two_process_ddp_equals_single_process(tmp_path, kind):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init_file = tmp_path / "rendezvous"  # fresh per test: it must not exist before the group is created
    assert not init_file.exists()
    ctx = mp.spawn(_worker, args=(WORLD, str(init_file), str(tmp_path), kind), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish in {DEADLINE_S:.0f} s")
    for rank in range(WORLD):
        assert (tmp_path / f"rank{rank}.safetensors").exists() and (tmp_path / f"rank{rank}.json").exists()

    net, coupling, objective = _problem(0, kind)
    single = fit(net, coupling, objective, **KW)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(r0[f"net.{k}"], v, rtol=1e-10, atol=1e-12)
        assert torch.equal(r0[f"net.{k}"], r1[f"net.{k}"])  # the replicas agree exactly
    for k, v in single.ema.state_dict().items():
        torch.testing.assert_close(r0[f"ema.{k}"], v, rtol=1e-10, atol=1e-12)
    # the logged losses are the global-batch losses (rank means averaged), as in one process
    info = json.loads((tmp_path / "rank0.json").read_text())
    assert info["step"] == 8
    assert info["rows"] == [8] * 8 * FORWARDS[kind]  # each rank runs the net on its half of the global batch of 16
    assert info["losses"] == pytest.approx(single.losses, rel=1e-10)
    # and the parameters did move: equality is not that of two untouched nets
    init, _, _ = _problem(0, kind)
    assert not torch.allclose(next(init.parameters()), next(net.parameters()))
    # rank 0 alone writes logs and checkpoints
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recs] == ["start", "train", "train"] and recs[0]["world_size"] == 2
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step_00000008.safetensors"]
