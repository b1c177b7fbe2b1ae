"""The DiT backbone: shapes and zero start, attention and positional embedding against closed forms (and
diffusers), ghost norms against exact per-sample gradients, the three objectives through fit, the MeanFlow JVP
against finite differences, torch.compile against eager, and a CLI run end to end on self-made images."""

from __future__ import annotations

import io
import math
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.func import jvp, vmap

from flowprobe.config import ConfigError
from flowprobe.couplings import GaussianSampler, IndependentCoupling, TensorSampler
from flowprobe.nets import DIT_PRESETS, build_net, count_parameters, dit_preset, model_spec
from flowprobe.nets.dit import DiT, attention, sincos_pos_embed_2d
from flowprobe.objectives import make_objective
from flowprobe.paths import StochasticPath
from flowprobe.probes.ghost import ghost_plan
from flowprobe.probes.grad_stats import ESTIMATORS, per_sample_grad_stats
from flowprobe.train import fit

TINY = dict(image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2)


def _tiny(seed: int = 0, std: float = 0.05, **kw) -> DiT:
    """The tiny DiT moved off its zero start (adaLN and output layer), so every parameter gets a gradient."""
    torch.manual_seed(seed)
    net = DiT(**{**TINY, **kw})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))
    return net


def test_output_shape_zero_start_and_step_input(one_thread):
    torch.manual_seed(0)
    net = DiT(**TINY, step_embed=True)
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    out = net(t, x, torch.rand(4))
    assert out.shape == x.shape and bool((out == 0).all())  # adaLN-Zero: the new net is the zero field
    moved = _tiny(step_embed=True)
    v = moved(t, x)
    assert v.abs().max() > 1e-3
    torch.testing.assert_close(moved(t, x, torch.zeros(4)), v)  # h = None is h = 0
    assert (moved(t, x, torch.full((4,), 0.5)) - v).abs().max() > 1e-4
    assert (moved(torch.full((4,), 0.9), x) - moved(torch.full((4,), 0.1), x)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no step input"):
        _tiny()(t, x, torch.zeros(4))
    for bad in (dict(patch_size=3), dict(hidden_size=30), dict(num_heads=3)):
        with pytest.raises(ValueError):
            DiT(**{**TINY, **bad})


def test_attention_equals_explicit_softmax_and_its_jvp(one_thread):
    q, k, v = torch.randn(3, 2, 3, 10, 8, dtype=torch.float64).unbind(0)
    tangents = tuple(torch.randn(3, 2, 3, 10, 8, dtype=torch.float64).unbind(0))

    def explicit(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v

    ref = explicit(q, k, v)
    torch.testing.assert_close(attention(q, k, v), ref)  # the fused scaled_dot_product_attention path
    torch.testing.assert_close(vmap(attention)(q, k, v), ref)
    # forward mode: the fused CPU kernel has no JVP; torch.func.jvp and dual tensors take the explicit path
    _, d_ref = jvp(explicit, (q, k, v), tangents)
    torch.testing.assert_close(jvp(attention, (q, k, v), tangents)[1], d_ref)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = attention(*(fwAD.make_dual(a, b) for a, b in zip((q, k, v), tangents)))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, d_ref)


def test_block_attention_splits_and_merges_heads():
    """A block's attention against an explicit per-head computation from its qkv and proj weights."""
    net = _tiny().double()
    block = net.blocks[0]
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    q, k, v = (x @ block.qkv.weight.T + block.qkv.bias).split(32, dim=-1)
    heads = [torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(16), -1) @ v[..., s]
             for s in (slice(0, 16), slice(16, 32))]
    ref = torch.cat(heads, -1) @ block.proj.weight.T + block.proj.bias
    torch.testing.assert_close(block.attend(x), ref)


def test_positional_embedding_is_the_closed_form_sincos():
    dim, grid = 16, 4
    pe = DiT(**{**TINY, "hidden_size": dim}).pos_embed
    w = [10000 ** (-m / (dim / 4)) for m in range(dim // 4)]
    for i in range(grid):
        for j in range(grid):
            row = [math.sin(j * a) for a in w] + [math.cos(j * a) for a in w]
            row += [math.sin(i * a) for a in w] + [math.cos(i * a) for a in w]
            torch.testing.assert_close(pe[i * grid + j], torch.tensor(row), rtol=1e-6, atol=1e-6)
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_pos_embed_2d(64, 8)
    torch.testing.assert_close(ours, get_2d_sincos_pos_embed(64, 8, base_size=8).float(), rtol=1e-5, atol=1e-5)


def test_unpatchify_puts_each_token_on_its_patch():
    net = DiT(**{**TINY, "in_channels": 2})
    p, g, c = 2, 4, 2
    tokens = torch.arange(2 * g * g * p * p * c, dtype=torch.float32).reshape(2, g * g, p * p * c)
    img = net.unpatchify(tokens)
    for b, i, j, a, e, ch in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 1, 0, 1), (0, 3, 1, 0, 1, 1), (1, 1, 2, 1, 1, 0)]:
        assert img[b, ch, i * p + a, j * p + e] == tokens[b, i * g + j, (a * p + e) * c + ch]


@pytest.mark.parametrize("step_embed", [False, True])
def test_ghost_norms_cover_every_parameter_and_equal_exact(one_thread, step_embed):
    net = _tiny(step_embed=step_embed).double()
    params = list(net.named_parameters())
    covered, fallback, types = ghost_plan(net, params)
    assert fallback == [] and types == []
    assert sum(len(names) for _, names in covered) == len(params)
    assert {type(m).__name__ for m, _ in covered} == {"Linear", "Conv2d"}
    torch.manual_seed(1)
    n = 6
    t, x = torch.rand(n, dtype=torch.float64), torch.randn(n, 3, 8, 8, dtype=torch.float64)
    u = torch.randn_like(x)
    assert set(ESTIMATORS) == {"exact", "naive", "microbatch", "ghost"}
    exact = per_sample_grad_stats(net, t, x, u, "exact")  # torch.func vmap(grad): the explicit attention
    naive = per_sample_grad_stats(net, t, x, u, "naive")  # n backward passes: the fused attention
    # two chunks; the strided patch convolution by both per-sample convolution rules
    ghosts = [per_sample_grad_stats(net, t, x, u, "ghost", chunk_size=4, ghost_conv=r) for r in ("grouped", "unfold")]
    micro = per_sample_grad_stats(net, t, x, u, "microbatch", micro_batch_size=1)  # units of one sample
    ghost = ghosts[0]
    assert ghost.fallback_modules == []
    assert exact.sq_norms.min() > 1e-8  # the norms are not vacuous
    for other in (naive, *ghosts, micro):
        torch.testing.assert_close(other.sq_norms, exact.sq_norms, rtol=1e-9, atol=1e-12)
        assert other.gv == pytest.approx(exact.gv, rel=1e-9)
        assert other.mean_grad_sq == pytest.approx(exact.mean_grad_sq, rel=1e-9)
    assert ghost.gv_se == pytest.approx(exact.gv_se, rel=1e-7)


def _image_coupling(n: int = 16):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return IndependentCoupling(GaussianSampler((3, 8, 8)), TensorSampler(data))


@pytest.mark.parametrize("kind", ["cfm", "meanflow", "splitmeanflow"])
def test_every_objective_trains_through_fit(one_thread, kind):
    torch.manual_seed(0)
    few = kind != "cfm"
    net = DiT(**TINY, step_embed=few, time_scale=10.0 if few else 1000.0)
    obj = make_objective(kind, StochasticPath(0.0), reduction="mean", **({"jump_fraction": 0.5} if few else {}))
    coupling = _image_coupling()
    pairs = coupling.sample(64, torch.Generator().manual_seed(5))  # a fixed evaluation batch
    t_eval = torch.rand(64, generator=torch.Generator().manual_seed(6))

    def velocity_loss():  # the h = 0 (instantaneous velocity) loss, which every objective trains
        x_t = (1 - t_eval[:, None, None, None]) * pairs.x0 + t_eval[:, None, None, None] * pairs.x1
        with torch.no_grad():
            return float((net(t_eval, x_t) - (pairs.x1 - pairs.x0)).pow(2).mean())

    before = velocity_loss()
    state = fit(net, coupling, obj, steps=20, batch_size=8, lr=1e-2, log_every=4)
    losses = torch.tensor(state.losses)
    assert len(losses) == 20 and bool(torch.isfinite(losses).all())
    # the zero net's loss is E||x1 - x0||^2 / d ~ 1 + 1/3; twenty steps must bring it down
    assert before == pytest.approx(4 / 3, rel=0.1)
    after = velocity_loss()
    assert after < 0.9 * before, (before, after)


def test_meanflow_jvp_through_the_dit_equals_finite_differences(one_thread):
    net = _tiny(step_embed=True, time_scale=10.0).double()
    torch.manual_seed(2)
    n = 3
    t, h = torch.rand(n, dtype=torch.float64) * 0.5, torch.rand(n, dtype=torch.float64) * 0.5
    x, u = torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.randn(n, 3, 8, 8, dtype=torch.float64)
    obj = make_objective("meanflow", StochasticPath(0.0), reduction="mean")
    pred, tgt = obj.target(net, t, h, x, u)
    eps = 1e-5
    with torch.no_grad():
        fd = (net(t + eps, x + eps * u, h - eps) - net(t - eps, x - eps * u, h + eps)) / (2 * eps)
        torch.testing.assert_close(pred, net(t, x, h))
    assert fd.abs().max() > 1e-3
    torch.testing.assert_close(tgt, u + h[:, None, None, None] * fd, rtol=1e-6, atol=1e-8)


def test_compiled_forward_and_backward_equal_eager(one_thread):
    """The forward is captured as one graph (fullgraph: no graph breaks); the captured graph, run by the eager
    backend, gives the eager output and gradients."""
    net = _tiny(step_embed=True)
    x, t, h = torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    out = compiled(t, x, h)
    torch.testing.assert_close(out, net(t, x, h))
    g_c = torch.autograd.grad(out.pow(2).sum(), list(net.parameters()))
    g_e = torch.autograd.grad(net(t, x, h).pow(2).sum(), list(net.parameters()))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FLOWPROBE_INDUCTOR_TESTS") != "1",
                    reason="inductor code generation takes about 90 s on a 2-core CPU: FLOWPROBE_INDUCTOR_TESTS=1")
def test_inductor_compiled_forward_equals_eager(one_thread):
    """The default backend (inductor, C++ kernels on CPU): about 90 s on a shared 2-core CPU, so it runs when asked
    (FLOWPROBE_INDUCTOR_TESTS=1); the rest of the suite compiles with the eager and aot_eager backends."""
    net = _tiny().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(t, x), net(t, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_meanflow_training_equals_eager(one_thread):
    """fit(compile="aot_eager") compiles the whole MeanFlow loss, the JVP through the DiT included (AOT autograd,
    as inductor uses it); its losses equal eager training's (about 20 s)."""
    runs = []
    for compile in (False, "aot_eager"):
        torch.manual_seed(0)
        net = DiT(**TINY, step_embed=True, time_scale=10.0)
        obj = make_objective("meanflow", StochasticPath(0.0), reduction="mean", jump_fraction=0.5)
        runs.append(fit(net, _image_coupling(), obj, steps=4, batch_size=8, compile=compile, log_every=2).losses)
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-5, atol=1e-6)


def test_model_spec_presets_overrides_and_meta_build():
    cfg = SimpleNamespace(arch="dit", preset="tiny", patch_size=None, hidden_size=48, num_blocks=3, num_heads=None,
                          time_scale=10.0)
    spec = model_spec(cfg, (1, 12, 12), step_embed=True)
    assert spec == {"class": "DiT", "kwargs": {**DIT_PRESETS["tiny"], "image_size": 12, "in_channels": 1,
                                               "hidden_size": 48, "depth": 3, "step_embed": True,
                                               "time_scale": 10.0}}
    net = build_net(spec, seed=0)
    assert len(net.blocks) == 3 and net.pos_embed.shape == (36, 48)
    torch.testing.assert_close(build_net(spec, seed=0)(torch.rand(2), torch.randn(2, 1, 12, 12)).abs().sum(),
                               torch.tensor(0.0))
    with torch.device("meta"):
        shell = build_net(spec)
    assert {k: v.shape for k, v in shell.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert "pos_embed" not in net.state_dict()  # a fixed function of the config, not stored in checkpoints
    for bad, word in ((dict(patch_size=5), "patch_size"), (dict(num_heads=5), "hidden_size"),
                      (dict(preset="nope"), "preset")):
        with pytest.raises(ConfigError, match=word):
            model_spec(SimpleNamespace(**{**vars(cfg), **bad}), (1, 12, 12))
    with pytest.raises(ConfigError, match="square images"):
        model_spec(cfg, (8,))


def test_repository_image_configs_select_the_dit_presets():
    from pathlib import Path

    from flowprobe.config import load_config
    from flowprobe.runs import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for name, shape in (("cifar10", (3, 32, 32)), ("celeba64", (3, 64, 64))):
        cfg = load_config(TrainConfig, root / f"{name}.yaml")
        cfg.model.arch = "dit"
        spec = model_spec(cfg.model, shape)
        assert spec == {"class": "DiT", "kwargs": DIT_PRESETS[name]}, name


def test_preset_parameter_counts():
    """Each preset against the closed-form count: per block 18 h^2 + 15 h (qkv, proj, MLP of ratio 4, six
    modulations), plus the patch projection, the time MLP (256 -> h -> h) and the final adaLN and Linear."""
    for name, kw in DIT_PRESETS.items():
        h, p, c, d = kw["hidden_size"], kw["patch_size"], kw["in_channels"], kw["depth"]
        expected = (c * p * p * h + h) + (256 * h + h + h * h + h) + d * (18 * h * h + 15 * h) + (
            2 * h * h + 2 * h + h * p * p * c + p * p * c)
        with torch.device("meta"):
            assert count_parameters(dit_preset(name)) == expected, name


def _tar(path, n: int, side: int):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_cli_trains_and_samples_a_few_step_dit(tmp_path, monkeypatch, one_thread):
    from flowprobe.cli import main
    from flowprobe.runs.load import load_model

    monkeypatch.setenv("FLOWPROBE_CACHE", str(tmp_path / "cache"))
    data = _tar(tmp_path / "imgs.tar.gz", 12, 8)
    out = tmp_path / "run"
    sets = ["data.dataset=" + str(data), "model.arch=dit", "model.preset=tiny", "model.hidden_size=32",
            "model.num_blocks=1", "model.time_scale=10", "objective.kind=meanflow", "coupling.kind=independent",
            "steps=4", "batch_size=4", "log_every=2", "ckpt_every=4", "sample.n=4", "sample.steps=2",
            "sample.solver=average", "sample.grid=4", "optim.warmup=0"]
    code = main(["train", *[a for s in sets for a in ("--set", s)], "--out", str(out), "--no-progress"])
    assert code == 0
    net, ck = load_model(out)
    assert ck.extra["model"]["class"] == "DiT" and ck.extra["model"]["kwargs"]["step_embed"] is True
    assert isinstance(net, DiT) and len(net.blocks) == 1 and net.pos_embed.shape == (16, 32)
    assert (out / "samples.png").exists()
    code = main(["train", "--set", "model.arch=dit", "--out", str(tmp_path / "toy"), "--no-progress"])
    assert code == 2  # dit on 2-D toys is a one-line config error


def test_class_conditional_dit_starts_at_zero_and_its_labels_matter(one_thread):
    from flowprobe.guidance import LabelledCoupling

    torch.manual_seed(0)
    net = DiT(**TINY, num_classes=3)
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    assert bool((net(t, x, y=ones) == 0).all()) and net.y_embedder.weight.shape == (4, 32)  # adaLN-Zero still holds
    with pytest.raises(ValueError, match="not class-conditional"):
        DiT(**TINY)(t, x, y=zeros)
    # a few training steps on labelled pairs (label dropout 0.5: both the labels and the null row are trained)
    data = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    coupling = LabelledCoupling(IndependentCoupling(GaussianSampler((3, 8, 8)), TensorSampler(data)),
                                torch.arange(16) % 3, 3, dropout=0.5)
    table = net.y_embedder.weight.detach().clone()
    fit(net, coupling, make_objective("cfm", StochasticPath(0.0), reduction="mean"), steps=4, batch_size=8, lr=1e-2)
    assert (net.y_embedder.weight - table).abs().max() > 1e-4  # the label table got gradients
    for moved in (net, _tiny(num_classes=3)):  # trained, and every parameter perturbed
        assert torch.equal(moved(t, x), moved(t, x, y=torch.full((4,), 3)))  # y=None is the null label 3
        assert (moved(t, x, y=zeros) - moved(t, x, y=ones)).abs().max() > 1e-4
        assert (moved(t, x, y=zeros) - moved(t, x)).abs().max() > 1e-4
    few = _tiny(num_classes=2, step_embed=True)
    h = torch.full((4,), 0.5)
    assert torch.equal(few(t, x, h), few(t, x, h, y=torch.full((4,), 2)))
    assert (few(t, x, h, y=zeros) - few(t, x, h, y=ones)).abs().max() > 1e-4


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_guided_field_on_a_dit_is_one_plus_w_conditional_minus_w_null(one_thread, w):
    from flowprobe.guidance import GuidedField

    for step_embed in (False, True):
        net = _tiny(num_classes=3, step_embed=step_embed).double()
        t, x = torch.rand(5, dtype=torch.float64), torch.randn(5, 3, 8, 8, dtype=torch.float64)
        extra = (torch.rand(5, dtype=torch.float64),) if step_embed else ()
        cond, null = net(t, x, *extra, y=torch.full((5,), 1)), net(t, x, *extra)
        assert (cond - null).abs().max() > 1e-4
        guided = GuidedField(net, 1, w, 3)(t, x, *extra)  # one pass on the doubled batch [x, x] with [1, null]
        torch.testing.assert_close(guided, (1 + w) * cond - w * null, rtol=1e-12, atol=1e-12)


def test_ghost_norms_of_a_class_conditional_dit_equal_exact(one_thread):
    # the probes call net(t, x) (no labels), so a class-conditional net is probed as its null-label field; the
    # label table (an nn.Embedding) is not a ghost type and goes through the exact torch.func fallback
    net = _tiny(num_classes=2).double()
    params = list(net.named_parameters())
    covered, fallback, types = ghost_plan(net, params)
    assert fallback == ["y_embedder.weight"] and types == ["Embedding"]
    assert sum(len(names) for _, names in covered) == len(params) - 1
    torch.manual_seed(1)
    t, x = torch.rand(4, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    u = torch.randn_like(x)
    exact = per_sample_grad_stats(net, t, x, u, "exact")
    with pytest.warns(UserWarning, match="Embedding"):
        ghost = per_sample_grad_stats(net, t, x, u, "ghost", chunk_size=4, ghost_conv="unfold")
    assert exact.sq_norms.min() > 1e-8
    torch.testing.assert_close(ghost.sq_norms, exact.sq_norms, rtol=1e-9, atol=1e-12)
    k = [n for n, _ in params].index("y_embedder.weight")
    assert float(exact.sq_norms[:, k].min()) > 0  # the null row gets a per-sample gradient, and it matches


def test_cli_trains_a_class_conditional_dit_on_a_labelled_folder_and_samples_guided(tmp_path, one_thread, capsys):
    from flowprobe.cli import main
    from flowprobe.runs.load import load_model

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    out = tmp_path / "run"
    sets = ["data.kind=image_folder", f"data.target_path={tmp_path / 'imgs'}", "data.resolution=4", "model.arch=dit",
            "model.preset=tiny", "model.hidden_size=32", "model.num_blocks=1", "model.num_classes=2",
            "coupling.kind=independent", "steps=3", "batch_size=4", "log_every=1", "sample.n=4", "sample.steps=2",
            "sample.plot=false", "optim.warmup=0"]
    code = main(["train", *[a for s in sets for a in ("--set", s)], "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    net, ck = load_model(out)
    assert ck.extra["model"]["class"] == "DiT" and ck.extra["model"]["kwargs"]["num_classes"] == 2
    assert isinstance(net, DiT) and net.y_embedder.weight.shape == (3, 32)
    samples = tmp_path / "s.npy"
    code = main(["sample", str(out), "--n", "4", "--steps", "2", "--label", "1", "--guidance", "1",
                 "--out", str(samples)])
    assert code == 0, capsys.readouterr().err
    assert np.load(samples).shape == (4, 3, 4, 4) and np.isfinite(np.load(samples)).all()
    code = main(["sample", str(out), "--n", "4", "--label", "2", "--out", str(tmp_path / "e.npy")])
    assert code == 2  # a class the net does not know
