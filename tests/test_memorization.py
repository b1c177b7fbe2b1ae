"""The memorisation probe: nearest neighbours, pairing metrics, copy metrics, pairs files and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from flowprobe.probes import memorization as mem


def _brute_nn(q, p, k):
    d = torch.cdist(q.reshape(len(q), -1).double(), p.reshape(len(p), -1).double())
    return torch.topk(d, k, dim=1, largest=False)


def test_nearest_neighbours_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(300, 3, 4, 4, generator=g)
    q = torch.randn(57, 3, 4, 4, generator=g)
    d, i = mem.nearest_neighbours(q, pool, k=3, chunk_size=16)
    bd, bi = _brute_nn(q, pool, 3)
    assert torch.equal(i, bi)
    torch.testing.assert_close(d.double(), bd, rtol=1e-6, atol=1e-6)


def test_nearest_neighbours_exact_copy_has_zero_distance():
    # large offsets: the matmul formula alone would leave a rounding residue of order 1e-2 here
    g = torch.Generator().manual_seed(1)
    pool = 100 + torch.randn(50, 3072, generator=g)
    d, i = mem.nearest_neighbours(pool[[7, 3]], pool, k=1)
    assert i[:, 0].tolist() == [7, 3]
    assert d.abs().max().item() == 0.0


def test_pairing_metrics_on_constructed_outputs():
    g = torch.Generator().manual_seed(2)
    targets = torch.randn(20, 8, generator=g) * 5
    assigned = torch.randperm(20, generator=g)
    ot = torch.roll(assigned, 1)
    # outputs sit exactly 0.1 away from the assigned partner along a random unit direction
    u = torch.randn(20, 8, generator=g)
    u = u / u.norm(dim=1, keepdim=True)
    outputs = targets[assigned] + 0.1 * u
    m = mem.pairing_metrics(outputs, targets, {"assigned": assigned, "ot": ot})
    assert m["chance"] == pytest.approx(1 / 20)
    assert m["l2_assigned_mean"] == pytest.approx(0.1, rel=1e-5)
    assert m["l2_assigned_std"] == pytest.approx(0.0, abs=1e-5)
    assert m["nn_acc_assigned"] == 1.0 and m["nn_acc_ot"] == 0.0
    ref = (outputs - targets[ot]).norm(dim=1)
    assert m["l2_ot_mean"] == pytest.approx(ref.mean().item(), rel=1e-6)
    assert m["l2_ot_std"] == pytest.approx(ref.std().item(), rel=1e-5)


def test_copy_metrics_exact_copy_and_midpoints():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(30, 3, 4, 4, generator=g)
    copies = train[:5].clone()
    m = mem.copy_metrics(copies, train)
    assert m["ratio_mean"] == 0.0 and m["copy_fraction"] == 1.0 and m["nn_dist_mean"] == 0.0
    # the midpoint of two training images is equidistant from both: ratio 1 (not a copy)
    mid = (train[0:1] + train[1:2]) / 2
    s = mem.copy_statistics(mid, train)
    assert s["ratio"].item() == pytest.approx(1.0, rel=1e-6)
    assert s["nn_index"].item() in (0, 1)
    # a point 1/5 of the way from a to b: d1/d2 = 0.2/0.8 = 0.25 < 1/3 -> a copy of a (if nothing is closer)
    a, b = torch.zeros(1, 4), torch.zeros(1, 4)
    b[0, 0] = 10.0
    pool = torch.cat([a, b, torch.full((1, 4), 100.0)])
    p = a + 0.2 * (b - a)
    s = mem.copy_statistics(p, pool)
    assert s["d1"].item() == pytest.approx(2.0) and s["d2"].item() == pytest.approx(8.0)
    assert s["ratio"].item() == pytest.approx(0.25)
    assert mem.copy_metrics(p, pool)["copy_fraction"] == 1.0
    q = a + 0.3 * (b - a)  # 3/7 > 1/3
    assert mem.copy_metrics(q, pool)["copy_fraction"] == 0.0


def test_copy_metrics_reference_block():
    g = torch.Generator().manual_seed(4)
    train = torch.randn(40, 16, generator=g)
    held_out = torch.randn(20, 16, generator=g)
    samples = torch.cat([train[:10], torch.randn(10, 16, generator=g)])
    m = mem.copy_metrics(samples, train, reference=held_out)
    assert m["copy_fraction"] == pytest.approx(0.5)
    assert m["reference"]["n"] == 20
    assert m["copy_fraction_excess"] == pytest.approx(0.5 - m["reference"]["copy_fraction"])
    # the reference equals copy_metrics of the held-out set on its own
    alone = mem.copy_metrics(held_out, train)
    assert m["reference"]["nn_dist_mean"] == pytest.approx(alone["nn_dist_mean"])


def test_pairs_file_round_trip(tmp_path):
    x0 = torch.randn(6, 3, 2, 2)
    x1 = torch.randint(0, 256, (6, 3, 2, 2), dtype=torch.uint8)
    ot = torch.tensor([1, 0, 2, 5, 4, 3])
    path = mem.save_pairs(tmp_path / "p.safetensors", x0, x1, ot_index=ot, metadata={"n": 6, "note": "test"})
    ps = mem.load_pairs(path)
    assert torch.equal(ps.x0, x0)
    torch.testing.assert_close(ps.x1, x1.float() / 127.5 - 1)
    assert torch.equal(ps.partners["ot"], ot) and torch.equal(ps.partners["assigned"], torch.arange(6))
    assert ps.metadata["n"] == 6 and ps.metadata["format"] == mem.PAIRS_FORMAT
    with pytest.raises(ValueError, match="ot_index"):
        mem.save_pairs(tmp_path / "bad.safetensors", x0, x1, ot_index=torch.tensor([0, 1]))


def test_cli_on_exact_field(tmp_path):
    """A constant field v = c maps x0 -> x0 + c exactly; make x1 = x0 + c the assigned partner."""
    from flowprobe.checkpoint import save_checkpoint
    from flowprobe.cli import main
    from flowprobe.nets import MLP

    torch.manual_seed(0)
    net = MLP(dim=4, width=8, depth=1)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.net[-1].bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    ck = save_checkpoint(tmp_path / "ck" / "step_00000001.safetensors", net=net, step=1,
                         extra={"model": {"class": "MLP", "kwargs": {"dim": 4, "width": 8, "depth": 1}}})
    x0 = torch.randn(12, 4)
    x1 = x0 + torch.tensor([0.5, -0.5, 1.0, 0.0])
    ot = torch.roll(torch.arange(12), 3)
    mem.save_pairs(tmp_path / "pairs.safetensors", x0, x1, ot_index=ot)
    code = main(["probe", "memorization", str(ck), "--pairs", str(tmp_path / "pairs.safetensors"), "--out",
                 str(tmp_path / "out"), "--steps", "3", "--device", "cpu"])
    assert code == 0
    res = json.loads((tmp_path / "out" / "memorization.json").read_text())
    assert res["l2_assigned_mean"] < 1e-5 and res["nn_acc_assigned"] == 1.0 and res["nn_acc_ot"] == 0.0
    assert (tmp_path / "out" / "memorization.png").is_file()


def test_evaluate_pairs_on_a_constant_field_and_limit_pairs():
    """v = c sends x0 to x0 + c exactly (any solver); the assigned partner x1 = x0 + c is then hit exactly."""
    c = torch.tensor([0.5, -1.0, 2.0])
    x0 = torch.randn(10, 3, generator=torch.Generator().manual_seed(5))
    pairs = mem.PairSet(x0, x0 + c, {"assigned": torch.arange(10), "ot": torch.roll(torch.arange(10), 1)})
    m, out = mem.evaluate_pairs(lambda t, x: c.expand_as(x), pairs, method="rk4", steps=3, batch_size=4)
    torch.testing.assert_close(out, x0 + c)
    assert m["l2_assigned_mean"] < 1e-5 and m["nn_acc_assigned"] == 1.0 and m["nn_acc_ot"] == 0.0
    assert m["n"] == 10 and m["solver"] == "rk4" and m["steps"] == 3
    small, dropped = mem.limit_pairs(pairs, 4)
    assert small.x0.shape[0] == 4 and dropped == ["ot"] and set(small.partners) == {"assigned"}
    assert mem.limit_pairs(pairs, 10) == (pairs, [])


# ------------------------------------------------------------------ nearest neighbours: the FAISS backend, "auto"

def _copies_and_ties(shape, seed):
    """A pool with a duplicated row; queries: two exact copies (distance exactly 0, one of them of the duplicated
    row), two midpoints of pool pairs (near-ties), then random rows (no ties). Returns (queries, pool, n_special)."""
    g = torch.Generator().manual_seed(seed)
    pool = 3 + torch.randn(300, *shape, generator=g)
    pool[10] = pool[3]
    mids = torch.stack([(pool[0] + pool[1]) / 2, (pool[20] + pool[21]) / 2])
    q = torch.cat([pool[[3, 5]], mids, 3 + torch.randn(40, *shape, generator=g)])
    return q, pool, 4


@pytest.mark.parametrize("shape", [(48,), (3, 4, 4)], ids=["vectors", "images"])
def test_faiss_backend_matches_brute_force_with_copies_and_near_ties(shape, one_thread):
    pytest.importorskip("faiss")
    q, pool, n_special = _copies_and_ties(shape, 0)
    d, i = mem.nearest_neighbours(q, pool, k=3, chunk_size=32, backend="faiss")  # 32 rows: faiss's BLAS path
    ref = torch.cdist(q.reshape(len(q), -1).double(), pool.reshape(len(pool), -1).double())
    bd, bi = torch.sort(ref, dim=1)
    torch.testing.assert_close(d.double(), bd[:, :3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref.gather(1, i), bd[:, :3], rtol=1e-6, atol=1e-6)  # the rows returned are that close
    same = lambda t: torch.where(t == 10, 3, t)  # noqa: E731  (rows 3 and 10 are one point)
    assert torch.equal(same(i[n_special:]), same(bi[n_special:, :3]))  # random queries: no other ties
    assert d[0, 0].item() == 0.0 and d[0, 1].item() == 0.0 and set(i[0, :2].tolist()) == {3, 10}  # duplicated row
    assert d[1, 0].item() == 0.0 and i[1, 0].item() == 5
    assert {i[2, 0].item(), i[2, 1].item()} == {0, 1} and {i[3, 0].item(), i[3, 1].item()} == {20, 21}


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_nearest_neighbours_widens_when_near_ties_fill_the_candidates(backend, one_thread):
    """40 pool rows at distance 1 from the query and, last, one at 1 - 1e-12: float32 candidate values cannot tell
    them apart, so the k + 8 candidates are all near-ties; the search must widen to the whole pool and the float64
    re-ranking must find the last row (with these data both searches miss it when they do not widen)."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    eye = torch.eye(20, dtype=torch.float64)
    q = torch.randn(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pool = q + torch.cat([eye, -eye, (1 - 1e-12) * eye[:1]])
    d, i = mem.nearest_neighbours(q, pool, k=1, backend=backend)
    assert i.item() == 40 and abs(d.item() - (1 - 1e-12)) < 1e-14


def test_auto_backend_equals_torch_and_faiss_agrees(monkeypatch, one_thread):
    from flowprobe.probes import neighbours

    q, pool, _ = _copies_and_ties((3, 4, 4), 1)
    auto = mem.nearest_neighbours(q, pool, k=2, chunk_size=16, backend="auto")
    torch_ = mem.nearest_neighbours(q, pool, k=2, chunk_size=16, backend="torch")
    assert neighbours.resolve_backend("auto", 300, 48) == "torch"  # far below any crossover
    assert torch.equal(auto[0], torch_[0]) and torch.equal(auto[1], torch_[1])
    assert neighbours.resolve_backend("auto", 10**9, 2, "cuda") == "torch"  # auto never sends CUDA data to faiss
    assert neighbours.resolve_backend("auto", 10**6, 2, threads=2) == "torch"  # nor work on several threads
    assert neighbours.resolve_backend("auto", 10**6, 3072, threads=1) == "torch"  # nor wide rows
    if neighbours.faiss_available():  # past the crossover, auto is faiss: the same distances
        assert neighbours.resolve_backend("auto", neighbours.FAISS_MIN_POOL, 2, threads=1) == "faiss"
        monkeypatch.setattr(neighbours, "FAISS_MIN_POOL", 0)
        monkeypatch.setattr(neighbours, "FAISS_MAX_DIM", 48)
        assert neighbours.resolve_backend("auto", 300, 48) == "faiss"
        d, i = mem.nearest_neighbours(q, pool, k=2, chunk_size=16, backend="auto")
        torch.testing.assert_close(d, torch_[0], rtol=0, atol=0)


def test_bad_backend_and_missing_faiss_are_config_errors(monkeypatch):
    import sys

    from flowprobe.config import ConfigError

    x = torch.randn(5, 3)
    with pytest.raises(ConfigError, match="backend must be one of"):
        mem.nearest_neighbours(x, x, backend="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ConfigError, match=r"flowprobe\[faiss\]"):
        mem.nearest_neighbours(x, x, backend="faiss")
    assert mem.nearest_neighbours(x, x, backend="auto")[1][:, 0].tolist() == list(range(5))  # auto falls back


def test_faiss_backend_exact_copies_under_a_large_offset(one_thread):
    """As for the torch search: 24 queries (faiss's BLAS path, ||q||^2 + ||p||^2 - 2 q.p) copying pool rows that share
    an offset of 100 get distance exactly 0 and their own rows."""
    pytest.importorskip("faiss")
    pool = 100 + torch.randn(50, 3072, generator=torch.Generator().manual_seed(1))
    rows = torch.arange(24) * 2
    d, i = mem.nearest_neighbours(pool[rows], pool, k=1, backend="faiss")
    assert torch.equal(i[:, 0], rows) and d.abs().max().item() == 0.0


def test_faiss_backend_restores_faiss_settings(one_thread):
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    mem.nearest_neighbours(x, x, backend="faiss")
    assert (faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold) == before
