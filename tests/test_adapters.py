"""Adapters: models trained with torchcfm, diffusers, FAIR flow_matching or any module, as flowprobe's net(t, x).

Each peer library is checked against itself: one step of its own sampler from a state equals one flowprobe Euler
step (``flowprobe.solvers.integrate``) from the same state, on small randomly initialised models (CPU, no
downloads). Tests of a library are skipped when it is not installed.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import pickle

import pytest
import torch
from torch import nn

from flowprobe.adapters import (Convention, ConventionAdapter, adapt_flow_matching, adapt_torchcfm,
                                flow_match_time_grid, load_model, named_path, path_from_flow_matching, to_velocity)
from flowprobe.config import ConfigError
from flowprobe.paths import LinearPath, StochasticPath, expand_like
from flowprobe.solvers import integrate

# ------------------------------------------------------------------------------------------------ torchcfm


def _tiny_unet(**over):
    from torchcfm.models.unet.unet import UNetModelWrapper

    kwargs = {"dim": [3, 8, 8], "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
              "attention_resolutions": "4", "dropout": 0.1, **over}
    return UNetModelWrapper(**kwargs), kwargs


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Non-zero values everywhere (torchcfm zero-initialises its output convolution)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def test_torchcfm_unet_euler_step_equals_torchdiffeq_odeint():
    """torchcfm samples with ``torchdiffeq.odeint(model, x, t_span)`` (compute_fid.py): its Euler step equals ours."""
    pytest.importorskip("torchcfm")
    from torchdiffeq import odeint

    torch.manual_seed(0)
    model = _randomise(_tiny_unet()[0], 1).eval()
    net = adapt_torchcfm(model)
    x = torch.randn(4, 3, 8, 8)
    for t0, t1 in ((0.0, 1.0), (0.25, 0.625)):
        with torch.no_grad():
            ref = odeint(model, x, torch.tensor([t0, t1]), method="euler")[-1]
        ours = integrate(net, x, method="euler", grid=torch.tensor([t0, t1])).x
        assert ref.abs().max() > 0.1 and (ours - ref).abs().max().item() <= 1e-6
    # the field is the model itself: net(t, x) == model(t, x)
    t = torch.rand(4)
    assert torch.equal(net(t, x), model(t, x))


def test_torchcfm_class_conditional_unet_takes_labels_as_extra():
    pytest.importorskip("torchcfm")
    torch.manual_seed(0)
    model = _randomise(_tiny_unet(class_cond=True, num_classes=3)[0], 2).eval()
    y = torch.tensor([0, 2, 1])
    net = adapt_torchcfm(model, extra={"y": y})
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    assert torch.equal(net(t, x), model(t, x, y=y))


def test_torchcfm_mlp_takes_time_as_last_column():
    pytest.importorskip("torchcfm")
    from torchcfm.models.models import MLP

    torch.manual_seed(0)
    model = MLP(dim=2, w=16, time_varying=True).eval()
    net = adapt_torchcfm(model)
    x = torch.randn(5, 2)
    try:  # torchcfm's own wrapper for torchdyn / torchdiffeq (needs torchdyn, which torchcfm.utils imports)
        from torchcfm.utils import torch_wrapper
    except ImportError:
        torch_wrapper = None
    for t in (0.0, 0.3, 1.0):
        ref = model(torch.cat([x, torch.full((5, 1), t)], 1))  # what torch_wrapper(model)(t, x) computes
        if torch_wrapper is not None:
            assert torch.equal(torch_wrapper(model)(torch.tensor(t), x), ref)
        assert torch.equal(net(torch.full((5,), t), x), ref)
    autonomous = MLP(dim=2, w=16, time_varying=False).eval()
    assert torch.equal(adapt_torchcfm(autonomous)(torch.rand(5), x), autonomous(x))


def _save_training_checkpoint(path, net_model, ema_model, prefix=False):
    """What torchcfm's train_cifar10.py saves (with DataParallel / DDP when prefix=True)."""
    optim = torch.optim.Adam(net_model.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda step: min(step, 5000) / 5000)
    x = torch.randn(2, 3, 8, 8)
    net_model.train()
    loss = net_model(torch.rand(2), x).square().mean()
    loss.backward()
    optim.step()
    sched.step()
    wrap = torch.nn.DataParallel if prefix else (lambda m: m)
    torch.save({"net_model": wrap(net_model).state_dict(), "ema_model": wrap(ema_model).state_dict(),
                "sched": sched.state_dict(), "optim": optim.state_dict(), "step": 20000}, path)


@pytest.mark.parametrize("prefix", [False, True])
def test_torchcfm_training_checkpoint_loads_ema_by_default(tmp_path, prefix):
    pytest.importorskip("torchcfm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net_model, kwargs = _tiny_unet()
    net_model = _randomise(net_model, 3)
    ema_model = _randomise(copy.deepcopy(net_model), 4)
    ckpt = tmp_path / "otcfm_cifar10_weights_step_20000.pt"
    _save_training_checkpoint(ckpt, net_model, ema_model, prefix)
    arch = {"class": "UNetModelWrapper", "kwargs": kwargs}
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(arch))

    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    net_model.eval()
    ema_model.eval()
    net, info = load_model("torchcfm", checkpoint=ckpt, arch=arch_file)
    assert info["weights"] == "ema_model" and info["step"] == 20000 and not net.training
    assert info["stripped_prefixes"] == (["module."] if prefix else [])
    assert torch.equal(net(t, x), ema_model(t, x)) and not torch.equal(net(t, x), net_model(t, x))
    raw, info = load_model("torchcfm", checkpoint=ckpt, arch=arch, use_ema=False)
    assert info["weights"] == "net_model" and torch.equal(raw(t, x), net_model(t, x))

    # a plain state dict and a safetensors file of the EMA weights
    torch.save(ema_model.state_dict(), tmp_path / "ema.pt")
    save_file({k: v.contiguous() for k, v in ema_model.state_dict().items()}, str(tmp_path / "ema.safetensors"))
    for name in ("ema.pt", "ema.safetensors"):
        plain, info = load_model("torchcfm", checkpoint=tmp_path / name, arch=arch)
        assert info["weights"] == "state_dict" and torch.equal(plain(t, x), ema_model(t, x))


class _Pickled:
    """Not a tensor: torch.load(weights_only=True) must refuse it."""


def test_torchcfm_errors_name_the_file(tmp_path):
    pytest.importorskip("torchcfm")
    net_model, kwargs = _tiny_unet()
    arch = {"class": "UNetModelWrapper", "kwargs": kwargs}
    good = tmp_path / "ckpt.pt"
    torch.save({"net_model": net_model.state_dict(), "ema_model": net_model.state_dict(), "step": 1}, good)

    with pytest.raises(ConfigError, match="no such file.*missing.pt"):
        load_model("torchcfm", checkpoint=tmp_path / "missing.pt", arch=arch)
    wrong = tmp_path / "wrong_keys.pt"
    torch.save({"model": net_model.state_dict(), "step": 1}, wrong)
    with pytest.raises(ConfigError, match=r"wrong_keys\.pt.*'ema_model'.*holds keys 'model', 'step'"):
        load_model("torchcfm", checkpoint=wrong, arch=arch)
    with pytest.raises(ConfigError, match=r"ckpt\.pt.*do not fit UNetModelWrapper.*shape mismatch"):
        load_model("torchcfm", checkpoint=good, arch={"class": "UNetModelWrapper", "kwargs": {**kwargs,
                                                                                               "num_channels": 64}})
    with pytest.raises(ConfigError, match=r"ckpt\.pt.*missing"):
        load_model("torchcfm", checkpoint=good, arch={"class": "UNetModelWrapper",
                                                      "kwargs": {**kwargs, "num_res_blocks": 2}})
    with pytest.raises(ConfigError, match="unknown class 'UNet3D'"):
        load_model("torchcfm", checkpoint=good, arch={"class": "UNet3D", "kwargs": {}})
    with pytest.raises(ConfigError, match="UNetModelWrapper.*failed.*TypeError"):
        load_model("torchcfm", checkpoint=good, arch={"class": "UNetModelWrapper", "kwargs": {"width": 3}})
    bad_json = tmp_path / "arch.json"
    bad_json.write_text("{not json")
    with pytest.raises(ConfigError, match=r"arch\.json"):
        load_model("torchcfm", checkpoint=good, arch=bad_json)
    pickled = tmp_path / "pickled.pt"
    with open(pickled, "wb") as f:
        pickle.dump({"ema_model": _Pickled()}, f, protocol=2)
    with pytest.raises(ConfigError, match=r"pickled\.pt.*weights_only=True"):
        load_model("torchcfm", checkpoint=pickled, arch=arch)
    code = tmp_path / "code.pt"
    torch.save({"ema_model": net_model.state_dict(), "args": _Pickled()}, code)
    with pytest.raises(ConfigError, match=r"code\.pt.*weights_only=True"):
        load_model("torchcfm", checkpoint=code, arch=arch)


# ------------------------------------------------------------------------------------------------ diffusers


def _tiny_diffusers_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("shift,from_config", [(1.0, False), (3.0, True), (3.0, False)])
def test_diffusers_scheduler_step_equals_flowprobe_euler_step(tmp_path, shift, from_config):
    """Every ``FlowMatchEulerDiscreteScheduler.step`` of a sampling loop equals one flowprobe Euler step over
    t = 1 - sigma -> 1 - sigma_next from the same state; the whole loop equals flowprobe on the scheduler's grid."""
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = _tiny_diffusers_unet()
    model.save_pretrained(tmp_path / "unet")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    if from_config:  # a pipeline folder: unet/ and scheduler/scheduler_config.json (the shift read from it)
        scheduler.save_pretrained(tmp_path / "scheduler")
        net, info = load_model("diffusers", folder=tmp_path)
    else:
        net, info = load_model("diffusers", folder=tmp_path / "unet", shift=shift)
    assert info["class"] == "UNet2DModel" and info["shift"] == shift and info["num_train_timesteps"] == 1000

    steps = 6
    scheduler.set_timesteps(steps)
    grid = net.time_grid(steps)
    assert torch.equal(grid, 1 - scheduler.sigmas.double()) and torch.equal(grid, flow_match_time_grid(steps, shift))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    state = x
    for i, timestep in enumerate(scheduler.timesteps):
        with torch.no_grad():
            out = model(state, timestep.expand(2)).sample
        nxt = scheduler.step(out, timestep, state).prev_sample
        ours = integrate(net, state, method="euler", grid=grid[i:i + 2]).x
        assert (ours - nxt).abs().max().item() <= 1e-6, (i, float(scheduler.sigmas[i]))
        wrong = integrate(net, state, method="euler", grid=torch.tensor([grid[i], 2 * grid[i + 1] - grid[i]])).x
        assert (wrong - nxt).abs().max().item() > 1e-3  # a different interval is seen
        state = nxt
    full = integrate(net, x, method="euler", grid=grid).x
    assert (full - state).abs().max().item() <= 2e-6


def test_diffusers_field_is_minus_model_output_at_timestep_1000_sigma(tmp_path):
    pytest.importorskip("diffusers")
    model = _tiny_diffusers_unet()
    model.save_pretrained(tmp_path)
    net, _ = load_model("diffusers", folder=tmp_path)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([1.0, 0.75, 0.5])
    with torch.no_grad():
        ref = -model(x, sigma * 1000).sample
    assert torch.equal(net(1 - sigma, x), ref)
    forward_time = ConventionAdapter(model, Convention(order="xt", t_keyword="timestep", scale=1000.0,
                                                       output="minus_velocity"))
    assert (forward_time(1 - sigma, x) - ref).abs().max() > 1e-3  # the time direction matters


def test_diffusers_dit_learned_sigma_and_class_labels(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                  norm_num_groups=4).eval()
    _randomise(model, 5)
    model.save_pretrained(tmp_path / "transformer")
    labels = torch.tensor([1, 7])
    net, info = load_model("diffusers", folder=tmp_path, extra={"class_labels": labels})
    assert info["class"] == "DiTTransformer2DModel" and net.convention.channels == 4
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.1, 0.6])
    with torch.no_grad():
        full = model(x, timestep=1000 * (1 - t), class_labels=labels).sample
    assert full.shape[1] == 8 and full[:, :4].abs().max() > 0.1
    assert torch.equal(net(t, x), -full[:, :4])


@pytest.mark.parametrize("steps,shift,n", [(1, 1.0, 1000), (28, 3.0, 1000), (50, 1.0, 1000), (10, 7.5, 500)])
def test_flow_match_time_grid_is_the_schedulers(steps, shift, n):
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=n)
    scheduler.set_timesteps(steps)
    grid = flow_match_time_grid(steps, shift, n)
    assert torch.equal(grid, 1 - scheduler.sigmas.double())
    assert grid[0] == 0 and grid[-1] == 1 and bool((grid.diff() > 0).all())


def test_diffusers_errors_name_the_folder(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(ConfigError, match="no such folder.*nowhere"):
        load_model("diffusers", folder=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty.*no config.json"):
        load_model("diffusers", folder=tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "NotAModel"}))
    with pytest.raises(ConfigError, match=r"bad/config\.json.*unknown model class 'NotAModel'"):
        load_model("diffusers", folder=bad)
    _tiny_diffusers_unet().save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"broken")
    with pytest.raises(ConfigError, match=r"unet.*from_pretrained failed"):
        load_model("diffusers", folder=tmp_path / "unet")
    ddpm = tmp_path / "ddpm"
    _tiny_diffusers_unet().save_pretrained(ddpm / "unet")
    (ddpm / "scheduler").mkdir()
    (ddpm / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(ConfigError, match=r"scheduler_config\.json.*'DDPMScheduler' is not a flow-match"):
        load_model("diffusers", folder=ddpm)


# ------------------------------------------------------------------------------------------------ flow_matching


class _FMNet(nn.Module):
    """An MLP like flow_matching's 2-D examples: forward(x, t) with t a scalar or (B,), plus a conditioning extra."""

    def __init__(self, dim: int = 2, hidden: int = 32):
        super().__init__()
        self.main = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, cond=None):
        t = t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)
        c = torch.zeros_like(t) if cond is None else cond.reshape(-1, 1).to(x.dtype)
        return self.main(torch.cat([x, t, c], dim=1))


def test_flow_matching_ode_solver_euler_step_equals_flowprobe():
    pytest.importorskip("flow_matching")
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    torch.manual_seed(0)
    wrapped = ModelWrapper(_FMNet()).eval()
    x, cond = torch.randn(6, 2), torch.randn(6)
    net = adapt_flow_matching(wrapped, extra={"cond": cond})
    solver = ODESolver(velocity_model=wrapped)
    for t0, t1 in ((0.0, 1.0), (0.2, 0.45)):
        ref = solver.sample(x, step_size=t1 - t0, method="euler", time_grid=torch.tensor([t0, t1]), cond=cond)
        ours = integrate(net, x, method="euler", grid=torch.tensor([t0, t1])).x
        assert (ours - ref).abs().max().item() <= 1e-6
        other = solver.sample(x, step_size=t1 - t0, method="euler", time_grid=torch.tensor([t0, t1]))
        assert (ours - other).abs().max().item() > 1e-4  # the extra reaches the model
    ref = solver.sample(x, step_size=0.125, method="midpoint", cond=cond)
    assert (integrate(net, x, method="midpoint", steps=8).x - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("scheduler", ["CondOTScheduler", "CosineScheduler", "LinearVPScheduler"])
def test_noise_and_data_conversions_equal_flow_matching_path(scheduler):
    """Our eps / x1 -> velocity equal flow_matching's AffineProbPath.epsilon_to_velocity / target_to_velocity."""
    pytest.importorskip("flow_matching")
    import flow_matching.path.scheduler as fs
    from flow_matching.path import AffineProbPath

    fm_path = AffineProbPath(getattr(fs, scheduler)())
    path = path_from_flow_matching(fm_path)
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(5, 3, 4, dtype=torch.float64, generator=g), torch.randn(5, 3, 4, dtype=torch.float64,
                                                                                    generator=g)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    tt = expand_like(t, x)
    for output, ref in (("noise", fm_path.epsilon_to_velocity(pred, x, tt)),
                        ("data", fm_path.target_to_velocity(pred, x, tt))):
        assert (to_velocity(pred, output, t, x, path) - ref).abs().max().item() <= 1e-12


def _write_user_module(tmp_path, monkeypatch, name):
    """A user's module on the path: ``Net`` is :class:`_FMNet`'s source under the name a user would give it."""
    source = inspect.getsource(_FMNet).replace("class _FMNet(", "class Net(")
    (tmp_path / f"{name}.py").write_text("import torch\nfrom torch import nn\n\n\n" + source)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_flow_matching_and_module_load_from_factory_and_weights(tmp_path, monkeypatch):
    pytest.importorskip("flow_matching")
    from safetensors.torch import save_file

    _write_user_module(tmp_path, monkeypatch, "fp_user_net")
    import fp_user_net

    torch.manual_seed(0)
    model = fp_user_net.Net(dim=2, hidden=16).eval()
    (tmp_path / "kw.json").write_text(json.dumps({"dim": 2, "hidden": 16}))
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    x, t = torch.randn(4, 2), torch.rand(4)
    net, info = load_model("flow_matching", factory="fp_user_net:Net", weights=tmp_path / "w.safetensors",
                           kwargs=tmp_path / "kw.json")
    assert info["kind"] == "flow_matching" and torch.equal(net(t, x), model(x, t))
    net, info = load_model("module", factory="fp_user_net:Net", weights=tmp_path / "ckpt.pt", key="model",
                           kwargs={"dim": 2, "hidden": 16}, order="xt")
    assert info["key"] == "model" and torch.equal(net(t, x), model(x, t))

    with pytest.raises(ConfigError, match=r"ckpt\.pt.*expected names mapped to tensors.*'model', 'epoch'"):
        load_model("module", factory="fp_user_net:Net", weights=tmp_path / "ckpt.pt", kwargs={"hidden": 16})
    with pytest.raises(ConfigError, match=r"w\.safetensors.*do not fit Net.*shape mismatch"):
        load_model("module", factory="fp_user_net:Net", weights=tmp_path / "w.safetensors", kwargs={"hidden": 8})
    with pytest.raises(ConfigError, match="factory: expected 'package.module:Name'"):
        load_model("module", factory="fp_user_net.Net")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        load_model("module", factory="no_such_module_xyz:Net")
    with pytest.raises(ConfigError, match="module 'fp_user_net' has no attribute 'Missing'"):
        load_model("module", factory="fp_user_net:Missing")
    with pytest.raises(ConfigError, match=r"weights: no such file.*nope\.safetensors"):
        load_model("module", factory="fp_user_net:Net", weights=tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match=r"bad\.safetensors"):
        load_model("module", factory="fp_user_net:Net", weights=tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------------ conventions


C = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)  # the target: x1 = C exactly, x0 ~ N(0, I)


class _ExactData(nn.Module):
    """The exact data prediction E[x1 | x_t] = C when x1 is the constant C, whatever the path."""

    def forward(self, t, x):
        return C.to(x.dtype).expand_as(x).clone()


class _ExactNoise(nn.Module):
    """The exact noise prediction E[x0 | x_t] = (x_t - b(t) C) / a(t) on the path, model time s = 1000 (1 - t)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def forward(self, x, s):
        t = expand_like(1 - s / 1000, x)
        return (x - self.path.b(t) * C) / self.path.a(t)


def _closed_form_velocity(path, t, x):
    tt = expand_like(t, x)
    x0_hat = (x - path.b(tt) * C) / path.a(tt)
    return path.da(tt) * x0_hat + path.db(tt) * C


@pytest.mark.parametrize("path_name", ["linear", "cosine"])
def test_noise_and_data_predictions_give_the_closed_form_velocity(path_name):
    path = named_path(path_name)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.1, 0.35, 0.5, 0.8, 0.95], dtype=torch.float64)
    x0 = torch.randn(5, 3, dtype=torch.float64, generator=g)
    x = path.sample(x0, C.expand(5, 3), t)[0]
    exact = _closed_form_velocity(path, t, x)
    if path_name == "linear":  # the straight path: v = x1 - x0
        assert (exact - (C - x0)).abs().max().item() <= 1e-12

    data = ConventionAdapter(_ExactData(), Convention(output="data"), path)
    noise = ConventionAdapter(_ExactNoise(path), Convention(order="xt", time="reverse", scale=1000.0,
                                                           output="noise"), path)
    assert (data(t, x) - exact).abs().max().item() <= 1e-12
    assert (noise(t, x) - exact).abs().max().item() <= 1e-12
    # deliberately wrong conventions must not pass
    wrong = [ConventionAdapter(_ExactData(), Convention(output="noise"), path),
             ConventionAdapter(_ExactNoise(path), Convention(order="xt", time="reverse", scale=1000.0,
                                                             output="data"), path),
             ConventionAdapter(_ExactNoise(path), Convention(order="xt", time="forward", scale=1000.0,
                                                             output="noise"), path),
             ConventionAdapter(_ExactData(), Convention(output="velocity"), path)]
    for net in wrong:
        assert (net(t, x) - exact).abs().max().item() > 0.1


def test_exact_data_prediction_transports_noise_to_the_target():
    """On the straight path the exact field v = (C - x)/(1 - t) is constant along its paths: Euler lands on C."""
    net = ConventionAdapter(_ExactData(), Convention(output="data"))
    x0 = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    end = integrate(net, x0, method="euler", steps=10).x
    assert (end - C).abs().max().item() <= 1e-12


def test_endpoint_clamp_is_bounded_and_documented():
    """At t = 0 a noise prediction divides by b(0) = 0: the divisor is clamped to eps, so the result is finite."""
    net = ConventionAdapter(_ExactData(), Convention(output="noise", eps=1e-4))
    x = torch.ones(2, 3, dtype=torch.float64)
    v = net(torch.zeros(2, dtype=torch.float64), x)
    expected = -C + (x - C) / 1e-4  # a' e + b' (x - a e) / eps with a = 1, a' = -1, b' = 1
    assert torch.isfinite(v).all() and (v - expected).abs().max().item() <= 1e-9


def test_convention_calls_and_dtypes():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=torch.float32))

        def forward(self, *args, **kwargs):
            seen["args"], seen["kwargs"] = args, kwargs
            x = kwargs.get("sample", args[-1] if args else None)
            return (x * self.w,)

    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    label = torch.tensor([4])
    net = ConventionAdapter(Probe(), Convention(order="tx", x_keyword="sample", time="reverse", scale=10.0,
                                                extra={"label": label}))
    v = net(t, x)
    assert v.dtype == torch.float64 and torch.allclose(v, x.float().double())
    (s,), kwargs = seen["args"], seen["kwargs"]
    assert s.dtype == torch.float32 and torch.equal(s, torch.tensor([10.0, 5.0, 0.0]))
    assert kwargs["sample"].dtype == torch.float32 and torch.equal(kwargs["label"], torch.tensor([4, 4, 4]))


def test_convention_and_load_model_errors():
    with pytest.raises(ConfigError, match="convention.order"):
        Convention(order="yx")
    with pytest.raises(ConfigError, match="convention.output"):
        Convention(output="score")
    with pytest.raises(ConfigError, match="convention.scale"):
        Convention(scale=math.inf)
    with pytest.raises(ConfigError, match="deterministic path"):
        ConventionAdapter(nn.Identity(), Convention(output="noise"), StochasticPath(0.1))
    with pytest.raises(ConfigError, match="path: expected one of linear, cosine, polynomial, vp, linear_vp"):
        ConventionAdapter(nn.Identity(), Convention(), "sigmoid")
    with pytest.raises(ConfigError, match="kind: expected one of torchcfm, diffusers, flow_matching, module"):
        load_model("jax")
    with pytest.raises(ConfigError, match="torchcfm: unknown option.*use_emma"):
        load_model("torchcfm", checkpoint="x.pt", arch={}, use_emma=False)
    with pytest.raises(ConfigError, match="module: missing option.*factory"):
        load_model("module", weights="w.pt")
    assert isinstance(named_path("linear"), LinearPath)
