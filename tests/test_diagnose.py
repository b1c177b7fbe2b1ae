"""flowprobe diagnose: the statistics, the verdict on known cases, the result file, the data loader and the command.

Known cases (the calibration): exact memorising fields (the empirical CFM minimiser of N training samples; the pair
field of a finite fixed Gaussian pairing) -> memorises; the closed-form Gaussian field -> generalises; a small MLP
trained on 8 points -> memorises and on 2000 points -> generalises; too few samples -> inconclusive.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowprobe.data.arrays import array_to_samples, load_data
from flowprobe.data.toy import make_toy
from flowprobe.diagnosis import (Diagnosis, DiagnoseOptions, EmpiricalMarginalField, EmpiricalPairField, diagnose,
                                 write_diagnosis)
from flowprobe.diagnosis.stats import auc, auc_brute_force, newcombe_interval, wilson_interval
from flowprobe.diagnosis.verdict import decide
from flowprobe.gaussian import IndependentGaussianCoupling, LinearGaussianCoupling
from flowprobe.nets import MLP
from flowprobe.paths import LinearPath
from flowprobe.checkpoint import load_checkpoint
from flowprobe.probes.memorization import PairSet, nearest_neighbours, save_pairs

FAST = DiagnoseOptions(n_generate=600, membership_samples=300, gradvar_samples=64, transport_samples=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.tensor([[1.0, 0.0], [0.3, 0.6]])
    return torch.tensor([3.0, 0.0]) + torch.randn(n, 2, generator=g) @ L.T


# --------------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("m,n,levels", [(1, 1, 3), (7, 5, 3), (40, 60, 1000), (50, 30, 4)])
def test_auc_matches_brute_force_with_ties(m, n, levels):
    g = torch.Generator().manual_seed(m * 100 + n)
    x = torch.randint(levels, (m,), generator=g).double()
    y = torch.randint(levels, (n,), generator=g).double() - 0.5 * (levels > 10)
    value, se = auc(x, y)
    assert value == pytest.approx(auc_brute_force(x, y), abs=1e-12)
    # DeLong by brute force: placements from the m x n comparison matrix
    psi = (x[:, None] > y[None, :]).double() + 0.5 * (x[:, None] == y[None, :]).double()
    v10, v01 = psi.mean(1), psi.mean(0)
    var = (v10.var().item() / m if m > 1 else 0.0) + (v01.var().item() / n if n > 1 else 0.0)
    assert se == pytest.approx(var ** 0.5, abs=1e-12)


def test_auc_extremes_and_errors():
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))[0] == 1.0
    assert auc(torch.tensor([0.0]), torch.tensor([0.0]))[0] == 0.5
    with pytest.raises(ValueError, match="finite"):
        auc(torch.tensor([float("nan")]), torch.tensor([0.0]))


def test_wilson_and_newcombe_intervals():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)  # the textbook value for 0 / 10
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    d, lo, hi = newcombe_interval(56, 70, 48, 80)  # Newcombe (1998), example (e): 0.2 [0.0524, 0.3339]
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.0524, abs=1e-3) and hi == pytest.approx(0.3339, abs=1e-3)


def test_nearest_neighbours_near_ties_and_offsets_match_brute_force():
    """The candidate search decides near-ties only within its error bound: lattice data with a large offset (many
    exact ties, strong cancellation) must give brute-force distances and neighbours up to tie order."""
    g = torch.Generator().manual_seed(0)
    pool = 50 + torch.randint(0, 3, (400, 64), generator=g).float()
    q = torch.cat([pool[:20], 50 + torch.randint(0, 3, (30, 64), generator=g).float() + 0.01])
    d, i = nearest_neighbours(q, pool, k=3, chunk_size=16)
    ref = torch.cdist(q.double(), pool.double())
    bd, _ = torch.topk(ref, 3, dim=1, largest=False)
    torch.testing.assert_close(d.double(), bd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.gather(ref, 1, i), bd, rtol=1e-6, atol=1e-6)  # the returned rows are that close
    assert d[:20, 0].abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------- calibration: closed forms


def test_exact_empirical_field_memorises():
    """The exact CFM minimiser of 200 training samples carries noise onto them: copies decide."""
    train, held = gaussian_data(200, 0), gaussian_data(1000, 1)
    d = diagnose(EmpiricalMarginalField(train), train, held, options=FAST)
    assert d.label == "memorises" and d.verdict.decided_by == ["copies"]
    ev = d.checks["copies"].evidence
    assert ev["copy_fraction"] > 0.9 and ev["excess_interval"][0] > 0.5
    assert d.checks["membership"].vote == "memorises"
    assert "trainable parameters" in d.checks["gradvar"].reason


def test_exact_pair_field_of_a_finite_gaussian_pairing_memorises(tmp_path):
    """x1 = mu + R x0 (R a 90-degree rotation, lines that never meet), 200 fixed pairs, the exact pair field:
    every training source lands on its training partner, none on its OT partner."""
    g = torch.Generator().manual_seed(2)
    coupling = LinearGaussianCoupling.rotated_ot(torch.tensor([4.0, 0.0]), torch.eye(2), 90.0)
    x0 = torch.randn(200, 2, generator=g, dtype=torch.float64)
    x1 = coupling.pair_map(x0)
    held = coupling.pair_map(torch.randn(1000, 2, generator=g, dtype=torch.float64)).float()
    pairs = PairSet(x0.float(), x1.float(), {"assigned": torch.arange(200)})
    d = diagnose(EmpiricalPairField(x0, x1, bandwidth=1e-3), None, held, pairs=pairs, options=FAST)
    assert d.label == "memorises" and "pairing" in d.verdict.decided_by
    ev = d.checks["pairing"].evidence
    assert ev["recall_assigned"] == 1.0 and ev["recall_ot"] < 0.1 and ev["same_as_ot"] < 0.1
    assert d.checks["membership"].evidence["max_auc"] > 0.99
    assert d.verdict.against == ["copies"]  # fresh noise is not carried onto training samples: listed, not deciding
    write_diagnosis(d, tmp_path)
    assert (tmp_path / "pairing.png").is_file()


def test_closed_form_gaussian_field_generalises():
    """The marginal field of N(0, I) -> N(m, S) does not depend on any training sample."""
    train, held = gaussian_data(1000, 3), gaussian_data(1000, 4)
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.45]])
    field = IndependentGaussianCoupling(torch.tensor([3.0, 0.0]), cov).field(LinearPath())
    d = diagnose(field, train, held, options=DiagnoseOptions(n_generate=1000, membership_samples=500))
    assert d.label == "generalises" and d.verdict.decided_by == ["copies"]
    ev = d.checks["copies"].evidence
    assert abs(ev["excess"]) < 0.04 and ev["excess_interval"][1] < 0.05
    assert d.checks["membership"].vote != "memorises"


def test_too_few_samples_is_inconclusive():
    train, held = gaussian_data(200, 0), gaussian_data(1000, 1)
    d = diagnose(EmpiricalMarginalField(train), train, held, options=DiagnoseOptions(n_generate=10, checks=("copies",)))
    assert d.label == "inconclusive"
    assert "too few samples" in d.checks["copies"].reason


# ------------------------------------------------------------------------------------- calibration: trained nets


def _train_mlp(n: int, steps: int = 1500, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = make_toy("moons").sample(n, g)[0]
    torch.manual_seed(seed)
    net = MLP(2, width=128, depth=3)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        x1 = data[torch.randint(n, (256,), generator=g)]
        x0, t = torch.randn(256, 2, generator=g), torch.rand(256, generator=g)
        loss = (net(t, (1 - t[:, None]) * x0 + t[:, None] * x1) - (x1 - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), data


@pytest.mark.parametrize("n,expected", [(8, "memorises"), (2000, "generalises")])
def test_trained_mlp_on_few_points_memorises_on_many_generalises(n, expected):
    net, data = _train_mlp(n)
    held = make_toy("moons").sample(1000, torch.Generator().manual_seed(99))[0]
    d = diagnose(net, data, held, options=DiagnoseOptions(n_generate=1000))
    assert d.label == expected, d.to_json()
    if expected == "memorises":
        assert d.checks["copies"].evidence["excess_interval"][0] > 0.3
        assert d.checks["gradvar"].vote == "memorises"           # collapsed on the 8 training points
        assert "too few samples" in d.checks["membership"].reason  # 8 < MIN_SAMPLES: membership cannot vote
    else:
        assert d.checks["membership"].vote == "generalises" and d.checks["gradvar"].vote == "generalises"


def test_flowprobe_run_without_train_uses_its_own_training_set(tmp_path):
    from flowprobe.config import from_dict
    from flowprobe.runs import TrainConfig, train_from_config
    from flowprobe.runs.diagnose import diagnose as diagnose_model

    cfg = from_dict(TrainConfig, {"data": {"n_train": 8, "source": "gaussian"}, "model": {"width": 128},
                                  "steps": 1500, "batch_size": 256, "log_every": 500, "optim": {"lr": 3e-3}})
    train_from_config(cfg, tmp_path / "run", device="cpu", progress=False)
    d = diagnose_model(tmp_path / "run", out=tmp_path / "diag", device="cpu", options=FAST)
    assert d.data["train"]["source"].startswith("run pool") and d.data["train_samples"] == 8
    assert "fresh draws" in d.data["heldout"]["source"]
    assert d.label == "memorises"
    assert (tmp_path / "diag" / "report.md").is_file()
    falling = [w for w in d.warnings if "still falling" in w]
    losses = torch.tensor(load_checkpoint(tmp_path / "run").losses)
    before, last = losses[-300:-150].mean().item(), losses[-150:].mean().item()
    assert bool(falling) == (last < 0.95 * before)  # the run's own loss history decides the warning


def test_training_warnings_on_a_falling_loss():
    from flowprobe.runs.diagnose import LOSS_STILL_FALLING, training_warnings

    assert LOSS_STILL_FALLING == 0.05
    assert training_warnings([1.0] * 99) == []  # too short to say
    assert training_warnings([1.0] * 1000) == []
    falling = training_warnings([1.0] * 800 + [0.8] * 100 + [0.7] * 100)
    assert len(falling) == 1 and "0.8 -> 0.7" in falling[0] and "12% lower" in falling[0]
    assert training_warnings([1.0] * 800 + [0.8] * 100 + [0.77] * 100) == []  # 3.75% lower: settled enough


# ---------------------------------------------------------------------------------------------- results, report


def test_verdict_rule():
    from flowprobe.diagnosis import CheckResult

    def c(name, role, vote, ran=True):
        return CheckResult(name, role, ran, vote)

    assert decide([c("copies", "decisive", "memorises"), c("membership", "supporting", "generalises")]).label \
        == "memorises"
    assert decide([c("copies", "decisive", "generalises"), c("gradvar", "supporting", "generalises")]).label \
        == "generalises"
    v = decide([c("copies", "decisive", "generalises"), c("membership", "supporting", "memorises")])
    assert v.label == "inconclusive" and v.against == ["membership"]
    assert decide([c("copies", "decisive", None)]).label == "inconclusive"
    assert decide([c("copies", "decisive", None, ran=False), c("membership", "supporting", "memorises")]).label \
        == "inconclusive"


def test_json_round_trip_and_report_without_heldout(tmp_path):
    train = gaussian_data(300, 0)
    d = diagnose(EmpiricalMarginalField(train), train, None, options=FAST)
    assert set(d.not_run()) == {"membership", "gradvar", "pairing", "map"}
    assert "held-out" in d.not_run()["membership"]
    assert d.checks["copies"].evidence["baseline"] == "training-split"
    assert d.label == "memorises"
    again = Diagnosis.from_json(d.to_json())
    assert again.to_dict() == d.to_dict() and again.label == d.label
    json.loads(d.to_json())  # strict JSON: no NaN
    paths = write_diagnosis(d, tmp_path)
    assert json.loads(paths["results"].read_text()) == d.to_dict()
    report = paths["report"].read_text()
    assert "## Checks that did not run" in report
    assert "**membership**: needs held-out samples" in report and "**gradvar**: needs held-out samples" in report
    assert (tmp_path / "copies_ratio.png").is_file() and (tmp_path / "copies_scatter.png").is_file()


def test_lazy_root_attribute_and_python_api(tmp_path):
    import flowprobe

    train, held = gaussian_data(200, 0), gaussian_data(500, 1)
    d = flowprobe.diagnose(EmpiricalMarginalField(train), train, held, tmp_path / "out", options=FAST)
    assert d.label == "memorises"
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "membership.png").is_file()


# ------------------------------------------------------------------------------------------------------ data


def test_array_conventions(tmp_path):
    pix = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    x, kind, info = array_to_samples(pix, "a")
    assert kind == "images" and x.shape == (5, 3, 8, 8) and info["layout"] == "NHWC"
    torch.testing.assert_close(x[1, 2, 3, 4], torch.tensor(pix[1, 3, 4, 2] / 127.5 - 1, dtype=torch.float32))
    x, _, info = array_to_samples(pix.transpose(0, 3, 1, 2).copy(), "b")
    assert x.shape == (5, 3, 8, 8) and info["layout"] == "NCHW"
    assert array_to_samples(np.zeros((4, 2), np.float32), "c")[1] == "vectors"
    np.save(tmp_path / "v.npy", np.ones((6, 2), np.float32))
    assert load_data(tmp_path / "v.npy").x.shape == (6, 2)
    a, b = load_data("moons:50", stream=0).x, load_data("moons:50", stream=1).x
    assert a.shape == (50, 2) and not torch.equal(a, b) and torch.equal(a, load_data("moons:50").x)
    save_pairs(tmp_path / "p.safetensors", torch.randn(4, 2), torch.randn(4, 2))
    assert load_data(tmp_path / "p.safetensors").kind == "pairs"


# ------------------------------------------------------------------------------------------------------ CLI


def _main(argv):
    from flowprobe.cli import main

    return main(argv)


@pytest.fixture
def files(tmp_path):
    train, held = gaussian_data(200, 0), gaussian_data(600, 1)
    np.save(tmp_path / "train.npy", train.numpy())
    np.save(tmp_path / "held.npy", held.numpy())
    (tmp_path / "kw.json").write_text(json.dumps({"targets": train.tolist()}))
    return tmp_path


def test_cli_exit_codes(files, capsys):
    """A memorising model through the module adapter: exit 0 without --fail-on, 4 with it."""
    base = ["diagnose", "--adapter", "module", "--adapter-option",
            "factory=flowprobe.diagnosis.calibration:EmpiricalMarginalField", "--adapter-option",
            f"kwargs={files / 'kw.json'}", "--train", str(files / "train.npy"), "--heldout", str(files / "held.npy"),
            "--samples", "300", "--membership-samples", "200", "--no-progress", "--no-figures"]
    assert _main(base + ["--out", str(files / "a")]) == 0
    out = capsys.readouterr().out
    assert "verdict: MEMORISES" in out and "copies" in out
    assert _main(base + ["--out", str(files / "b"), "--fail-on", "memorises"]) == 4
    res = json.loads((files / "b" / "results.json").read_text())
    assert res["verdict"]["label"] == "memorises" and res["model"]["kind"] == "module"


def test_cli_generalising_checkpoint_exits_zero_with_fail_on(files, capsys):
    from flowprobe.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = MLP(dim=2, width=16, depth=1)
    ck = save_checkpoint(files / "ck" / "step_00000001.safetensors", net=net, step=1,
                         extra={"model": {"class": "MLP", "kwargs": {"dim": 2, "width": 16, "depth": 1}}})
    code = _main(["diagnose", str(ck), "--train", str(files / "train.npy"), "--heldout", str(files / "held.npy"),
                  "--out", str(files / "c"), "--samples", "300", "--fail-on", "memorises", "--no-progress",
                  "--checks", "copies,transport", "--no-figures"])
    assert code == 0
    assert "verdict:" in capsys.readouterr().out


@pytest.mark.parametrize("train_arg,needle", [
    ("missing.npy", "missing.npy"),
    ("arr.npz:nokey", "no entry 'nokey'"),
    ("nhwc.npy", "channels-first"),
    ("moons", "needs a count"),
])
def test_cli_bad_input_exits_2_with_one_line(files, capsys, train_arg, needle):
    np.savez(files / "arr.npz", x=np.zeros((4, 2), np.float32), y=np.zeros((4, 2), np.float32))
    np.save(files / "nhwc.npy", np.zeros((4, 8, 8, 3), np.float32))
    arg = train_arg if train_arg == "moons" else str(files / train_arg)
    code = _main(["diagnose", "--adapter", "module", "--adapter-option",
                  "factory=flowprobe.diagnosis.calibration:EmpiricalMarginalField", "--adapter-option",
                  f"kwargs={files / 'kw.json'}", "--train", arg, "--out", str(files / "x"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err


def test_cli_shape_mismatch_and_missing_model(files, capsys):
    np.save(files / "three.npy", np.zeros((10, 3), np.float32))
    code = _main(["diagnose", "--adapter", "module", "--adapter-option",
                  "factory=flowprobe.diagnosis.calibration:EmpiricalMarginalField", "--adapter-option",
                  f"kwargs={files / 'kw.json'}", "--train", str(files / "three.npy"), "--out", str(files / "y"),
                  "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "shape" in err
    assert _main(["diagnose", str(files / "nothing"), "--train", "moons:10", "--out", str(files / "z")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_feature_space_copies_through_the_python_api(tmp_path):
    """``features="module:fn"`` adds a second copies check in that space (here tanh of the samples)."""
    from flowprobe.runs.diagnose import diagnose as diagnose_model

    train, held = gaussian_data(200, 0), gaussian_data(500, 1)
    d = diagnose_model(EmpiricalMarginalField(train), train, held, features="torch:tanh", device="cpu",
                       options=DiagnoseOptions(n_generate=300, checks=("copies",)))
    spaces = d.checks["copies"].evidence["spaces"]
    assert set(spaces) == {"pixels", "features"} and spaces["features"]["vote"] == "memorises"
    assert d.label == "memorises" and d.not_run()["membership"] == "not requested"


@pytest.mark.parametrize("n_train, expected", [(8, "memorises"), (2000, "generalises")])
def test_calibration_torchcfm_model_trained_with_torchcfm_through_its_adapter(tmp_path, capsys, n_train, expected):
    """A model from another library: torchcfm's MLP trained here with torchcfm's own ConditionalFlowMatcher on a
    handful of 2-D points until it copies (and on 2000 points, where it does not), saved the way torchcfm's training
    scripts save ({"net_model", "ema_model", ...} through torch.save), diagnosed through the torchcfm adapter."""
    pytest.importorskip("torchcfm")
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models.models import MLP as TorchCFMMLP

    from flowprobe.cli import main as cli_main
    from flowprobe.data.toy import Moons

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    train, _ = Moons().sample(n_train, g)
    heldout, _ = Moons().sample(2000, g)
    model = TorchCFMMLP(dim=2, w=64, time_varying=True)
    fm = ConditionalFlowMatcher(sigma=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(1500):
        x1 = train[torch.randint(n_train, (256,))]
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
        loss = (model(torch.cat([xt, t[:, None]], dim=-1)) - ut).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp_path / "torchcfm_weights.pt"
    torch.save({"net_model": model.state_dict(), "ema_model": model.state_dict(), "optim": opt.state_dict(),
                "step": 1500}, ckpt)
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"class": "MLP", "kwargs": {"dim": 2, "w": 64, "time_varying": True}}))
    np.save(tmp_path / "train.npy", train.numpy())
    np.save(tmp_path / "heldout.npy", heldout.numpy())
    code = cli_main(["diagnose", str(ckpt), "--adapter", "torchcfm", "--adapter-option", f"arch={arch}",
                     "--train", str(tmp_path / "train.npy"), "--heldout", str(tmp_path / "heldout.npy"),
                     "--out", str(tmp_path / "d"), "--no-figures", "--no-progress", "--samples", "500",
                     "--steps", "50", "--fail-on", "memorises"])
    result = json.loads((tmp_path / "d" / "results.json").read_text())
    assert result["verdict"]["label"] == expected, result["verdict"]
    assert code == (4 if expected == "memorises" else 0)


def test_mirrored_copy_statistics_match_brute_force():
    """With the mirror images, the distance to item j is min(||s - t_j||, ||s - flip(t_j)||): d1, d2 and the
    nearest index equal a brute-force minimum over both forms, and a mirrored copy has d1 = 0."""
    from flowprobe.probes.memorization import copy_statistics

    g = torch.Generator().manual_seed(3)
    train = torch.randn(25, 3, 4, 5, generator=g)
    near = train[:6].flip(-1) + 0.05 * torch.randn(6, 3, 4, 5, generator=g)
    queries = torch.cat([train[6:9].flip(-1), near, torch.randn(10, 3, 4, 5, generator=g), train[9:11]])
    s = copy_statistics(queries, train, mirrored=train.flip(-1))
    flat = lambda x: x.double().reshape(x.shape[0], -1)  # noqa: E731
    d = torch.minimum(torch.cdist(flat(queries), flat(train)), torch.cdist(flat(queries), flat(train.flip(-1))))
    best, idx = d.sort(dim=1)
    torch.testing.assert_close(s["d1"], best[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["d2"], best[:, 1], rtol=1e-5, atol=1e-5)
    assert torch.equal(s["nn_index"], idx[:, 0])
    assert torch.equal(s["d1"][:3], torch.zeros(3, dtype=torch.float64))
    plain = copy_statistics(queries, train)
    assert (plain["ratio"][:3] > 0.5).all()  # without the mirror images a mirrored copy is no copy at all


def test_copies_check_counts_mirrored_copies_only_with_mirror():
    from flowprobe.diagnosis.copies import copies_check

    g = torch.Generator().manual_seed(4)
    train = torch.rand(300, 3, 8, 8, generator=g) * 2 - 1
    generated = train[:200].flip(-1)  # every generated sample is a left-right mirrored training image
    heldout = torch.rand(200, 3, 8, 8, generator=g) * 2 - 1
    off, _ = copies_check(generated, train, heldout, "held-out")
    on, _ = copies_check(generated, train, heldout, "held-out", mirror=True)
    assert off.vote == "generalises" and off.evidence["copy_fraction"] == 0.0 and not off.evidence["mirror"]
    assert on.vote == "memorises" and on.evidence["copy_fraction"] == 1.0 and on.evidence["mirror"]
    assert on.evidence["reference_copy_fraction"] == 0.0
    with pytest.raises(ValueError, match="mirror needs images"):
        copies_check(generated.flatten(1), train.flatten(1), heldout.flatten(1), "held-out", mirror=True)
    with pytest.raises(ValueError, match="mirror"):
        DiagnoseOptions(mirror="sometimes")


def test_copy_closeness_is_the_chance_a_generated_sample_sits_relatively_nearer_a_training_sample():
    """closeness = P(ratio_generated < ratio_reference) + P(=) / 2 over all pairs, the ratios d1 / d2 from a brute-force
    distance matrix; about 0.5 for generated samples drawn as the reference is, above it when some sit near
    training samples without being copies yet (ratio above 1/3)."""
    from flowprobe.diagnosis.copies import copies_check

    g = torch.Generator().manual_seed(5)
    train, reference = torch.randn(64, 3, generator=g), torch.randn(300, 3, generator=g)

    def ratios(x):
        d = torch.cdist(x.double(), train.double()).sort(dim=1).values
        return d[:, 0] / d[:, 1]

    fresh = torch.randn(300, 3, generator=g)
    partner = train[torch.randint(64, (300,), generator=g)]
    drawn_in = partner + 0.5 * (fresh - partner) * torch.rand(300, 1, generator=g)  # part of the way to a point
    for generated in (fresh, drawn_in):
        check, _ = copies_check(generated, train, reference, "held-out")
        brute = auc_brute_force(-ratios(generated), -ratios(reference))
        assert check.evidence["closeness"] == pytest.approx(brute, abs=1e-9)
    assert abs(copies_check(fresh, train, reference, "held-out")[0].evidence["closeness"] - 0.5) < 0.06
    nearer, _ = copies_check(drawn_in, train, reference, "held-out")
    assert nearer.evidence["closeness"] > 0.65


def test_pairing_vote_against_chance():
    from flowprobe.diagnosis.verdict import PAIRING_EXCESS_MARGIN, pairing_vote

    chance = 1 / 128
    assert PAIRING_EXCESS_MARGIN == 0.05
    # 14x chance with the interval's lower end 0.066 - 0.008 = 0.058 above the margin: a partly reproduced pairing
    assert pairing_vote(128, chance, (0.109, 0.066, 0.175), (0.203, 0.143, 0.281)).vote == "memorises"
    assert pairing_vote(128, chance, (0.008, 0.001, 0.043)).vote == "generalises"
    assert pairing_vote(128, chance, (0.05, 0.02, 0.1)).vote is None
    assert pairing_vote(20, 1 / 20, (1.0, 0.84, 1.0)).vote is None  # too few contested pairs


def test_pairing_check_judges_contested_pairs_only():
    """Pairs whose training partner is also their OT partner are left out of the vote; a field that carries every
    source to its OT partner recalls the training partner of a contested pair at chance only: generalises."""
    from flowprobe.couplings import ot_permutation
    from flowprobe.diagnosis.transport import pairing_check

    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(160, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(160, 2, generator=g, dtype=torch.float64) + 4
    ot = ot_permutation(x0, x1, "lsa")
    assigned = ot.clone()  # a quarter of the training pairs are OT pairs, the rest shuffled among themselves
    assigned[40:] = ot[40:][torch.randperm(120, generator=g)]
    pairs = PairSet(x0.float(), x1[assigned].float(), {"ot": torch.argsort(assigned)[ot]})
    pairs.partners["assigned"] = torch.arange(160)
    contested = int((pairs.partners["ot"] != torch.arange(160)).sum())
    memorising, _, _ = pairing_check(EmpiricalPairField(x0, x1[assigned], bandwidth=1e-3), pairs, steps=50)
    assert memorising.evidence["n_contested"] == contested and 110 <= contested <= 120
    assert memorising.vote == "memorises" and memorising.evidence["recall_assigned"] > 0.5  # crossing lines cost some
    transporting, _, _ = pairing_check(EmpiricalPairField(x0, x1[ot], bandwidth=1e-3), pairs, steps=50)
    assert transporting.evidence["recall_ot"] == 1.0 and transporting.evidence["recall_assigned"] == 0.0
    assert transporting.vote == "generalises"


# --------------------------------------------------------------------------------------------------- the map check


class _Constant(torch.nn.Module):
    """v(t, x) = c: the exact field of the translation map G(x0) = x0 + c (a net that has learned the map)."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("c", torch.as_tensor(c, dtype=torch.float32))

    def forward(self, t, x):
        return self.c.expand_as(x)


def _translation_pairs(n: int, seed: int, c=(3.0, 1.0)) -> PairSet:
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return PairSet(x0, x0 + torch.tensor(c), {})


def test_map_check_shares_and_intervals_by_brute_force():
    from scipy.stats import fisher_exact

    from flowprobe.diagnosis.transport import map_check
    from flowprobe.diagnosis.verdict import MAP_TOLERANCE

    net, train = _Constant([3.0, 1.0]), _translation_pairs(40, 0)
    held = _translation_pairs(200, 1)
    tol = MAP_TOLERANCE * train.x1.double().pow(2).sum(1).mean().sqrt().item()
    miss = torch.zeros(200, 2)
    off = torch.arange(200) % 20 >= 7
    miss[off, 0] = 3 * tol  # 70 held-out partners where the map puts them, 130 moved off it
    held = PairSet(held.x0, held.x1 + miss, {})
    check, arrays = map_check(net, train, held, steps=4)
    ev = check.evidence
    assert ev["tolerance"] == pytest.approx(tol, rel=1e-9)
    assert ev["landed_train"] == 1.0 and ev["landed_heldout"] == 70 / 200 and ev["exact_p"] is None
    _, lo, hi = newcombe_interval(40, 40, 70, 200)
    assert ev["excess_interval"] == pytest.approx([lo, hi], abs=1e-12)
    assert check.vote == "memorises" and check.role == "decisive"
    assert arrays["heldout"]["errors"][off].min() == pytest.approx(3 * tol, rel=1e-5)
    part, _ = map_check(net, train, held, n_max=35, steps=4)  # the first 35 of each: rows 0-6 and 20-26 land
    _, nlo, nhi = newcombe_interval(35, 35, 14, 35)
    assert part.evidence["excess_interval"] == pytest.approx([nlo, nhi], abs=1e-12) and part.vote == "memorises"
    # fewer than MIN_SAMPLES training pairs: Fisher's exact one-sided test (scipy's), memorisation only
    few_train, _ = map_check(net, _translation_pairs(8, 4), held, steps=4)
    p_scipy = fisher_exact([[8, 0], [70, 130]], alternative="greater")[1]
    assert few_train.evidence["exact_p"] == pytest.approx(p_scipy, rel=1e-9) and few_train.vote == "memorises"
    # every held-out source lands: no excess, generalises; too few held-out pairs: no vote
    same, _ = map_check(net, train, _translation_pairs(200, 2), steps=4)
    assert same.evidence["excess"] == 0.0 and same.vote == "generalises"
    few, _ = map_check(net, train, _translation_pairs(20, 3), steps=4)
    assert few.vote is None and "too few held-out pairs" in few.reason


@pytest.mark.parametrize("n_train", [8, 20, 40])
def test_map_vote_false_alarms_under_the_null_stay_below_the_level(n_train):
    """When training and held-out sources land alike (both shares Binomial draws of one p), the map vote says
    memorises in at most (1 - CONFIDENCE) / 2 of 4000 simulated cases: for few training pairs too, whose share is a
    draw like the held-out one (a rule that took it as exact would say memorises in about a third of them at N = 8)."""
    from flowprobe.diagnosis.stats import exact_greater_p
    from flowprobe.diagnosis.verdict import CONFIDENCE, MIN_SAMPLES, map_vote

    g = torch.Generator().manual_seed(n_train)
    k_tr = torch.binomial(torch.full((4000,), float(n_train)), torch.full((4000,), 0.3), generator=g).long()
    k_ho = torch.binomial(torch.full((4000,), 1000.0), torch.full((4000,), 0.3), generator=g).long()
    said = 0
    for a, b in zip(k_tr.tolist(), k_ho.tolist()):
        d, lo, hi = newcombe_interval(a, n_train, b, 1000)
        p = exact_greater_p(a, n_train, b, 1000) if n_train < MIN_SAMPLES else None
        said += map_vote(n_train, 1000, d, lo, hi, p).vote == "memorises"
    assert said / 4000 <= (1 - CONFIDENCE) / 2


def test_diagnose_with_heldout_pairs_of_a_map(tmp_path):
    """Pairs of the 90-degree rotation map x1 = mu + R x0 in d = 8: the exact pair field of 200 pairs carries only
    its training sources to their partners (map: memorises); the translation map's own field carries every source
    (map and copies: generalises). The pairing check does not vote on pairs of a map."""
    g = torch.Generator().manual_seed(2)
    coupling = LinearGaussianCoupling.rotated_ot(4.0 * torch.eye(8)[0], torch.eye(8), 90.0)
    x0, x0_held = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (200, 600))
    pairs = PairSet(x0.float(), coupling.pair_map(x0).float(), {})
    held = PairSet(x0_held.float(), coupling.pair_map(x0_held).float(), {})
    d = diagnose(EmpiricalPairField(x0, coupling.pair_map(x0), bandwidth=1e-3), pairs=pairs, heldout_pairs=held,
                 options=FAST)
    assert d.label == "memorises" and "map" in d.verdict.decided_by
    ev = d.checks["map"].evidence
    assert ev["landed_train"] == 1.0 and ev["landed_heldout"] < 0.2
    assert d.checks["pairing"].vote is None and d.checks["pairing"].role == "informational"
    assert d.checks["membership"].evidence["heldout_pairs"] and d.data["heldout_pairs"] == 600
    assert any("has not learned the map" in w for w in d.warnings)
    write_diagnosis(d, tmp_path)
    assert (tmp_path / "map.png").is_file() and "## map (decisive)" in (tmp_path / "report.md").read_text()

    learned = diagnose(_Constant([3.0, 1.0]), pairs=_translation_pairs(200, 4),
                       heldout_pairs=_translation_pairs(600, 5), options=FAST)
    assert learned.checks["map"].vote == "generalises" and learned.checks["map"].evidence["landed_heldout"] == 1.0
    assert learned.label == "generalises" and not any("learned the map" in w for w in learned.warnings)
    with pytest.raises(ValueError, match="heldout_pairs needs the training pairs"):
        diagnose(_Constant([3.0, 1.0]), torch.zeros(10, 2), heldout_pairs=_translation_pairs(50, 6))


def test_map_figure_leaves_out_non_finite_errors_and_refuses_a_zero_tolerance(tmp_path):
    from flowprobe.report.diagnosis import plot_map_errors

    errors = torch.tensor([0.01, 0.2, float("nan"), float("inf"), 0.0])
    assert plot_map_errors(tmp_path / "m.png", errors, torch.tensor([0.5, 1.0]), 0.1).is_file()
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        plot_map_errors(tmp_path / "z.png", errors, errors, 0.0)
