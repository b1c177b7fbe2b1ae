"""fit: learning-rate schedule, EMA, bf16 autocast, losses, logging and the classic call."""

import copy
import json
import math

import pytest
import torch

from flowprobe.objectives import CFMObjective
from flowprobe.paths import LinearPath
from flowprobe.train import Callback, MetricsLog, TrainState, fit, learning_rate


def test_learning_rate_closed_form():
    lr, steps, warm = 2e-3, 100, 10
    for k in (0, 4, 9, 10, 50, 99):
        w = min(1.0, (k + 1) / warm)
        assert learning_rate(k, lr=lr, steps=steps, warmup=warm) == pytest.approx(lr * w, rel=1e-15)
        cos = 0.5 * (1 + math.cos(math.pi * k / steps))
        assert learning_rate(k, lr=lr, steps=steps, warmup=warm, schedule="cosine") == pytest.approx(lr * w * cos,
                                                                                                  rel=1e-15)
    assert learning_rate(0, lr=1.0, steps=10, warmup=0) == 1.0
    assert learning_rate(50, lr=1.0, steps=100, schedule="cosine") == pytest.approx(0.5, abs=1e-15)
    with pytest.raises(ValueError, match="constant, cosine"):
        learning_rate(0, lr=1.0, steps=10, schedule="linear")


def test_fit_applies_the_schedule(tmp_path, tiny_problem):
    net, coupling, objective = tiny_problem()
    log = tmp_path / "m.jsonl"
    fit(net, coupling, objective, steps=12, batch_size=8, lr=0.01, warmup=4, lr_schedule="cosine", log_every=1,
        hooks=[MetricsLog(log)])
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:
        k = r["step"] - 1
        expected = 0.01 * min(1.0, (k + 1) / 4) * 0.5 * (1 + math.cos(math.pi * k / 12))
        assert r["lr"] == pytest.approx(expected, rel=1e-12)
    start = recs[0]
    assert start["event"] == "start"
    assert start["path"] == {"path": "stochastic", "sigma": 0.1, "schedule": "constant", "t_clip": 1e-4}
    assert start["coupling"] == {"coupling": "independent"}
    assert start["objective"] == {"objective": "cfm", "reduction": "mean"}


def test_losses_are_the_objective_on_the_seeded_draw(tiny_problem):
    """The first logged loss is the objective of the initial net on the first draw of the seeded generator."""
    net, coupling, objective = tiny_problem()
    net0 = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        expected = objective(net0, coupling.sample(16, gen), gen).item()
    state = fit(net, coupling, objective, steps=3, batch_size=16, seed=5)
    assert isinstance(state, TrainState) and state.step == 3 and len(state.losses) == 3
    assert state.losses[0] == pytest.approx(expected, rel=1e-6)
    assert state.ema is None and state.model is state.net


def test_ema_equals_hand_computed_average(tiny_problem):
    net, coupling, objective = tiny_problem(dtype=torch.float64)
    snapshots = [[p.detach().clone() for p in net.parameters()]]

    def record(state):
        snapshots.append([p.detach().clone() for p in state.net.parameters()])

    d = 0.8
    state = fit(net, coupling, objective, steps=5, batch_size=8, lr=0.05, ema_decay=d,
                hooks=[Callback(record, every=1)])
    assert len(snapshots) == 6
    expected = snapshots[0]
    for snap in snapshots[1:]:
        expected = [d * e + (1 - d) * p for e, p in zip(expected, snap)]
    for e, p, last in zip(expected, state.ema.parameters(), snapshots[-1]):
        torch.testing.assert_close(p, e, rtol=0, atol=1e-13)
        assert not torch.allclose(p, last)  # the EMA lags the raw weights
    assert state.model is state.ema


def test_bf16_autocast_runs_on_cpu(tiny_problem):
    net, coupling, objective = tiny_problem()
    dtypes = []
    net.net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = [p.detach().clone() for p in net.parameters()]
    state = fit(net, coupling, objective, steps=5, batch_size=32, precision="bf16")
    assert dtypes and all(dt == torch.bfloat16 for dt in dtypes)
    assert all(math.isfinite(v) for v in state.losses) and len(state.losses) == 5
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_fp32_forward_is_not_autocast(tiny_problem):
    net, coupling, objective = tiny_problem()
    dtypes = []
    net.net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    fit(net, coupling, objective, steps=2, batch_size=8)
    assert dtypes == [torch.float32, torch.float32]


def test_classic_call_and_bad_arguments(tiny_problem):
    net, coupling, _ = tiny_problem()
    objective = CFMObjective(LinearPath())
    state = fit(net, coupling, objective, steps=4, batch_size=8, lr=1e-3, seed=0, lr_schedule="constant",
                warmup=0, grad_clip=1.0, weight_decay=0.0, device="cpu", progress=False)
    assert state.step == 4 and not net.training
    with pytest.raises(ValueError, match="precision"):
        fit(net, coupling, objective, steps=1, batch_size=4, precision="fp16")
    with pytest.raises(ValueError, match="ema_decay"):
        fit(net, coupling, objective, steps=1, batch_size=4, ema_decay=1.0)


def test_same_seed_same_result_and_training_reduces_loss(tiny_problem):
    a, coupling, objective = tiny_problem()
    b, _, _ = tiny_problem()
    sa = fit(a, coupling, objective, steps=150, batch_size=128, lr=3e-3, seed=3)
    sb = fit(b, coupling, objective, steps=150, batch_size=128, lr=3e-3, seed=3)
    assert sa.losses == sb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # The initial net outputs ~0, so its loss is E||u||^2 / 2; no field that ignores x (u has mean 0) does better.
    # Learning the x-dependence of the conditional mean brings it well below that.
    first, last = sum(sa.losses[:10]) / 10, sum(sa.losses[-10:]) / 10
    assert last < 0.75 * first


def test_compile_gives_the_same_training(tiny_problem):
    """torch.compile (eager backend: graph capture without code generation) trains identically."""
    a, coupling, objective = tiny_problem()
    b, _, _ = tiny_problem()
    sa = fit(a, coupling, objective, steps=3, batch_size=16)
    sb = fit(b, coupling, objective, steps=3, batch_size=16, compile="eager")
    assert sa.losses == pytest.approx(sb.losses, rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_gradvar_log_is_the_probe_on_the_weights_of_that_step(tmp_path, tiny_problem):
    from flowprobe.probes.gradvar import gradient_variance
    from flowprobe.runs.hooks import GRADVAR_SEED_OFFSET, GradVarHook

    net, coupling, objective = tiny_problem()
    straight_net, _, _ = tiny_problem()
    log = tmp_path / "m.jsonl"
    hook = GradVarHook(log, objective, coupling, every=4, times=[0.1, 0.9], n_samples=32, seed=2)
    state = fit(net, coupling, objective, steps=4, batch_size=16, seed=2, hooks=[MetricsLog(log), hook])
    recs = [json.loads(line) for line in log.read_text().splitlines() if '"gradvar"' in line]
    assert len(recs) == 1 and recs[0]["step"] == 4 and recs[0]["reduction"] == "sum"
    expected = gradient_variance(state.net, objective.path, coupling, [0.1, 0.9], n_samples=32, method="exact",
                                 generator=torch.Generator().manual_seed(2 + GRADVAR_SEED_OFFSET), reduction="sum")
    assert [r["t"] for r in recs[0]["rows"]] == [0.1, 0.9]
    for got, exp in zip(recs[0]["rows"], expected.rows):
        assert got["gv"] == pytest.approx(exp["gv"], rel=1e-9) and got["gv"] > 0
    # the probe does not disturb training: same weights as a run without it
    fit(straight_net, coupling, objective, steps=4, batch_size=16, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), straight_net.parameters()))


def _reference_fit(net, coupling, objective, *, steps, batch_size, lr, seed, grad_clip, ema_decay, warmup=0):
    """The training loop written out by hand (single-tensor AdamW, per-tensor clipping, per-tensor EMA lerp)."""
    from flowprobe.train import learning_rate as lr_at

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, foreach=False)
    ema = copy.deepcopy(net).requires_grad_(False)
    losses, norms = [], []
    for k in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(k, lr=lr, steps=steps, warmup=warmup)
        loss = objective(net, coupling.sample(batch_size, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip, foreach=False).item())
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 1 - ema_decay)  # e + (1 - d) (p - e), one tensor at a time
        losses.append(loss.item())
    assert max(norms) > grad_clip  # clipping was active
    return ema, losses


def test_fast_step_is_bitwise_the_hand_written_loop(tiny_problem):
    """fit's step (fast.make_train_step: foreach AdamW, foreach clipping, foreach EMA lerp) gives bit for bit
    the parameters, EMA and losses of a plain single-tensor loop on the CPU, with clipping active (the EMA
    against its formula: test_ema_equals_hand_computed_average)."""
    a, coupling, objective = tiny_problem(dtype=torch.float64)
    b = copy.deepcopy(a)
    d = 0.8
    state = fit(a, coupling, objective, steps=6, batch_size=16, lr=0.05, seed=4, grad_clip=0.05, ema_decay=d,
                warmup=2)
    ema, losses = _reference_fit(b, coupling, objective, steps=6, batch_size=16, lr=0.05, seed=4, grad_clip=0.05,
                                 ema_decay=d, warmup=2)
    assert state.losses == losses
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(state.ema.parameters(), ema.parameters()):
        assert torch.equal(p, q)


def test_optimizer_implementation_follows_the_device_unless_asked(tiny_problem):
    from flowprobe.train import loop as train

    net, coupling, objective = tiny_problem()

    opts = []
    orig = train.make_optimizer

    def spy(*args, **kwargs):
        opts.append(orig(*args, **kwargs))
        return opts[-1]

    train.make_optimizer = spy
    try:
        fit(net, coupling, objective, steps=1, batch_size=4)
        fit(net, coupling, objective, steps=1, batch_size=4, optimizer_kwargs={"foreach": False, "betas": (0.5, 0.9)})
    finally:
        train.make_optimizer = orig
    assert isinstance(opts[0], torch.optim.AdamW) and opts[0].defaults["foreach"] is True
    assert opts[1].defaults["foreach"] is False and opts[1].defaults["betas"] == (0.5, 0.9)


@pytest.mark.parametrize("compile", ["eager", "aot_eager"])
def test_compiled_fit_matches_eager(tiny_problem, compile):
    """Compiling the loss (graph capture; aot_eager also traces the backward) leaves training unchanged."""
    a, coupling, objective = tiny_problem()
    b = copy.deepcopy(a)
    sa = fit(a, coupling, objective, steps=4, batch_size=16, grad_clip=1.0, ema_decay=0.9)
    sb = fit(b, coupling, objective, steps=4, batch_size=16, grad_clip=1.0, ema_decay=0.9, compile=compile)
    assert sa.losses == pytest.approx(sb.losses, rel=1e-6)
    for p, q in zip(list(a.parameters()) + list(sa.ema.parameters()), list(b.parameters()) + list(sb.ema.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not any(n.startswith("_orig_mod") for n in b.state_dict())  # the net itself is not wrapped


def test_bad_compile_setting_names_the_choices(tiny_problem):
    net, coupling, objective = tiny_problem()
    with pytest.raises(ValueError, match="reduce-overhead"):
        fit(net, coupling, objective, steps=1, batch_size=4, compile="warp-speed")


def _image_folder(path, n=64, side=8, seed=0):
    """n random RGB PNGs of side x side in ``path`` (a flat folder of images)."""
    import numpy as np
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


def test_tiny_image_run_trains_samples_and_probes_through_the_cli(tmp_path, monkeypatch):
    """An image config end to end: train (tiny UNet, 5 steps), sample a PNG grid, probe gradvar from the
    checkpoint; every command rebuilds the net from the sidecar (load_model)."""
    import numpy as np
    from PIL import Image

    from flowprobe.checkpoint import load_checkpoint
    from flowprobe.cli import main
    from flowprobe.runs import load_model

    monkeypatch.setenv("FLOWPROBE_CACHE", str(tmp_path / "cache"))
    folder = _image_folder(tmp_path / "imgs")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
data: {{dataset: {folder}, flip: true}}
model: {{arch: unet, preset: tiny, model_channels: 8, attention_resolutions: [4]}}
path: {{sigma: 0.05}}
coupling: {{kind: minibatch_ot, method: lsa}}
optim: {{lr: 1.0e-3, grad_clip: 1.0}}
ema_decay: 0.9
precision: auto
compile: auto
steps: 5
batch_size: 8
log_every: 5
sample: {{n: 16, steps: 3, grid: 9}}
""")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--device", "cpu", "--no-progress"]) == 0
    ck = load_checkpoint(run)
    assert ck.step == 5 and ck.extra["shape"] == [3, 8, 8] and ck.extra["model"]["class"] == "UNet"
    kw = ck.extra["model"]["kwargs"]
    assert kw["image_size"] == 8 and kw["model_channels"] == 8 and kw["attention_resolutions"] == [4]
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["precision"] == "fp32" and info["config"]["compile"] is False  # auto on a CPU
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if r["event"] == "eval"]
    assert len(ev) == 1 and ev[0]["nfe"] == 3 and ev[0]["energy_distance"] > 0
    grid = np.asarray(Image.open(run / "samples.png"))
    assert grid.shape == (3 * 10 + 2, 3 * 10 + 2, 3)  # 9 tiles of 8x8 with 2-pixel gaps

    # the rebuilt net is the trained EMA, bit for bit
    net, _ = load_model(run)
    for name, p in net.state_dict().items():
        assert torch.equal(p, ck.state_dict("ema")[name])

    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert np.asarray(Image.open(out)).shape == (2 * 10 + 2, 2 * 10 + 2, 3)
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["shape"] == [4, 3, 8, 8] and rec["model"] == "ema" and rec["nfe"] == 2

    probe = tmp_path / "gv"
    assert main(["probe", "gradvar", str(run), "--times", "0.2:0.8:2", "--samples", "4", "--out", str(probe),
                 "--device", "cpu", "--no-progress"]) == 0
    doc = json.loads((probe / "gradvar.json").read_text())
    (prof,) = doc["profiles"]
    assert prof["step"] == 5 and prof["weights"] == "ema" and [r["t"] for r in prof["rows"]] == [0.2, 0.8]
    assert all(r["gv"] > 0 and math.isfinite(r["gv"]) for r in prof["rows"])
    assert prof["path"]["sigma"] == 0.05
    # the ghost method with a forced convolution rule on the same checkpoint: same variance as exact
    probe2 = tmp_path / "gv-ghost"
    assert main(["probe", "gradvar", str(run), "--times", "0.2:0.8:2", "--samples", "4", "--out", str(probe2),
                 "--device", "cpu", "--no-progress", "--method", "ghost", "--ghost-conv", "unfold"]) == 0
    (ghost,) = json.loads((probe2 / "gradvar.json").read_text())["profiles"]
    assert ghost["ghost_conv"] == "unfold" and ghost["method"] == "ghost"
    for a, b in zip(ghost["rows"], prof["rows"]):
        assert a["gv"] == pytest.approx(b["gv"], rel=1e-4)


def test_image_configs_in_the_repository_load():
    from pathlib import Path

    from flowprobe.config import load_config
    from flowprobe.nets.unet import count_parameters
    from flowprobe.nets.factory import build_net, model_spec
    from flowprobe.runs import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    cifar = load_config(TrainConfig, root / "cifar10.yaml")
    assert cifar.data.dataset == "cifar10" and cifar.model.preset == "cifar10"
    assert count_parameters(build_net(model_spec(cifar.model, (3, 32, 32)), 0)) == 35_746_307  # torchcfm's UNet
    celeba = load_config(TrainConfig, root / "celeba64.yaml")
    assert celeba.data.dataset == "celeba" and celeba.path.sigma == 0.05 and celeba.model.preset == "celeba64"


def test_unet_needs_images_and_bad_compile_is_a_config_error():
    from flowprobe.config import ConfigError, from_dict
    from flowprobe.runs import TrainConfig

    with pytest.raises(ConfigError, match="data.dataset"):
        from_dict(TrainConfig, {"model": {"arch": "unet"}})
    with pytest.raises(ConfigError, match="compile"):
        from_dict(TrainConfig, {"compile": "warp-speed"})


def test_image_fixed_pairs_pair_noise_i_with_image_i(tmp_path, monkeypatch):
    from flowprobe.config import from_dict
    from flowprobe.data.images import fixed_noise
    from flowprobe.runs import TrainConfig, build_data

    monkeypatch.setenv("FLOWPROBE_CACHE", str(tmp_path / "cache"))
    folder = _image_folder(tmp_path / "imgs", n=12, side=4)
    cfg = from_dict(TrainConfig, {"data": {"dataset": str(folder), "n_train": 10}, "coupling": {"kind": "fixed_pairs"},
                                  "seed": 3})
    coupling, source, target, shape = build_data(cfg)
    assert shape == (3, 4, 4) and len(target) == 10  # n_train keeps the first 10 images
    p = coupling.sample(6, torch.Generator().manual_seed(0))
    assert torch.equal(p.i0, p.i1)
    torch.testing.assert_close(p.x0, fixed_noise(10, shape, seed=4)[p.i0], rtol=0, atol=0)
    torch.testing.assert_close(p.x1, target.data[p.i1].float() / 127.5 - 1, rtol=0, atol=0)
