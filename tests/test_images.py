"""Image loaders (tars, folders, CIFAR batches), the decode cache, the GPU-style sampler and pairings."""

from __future__ import annotations

import io
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowprobe.data import image_files, images as im
from flowprobe.report.images import to_uint8
from flowprobe.solvers import push_forward


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless, so decoded pixels are exact
    return buf.getvalue()


def _random_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _write_tar(path: Path, members: dict[str, bytes], order: list[str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name in order or list(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tf.addfile(info, io.BytesIO(members[name]))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FLOWPROBE_CACHE", str(d))
    return d


def test_flat_tar_sorted_order_and_limit(tmp_path, cache):
    imgs = _random_images(5, 8, 8)
    names = [f"{i:06d}.png" for i in range(5)]
    # written in reverse order: the loader must sort by name
    _write_tar(tmp_path / "flat.tar.gz", {n: _png_bytes(a) for n, a in zip(names, imgs)}, order=names[::-1])
    d = im.load_images(tmp_path / "flat.tar.gz", kind="plain")
    assert d.images.dtype == np.uint8 and d.images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(d.images, imgs)
    assert d.labels is None
    d3 = im.load_images(tmp_path / "flat.tar.gz", kind="plain", limit=3)
    np.testing.assert_array_equal(d3.images, imgs[:3])


def test_class_tar_gives_labels(tmp_path, cache):
    imgs = _random_images(4, 4, 4, seed=1)
    members = {"dog/0001.png": imgs[2], "cat/0001.png": imgs[0], "cat/0002.png": imgs[1], "dog/0000.png": imgs[3]}
    _write_tar(tmp_path / "cls.tar.gz", {k: _png_bytes(v) for k, v in members.items()})
    d = im.load_images(tmp_path / "cls.tar.gz")
    assert d.classes == ["cat", "dog"]
    np.testing.assert_array_equal(d.labels, [0, 0, 1, 1])
    # sorted member order: cat/0001, cat/0002, dog/0000, dog/0001
    np.testing.assert_array_equal(d.images, np.stack([imgs[0], imgs[1], imgs[3], imgs[2]]))


def test_image_folder_and_flat_folder(tmp_path, cache):
    imgs = _random_images(3, 6, 6, seed=2)
    root = tmp_path / "folder"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    Image.fromarray(imgs[0]).save(root / "b" / "x.png")
    Image.fromarray(imgs[1]).save(root / "a" / "y.png")
    Image.fromarray(imgs[2]).save(root / "a" / "z.png")
    (root / "a" / "notes.txt").write_text("not an image")
    d = im.load_images(root)
    assert d.classes == ["a", "b"]
    np.testing.assert_array_equal(d.labels, [0, 0, 1])
    np.testing.assert_array_equal(d.images, imgs[[1, 2, 0]])

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(flat / f"{9 - i}.png")
    f = im.load_images(flat)
    assert f.labels is None
    np.testing.assert_array_equal(f.images, imgs[::-1])


def test_celeba_crop_and_resize_match_pil(tmp_path, cache):
    # an official-size 178x218 face: the standard crop is rows 20..198, then bicubic to 64
    big = _random_images(1, 218, 178, seed=3)[0]
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    Image.fromarray(big).save(folder / "000001.png")
    d = im.load_images(folder)
    expected = np.asarray(Image.fromarray(big[20:198, :, :]).resize((64, 64), Image.BICUBIC))
    assert d.images.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(d.images[0], expected)


def test_mixed_sizes_need_size(tmp_path, cache):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(_random_images(1, 8, 8)[0]).save(folder / "a.png")
    Image.fromarray(_random_images(1, 10, 12)[0]).save(folder / "b.png")
    with pytest.raises(ValueError, match="different sizes"):
        im.load_images(folder, cache=False)
    d = im.load_images(folder, size=8, cache=False)
    assert d.images.shape == (2, 8, 8, 3)


def _cifar_folder(tmp_path: Path, binary: bool) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    folder = tmp_path / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    folder.mkdir()
    xs, ys = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)  # 3 images per batch, CHW planes
        y = rng.integers(0, 10, size=3)
        xs.append(x.transpose(0, 2, 3, 1))
        ys.append(y)
        if binary:
            rec = np.concatenate([y[:, None].astype(np.uint8), x.reshape(3, -1)], axis=1)
            rec.tofile(folder / f"data_batch_{b}.bin")
        else:
            d = {b"batch_label": b"training batch", b"labels": [int(v) for v in y], b"data": x.reshape(3, -1),
                 b"filenames": [b"a.png", b"b.png", b"c.png"]}
            (folder / f"data_batch_{b}").write_bytes(pickle.dumps(d, protocol=2))
    return folder, np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("binary", [True, False])
def test_cifar_official_batches(tmp_path, cache, binary):
    folder, x, y = _cifar_folder(tmp_path, binary)
    d = im.load_images(folder)
    np.testing.assert_array_equal(d.images, x)
    np.testing.assert_array_equal(d.labels, y)


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        image_files.read_cifar_batches(tmp_path, "train")


def test_cache_round_trip(tmp_path, cache):
    imgs = _random_images(6, 8, 8, seed=5)
    src = _write_tar(tmp_path / "c.tar.gz", {f"{i}.png": _png_bytes(a) for i, a in enumerate(imgs)})
    first = im.load_images(src, kind="plain")
    files = sorted(cache.glob("*.npy"))
    assert files, "the decode must be cached"
    second = im.load_images(src, kind="plain")
    np.testing.assert_array_equal(first.images, second.images)
    # the cached file is a plain .npy: loads without pickle
    np.testing.assert_array_equal(np.load(files[0], allow_pickle=False), imgs)
    # a prefix is served from the cached longer decode, and the downsampled view is the block mean
    r = im.load_images(src, kind="plain", limit=4, resolution=4)
    block = imgs[:4].reshape(4, 4, 2, 4, 2, 3).astype(np.float64).mean(axis=(2, 4))
    np.testing.assert_array_equal(r.images, np.rint(block).astype(np.uint8))
    # a changed source (new size and mtime) is decoded again, not served stale
    imgs2 = _random_images(7, 8, 8, seed=6)
    time.sleep(0.01)
    _write_tar(src, {f"{i}.png": _png_bytes(a) for i, a in enumerate(imgs2)})
    np.testing.assert_array_equal(im.load_images(src, kind="plain").images, imgs2)


def test_dataset_names_use_flowprobe_data(tmp_path, cache, monkeypatch):
    imgs = _random_images(3, 64, 64, seed=7)
    (tmp_path / "root" / "celeba").mkdir(parents=True)
    _write_tar(tmp_path / "root" / "celeba" / "images.tar.gz", {f"{i:06d}.png": _png_bytes(a) for i, a in
                                                                enumerate(imgs)})
    monkeypatch.setenv("FLOWPROBE_DATA", str(tmp_path / "root"))
    d = im.load_images("celeba")
    np.testing.assert_array_equal(d.images, imgs)
    with pytest.raises(FileNotFoundError, match="cifar10"):
        im.load_images("cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        im.dataset_path("mnist")


def test_to_unit_and_back():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = im.to_unit(u)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    torch.testing.assert_close(x[0, 0, 0, 1], torch.tensor(1 / 127.5 - 1))
    assert torch.equal(to_uint8(x), u)


def test_image_sampler_scaling_and_flip():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (10, 3, 4, 5), generator=g, dtype=torch.uint8)
    s = im.ImageSampler(data, flip=True)
    x, idx = s.sample(200, torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and x.shape == (200, 3, 4, 5)
    ref = im.to_unit(data[idx])
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(x, ref)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(x, ref)])
    assert bool((flipped | same).all()), "every row is the image or its mirror"
    assert 60 < int(flipped.sum()) < 140, "about half are mirrored"
    # no flip: exactly the scaled images; same generator seed -> same draw
    s0 = im.ImageSampler(data, flip=False)
    x0, i0 = s0.sample(10, torch.Generator().manual_seed(3))
    assert torch.equal(x0, im.to_unit(data[i0])) and sorted(i0.tolist()) == list(range(10))
    x0b, i0b = s0.sample(10, torch.Generator().manual_seed(3))
    assert torch.equal(x0, x0b) and torch.equal(i0, i0b)


def test_indexed_pairs_follow_partner():
    data = torch.randint(0, 256, (6, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x0 = torch.randn(6, 3, 2, 2)
    partner = torch.tensor([3, 1, 0, 5, 2, 4])
    pairs = im.IndexedPairs(x0, data, partner)
    p = pairs.sample(6, torch.Generator().manual_seed(1))
    assert torch.equal(p.x0, x0[p.i0])
    assert torch.equal(p.i1, partner[p.i0])
    assert torch.equal(p.x1, im.to_unit(data[partner[p.i0]]))


def test_fixed_noise_is_fixed_per_index():
    a = im.fixed_noise(5, (3, 2, 2), seed=11)
    b = im.fixed_noise(9, (3, 2, 2), seed=11)
    assert torch.equal(a, b[:5])
    assert not torch.equal(a, im.fixed_noise(5, (3, 2, 2), seed=12))


def test_shuffled_partner_is_seeded_permutation():
    p = im.shuffled_partner(50, seed=3)
    assert sorted(p.tolist()) == list(range(50))
    assert torch.equal(p, im.shuffled_partner(50, seed=3))
    assert not torch.equal(p, torch.arange(50))


def test_ot_partner_matches_pot_and_brute_force():
    import itertools

    import ot

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(40, 3, 4, 4, generator=g, dtype=torch.float64)
    x1 = torch.randint(0, 256, (40, 3, 4, 4), generator=g, dtype=torch.uint8)
    perm = im.ot_partner(x0, x1)
    assert sorted(perm.tolist()) == list(range(40))
    # POT's exact solver on the same cost gives the same optimal cost (an independent LP solver)
    a, b = x0.reshape(40, -1), im.to_unit(x1, torch.float64).reshape(40, -1)
    C = torch.cdist(a, b).pow(2).numpy()
    w = np.full(40, 1 / 40)
    pot_cost = (ot.emd(w, w, C) * C).sum() * 40
    our_cost = C[np.arange(40), perm.numpy()].sum()
    assert our_cost == pytest.approx(pot_cost, rel=1e-10)
    # and brute force over all permutations on a tiny case
    small0, small1 = x0[:6], x1[:6]
    p6 = im.ot_partner(small0, small1)
    Cs = torch.cdist(small0.reshape(6, -1), im.to_unit(small1, torch.float64).reshape(6, -1)).pow(2)
    best = min(sum(Cs[i, q[i]].item() for i in range(6)) for q in itertools.permutations(range(6)))
    assert sum(Cs[i, p6[i]].item() for i in range(6)) == pytest.approx(best, rel=1e-12)


def test_push_forward_integrates_model_in_batches():
    # v(t, x) = c (constant field): Phi(x0) = x0 + c exactly, with any solver; batches of 3 rows cover all 7
    c = torch.full((3, 2, 2), 0.25)

    def field(t, x):
        return c.expand_as(x)

    x0 = torch.randn(7, 3, 2, 2)
    out = push_forward(field, x0, method="euler", steps=4, batch_size=3)
    torch.testing.assert_close(out, x0 + c)


# the data root as the library finds it: $FLOWPROBE_DATA, else ../shared/data (so these run wherever the data is)
SHARED = image_files.find_data_root() or Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "celeba" / "images.tar.gz").is_file(), reason="shared CelebA data not present")
def test_shared_celeba_prefix(cache):
    d = im.load_images(SHARED / "celeba" / "images.tar.gz", limit=20)
    assert d.images.shape == (20, 64, 64, 3) and d.images.dtype == np.uint8
    assert 30 < d.images.mean() < 220


@pytest.mark.skipif(not (SHARED / "cifar10" / "test.tar.gz").is_file(), reason="shared CIFAR-10 data not present")
def test_shared_cifar_test_labels(cache):
    d = im.load_images(SHARED / "cifar10" / "test.tar.gz")
    assert d.images.shape == (10000, 32, 32, 3)
    assert d.classes[0] == "airplane" and d.classes[-1] == "truck"
    np.testing.assert_array_equal(np.bincount(d.labels), np.full(10, 1000))


def test_restricted_unpickler_refuses_an_allocation_bomb(tmp_path):
    """A 143-byte pickle that asks numpy's _reconstruct for 1e8 elements before any data is refused before
    the allocation; an ordinary pickled array still loads."""
    import numpy.core.multiarray as multiarray

    class Bomb:
        def __reduce__(self):
            return (multiarray._reconstruct, (np.ndarray, (100_000_000,), b"b"))

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Bomb(), b"labels": [0]}, protocol=2))
    assert p.stat().st_size < 300
    with pytest.raises(pickle.UnpicklingError, match="shape"):
        image_files.read_cifar_batches(tmp_path, "train")
    ok = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [3, 4]}
    for k in range(1, 6):
        (tmp_path / f"data_batch_{k}").write_bytes(pickle.dumps(ok, protocol=2))
    images, labels = image_files.read_cifar_batches(tmp_path, "train")
    assert images.shape == (10, 32, 32, 3) and labels.tolist() == [3, 4] * 5
