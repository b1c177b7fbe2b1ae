"""Bad input never ends in a traceback: generated configs, overrides, flag values, pairs files and damaged
checkpoints, driven through the commands' entry function in-process.

For every generated input the command must: exit with code 2, print exactly one line on stderr that names the
offending key, flag or file, print no traceback, write nothing outside ``--out`` and change no checkpoint of the
run folder it was pointed at. The example count is fixed for CI (``FLOWPROBE_PROPERTY_EXAMPLES`` raises it).
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowprobe.cli import main

EXAMPLES = int(os.environ.get("FLOWPROBE_PROPERTY_EXAMPLES", "12"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = ["--set", "steps=4", "--set", "batch_size=8", "--set", "model.width=8", "--set", "model.depth=1",
        "--set", "log_every=2", "--set", "sample.n=10", "--set", "sample.steps=2", "--set", "sample.plot=false",
        "--no-progress"]


_COUNTER = iter(range(10**9))


def _fresh(tmp_path: Path) -> Path:
    """A folder not used by an earlier example (Hypothesis runs all examples in one function-scoped tmp_path)."""
    return tmp_path / f"ex{next(_COUNTER)}"


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_refused(argv, capsys, *names) -> str:
    """Run the command; assert exit 2, one stderr line without a traceback that names one of ``names``."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("flowprobe: error: ")
    assert any(n in err for n in names), (names, err)
    return err


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--set", "ckpt_every=2", "--out", str(run)]) == 0
    return run


# ----------------------------------------------------------------------------------------------- configs

BAD_FLOATS = st.sampled_from([".inf", "-.inf", ".nan", "inf", "nan", "1e999", "-1", "abc", "[1, 2]", "{a: 1}"])
FLOAT_KEYS = st.sampled_from(["optim.lr", "optim.weight_decay", "model.time_scale", "path.sigma",
                              "coupling.weight_epsilon", "ema_decay", "optim.grad_clip"])
BAD_INTS = st.sampled_from(["-5", "0.5", "abc", "1e30", "18446744073709551615", "1000000000000", "[]", "true"])
#: integer settings with an upper bound (every bad value above is bad for each of them)
INT_KEYS = st.sampled_from(["steps", "batch_size", "seed", "model.width", "model.depth", "model.time_embed_dim",
                            "sample.n", "sample.steps", "data.n_train"])
CHOICE_KEYS = st.sampled_from(["precision", "data.source", "coupling.kind", "path.schedule", "optim.lr_schedule",
                               "objective.kind", "sample.solver", "model.arch", "model.activation"])
JUNK = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)


@SETTINGS
@given(setting=st.one_of(st.tuples(FLOAT_KEYS, BAD_FLOATS), st.tuples(INT_KEYS, BAD_INTS)))
def test_bad_numeric_settings_are_refused(tmp_path, capsys, setting):
    key, value = setting
    if key in ("ema_decay", "optim.grad_clip", "coupling.weight_epsilon") and value == "-1":
        value = "-2"
    out = _fresh(tmp_path) / "out"
    _run_refused(["train", *TINY, "--set", f"{key}={value}", "--out", str(out)], capsys, key)
    assert not out.exists()


@SETTINGS
@given(key=CHOICE_KEYS, value=JUNK)
def test_unknown_choices_and_keys_are_refused(tmp_path, capsys, key, value):
    out = _fresh(tmp_path) / "out"
    _run_refused(["train", *TINY, "--set", f"{key}=zz{value}", "--out", str(out)], capsys, key)
    _run_refused(["train", *TINY, "--set", f"zz{value}.lr=1", "--out", str(out)], capsys, f"zz{value}")
    assert not out.exists()


YAML_TEXTS = st.sampled_from([
    b"", b"\n\n", b"- 1\n- 2\n", b"steps: 3\nsteps: 4\n", b"1: 2\n", b"steps: [\n", b"\xff\xfe\x00s\x00",
    "steps: 3 # caf\u00e9\n".encode("latin-1", "replace") + b"\xe9\n", "steps: 3\n".encode("utf-16"),
    b"[" * 3000 + b"]" * 3000, b"optim: 3\n", b"optim:\n  lr: [1, 2]\n", b"!!python/object/apply:os.system ['true']\n",
])


@SETTINGS
@given(text=YAML_TEXTS)
def test_bad_yaml_files_are_refused(tmp_path, capsys, text):
    cfg = _fresh(tmp_path) / "bad.yaml"
    cfg.parent.mkdir()
    cfg.write_bytes(text)
    out = _fresh(tmp_path) / "out"
    _run_refused(["train", str(cfg), "--no-progress", "--out", str(out)], capsys, "bad.yaml", "optim", "steps")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- flags


@SETTINGS
@given(device=st.sampled_from(["meta", "bogus", "cuda:99", "cuda", "mps", "", "cpu:x", "xla"]))
def test_bad_devices_are_refused(tmp_path, capsys, device):
    if device in ("cuda", "mps") and (torch.cuda.is_available() or torch.backends.mps.is_available()):
        return
    if device == "":
        return  # "" means "auto"
    out = _fresh(tmp_path) / "out"
    _run_refused(["train", *TINY, "--device", device, "--out", str(out)], capsys, "device")
    assert not out.exists()


@SETTINGS
@given(flag=st.sampled_from(["--n", "--steps"]), value=st.sampled_from(["0", "-3", "1000000000", "10000000000"]))
def test_bad_sample_sizes_are_refused(run_folder, tmp_path, capsys, flag, value):
    before = _snapshot(run_folder)
    out = _fresh(tmp_path) / "s.npy"
    argv = ["sample", str(run_folder), "--n", "10", "--steps", "2", "--out", str(out)]
    argv[argv.index(flag) + 1] = value
    _run_refused(argv, capsys, flag, "n=", "steps=")
    assert not out.exists() and _snapshot(run_folder) == before


@SETTINGS
@given(suffix=st.sampled_from([".txt", ".npz", "", ".pt"]))
def test_bad_sample_outputs_are_refused(run_folder, tmp_path, capsys, suffix):
    out = _fresh(tmp_path) / f"s{suffix}"
    _run_refused(["sample", str(run_folder), "--n", "4", "--steps", "2", "--out", str(out)], capsys, "--out")
    assert not out.exists()


@SETTINGS
@given(args=st.sampled_from([["--times", "nan:1:5"], ["--times", "0:1:0"], ["--times", "abc"], ["--samples", "1"],
                             ["--samples", "0"], ["--chunk-size", "0"], ["--chunk-size", "-4"],
                             ["--method", "microbatch", "--samples", "8", "--micro-batch-size", "16"],
                             ["--sigma", "inf"], ["--sigma", "-1"], ["--sigma", "nan"], ["--step", "abc"],
                             ["--micro-batch-size", "0"]]))
def test_bad_probe_flags_are_refused(run_folder, tmp_path, capsys, args):
    before = _snapshot(run_folder)
    out = _fresh(tmp_path) / "probe"
    _run_refused(["probe", "gradvar", str(run_folder), "--out", str(out), "--no-progress", *args], capsys,
                 args[0], args[-2] if len(args) > 2 else args[0], "times", "samples", "sigma", "chunk", "micro")
    assert _snapshot(run_folder) == before


# ----------------------------------------------------------------------------------------------- files

PAIRS = st.sampled_from(["empty", "nan", "0d", "1d", "3d", "mismatch", "ot_oob", "ot_negative", "garbage", "missing"])


def _write_pairs(path: Path, kind: str) -> None:
    from safetensors.torch import save_file

    x = torch.randn(6, 2)
    tensors = {"x0": x, "x1": x + 1}
    if kind == "empty":
        tensors = {"x0": torch.zeros(0, 2), "x1": torch.zeros(0, 2)}
    elif kind == "nan":
        tensors["x1"] = torch.full((6, 2), float("nan"))
    elif kind == "0d":
        tensors = {"x0": torch.tensor(1.0), "x1": torch.tensor(2.0)}
    elif kind == "1d":
        tensors = {"x0": torch.randn(6), "x1": torch.randn(6)}
    elif kind == "3d":
        tensors = {"x0": torch.randn(6, 2, 1), "x1": torch.randn(6, 2, 1)}
    elif kind == "mismatch":
        tensors["x1"] = torch.randn(5, 2)
    elif kind == "ot_oob":
        tensors["ot_index"] = torch.tensor([0, 1, 2, 3, 4, 99])
    elif kind == "ot_negative":
        tensors["ot_index"] = torch.tensor([0, 1, 2, 3, 4, -1])
    if kind == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif kind != "missing":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@SETTINGS
@given(kind=PAIRS)
def test_bad_pairs_files_are_refused(run_folder, tmp_path, capsys, kind):
    pairs = _fresh(tmp_path) / "pairs.safetensors"
    pairs.parent.mkdir()
    _write_pairs(pairs, kind)
    before = _snapshot(run_folder)
    _run_refused(["probe", "memorization", str(run_folder), "--pairs", str(pairs), "--out", str(tmp_path / "m"),
                  "--steps", "2"], capsys, "pairs.safetensors", "pairs")
    assert _snapshot(run_folder) == before


DAMAGE = st.sampled_from(["truncate", "zero", "header", "flip", "sidecar_empty", "sidecar_list", "sidecar_binary",
                          "sidecar_nostep", "sidecar_edit"])


@SETTINGS
@given(damage=DAMAGE, command=st.sampled_from(["sample", "gradvar", "resume"]))
def test_damaged_checkpoints_are_refused(run_folder, tmp_path, capsys, damage, command):
    import shutil

    tmp_path = _fresh(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    ckpts = sorted((run / "checkpoints").glob("step_*.safetensors"))
    for ck in ckpts:  # damage every checkpoint, so no fallback can hide it
        side = ck.with_suffix(".json")
        if damage == "truncate":
            ck.write_bytes(ck.read_bytes()[:100])
        elif damage == "zero":
            ck.write_bytes(b"")
        elif damage == "header":
            ck.write_bytes(b"\xff" * 8 + ck.read_bytes()[8:])
        elif damage == "flip":
            data = bytearray(ck.read_bytes())
            data[-5] ^= 1
            ck.write_bytes(bytes(data))
        elif damage == "sidecar_empty":
            side.write_text("")
        elif damage == "sidecar_list":
            side.write_text("[]")
        elif damage == "sidecar_binary":
            side.write_bytes(b"\x00\x01\x02")
        elif damage == "sidecar_nostep":
            d = json.loads(side.read_text())
            d.pop("step")
            side.write_text(json.dumps(d))
        else:
            d = json.loads(side.read_text())
            d["extra"]["model"]["kwargs"]["width"] = 200000
            side.write_text(json.dumps(d))
    before = _snapshot(run)
    if command == "sample":
        argv = ["sample", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s.npy")]
    elif command == "gradvar":
        argv = ["probe", "gradvar", str(run), "--out", str(tmp_path / "g"), "--samples", "4", "--times", "0.1:0.9:2",
                "--no-progress"]
    else:
        argv = ["train", *TINY, "--set", "steps=6", "--set", "ckpt_every=2", "--out", str(run), "--resume"]
    _run_refused(argv, capsys, "step_", "checkpoint", "sidecar")
    assert _snapshot(run) == before
