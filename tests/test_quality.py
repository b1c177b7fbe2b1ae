"""Sample quality (probes.quality, runs.quality, ``flowprobe quality``): k-NN precision / recall / density / coverage
against a brute-force O(N M) computation, the Frechet distance against scipy's sqrtm and Gaussian closed forms, KID
against a brute-force unbiased MMD^2, the feature and Inception paths, the CLI end to end."""

import json
import os
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from flowprobe.cli import main
from flowprobe.config import ConfigError
from flowprobe.probes.quality import (frechet_distance, kernel_inception_distance, knn_radii,
                                      precision_recall_density_coverage)
from flowprobe.runs.quality import QualityOptions, quality, to_uint8_rgb

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ brute force


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def brute_prdc(gen, real, k: int) -> dict:
    """The definitions written out on the full distance matrices (float64)."""
    y = gen.reshape(len(gen), -1).double().numpy()
    x = real.reshape(len(real), -1).double().numpy()
    r_x = np.sort(_dist(x, x), axis=1)[:, k]  # the k-th neighbour other than the point itself
    r_y = np.sort(_dist(y, y), axis=1)[:, k]
    d_yx = _dist(y, x)
    in_real = d_yx <= r_x[None, :]
    return {"precision": in_real.any(1).mean(), "recall": (d_yx.T <= r_y[None, :]).any(1).mean(),
            "density": in_real.sum() / (k * len(y)), "coverage": (d_yx.min(0) <= r_x).mean()}


def _assert_matches(got: dict, want: dict):
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key


@pytest.mark.parametrize("seed,k", [(0, 5), (1, 3), (2, 1)])
def test_prdc_matches_brute_force(seed, k):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(60, 7, generator=g) + 3
    gen = torch.randn(45, 7, generator=g) * 1.3 + 3.4
    got = precision_recall_density_coverage(gen, real, k, chunk_size=16)
    want = brute_prdc(gen, real, k)
    _assert_matches(got, want)
    assert 0 < want["precision"] < 1 and 0 < want["coverage"] < 1  # a case where the balls decide something


def test_prdc_ties_and_a_large_offset_match_brute_force():
    """Integer-valued points far from the origin: many distances tie with a radius exactly, and the float32 matmul
    of uncentred points would cancel; the boundary pairs are decided on direct float64 distances."""
    g = torch.Generator().manual_seed(3)
    real = torch.randint(0, 6, (70, 16), generator=g).double() + 1000
    gen = torch.randint(0, 6, (60, 16), generator=g).double() + 1000
    _assert_matches(precision_recall_density_coverage(gen, real, 5), brute_prdc(gen, real, 5))


def test_knn_radii_match_brute_force():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(4))
    want = np.sort(_dist(x.double().numpy(), x.double().numpy()), axis=1)[:, 4]
    assert np.allclose(knn_radii(x, 4).numpy(), want, rtol=0, atol=1e-12)


def test_identical_sets_and_far_apart_sets():
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(5))
    same = precision_recall_density_coverage(x, x, 5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(6 / 5, abs=1e-12)  # each ball holds its centre and its 5 neighbours
    far = precision_recall_density_coverage(x + 100, x, 5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_refuses_sets_not_larger_than_k():
    with pytest.raises(ValueError, match="more than k"):
        precision_recall_density_coverage(torch.randn(5, 2), torch.randn(20, 2), 5)


# ------------------------------------------------------------------------------------------------ Frechet distance


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (TTUR / pytorch-fid): sqrtm of the non-symmetric product S_a S_b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean).real)


def test_frechet_matches_scipy_sqrtm():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    b = torch.randn(300, 24, generator=g, dtype=torch.float64) * 2 + 1
    want = scipy_frechet(a.numpy(), b.numpy())
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * float(a.var(0).sum()))


def _with_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # sample covariance I
    return mean + z @ torch.linalg.cholesky(cov).T


def test_frechet_closed_form_of_two_gaussians():
    d = 6
    g = torch.Generator().manual_seed(7)
    m_a, m_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    # commuting (diagonal) covariances: W2^2 = |m_a - m_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = torch.rand(d, generator=g, dtype=torch.float64) + 0.5, torch.rand(d, generator=g, dtype=torch.float64) * 3
    a, b = _with_moments(200, m_a, torch.diag(va), 1), _with_moments(150, m_b, torch.diag(vb + 0.1), 2)
    want = float((m_a - m_b).pow(2).sum() + (va.sqrt() - (vb + 0.1).sqrt()).pow(2).sum())
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-10)
    # S_a = I against a rotated S_b = Q diag(l) Q^T: W2^2 = |m_a - m_b|^2 + sum (1 - sqrt(l_i))^2
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.rand(d, generator=g, dtype=torch.float64) * 4 + 0.05
    a, b = _with_moments(200, m_a, torch.eye(d, dtype=torch.float64), 3), _with_moments(150, m_b, q @ torch.diag(lam)
                                                                                         @ q.T, 4)
    want = float((m_a - m_b).pow(2).sum() + (1 - lam.sqrt()).pow(2).sum())
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-10)


# ------------------------------------------------------------------------------------------------ KID


def brute_mmd2(u: np.ndarray, v: np.ndarray) -> float:
    m, d = len(u), u.shape[1]

    def k(p, q):
        return (float(np.dot(p, q)) / d + 1) ** 3

    uu = sum(k(u[i], u[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    vv = sum(k(v[i], v[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    uv = sum(k(u[i], v[j]) for i in range(m) for j in range(m)) / (m * m)
    return uu + vv - 2 * uv


def test_kid_matches_brute_force_unbiased_mmd2():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(30, 4, generator=g, dtype=torch.float64)
    b = torch.randn(25, 4, generator=g, dtype=torch.float64) * 1.5 + 0.5
    mean, std = kernel_inception_distance(a, b, subsets=4, subset_size=12, generator=torch.Generator().manual_seed(9))
    draw = torch.Generator().manual_seed(9)  # the same subsets: randperm of a, then of b, per subset
    values = []
    for _ in range(4):
        ia, ib = torch.randperm(30, generator=draw)[:12], torch.randperm(25, generator=draw)[:12]
        values.append(brute_mmd2(a[ia].numpy(), b[ib].numpy()))
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)
    assert len(set(np.round(values, 12))) == 4  # four different subsets


def test_kid_of_equal_distributions_is_near_zero_and_of_shifted_ones_is_not():
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, same_std = kernel_inception_distance(a, b, 20, 200, torch.Generator().manual_seed(0))
    shifted, _ = kernel_inception_distance(a, b + 1, 20, 200, torch.Generator().manual_seed(0))
    assert abs(same) < 3 * same_std + 1e-3 and shifted > 0.5


# ------------------------------------------------------------------------------------------------ feature spaces

_NET = {}


def tiny_conv_features(x: torch.Tensor) -> torch.Tensor:
    """A randomly initialised conv feature net (seeded): (N, 3, 8, 8) -> (N, 16); named by module:fn in the CLI test."""
    if "net" not in _NET:
        torch.manual_seed(0)
        _NET["net"] = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                    nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return _NET["net"](x)


def _images(n: int, seed: int, high: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, 3, 8, 8), generator=g).float() / 127.5 - 1


def test_fid_code_path_with_a_random_conv_feature_net():
    gen, real = _images(90, 11, high=180), _images(110, 12)
    opts = QualityOptions(kid_subsets=5, kid_subset_size=50)
    rec = quality(gen, real, features=tiny_conv_features, options=opts)
    with torch.no_grad():
        f_gen, f_real = tiny_conv_features(gen).double(), tiny_conv_features(real).double()
    space = rec["spaces"]["features"]
    assert space["dim"] == 16
    assert space["frechet_distance"] == pytest.approx(scipy_frechet(f_gen.numpy(), f_real.numpy()), rel=1e-9)
    _assert_matches(space, brute_prdc(f_gen.float(), f_real.float(), 5))
    assert rec["spaces"]["input"]["dim"] == 3 * 8 * 8


def _fake_torch_fidelity(monkeypatch, seen: dict):
    """A stand-in for torch_fidelity.feature_extractor_inceptionv3 with its interface: the constructor loads the
    weights file with torch.load(weights_only=False) and load_state_dict (strict), forward takes uint8 (N, 3, H, W)
    and returns a tuple of features. It records how it was called."""

    class FakeInception(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3)
            seen["forced"] = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            seen["features_list"] = features_list
            self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=False))

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            seen["pixels"] = x
            return (self.conv(x.float() / 128 - 1).mean((2, 3)),)

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)


def test_inception_path_reads_weights_safely_and_feeds_uint8_rgb(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    seen = {}
    _fake_torch_fidelity(monkeypatch, seen)
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3)
    save_file({f"conv.{k}": v.contiguous() for k, v in conv.state_dict().items()}, str(tmp_path / "w.safetensors"))
    g = torch.Generator().manual_seed(13)
    gen, real = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.rand(50, 1, 8, 8, generator=g) * 1.6 - 0.8
    rec = quality(gen, real, inception_weights=tmp_path / "w.safetensors",
                  options=QualityOptions(kid_subsets=3, kid_subset_size=20))
    assert seen["forced"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert seen["features_list"] == ["2048"]
    assert torch.equal(seen["pixels"][:, 0], seen["pixels"][:, 2])  # grey images read as three equal channels
    with torch.no_grad():
        def feats(x):
            return conv(to_uint8_rgb(x).float() / 128 - 1).mean((2, 3)).double().numpy()
        want = scipy_frechet(feats(gen), feats(real))
    assert rec["spaces"]["inception"]["frechet_distance"] == pytest.approx(want, rel=1e-9)

    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="not torch-fidelity's InceptionV3 weights"):
        quality(gen, real, inception_weights=tmp_path / "wrong.pt")
    torch.save({"conv.weight": types.SimpleNamespace()}, tmp_path / "code.pt")  # needs real unpickling
    with pytest.raises(ConfigError, match="weights_only=True"):
        quality(gen, real, inception_weights=tmp_path / "code.pt")


def test_inception_without_torch_fidelity_or_file_is_a_config_error(tmp_path, monkeypatch):
    x = _images(20, 14)
    with pytest.raises(ConfigError, match="no such file"):
        quality(x, x, inception_weights=tmp_path / "missing.pth")
    (tmp_path / "w.pth").write_bytes(b"not weights")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as without the package
    with pytest.raises(ConfigError, match="needs torch-fidelity"):
        quality(x, x, inception_weights=tmp_path / "w.pth")


# ------------------------------------------------------------------------------------------------ job and CLI


def test_checkpoint_is_sampled_as_generated(tmp_path):
    from flowprobe.config import from_dict
    from flowprobe.runs import TrainConfig, train_from_config
    from flowprobe.runs.jobs import sample_checkpoint

    cfg = from_dict(TrainConfig, {"data": {"source": "gaussian"}, "model": {"width": 16}, "steps": 20,
                                  "batch_size": 64, "log_every": 10})
    train_from_config(cfg, tmp_path / "run", device="cpu", progress=False)
    real = torch.randn(60, 2, generator=torch.Generator().manual_seed(15))
    opts = QualityOptions(steps=4, kid_subsets=2, kid_subset_size=30, seed=3)
    rec = quality(tmp_path / "run", real, options=opts)
    assert rec["generated"]["loader"] == "checkpoint" and rec["generated"]["n"] == 60
    res, _, _ = sample_checkpoint(tmp_path / "run", 60, 4, "euler", 3, "cpu")
    _assert_matches(rec["spaces"]["input"], brute_prdc(res.x.float(), real, 5))


def test_cli_end_to_end_on_npy_files(tmp_path, capsys):
    rng = np.random.default_rng(16)
    real = rng.normal(size=(80, 3, 8, 8)).clip(-1, 1).astype(np.float32)
    gen = (rng.normal(size=(70, 3, 8, 8)) * 0.8).clip(-1, 1).astype(np.float32)
    np.save(tmp_path / "real.npy", real)
    np.save(tmp_path / "gen.npy", gen)
    code = main([
        "quality", str(tmp_path / "gen.npy"), "--real", str(tmp_path / "real.npy"), "--features",
        "test_quality:tiny_conv_features", "--k", "3", "--kid-subsets", "4", "--kid-subset-size", "40",
        "--out", str(tmp_path / "q")])
    assert code == 0
    rec = json.loads((tmp_path / "q" / "results.json").read_text())
    assert rec["format"] == "flowprobe-quality-1" and set(rec["spaces"]) == {"input", "features"}
    assert rec["generated"]["n"] == 70 and rec["real"]["n"] == 80 and rec["options"]["k"] == 3
    for space in rec["spaces"].values():
        assert {"precision", "recall", "density", "coverage", "frechet_distance", "kid", "kid_std"} <= set(space)
        assert space["kid_subset_size"] == 40
    _assert_matches(rec["spaces"]["input"], brute_prdc(torch.from_numpy(gen), torch.from_numpy(real), 3))
    out = capsys.readouterr().out
    assert "precision" in out and "features" in out


@pytest.mark.parametrize("extra,message", [
    (["--real", "missing.npy"], "missing.npy"),
    (["--real", "small.npy"], "shape"),
    (["--real", "real.npy", "--inception-weights", "nope.pth"], "no such file"),
    (["--real", "real.npy", "--k", "0"], "k >= 1"),
    (["--real", "real.npy", "--features", "no_such_module_here:fn"], "cannot import"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "real.npy", np.zeros((20, 4), np.float32) + np.arange(20, dtype=np.float32)[:, None])
    np.save(tmp_path / "small.npy", np.zeros((20, 3), np.float32))
    np.save(tmp_path / "gen.npy", np.ones((20, 4), np.float32))
    assert main(["quality", "gen.npy", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flowprobe: error:") and message in err
