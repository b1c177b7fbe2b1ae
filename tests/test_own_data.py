"""Training on the user's own files from the command line: ``data.kind: array | image_folder``, labels, the seeded
held-out split that ``flowprobe diagnose RUN`` uses, standardisation, and one-line errors for bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flowprobe.cli import main
from flowprobe.data.own import load_array_data, split_indices
from flowprobe.runs.diagnose import run_training_data
from flowprobe.runs.load import load_run
from flowprobe.runs.own_data import heldout_of

N = 40
TINY = ["--set", "steps=4", "--set", "batch_size=8", "--set", "model.width=8", "--set", "model.depth=1",
        "--set", "model.time_embed_dim=4", "--set", "sample.n=16", "--set", "sample.steps=2", "--set", "log_every=2",
        "--no-progress", "--device", "cpu"]


def _vectors(seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, N)
    x = (rng.normal(size=(N, 2)) + 3.0 * y[:, None]).astype(np.float32)
    return x, y.astype(np.int64)


def _write(fmt, tmp_path, x, y):
    """(target_path, labels setting) of the vectors and labels written as ``fmt``."""
    if fmt == "npy":
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", y)
        return tmp_path / "x.npy", str(tmp_path / "y.npy")
    if fmt == "safetensors":
        save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
        return tmp_path / "d.safetensors", "y"  # an entry of the target file
    rows = ["a,b,label"] + [f"{u!r},{v!r},{k}" for (u, v), k in zip(x.tolist(), y.tolist())]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "d.csv", "label"  # a column name


def _train(tmp_path, out, *sets):
    args = ["train", "--out", str(tmp_path / out), *TINY]
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "csv"])
def test_vectors_train_with_a_heldout_split(tmp_path, capsys, one_thread, fmt):
    x, y = _vectors()
    path, labels = _write(fmt, tmp_path, x, y)
    data = load_array_data(str(path), labels)
    assert torch.equal(data.labels, torch.from_numpy(y))  # the labels read equal the written ones
    assert torch.allclose(data.x, torch.from_numpy(x), rtol=1e-6, atol=0)
    sets = ("data.kind=array", f"data.target_path={path}", f"data.labels={labels}", "data.heldout_fraction=0.25")
    assert _train(tmp_path, "run", *sets) == 0, capsys.readouterr().err
    split = json.loads((tmp_path / "run" / "split.json").read_text())["target"]
    train, held = split["train"], split["heldout"]
    assert len(held) == 10 and len(train) == 30 and not set(train) & set(held) and set(train) | set(held) == set(
        range(N))
    # the same seed gives the same split in a second run; another seed another split
    assert _train(tmp_path, "again", *sets) == 0
    assert json.loads((tmp_path / "again" / "split.json").read_text())["target"]["heldout"] == held
    assert split_indices(N, 0.25, seed=1)[1].tolist() != held
    # the run rebuilt from its checkpoint (what `flowprobe diagnose RUN` does) trains on and holds out those rows
    run = load_run(tmp_path / "run")
    x_train, pairs, _ = run_training_data(run, "cpu")
    x_held, why = heldout_of(run)
    assert pairs is None and torch.equal(x_train, data.x[train]) and torch.equal(x_held, data.x[held]), why
    assert torch.equal(run.target.labels, data.labels[train])


def test_csv_without_header_labels_by_index_and_names(tmp_path):
    (tmp_path / "h.csv").write_text("1.5,T,2\n-0.5,B,3\n\n2.0,T,4e-1\n")  # a blank line is skipped
    data = load_array_data(str(tmp_path / "h.csv"), "1")
    assert data.classes == ["B", "T"] and data.labels.tolist() == [1, 0, 1]
    assert torch.equal(data.x, torch.tensor([[1.5, 2.0], [-0.5, 3.0], [2.0, 0.4]]))


def test_image_folder_trains_with_folder_labels(tmp_path, capsys, one_thread):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(5):
            size = (10, 12) if i % 2 else (8, 8)  # mixed sizes: centre crop + resize to the resolution
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    sets = ("data.kind=image_folder", f"data.target_path={tmp_path / 'imgs'}", "data.resolution=4",
            "data.heldout_fraction=0.2", "sample.plot=false")
    assert _train(tmp_path, "run", *sets) == 0, capsys.readouterr().err
    run = load_run(tmp_path / "run")
    split = json.loads((tmp_path / "run" / "split.json").read_text())["target"]
    assert split["classes"] == ["cats", "dogs"] and len(split["heldout"]) == 2
    labels = torch.tensor([0] * 5 + [1] * 5)  # sorted files: cats/0..4, dogs/0..4
    assert torch.equal(run.target.labels, labels[split["train"]])
    assert tuple(run.target.data.shape) == (8, 3, 4, 4) and run.target.data.dtype == torch.uint8
    x_held, _ = heldout_of(run)
    assert x_held.shape == (2, 3, 4, 4) and float(x_held.abs().max()) <= 1.0


def test_standardize_stores_the_statistics_and_sample_undoes_them(tmp_path, capsys, one_thread):
    from flowprobe.runs.jobs import sample_checkpoint
    from flowprobe.runs.load import load_model
    from flowprobe.solvers import integrate

    x, _ = _vectors()
    x = x * np.array([100.0, 0.01], dtype=np.float32) + np.array([5.0, -2.0], dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    assert _train(tmp_path, "run", "data.kind=array", f"data.target_path={tmp_path / 'x.npy'}",
                  "data.heldout_fraction=0.25", "data.standardize=true") == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "split.json").read_text())["target"]
    rows = x[record["train"]].astype(np.float64)
    assert np.allclose(record["standardize"]["mean"], rows.mean(0), rtol=1e-9)
    assert np.allclose(record["standardize"]["std"], rows.std(0), rtol=1e-9)
    run = load_run(tmp_path / "run")
    z = run.target.data.double()
    assert torch.allclose(z.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    res, info, _ = sample_checkpoint(tmp_path / "run", n=8, steps=2, seed=5, device="cpu")
    net, _ = load_model(tmp_path / "run")
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        raw = integrate(net, x0, steps=2).x.double()
    mean, std = torch.tensor(record["standardize"]["mean"]), torch.tensor(record["standardize"]["std"])
    assert "unstandardized" in info and torch.allclose(res.x.double(), raw * std + mean, rtol=1e-5)
    # a target file changed since training: its held-out rows are no longer trusted
    np.save(tmp_path / "x.npy", x[::-1].copy())
    held, why = heldout_of(load_run(tmp_path / "run"))
    assert held is None and "changed since training" in why


def test_a_source_file_paired_row_by_row(tmp_path, capsys, one_thread):
    """A source file with fixed_pairs: both files share the target's split and row i pairs with row i."""
    x, _ = _vectors()
    s = x[:, ::-1].copy() - 10.0
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "s.npy", s)
    assert _train(tmp_path, "run", "data.kind=array", f"data.target_path={tmp_path / 'x.npy'}",
                  f"data.source_path={tmp_path / 's.npy'}", "coupling.kind=fixed_pairs",
                  "data.heldout_fraction=0.25") == 0, capsys.readouterr().err
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["source"]["heldout"] == split["target"]["heldout"]
    run = load_run(tmp_path / "run")
    pairing = run.coupling.sample(8, torch.Generator().manual_seed(0))
    assert torch.equal(pairing.x0, pairing.x1.flip(-1) - 10.0)
    _, pairs, _ = run_training_data(run, "cpu")
    assert torch.equal(pairs.x1, torch.from_numpy(x[split["target"]["train"]]))


def _bad_cases(tmp_path):
    x, y = _vectors()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "short.npy", y[:-3])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,oops\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "none.npy", np.zeros((0, 2), np.float32))
    own = "data.kind=array"
    return [
        ((own, f"data.target_path={tmp_path / 'missing.npy'}"), "missing.npy"),
        ((own, f"data.target_path={tmp_path / 'bad.csv'}"), "row 3, column 2 ('b'): 'oops' is not a number"),
        ((own, f"data.target_path={tmp_path / 'x.npy'}", f"data.labels={tmp_path / 'short.npy'}"),
         "data.labels: 37 labels"),
        ((own, f"data.target_path={tmp_path / 'x.npy'}", "data.heldout_fraction=1.5"), "data.heldout_fraction"),
        ((own, f"data.target_path={tmp_path / 'x.npy'}", "data.heldout_fraction=0.001"), "data.heldout_fraction"),
        ((own, f"data.target_path={tmp_path / 'empty.csv'}"), "empty.csv is empty"),
        ((own, f"data.target_path={tmp_path / 'empty.npy'}"), "empty.npy is empty"),
        ((own, f"data.target_path={tmp_path / 'none.npy'}"), "none.npy holds no samples"),
        ((own,), "data.target_path"),
        (("data.kind=image_folder", f"data.target_path={tmp_path / 'nofolder'}"), "nofolder"),
        ((f"data.target_path={tmp_path / 'x.npy'}",), "data.target_path: only read with data.kind"),
    ]


def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
    for sets, words in _bad_cases(tmp_path):
        assert _train(tmp_path, "run", *sets) == 2, sets
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flowprobe: error:") and words in err[0], (sets, err)
        assert not (tmp_path / "run" / "checkpoints").exists()
