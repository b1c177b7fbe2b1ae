"""Data-parallel training (two CPU processes, gloo, localhost) equals single-process training on the same
global batch."""

import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import make_tiny_problem
from flowprobe.checkpoint import list_checkpoints
from flowprobe.train import fit

KW = dict(steps=8, batch_size=16, lr=0.02, warmup=2, lr_schedule="cosine", grad_clip=1.0, ema_decay=0.9, seed=3,
          log_every=4)


def _worker(rank: int, world: int, port: int, out: str, kind: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # rank 1 starts from other weights: DDP must broadcast rank 0's before the first step
        net, coupling, objective = _problem(rank, kind)
        rows = []
        net.net[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
        state = fit(net, coupling, objective, log_path=os.path.join(out, "metrics.jsonl"),
                    ckpt_dir=os.path.join(out, "ckpt"), **KW)
        tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
        tensors.update({f"ema.{k}": v.contiguous() for k, v in state.ema.state_dict().items()})
        save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"losses": state.losses, "step": state.step, "rows": rows}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), kind), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in 120 s")

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
