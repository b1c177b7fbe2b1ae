"""Log-likelihood by the instantaneous change of variables (probes.likelihood, runs.likelihood, the CLI).

References: the closed-form density of a Gaussian target under its exact marginal field, the Jacobian of a small
net (trace and the closed-form variance of Hutchinson's estimator), FAIR flow_matching's
``ODESolver.compute_likelihood`` on the same net and points, and the exact probability of 8-bit pixels under a
Gaussian (normal CDF over each pixel's cell) for bits per dimension.
"""

import json
import math

import numpy as np
import pytest
import torch

from flowprobe.gaussian import IndependentGaussianCoupling, LinearGaussianCoupling
from flowprobe.nets import MLP
from flowprobe.probes.likelihood import (bits_per_dim, dequantize, draw_probes, exact_divergence, gaussian_log_prob,
                                         hutchinson_divergence, log_likelihood, on_pixel_grid)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _gaussian_target(d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=F64)
    return torch.randn(d, generator=g, dtype=F64), A @ A.T / d + 0.3 * torch.eye(d, dtype=F64), g


def _net(dim: int, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(dim, width=16, depth=2, time_embed_dim=4, time_scale=3.0).double().eval()


# ------------------------------------------------------------------------------------------ closed-form Gaussian


@pytest.mark.parametrize("coupling", ["independent", "ot", "wide-source"])
def test_exact_field_of_gaussian_endpoints_gives_the_target_density(coupling):
    """Source N(m0, s0^2 I), target N(mu, Sigma), the exact marginal field of the linear path (independent
    coupling, or the OT pairing's Lemma-1 field): log p_1 from the ODE equals log N(x; mu, Sigma) to solver
    tolerance, and the source point reached is the closed-form flow map's."""
    mu, S, g = _gaussian_target(3, 0)
    m0, s0 = (torch.zeros(3, dtype=F64), 1.0) if coupling != "wide-source" else (torch.full((3,), 0.5, dtype=F64), 2.0)
    cp = (LinearGaussianCoupling.ot(mu, S) if coupling == "ot"
          else IndependentGaussianCoupling(mu, S, m0=m0, S0=s0 ** 2 * torch.eye(3, dtype=F64)))
    target = torch.distributions.MultivariateNormal(mu, S)
    x1 = mu + torch.randn(6, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(S).T
    lk = log_likelihood(cp.field(), x1, lambda x: gaussian_log_prob(x, s0, m0), rtol=1e-10, atol=1e-10)
    assert (lk.log_prob - target.log_prob(x1)).abs().max() < 1e-8
    assert lk.draws is None and lk.stderr is None and not lk.log_prob.requires_grad
    if coupling != "ot":
        back = cp.flow_map(torch.ones(6, dtype=F64), x1, torch.zeros(6, dtype=F64))
        assert (lk.x0 - back).abs().max() < 1e-7
    assert lk.summary()["n"] == 6 and lk.nfe > 0


# ------------------------------------------------------------------------------------------------- Hutchinson


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_the_closed_form_variance(probe):
    """At fixed (t, x) on a random MLP: the exact divergence is the Jacobian's trace; K probe estimates average to
    it within 4 standard errors of the closed-form variance (Rademacher: sum_{i<j} (J_ij + J_ji)^2; Gaussian: that
    + 2 sum_i J_ii^2), and their sample variance matches that variance (K = 3000: relative s.e. < 6%)."""
    d, n, k = 4, 3, 3000
    net = _net(d)
    x = torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.full((n,), 0.3, dtype=F64)
    J = torch.stack([torch.autograd.functional.jacobian(lambda y: net(t[:1], y[None])[0], x[i]) for i in range(n)])
    xr = x.clone().requires_grad_(True)
    v = net(t, xr)
    assert torch.allclose(exact_divergence(v, xr), torch.diagonal(J, dim1=1, dim2=2).sum(1), atol=1e-12)
    z = draw_probes((n, d), k, probe, torch.Generator().manual_seed(2), F64)
    est = hutchinson_divergence(net(t, xr), xr, z)  # (K, N)
    sym = J + J.transpose(1, 2)
    var = torch.triu(sym ** 2, diagonal=1).sum((1, 2))
    if probe == "gaussian":
        var = var + 2 * torch.diagonal(J, dim1=1, dim2=2).pow(2).sum(1)
    trace = torch.diagonal(J, dim1=1, dim2=2).sum(1)
    assert ((est.mean(0) - trace).abs() < 4 * (var / k).sqrt()).all()
    assert ((est.var(0) / var - 1).abs() < 0.25).all()
    assert xr.grad is None and all(p.grad is None for p in net.parameters())


def test_hutchinson_log_likelihood_agrees_with_exact_within_its_standard_error():
    """The integrated estimate: K = 24 probes per sample average to the exact-divergence log-likelihood within
    4 of their own standard errors (the probes are the only randomness; the trajectory is the same)."""
    net = _net(3, seed=3)
    x1 = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(4)) * 1.5
    exact = log_likelihood(net, x1, rtol=1e-8, atol=1e-8)
    hut = log_likelihood(net, x1, divergence="hutchinson", n_probes=24, rtol=1e-8, atol=1e-8,
                         generator=torch.Generator().manual_seed(5))
    assert hut.draws.shape == (24, 6) and (hut.stderr > 0).all()
    assert (hut.x0 - exact.x0).abs().max() < 1e-6
    assert ((hut.log_prob - exact.log_prob).abs() < 4 * hut.stderr).all()
    assert hut.summary()["probe_stderr_of_mean"] < hut.summary()["mean_probe_stderr"]


def test_images_and_no_grad_leak():
    """(N, C, H, W) images through a convolutional field: the same log-likelihood as the flattened (N, D) problem,
    batches of 2 as one batch (to solver tolerance), and no gradient left on the parameters."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()

    def field(t, x):
        return torch.tanh(conv(x)) * (1 + t[:, None, None, None])

    x1 = torch.randn(4, 2, 2, 2, dtype=F64)
    whole = log_likelihood(field, x1, rtol=1e-8, atol=1e-8)
    batched = log_likelihood(field, x1, rtol=1e-8, atol=1e-8, batch_size=2)
    assert whole.log_prob.shape == (4,) and whole.dim == 8
    assert (whole.log_prob - batched.log_prob).abs().max() < 1e-6
    flat = log_likelihood(lambda t, y: field(t, y.reshape(-1, 2, 2, 2)).reshape(-1, 8), x1.reshape(4, 8),
                          rtol=1e-8, atol=1e-8)
    assert (whole.log_prob - flat.log_prob).abs().max() < 1e-9
    assert all(p.grad is None for p in conv.parameters())


# ------------------------------------------------------------------------------------------- flow_matching (FAIR)


def test_agrees_with_flow_matching_compute_likelihood():
    """Same net, same points, dopri5 at the same tolerances: FAIR's ODESolver.compute_likelihood (exact divergence,
    and Hutchinson with one Rademacher probe drawn from the same seed) gives the same log-likelihoods."""
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    net = _net(3, seed=7)

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(t.expand(x.shape[0]).to(x.dtype), x)

    solver = ODESolver(velocity_model=Wrapped(net))
    x1 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(8))
    grid = torch.tensor([1.0, 0.0], dtype=F64)
    tol = {"rtol": 1e-8, "atol": 1e-8}
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # flow_matching makes its log-det and Rademacher probes in the default dtype
    try:
        _compare_with_flow_matching(solver, net, x1, grid, tol)
    finally:
        torch.set_default_dtype(default)


def _compare_with_flow_matching(solver, net, x1, grid, tol):
    def log_p0(x):
        return gaussian_log_prob(x)

    _, theirs = solver.compute_likelihood(x_1=x1, log_p0=log_p0, step_size=None, method="dopri5", time_grid=grid,
                                          exact_divergence=True, **tol)
    ours = log_likelihood(net, x1, method="dopri5", **tol)
    assert (ours.log_prob - theirs).abs().max() < 1e-7
    torch.manual_seed(11)
    _, theirs_h = solver.compute_likelihood(x_1=x1, log_p0=log_p0, step_size=None, method="dopri5", time_grid=grid,
                                            exact_divergence=False, **tol)
    ours_h = log_likelihood(net, x1, divergence="hutchinson", n_probes=1, generator=torch.Generator().manual_seed(11),
                            **tol)
    assert (ours_h.log_prob - theirs_h).abs().max() < 1e-7
    assert (ours_h.log_prob - ours.log_prob).abs().max() > 1e-4  # one probe really is an estimate


# ----------------------------------------------------------------------------------------------- bits per dimension


@pytest.mark.parametrize("scale", [127.5, 128.0])
def test_bits_per_dim_matches_the_exact_probability_of_the_pixels(scale):
    """Model density N(m, diag(s^2)) in model space (the exact field of independent Gaussian endpoints, run on
    1 x 2 x 2 images): the dequantised estimate averaged over u equals -log2 P(p) / D, P(p) = prod over pixels of
    the normal probability of the cell [p / scale - 1, (p + 1) / scale - 1), within 4 Monte Carlo standard errors
    (~1e-4 bits; the Jensen gap is ~1e-6 here, and a wrong Jacobian such as 127.5 vs 128 would be off by 5.6e-3)."""
    m = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=F64)
    s = torch.tensor([0.3, 0.5, 0.4, 0.6], dtype=F64)
    cp = IndependentGaussianCoupling(m, torch.diag(s ** 2))
    field = cp.field()
    pixels = ((m + 0.1 * s + 1) * scale).floor()  # near the mode: the density barely varies over a cell
    x = (pixels / scale - 1).reshape(1, 1, 2, 2)
    assert on_pixel_grid(x, scale)
    reps = 64
    xq = dequantize(x.expand(reps, 1, 2, 2), torch.Generator().manual_seed(0), scale)
    assert ((xq - x) >= 0).all() and ((xq - x) < 1 / scale).all()

    lk = log_likelihood(lambda t, y: field(t, y.reshape(-1, 4)).reshape(-1, 1, 2, 2), xq, rtol=1e-9, atol=1e-9)
    per_draw = bits_per_dim(lk.log_prob, 4, scale)
    bpd, se = float(per_draw.mean()), float(per_draw.std() / math.sqrt(reps))
    normal = torch.distributions.Normal(m, s)
    lo, hi = pixels / scale - 1, (pixels + 1) / scale - 1
    exact_bits = float(-torch.log2(normal.cdf(hi) - normal.cdf(lo)).sum() / 4)
    assert se < 2e-4  # fine enough to see a wrong Jacobian (log2(128 / 127.5) = 5.6e-3 bits)
    assert abs(bpd - exact_bits) < 4 * se + 1e-5  # Monte Carlo over u, plus the Jensen gap (~1e-6 here)


# ----------------------------------------------------------------------------------------------------- runs, CLI


def _main(argv):
    from flowprobe.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from flowprobe.config import from_dict
    from flowprobe.runs import TrainConfig, train_from_config

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lk") / "run"
    cfg = from_dict(TrainConfig, {"data": {"source": "gaussian", "target": "moons"},
                                  "model": {"width": 16, "depth": 1}, "steps": 30, "batch_size": 64,
                                  "log_every": 10, "sample": {"plot": False, "n": 64, "steps": 2}})
    train_from_config(cfg, out, device="cpu", progress=False)
    torch.set_num_threads(before)
    return out


def test_cli_on_a_toy_run(toy_run, tmp_path, capsys):
    """``flowprobe likelihood RUN --data``: exit 0, results.json with the exact divergence (D = 2) and the
    per-sample file, equal to the library's numbers on the run's own net and source density. On a fixed grid
    (rk4) the trajectory is the same for both divergences and the Hutchinson log-det is an unbiased estimate of
    the exact one: they agree within 4 of its probe standard error of the mean."""
    from flowprobe.runs import load_model

    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0)) * 1.5
    np.save(tmp_path / "x.npy", x.numpy())
    base = ["likelihood", str(toy_run), "--data", str(tmp_path / "x.npy"), "--n", "32", "--no-figures"]
    assert _main(base + ["--out", str(tmp_path / "e"), "--rtol", "1e-4", "--atol", "1e-4"]) == 0
    assert "log p(x):" in capsys.readouterr().out
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["divergence"] == "exact" and res["n"] == 32 and res["dim"] == 2 and res["nfe"] > 0
    assert res["source"] == {"distribution": "gaussian", "std": 1.0} and res["path"]["path"] == "linear"
    per = np.load(tmp_path / "e" / "log_likelihood.npy")
    assert per.shape == (32,) and abs(per.mean() - res["mean_log_likelihood"]) < 1e-9
    net, _ = load_model(toy_run)
    direct = log_likelihood(net, x[:32], gaussian_log_prob, rtol=1e-4, atol=1e-4)
    assert np.abs(direct.log_prob.double().numpy() - per).max() < 1e-6

    fixed = ["--method", "rk4", "--steps", "12"]
    assert _main(base + fixed + ["--out", str(tmp_path / "r")]) == 0
    assert _main(base + fixed + ["--out", str(tmp_path / "h"), "--divergence", "hutchinson", "--probes", "8"]) == 0
    exact = json.loads((tmp_path / "r" / "results.json").read_text())
    hut = json.loads((tmp_path / "h" / "results.json").read_text())
    assert hut["n_probes"] == 8 and hut["probe"] == "rademacher" and hut["steps"] == 12 and exact["nfe"] == 48
    assert abs(hut["mean_log_likelihood"] - exact["mean_log_likelihood"]) < 4 * hut["probe_stderr_of_mean"]


@pytest.mark.parametrize("args, needle", [
    (["--probes", "0"], "--probes"),
    (["--method", "euler"], "--steps"),
    (["--rtol", "0"], "--rtol"),
])
def test_cli_bad_options_exit_2_with_one_line(toy_run, tmp_path, capsys, args, needle):
    np.save(tmp_path / "x.npy", np.zeros((4, 2), dtype=np.float32))
    assert _main(["likelihood", str(toy_run), "--data", str(tmp_path / "x.npy"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_cli_bad_inputs_exit_2_with_one_line(toy_run, tmp_path, capsys):
    np.save(tmp_path / "x3.npy", np.zeros((4, 3), dtype=np.float32))
    cases = [([str(tmp_path / "missing"), "--data", "moons:10"], "missing"),
             ([str(toy_run), "--data", str(tmp_path / "nope.npy")], "nope.npy"),
             ([str(toy_run), "--data", str(tmp_path / "x3.npy")], "shape")]
    for argv, needle in cases:
        assert _main(["likelihood", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_source_density_of_run_configs():
    """Image runs: N(0, I); a constant-sigma path: the source convolved with N(0, sigma^2 I) (checked for the eight
    Gaussians against a numerical convolution); a toy source without a closed form is refused."""
    from flowprobe.config import ConfigError, from_dict
    from flowprobe.data.toy import EightGaussians
    from flowprobe.runs import TrainConfig
    from flowprobe.runs.likelihood import source_density

    x = torch.tensor([[0.3, -0.2], [3.5, 0.4]], dtype=F64)
    img = from_dict(TrainConfig, {"data": {"dataset": "cifar10"}})
    lp, info = source_density(img, "cpu")
    assert info["source"] == "N(0, I)" and torch.allclose(lp(x), gaussian_log_prob(x))
    noisy = from_dict(TrainConfig, {"data": {"source": "eight_gaussians"}, "path": {"sigma": 0.3}})
    lp, info = source_density(noisy, "cpu")
    grid = torch.linspace(-6, 6, 601, dtype=F64)
    yy = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    p = EightGaussians(dtype=F64).log_prob(yy).exp()
    h = float(grid[1] - grid[0])
    conv = [(p * gaussian_log_prob(xi - yy, 0.3).exp()).sum() * h * h for xi in x]
    assert torch.allclose(lp(x), torch.stack(conv).log(), atol=1e-6)
    assert "density_of" in info
    with pytest.raises(ConfigError, match="closed-form density"):
        source_density(from_dict(TrainConfig, {"data": {"source": "moons"}}), "cpu")


def test_image_checkpoint_reports_bits_per_dim(tmp_path):
    """An image run (FlatMLP on 1 x 4 x 4, untrained) on 8-bit images: dequantised, bits/dim equals the formula on
    the per-sample nats, the histogram is written; float images off the pixel grid get no bits/dim, and D = 16 is
    still exact by default."""
    from flowprobe.checkpoint import save_checkpoint
    from flowprobe.config import from_dict
    from flowprobe.nets.factory import build_net
    from flowprobe.runs import TrainConfig, run_model_spec
    from flowprobe.runs.likelihood import likelihood

    cfg = from_dict(TrainConfig, {"data": {"dataset": "cifar10", "resolution": 4},
                                  "model": {"width": 16, "depth": 1, "time_embed_dim": 4}})
    spec = run_model_spec(cfg, (1, 4, 4))
    save_checkpoint(tmp_path / "ck" / "step_00000001.safetensors", net=build_net(spec, 0), step=1, config=cfg,
                    extra={"model": spec, "shape": [1, 4, 4]})
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 4, 4, 1), dtype=np.uint8)
    np.save(tmp_path / "px.npy", pixels)
    res = likelihood(tmp_path / "ck", str(tmp_path / "px.npy"), tmp_path / "out", divergence="hutchinson",
                     probes=2, rtol=1e-4, atol=1e-4)
    per = np.load(tmp_path / "out" / "log_likelihood.npy")
    assert res["dim"] == 16 and res["n"] == 6 and res["source"] == "N(0, I)"
    expected = float(np.mean(-per / (16 * math.log(2)) + math.log2(127.5)))
    assert abs(res["bits_per_dim"] - expected) < 1e-9 and (tmp_path / "out" / "likelihood.png").is_file()
    off = np.random.default_rng(1).uniform(-1, 1, size=(3, 1, 4, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", off)
    res = likelihood(tmp_path / "ck", str(tmp_path / "f.npy"), rtol=1e-4, atol=1e-4)
    assert res["bits_per_dim"] is None and res["divergence"] == "exact"
