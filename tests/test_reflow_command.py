"""``flowprobe reflow``: each round's pairs are the previous flow's push-forward of seeded sources, the rounds train on
them (``data.pairs``), rectification straightens an independent-coupling flow, and bad input exits 2 with one
line. Also ``data.pairs`` and ``model.init`` as config keys, and ``couplings.MappedCoupling``."""

import json

import numpy as np
import ot
import pytest
import torch

from flowprobe.cli import main
from flowprobe.config import ConfigError, from_dict
from flowprobe.couplings import MappedCoupling
from flowprobe.data.toy import make_toy
from flowprobe.probes.memorization import load_pairs, save_pairs
from flowprobe.runs.config import TrainConfig
from flowprobe.runs.jobs import train_from_config
from flowprobe.runs.load import checkpoint_config, load_model
from flowprobe.runs.reflow import HELDOUT_PAIRS, heldout_seed_stream, pairs_seed_stream
from flowprobe.seeds import seeded_generator
from flowprobe.solvers import push_forward

pytestmark = pytest.mark.usefixtures("one_thread")

#: N(0, I) -> eight Gaussians with the independent coupling: the first flow's paths bend (they average over
#: partners); a flow trained on its own deterministic pairs has (nearly) straight paths.
BASE = {"data": {"source": "gaussian", "target": "eight_gaussians"},
        "model": {"width": 32, "depth": 2, "time_embed_dim": 8}, "coupling": {"kind": "independent"},
        "optim": {"lr": 3e-3}, "steps": 300, "batch_size": 128, "log_every": 100,
        "sample": {"n": 256, "steps": 8, "solver": "euler", "plot": False}}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reflow") / "base"
    train_from_config(from_dict(TrainConfig, BASE), out, device="cpu", progress=False)
    return out


def test_reflow_command_rounds(base_run, tmp_path, capsys):
    out = tmp_path / "reflow"
    code = main(["reflow", str(base_run), "--pairs", "256", "--rounds", "2", "--out", str(out), "--set", "steps=300",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0 and "| 2 |" in captured.out and "round 2: trained 300 steps" in captured.err
    results = json.loads((out / "results.json").read_text())
    rows = results["per_round"]
    assert [r["round"] for r in rows] == [0, 1, 2] and (out / "report.md").is_file()
    source = make_toy("gaussian")
    previous = base_run
    for k in (1, 2):
        pairs = load_pairs(out / f"round-{k}" / "pairs.safetensors")
        # the sources: the seeded draw of the run's source law; the targets: the previous flow's push-forward
        x0, _ = source.sample(256, seeded_generator(0, pairs_seed_stream(k)))
        assert torch.equal(pairs.x0, x0)
        net, ck = load_model(previous)
        cfg = checkpoint_config(ck)
        assert torch.equal(pairs.x1, push_forward(net, x0, method=cfg.sample.solver, steps=cfg.sample.steps))
        # the pairing probe: the OT partner, checked against POT's exact solver
        cost = torch.cdist(x0.double(), pairs.x1.double()).pow(2).numpy()
        plan = ot.emd(np.full(256, 1 / 256), np.full(256, 1 / 256), cost)
        assert torch.equal(pairs.partners["ot"], torch.from_numpy(plan.argmax(1)))
        assert rows[k]["pairs_ot_recall"] == (pairs.partners["ot"] == torch.arange(256)).double().mean().item()
        # the round trained on exactly these pairs with the run's config
        run_cfg = checkpoint_config(load_model(out / f"round-{k}")[1])
        assert run_cfg.data.pairs == str((out / f"round-{k}" / "pairs.safetensors").resolve())
        # held-out pairs of the same map: other seeded sources, the same push-forward, named in the round's config
        held = load_pairs(out / f"round-{k}" / "heldout_pairs.safetensors")
        h0, _ = source.sample(HELDOUT_PAIRS, seeded_generator(0, heldout_seed_stream(k)))
        assert torch.equal(held.x0, h0) and not torch.equal(h0[:256], x0)
        assert torch.equal(held.x1, push_forward(net, h0, method=cfg.sample.solver, steps=cfg.sample.steps))
        assert run_cfg.data.heldout_pairs == str((out / f"round-{k}" / "heldout_pairs.safetensors").resolve())
        assert run_cfg.coupling.kind == "fixed_pairs" and run_cfg.model == cfg.model and run_cfg.model.init is None
        previous = out / f"round-{k}"
    # rectification straightens: the independent-coupling flow bends, its 1-rectified flow much less
    assert rows[1]["straightness"] < rows[0]["straightness"] / 4
    assert all(r["energy_distance"] < r["energy_distance_source"] / 4 for r in rows)  # every round still samples
    # diagnosing a round: its pairs are the training set, its held-out pairs of the same map the held-out data
    from flowprobe.diagnosis import DiagnoseOptions
    from flowprobe.runs.diagnose import diagnose as diagnose_run

    d = diagnose_run(out / "round-1", device="cpu", options=DiagnoseOptions(
        n_generate=64, steps=8, membership_samples=32, gradvar_samples=8, pairs_max=64, transport_samples=16))
    assert "held-out pairs of the run's map" in d.data["heldout"]["source"] and d.data["heldout_pairs"] == HELDOUT_PAIRS
    assert d.checks["map"].ran and d.checks["map"].evidence["n_heldout_pairs"] == 64
    assert d.checks["membership"].evidence["heldout_pairs"] and d.checks["pairing"].vote is None
    assert d.data["pairs"] == 256


def test_init_previous_starts_from_the_previous_weights(base_run, tmp_path):
    out = tmp_path / "reflow"
    assert main(["reflow", str(base_run), "--pairs", "64", "--rounds", "1", "--out", str(out), "--init", "previous",
                 "--set", "steps=1", "--set", "optim.lr=1e-12", "--device", "cpu", "--eval-n", "64"]) == 0
    previous, _ = load_model(base_run)
    trained, ck = load_model(out / "round-1")
    assert checkpoint_config(ck).model.init == str(load_model(base_run)[1].path.resolve())
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(previous.state_dict().values(),
                                                                 trained.state_dict().values()))


@pytest.mark.parametrize("args, message", [
    (["--pairs", "1", "--rounds", "1"], "--pairs: need at least 2 pairs"),
    (["--pairs", "8", "--rounds", "0"], "--rounds: need 1 to 100 rounds"),
    (["--pairs", "8", "--rounds", "1", "--set", "nonsense=3"], "nonsense"),
    (["--pairs", "8", "--rounds", "1", "--set", "data.pairs=x.safetensors"], "set by reflow"),
    (["--pairs", "8", "--rounds", "1", "--set", "watch.every=50", "--heldout-pairs", "0"],
     "needs held-out pairs of the map"),
    (["--pairs", "8", "--rounds", "1", "--heldout-pairs", "1"], "--heldout-pairs: need 0 (none) or at least 2"),
])
def test_bad_input_exits_2_with_one_line(base_run, tmp_path, capsys, args, message):
    assert main(["reflow", str(base_run), "--out", str(tmp_path / "o"), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowprobe: error:") and message in err and err.count("\n") == 1
    assert not any((tmp_path / "o").glob("round-*"))


def test_missing_checkpoint_and_used_out_exit_2(base_run, tmp_path, capsys):
    assert main(["reflow", str(tmp_path / "nothing"), "--pairs", "8", "--rounds", "1", "--out", str(tmp_path / "o")]) \
        == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "o" / "round-1").mkdir(parents=True)
    assert main(["reflow", str(base_run), "--pairs", "8", "--rounds", "1", "--out", str(tmp_path / "o")]) == 2
    assert "already holds reflow rounds" in capsys.readouterr().err


def test_data_pairs_is_a_toy_runs_training_set(tmp_path):
    x0, x1 = torch.randn(16, 2), torch.randn(16, 2) + 3
    save_pairs(tmp_path / "p.safetensors", x0, x1)
    cfg = from_dict(TrainConfig, {**BASE, "data": {**BASE["data"], "pairs": str(tmp_path / "p.safetensors")},
                                  "coupling": {"kind": "fixed_pairs"}, "steps": 2})
    from flowprobe.runs.build import build_data

    coupling, _, _, _ = build_data(cfg)
    assert torch.equal(coupling.x0, x0) and torch.equal(coupling.x1, x1)
    save_pairs(tmp_path / "q.safetensors", torch.randn(16, 3), torch.randn(16, 3))
    for name, match in (("q.safetensors", r"data.pairs: .* shape \(3,\)"),
                        ("none.safetensors", "data.pairs: .*not found")):
        bad = from_dict(TrainConfig, {**BASE, "data": {**BASE["data"], "pairs": str(tmp_path / name)}})
        with pytest.raises(ConfigError, match=match):
            build_data(bad)
    with pytest.raises(ConfigError, match="data.pairs and data.n_train exclude each other"):
        from_dict(TrainConfig, {"data": {"pairs": "p.safetensors", "n_train": 4}})
    from_dict(TrainConfig, {"data": {"pairs": "p.safetensors"}, "coupling": {"kind": "fixed_pairs"}})  # no n_train


def test_model_init_that_does_not_fit_is_one_config_error(base_run, tmp_path):
    model = {"width": 16, "depth": 2, "time_embed_dim": 8, "init": str(base_run)}
    cfg = from_dict(TrainConfig, {**BASE, "model": model})
    with pytest.raises(ConfigError, match="model.init: .*do not fit"):
        train_from_config(cfg, tmp_path / "run", device="cpu", progress=False)


def test_mapped_coupling_pairs_fresh_sources_with_their_image():
    coupling = MappedCoupling(make_toy("gaussian"), lambda x: 5 - x)
    p = coupling.sample(32, torch.Generator().manual_seed(0))
    x0, _ = make_toy("gaussian").sample(32, torch.Generator().manual_seed(0))
    assert torch.equal(p.x0, x0) and torch.equal(p.x1, 5 - x0) and torch.equal(p.i0, p.i1)


# ----------------------------------------------------------------------------------------------------------
# image runs: data.pairs for images, reflow of an image run

def _image_tar(path, n: int = 24, side: int = 8, seed: int = 0):
    """A tar of n random side x side RGB PNGs (sorted names), and their pixels (N, H, W, 3) uint8."""
    import io
    import tarfile

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(pixels[i]).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path, pixels


def _image_base(tar) -> dict:
    """A tiny FlatMLP image run on the first 16 images of ``tar`` (the other 8 are held out)."""
    return {"data": {"dataset": str(tar), "n_train": 16, "flip": False},
            "model": {"arch": "mlp", "width": 32, "depth": 2, "time_embed_dim": 8},
            "coupling": {"kind": "independent"}, "steps": 20, "batch_size": 8, "log_every": 10,
            "sample": {"n": 16, "steps": 4, "solver": "euler", "plot": False}}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflow_images")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWPROBE_CACHE", str(root / "cache"))
        tar, pixels = _image_tar(root / "images.tar")
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train_from_config(from_dict(TrainConfig, _image_base(tar)), root / "base", device="cpu", progress=False)
        finally:
            torch.set_num_threads(before)
        yield root / "base", tar, pixels


def _euler(net, x0, steps):
    """Our own Euler loop for dx/dt = net(t, x) from t = 0 to 1."""
    x = x0.clone()
    with torch.no_grad():
        for i in range(steps):
            x = x + net(torch.full((x.shape[0],), i / steps), x) / steps
    return x


def test_reflow_of_an_image_run(image_run, tmp_path, capsys):
    base_run, tar, pixels = image_run
    out = tmp_path / "reflow"
    assert main(["reflow", str(base_run), "--pairs", "16", "--rounds", "2", "--out", str(out), "--set", "steps=10",
                 "--init", "previous", "--heldout-pairs", "40", "--device", "cpu"]) == 0
    assert "| 2 |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = results["per_round"]
    assert [r["round"] for r in rows] == [0, 1, 2] and results["data_kind"] == "images"
    assert results["energy_distance_reference"].startswith("8 held-out real images")
    # round 0's quality number, recomputed: our Euler endpoints of the seeded evaluation noises against the 8
    # held-out images (rows 16..23 of the tar, from their pixels; the energy distance ignores their order)
    net0, _ = load_model(base_run)
    x1_eval = _euler(net0, torch.randn(16, 3, 8, 8, generator=seeded_generator(0, 1)), 4).reshape(16, -1).double()
    held = torch.from_numpy(pixels[16:]).permute(0, 3, 1, 2).reshape(8, -1).double() / 127.5 - 1
    ed = 2 * torch.cdist(x1_eval, held).mean() - torch.cdist(x1_eval, x1_eval).mean() - torch.cdist(held, held).mean()
    assert rows[0]["energy_distance"] == pytest.approx(ed.item(), rel=1e-5)
    previous = base_run
    for k in (1, 2):
        pairs = load_pairs(out / f"round-{k}" / "pairs.safetensors")
        x0 = torch.randn(16, 3, 8, 8, generator=seeded_generator(0, pairs_seed_stream(k)))
        assert torch.equal(pairs.x0, x0)
        net, ck = load_model(previous)
        torch.testing.assert_close(pairs.x1, _euler(net, x0, 4), rtol=1e-5, atol=1e-5)
        cost = torch.cdist(x0.reshape(16, -1).double(), pairs.x1.reshape(16, -1).double()).pow(2).numpy()
        plan = ot.emd(np.full(16, 1 / 16), np.full(16, 1 / 16), cost)
        assert torch.equal(pairs.partners["ot"], torch.from_numpy(plan.argmax(1)))
        assert rows[k]["pairs_ot_recall"] == (pairs.partners["ot"] == torch.arange(16)).double().mean().item()
        # the round is the base run's config on these pairs, from the previous round's weights
        run_cfg = checkpoint_config(load_model(out / f"round-{k}")[1])
        assert run_cfg.data.pairs == str((out / f"round-{k}" / "pairs.safetensors").resolve())
        # held-out pairs of the same map: other seeded noises, the same push-forward
        held = load_pairs(out / f"round-{k}" / "heldout_pairs.safetensors")
        h0 = torch.randn(40, 3, 8, 8, generator=seeded_generator(0, heldout_seed_stream(k)))
        assert torch.equal(held.x0, h0)
        torch.testing.assert_close(held.x1, _euler(net, h0, 4), rtol=1e-5, atol=1e-5)
        assert run_cfg.data.heldout_pairs == str((out / f"round-{k}" / "heldout_pairs.safetensors").resolve())
        assert run_cfg.coupling.kind == "fixed_pairs" and run_cfg.data.dataset == str(tar)
        assert run_cfg.model.arch == "mlp" and run_cfg.model.width == 32
        assert run_cfg.model.init == str(ck.path.resolve())
        from flowprobe.runs.build import build_data

        coupling, _, target, shape = build_data(run_cfg)
        assert torch.equal(coupling.x0, pairs.x0) and torch.equal(coupling.x1, pairs.x1)
        assert shape == (3, 8, 8) and len(target) == 24  # the whole dataset is the evaluation's target
        previous = out / f"round-{k}"


def test_image_pairs_of_the_wrong_shape_exit_2(image_run, tmp_path, capsys):
    import yaml

    base_run, tar, _ = image_run
    save_pairs(tmp_path / "p.safetensors", torch.randn(16, 3, 4, 4), torch.rand(16, 3, 4, 4) * 2 - 1)
    cfg = _image_base(tar)
    cfg["data"] = {"dataset": str(tar), "pairs": str(tmp_path / "p.safetensors")}
    cfg["coupling"] = {"kind": "fixed_pairs"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowprobe: error: data.pairs:") and "(3, 4, 4)" in err and "(3, 8, 8)" in err
    assert err.count("\n") == 1
    with pytest.raises(ConfigError, match="data.pairs: a pairs file is the training set of a toy or image"):
        from_dict(TrainConfig, {"data": {"kind": "array", "target_path": "x.npy", "pairs": "p.safetensors"}})


def test_a_base_runs_watch_goes_into_reflow_rounds_with_heldout_pairs(base_run, tmp_path):
    """A base run trained with the memorisation watch: its reflow rounds carry it when they have held-out pairs of
    their map, and train without it when they have none (the watch would then compare the map's pairs with fresh
    draws and read the map as memorised); the base config itself is left as it was."""
    from flowprobe.runs.reflow import round_config

    base = from_dict(TrainConfig, {**BASE, "watch": {"every": 100}})
    pairs = save_pairs(tmp_path / "pairs.safetensors", torch.randn(16, 2), torch.randn(16, 2))
    held = save_pairs(tmp_path / "held.safetensors", torch.randn(40, 2), torch.randn(40, 2))
    cfg = round_config(base, pairs, None, [], held)
    assert cfg.watch.every == 100 and cfg.data.heldout_pairs == str(held.resolve())
    cfg = round_config(base, pairs, None, [])
    assert base.watch.every == 100 and cfg.watch.every is None and cfg.coupling.kind == "fixed_pairs"
    with pytest.raises(ConfigError, match="needs held-out pairs of the map"):
        round_config(base, pairs, None, ["watch.every=100"])
    with pytest.raises(ConfigError, match="set by reflow"):
        round_config(base, pairs, None, ["data.heldout_pairs=other.safetensors"], held)
    with pytest.raises(ConfigError, match="data.heldout_pairs: held-out pairs of a map go with its training pairs"):
        from_dict(TrainConfig, {**BASE, "data": {**BASE["data"], "heldout_pairs": str(held)}})
    with pytest.raises(ConfigError, match="coupling.kind: fixed_pairs"):  # a pairs file drawn apart is no map
        from_dict(TrainConfig, {**BASE, "data": {**BASE["data"], "pairs": str(pairs), "heldout_pairs": str(held)}})


def test_the_watch_on_a_reflow_round_reads_its_heldout_pairs(base_run, tmp_path):
    """``flowprobe reflow --set watch.every=K``: the round's watch compares its training pairs with the held-out pairs
    of the same map (their targets and their own sources), and writes its readings to the round's log."""
    from flowprobe.couplings import FixedPairs
    from flowprobe.runs.hooks import config_watch

    out = tmp_path / "reflow"
    assert main(["reflow", str(base_run), "--pairs", "64", "--rounds", "1", "--out", str(out), "--heldout-pairs", "48",
                 "--set", "steps=40", "--set", "watch.every=20", "--device", "cpu", "--eval-n", "64"]) == 0
    cfg = checkpoint_config(load_model(out / "round-1")[1])
    events = [json.loads(line) for line in (out / "round-1" / "metrics.jsonl").read_text().splitlines()]
    readings = [e for e in events if e.get("event") == "watch"]
    assert [r["step"] for r in readings] == [20, 40] and all(r["auc"] is not None for r in readings)
    train, held = load_pairs(cfg.data.pairs), load_pairs(cfg.data.heldout_pairs)
    watch = config_watch(cfg, FixedPairs(train.x0, train.x1), None, None, None, tmp_path / "log.jsonl", "cpu")
    assert watch.heldout_sources_probe is not None
    # every held-out probe row is a held-out pair (its target and its own source), never a training pair
    rows = [(a.tolist(), b.tolist()) for a, b in zip(held.x0, held.x1)]
    assert all((s.tolist(), x.tolist()) in rows for s, x in zip(watch.heldout_sources_probe, watch.heldout_probe))
    # held-out pairs of another shape: a one-line error naming the key before training, not a crash at a reading
    from dataclasses import replace

    bad = save_pairs(tmp_path / "bad.safetensors", torch.randn(40, 3), torch.randn(40, 3))
    wrong = replace(cfg, data=replace(cfg.data, heldout_pairs=str(bad)))
    with pytest.raises(ConfigError, match=r"data.heldout_pairs: .* shape \(3,\), the training pairs \(2,\)"):
        config_watch(wrong, FixedPairs(train.x0, train.x1), None, None, None, tmp_path / "log.jsonl", "cpu")
    # diagnose with the round's pairs given explicitly still finds the round's held-out pairs
    from flowprobe.diagnosis import DiagnoseOptions
    from flowprobe.runs.diagnose import diagnose as diagnose_run

    d = diagnose_run(out / "round-1", pairs=cfg.data.pairs, device="cpu", options=DiagnoseOptions(
        n_generate=48, steps=8, membership_samples=32, gradvar_samples=8, pairs_max=64, transport_samples=16),
        figures=False)
    assert d.checks["map"].ran and d.data["heldout_pairs"] == 48


def test_diagnose_command_takes_heldout_pairs(base_run, tmp_path, capsys):
    """``flowprobe diagnose ROUND --heldout PAIRS``: the map check runs on the given held-out pairs; held-out pairs
    for a model without training pairs exit 2 with one line."""
    out = tmp_path / "reflow"
    assert main(["reflow", str(base_run), "--pairs", "64", "--rounds", "1", "--out", str(out), "--heldout-pairs", "0",
                 "--set", "steps=40", "--device", "cpu", "--eval-n", "64"]) == 0
    assert not (out / "round-1" / "heldout_pairs.safetensors").exists()
    cfg = checkpoint_config(load_model(out / "round-1")[1])
    h0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    base_net, _ = load_model(base_run)
    held = save_pairs(tmp_path / "held.safetensors", h0, push_forward(base_net, h0, method=cfg.sample.solver,
                                                                      steps=cfg.sample.steps))
    capsys.readouterr()
    fast = ["--samples", "64", "--steps", "8", "--membership-samples", "32", "--gradvar-samples", "8",
            "--device", "cpu"]
    assert main(["diagnose", str(out / "round-1"), "--heldout", str(held), "--out", str(tmp_path / "d"), *fast]) == 0
    result = json.loads((tmp_path / "d" / "results.json").read_text())
    assert result["checks"]["map"]["ran"] and result["checks"]["map"]["evidence"]["n_heldout_pairs"] == 64
    assert result["data"]["heldout_pairs"] == 64 and (tmp_path / "d" / "map.png").is_file()
    capsys.readouterr()
    assert main(["diagnose", str(base_run), "--train", "moons:100", "--heldout", str(held), "--out",
                 str(tmp_path / "e"), *fast]) == 2
    err = capsys.readouterr().err
    assert "held-out pairs of a map need the training pairs" in err and err.count("\n") == 1
