"""The image experiments end to end: tiny pipelines on self-made data (seconds), and the --quick runs on the
shared data (marked slow)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowprobe.data.image_files import find_data_root
from flowprobe.data.images import load_images, ot_partner, shuffled_partner, to_tensor
from flowprobe.experiments import run_experiment
from flowprobe.probes.memorization import load_pairs

TINY_MLP = ["model.arch=mlp", "model.width=64", "model.depth=2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLOWPROBE_CACHE", str(tmp_path_factory.getbasetemp() / "flowprobe-cache"))


def _tar(path: Path, n: int, side: int, classes: list[str] | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
            name = f"{i:06d}.png" if classes is None else f"{classes[i % len(classes)]}/{i:04d}.png"
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def _finite(*vals) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in vals)


def test_celeba_pairs_tiny_pipeline(tmp_path):
    src = _tar(tmp_path / "faces.tar.gz", 16, 8)
    res = run_experiment("celeba-pairs", tmp_path / "out", quick=False, seed=3, device="cpu", verbose=False, overrides=[
        f"dataset={src}", "resolution=8", "n_list=[12]", "sigmas=[0.0, 0.05]", "steps=20", "batch_size=8",
        "curve_every=10", "curve_n=6", "curve_solver_steps=3", "solver_steps=5", "save_pairs=true", "n_show=3",
        *TINY_MLP])
    runs = res["runs"]
    assert [(r["n"], r["sigma"]) for r in runs] == [(12, 0.0), (12, 0.05)]
    for r in runs:
        assert _finite(r["l2_shuffled_mean"], r["l2_shuffled_std"], r["l2_ot_mean"], r["l2_ot_std"])
        assert 0 <= r["nn_acc_shuffled"] <= 1 and 0 <= r["nn_acc_ot"] <= 1
        assert r["gap"] == pytest.approx(r["l2_shuffled_mean"] - r["l2_ot_mean"])
    assert sorted((c["sigma"], c["step"]) for c in res["curves"]) == [(0.0, 10), (0.0, 20), (0.05, 10), (0.05, 20)]
    names = [c["name"] for c in res["criteria"]]
    assert any("shuffled partner than to the OT" in n for n in names) and len(res["statements"]) == 1
    for f in ("samples_n12.png", "curves.png", "results.json", "report.md"):
        assert (tmp_path / "out" / f).is_file()
    # the pairs file holds exactly the pairing that was trained on, and the exact OT partner
    ps = load_pairs(tmp_path / "out" / "pairs_n12.safetensors")
    imgs = to_tensor(load_images(src, limit=12).images)
    perm = shuffled_partner(12, seed=3 * 1_000_003 + 17 + 12)
    torch.testing.assert_close(ps.x1, imgs[perm].float() / 127.5 - 1)
    ot = ot_partner(ps.x0, imgs)
    assert torch.equal(perm[ps.partners["ot"]], ot)  # x1[ot_index[i]] = image[ot[i]]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["runs"][0]["l2_ot_mean"] == pytest.approx(runs[0]["l2_ot_mean"])


def test_image_experiments_take_a_compile_mode_or_backend(tmp_path):
    """compile accepts what fit accepts (a mode such as reduce-overhead, or a backend); the eager backend
    (graph capture, no code generation) trains to the same numbers as no compilation."""
    from flowprobe.config import ConfigError, from_dict
    from flowprobe.experiments.celeba import CelebaPairsConfig

    assert from_dict(CelebaPairsConfig, {"compile": "reduce-overhead"}).compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile"):
        from_dict(CelebaPairsConfig, {"compile": "warp-speed"})
    src = _tar(tmp_path / "faces.tar.gz", 8, 8)
    common = [f"dataset={src}", "resolution=8", "n_list=[6]", "sigmas=[0.0]", "steps=4", "batch_size=4",
              "curve_every=4", "curve_n=3", "curve_solver_steps=2", "solver_steps=2", "n_show=2", *TINY_MLP]
    plain = run_experiment("celeba-pairs", tmp_path / "a", quick=False, seed=1, device="cpu", verbose=False,
                           overrides=common)
    graph = run_experiment("celeba-pairs", tmp_path / "b", quick=False, seed=1, device="cpu", verbose=False,
                           overrides=[*common, "compile=eager"])
    assert graph["config"]["compile"] == "eager"
    assert graph["runs"][0]["l2_shuffled_mean"] == pytest.approx(plain["runs"][0]["l2_shuffled_mean"], rel=1e-6)


def test_celeba_pairs_selects_subsets():
    from flowprobe.experiments.celeba import CelebaPairsConfig, train_jobs

    cfg = CelebaPairsConfig(n_list=[1000, 5000], sigmas=[0.0, 0.05, 0.2, 0.5], max_sigmas_large_n=2)
    assert train_jobs(cfg) == [(1000, 0.0), (1000, 0.05), (1000, 0.2), (1000, 0.5), (5000, 0.0), (5000, 0.05)]


def _euler(net, x0, steps: int):
    x, h = x0.clone(), 1.0 / steps
    with torch.no_grad():
        for k in range(steps):
            x = x + h * net(torch.full((x.shape[0],), k * h), x)
    return x


def test_celeba_reflow_tiny_pipeline(tmp_path):
    """Every reported number recomputed from the saved nets and data: G(x0) by the test's own Euler loop through the
    first flow, each reflow net's end points the same way, the OT partners by scipy's assignment."""
    from safetensors.torch import load_file
    from scipy.optimize import linear_sum_assignment

    from flowprobe.runs import load_model

    src = _tar(tmp_path / "faces.tar.gz", 12, 8, seed=1)
    out = tmp_path / "out"
    res = run_experiment("celeba-reflow", out, quick=False, device="cpu", verbose=False, overrides=[
        f"dataset={src}", "resolution=8", "n=10", "first_steps=10", "steps=10", "batch_size=8", "gen_steps=4",
        "solver_steps=4", "n_show=2", "save_models=true", *TINY_MLP])
    assert [r["sigma"] for r in res["runs"]] == [0.0, 0.05]
    data = load_file(out / "models" / "reflow-data.safetensors")
    x0, generated, images = data["x0"], data["generated"], data["images"]
    assert x0.shape == generated.shape == (10, 3, 8, 8) and images.dtype == torch.uint8 and images.shape[0] == 10
    first, _ = load_model(out / "models" / "first-flow.safetensors")
    torch.testing.assert_close(_euler(first, x0, 4), generated, rtol=1e-5, atol=1e-5)
    real = images.double().flatten(1) / 127.5 - 1
    flat0, flat_gen = x0.double().flatten(1), generated.double().flatten(1)

    def lsa(a, b):
        return torch.from_numpy(linear_sum_assignment(torch.cdist(a, b).pow(2).numpy())[1])

    ot_real, ot_gen = lsa(flat0, real), lsa(flat0, flat_gen)
    frac = (ot_gen == torch.arange(10)).double().mean().item()
    assert res["first_flow"]["generated_is_ot_fraction"] == pytest.approx(frac)
    for r in res["runs"]:
        net, _ = load_model(out / "models" / f"reflow-sigma{r['sigma']:g}.safetensors")
        end = _euler(net, x0, 4).double().flatten(1)
        l2_gen, l2_ot = (end - flat_gen).norm(dim=1), (end - real[ot_real]).norm(dim=1)
        assert r["l2_generated_mean"] == pytest.approx(l2_gen.mean().item(), rel=1e-4)
        assert r["l2_generated_std"] == pytest.approx(l2_gen.std().item(), rel=1e-3)
        assert r["l2_ot_mean"] == pytest.approx(l2_ot.mean().item(), rel=1e-4)
        assert r["l2_ot_std"] == pytest.approx(l2_ot.std().item(), rel=1e-3)
        nearest = torch.cdist(end, real).argmin(dim=1)
        assert r["nn_acc_ot"] == pytest.approx((nearest == ot_real).double().mean().item())
    assert len(res["criteria"]) == 2 and (out / "samples.png").is_file()


def test_cifar_gradvar_tiny_pipeline(tmp_path):
    src = _tar(tmp_path / "train.tar.gz", 20, 8, classes=["a", "b"], seed=2)
    res = run_experiment("cifar-gradvar", tmp_path / "out", quick=False, device="cpu", verbose=False, overrides=[
        f"dataset={src}", "resolution=8", "steps=5", "batch_size=8", "times=[0.1, 0.5, 0.9]", "gv_samples=6",
        "gv_chunk=3", *TINY_MLP])
    assert [(r["direction"], r["sigma"]) for r in res["runs"]] == [("forward", 0.0), ("forward", 0.05),
                                                                   ("backward", 0.0), ("backward", 0.05)]
    for r in res["runs"]:
        assert r["times"] == [0.1, 0.5, 0.9] and len(r["gv"]) == 3 and len(r["gv_se"]) == 3 and len(r["loss"]) == 3
        assert all(g > 0 for g in r["gv"]) and r["argmax_t"] == r["times"][int(np.argmax(r["gv"]))]
    assert [q["direction"] for q in res["ratios"]] == ["forward", "backward"]
    fwd = {r["sigma"]: r for r in res["runs"] if r["direction"] == "forward"}
    assert res["ratios"][0]["ratio"][1] == pytest.approx(fwd[0.05]["gv"][1] / fwd[0.0]["gv"][1])
    assert len(res["criteria"]) == 4 and (tmp_path / "out" / "gradvar.png").is_file()


def test_cifar_gradvar_residual_probe(tmp_path):
    """The residual probe: at each t, actual / white / image residuals of equal per-sample norms (so equal
    mean squared norms), each with a positive gain, in results and in the report."""
    src = _tar(tmp_path / "train.tar.gz", 20, 8, classes=["a", "b"], seed=2)
    res = run_experiment("cifar-gradvar", tmp_path / "out", quick=False, device="cpu", verbose=False, overrides=[
        f"dataset={src}", "resolution=8", "steps=5", "batch_size=8", "times=[0.1, 0.9]", "gv_samples=6",
        "gv_chunk=3", "directions=[backward]", "sigmas=[0.0]", "residual_probe=true", "gv_method=ghost", *TINY_MLP])
    (run,) = res["runs"]
    assert [g["t"] for g in run["residual_gain"]] == [0.1, 0.9]
    for g in run["residual_gain"]:
        sq = g["actual"]["sq_norm"]
        assert sq > 0 and g["white"]["sq_norm"] == pytest.approx(sq, rel=1e-5)
        assert g["image"]["sq_norm"] == pytest.approx(sq, rel=1e-5)
        assert all(g[k]["gain"] > 0 and g[k]["gain"] == pytest.approx(g[k]["gv"] / g[k]["sq_norm"])
                   for k in ("actual", "white", "image"))
    assert "Gain GV / mean ||r||^2" in (tmp_path / "out" / "report.md").read_text()


# the data root as the library finds it ($FLOWPROBE_DATA, else ../shared/data), so these run wherever the data is
SHARED = find_data_root() or Path(__file__).resolve().parents[2] / "shared" / "data"
needs_celeba = pytest.mark.skipif(not (SHARED / "celeba" / "images.tar.gz").is_file(), reason="no shared CelebA")
needs_cifar = pytest.mark.skipif(not (SHARED / "cifar10" / "train.tar.gz").is_file(), reason="no shared CIFAR-10")


@pytest.fixture
def shared_data(monkeypatch):
    monkeypatch.setenv("FLOWPROBE_DATA", str(SHARED))
    torch.set_num_threads(1)


@pytest.mark.slow
@needs_celeba
def test_celeba_pairs_quick(tmp_path, shared_data):
    res = run_experiment("celeba-pairs", tmp_path, quick=True, device="cpu", verbose=False)
    r0 = next(r for r in res["runs"] if r["sigma"] == 0.0)
    # sigma = 0 memorises the shuffled pairs of the quick run (nn acc 1.0 and L2 2.0 vs 8.7 at seed 0)
    assert r0["nn_acc_shuffled"] >= 0.9 and r0["l2_shuffled_mean"] < r0["l2_ot_mean"]
    assert len(res["curves"]) == 3 * 4


@pytest.mark.slow
@needs_celeba
def test_celeba_reflow_quick(tmp_path, shared_data):
    res = run_experiment("celeba-reflow", tmp_path, quick=True, device="cpu", verbose=False)
    r0 = next(r for r in res["runs"] if r["sigma"] == 0.0)
    assert r0["l2_generated_mean"] < r0["l2_ot_mean"]


@pytest.mark.slow
@needs_cifar
def test_cifar_gradvar_quick(tmp_path, shared_data):
    res = run_experiment("cifar-gradvar", tmp_path, quick=True, device="cpu", verbose=False)
    by = {(r["direction"], r["sigma"]): r for r in res["runs"]}
    fwd, bwd = by[("forward", 0.0)], by[("backward", 0.0)]
    assert fwd["gv"][-1] > fwd["gv"][0] and bwd["gv"][0] > bwd["gv"][-1]
