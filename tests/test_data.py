"""gpumlp.data: shipped MNIST, corrupt files, loopback downloads, search order, cache, preprocessing, toys."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import loopback_server

import gpumlp
from gpumlp.data import (
    DEFAULT_MIRRORS,
    MNIST,
    DataError,
    load_mnist,
    make_circles,
    make_moons,
    make_spirals,
    make_xor,
    read_idx,
    scale_pixels,
    split_train_valid,
    standardize,
)
from gpumlp.data import mnist as mnist_mod

SHIPPED = Path(gpumlp.__file__).resolve().parents[1] / "data" / "mnist"
CANONICAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
STEMS = [name[: -len(".gz")] for name in CANONICAL_MD5]
needs_shipped = pytest.mark.skipif(
    not all((SHIPPED / n).is_file() for n in CANONICAL_MD5), reason=f"MNIST not shipped in {SHIPPED}"
)


# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's env or writes into ~/.cache: home and cache live in tmp_path."""
    for var in ("GPUMLP_DATA", "GPUMLP_MNIST_MIRRORS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPUMLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mnist_mod, "DOWNLOAD_TIMEOUT_S", 10.0)  # loopback only: fail fast, never hang


def idx_bytes(a: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_idx(path: Path, a: np.ndarray) -> Path:
    """Write ``a`` as IDX, gzipped when ``path`` ends in .gz."""
    data = idx_bytes(a)
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


def tiny_mnist(d: Path, n_train: int = 12, n_test: int = 6, seed: int = 0, gz: bool = True) -> Path:
    """A small, valid MNIST-shaped directory (random pixels, labels 0..9)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{split}-labels-idx1-ubyte{ext}", np.arange(n, dtype=np.uint8) % 10)
    return d


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shipped() -> MNIST:
    if not all((SHIPPED / n).is_file() for n in CANONICAL_MD5):
        pytest.skip(f"MNIST not shipped in {SHIPPED}")
    return load_mnist(SHIPPED, download=False, cache=False)


# ---------------------------------------------------------------- the shipped real MNIST


@needs_shipped
def test_shipped_files_have_canonical_md5():
    assert {n: md5(SHIPPED / n) for n in CANONICAL_MD5} == CANONICAL_MD5


def test_shipped_mnist_shapes_dtypes_labels(shipped):
    m = shipped
    assert m.x_train.shape == (60000, 784) and m.x_train.dtype == np.uint8
    assert m.y_train.shape == (60000,) and m.y_train.dtype == np.int64
    assert m.x_test.shape == (10000, 784) and m.x_test.dtype == np.uint8
    assert m.y_test.shape == (10000,) and m.y_test.dtype == np.int64
    assert m.x_train.flags.c_contiguous
    assert np.bincount(m.y_train, minlength=10).sum() == 60000 and len(np.bincount(m.y_train)) == 10
    assert np.bincount(m.y_test, minlength=10).sum() == 10000 and len(np.bincount(m.y_test)) == 10
    assert m.y_train[0] == 5 and m.y_test[0] == 7
    assert m.x_train.min() == 0 and m.x_train.max() == 255
    assert Path(m.source) == SHIPPED


@needs_shipped
def test_default_search_finds_shipped_copy_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data/mnist here, GPUMLP_DATA unset
    m = load_mnist(download=False, cache=False)
    assert Path(m.source).resolve() == SHIPPED and m.x_test.shape == (10000, 784)


def test_read_idx_raw_and_gz_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        got = read_idx(write_idx(tmp_path / name, a))
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, a)
        got[0, 0, 0] = 1  # writable, not a view of a bytes object


# ---------------------------------------------------------------- corrupt inputs


GOOD = idx_bytes(np.zeros((3, 28, 28), np.uint8))
CORRUPT_FILES = {
    "wrong magic": (b"\x08\x03\x00\x00" + GOOD[4:], False, "bad magic"),
    "unsupported dtype": (GOOD[:2] + b"\x0d" + GOOD[3:], False, "unsupported IDX data type 0x0d"),
    "truncated data": (GOOD[:-10], False, "truncated IDX data"),
    "truncated header": (GOOD[:9], False, "truncated IDX header"),
    "empty": (b"", False, "truncated IDX file"),
    "extra bytes": (GOOD + b"\0" * 7, False, "size mismatch.*7 extra"),
    "gz not gzip": (GOOD, True, "not a gzip file"),
    "truncated gzip": (gzip.compress(GOOD)[:-20], True, "truncated or corrupt gzip"),
}


@pytest.mark.parametrize("case", list(CORRUPT_FILES))
def test_read_idx_rejects_corrupt_file(tmp_path, case):
    payload, gz, problem = CORRUPT_FILES[case]
    path = tmp_path / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(payload)
    with pytest.raises(DataError, match=problem) as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read file"):
        read_idx(tmp_path / "nope.gz")


def _corrupt_labels_count(d: Path):
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(11, dtype=np.uint8) % 10)
    return "train-labels-idx1-ubyte.gz", r"12 images but .* 11 labels"


def _corrupt_labels_range(d: Path):
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 12, 4, 5], np.uint8))
    return "t10k-labels-idx1-ubyte.gz", "labels must be in 0..9, found 12 at index 3"


def _corrupt_image_size(d: Path):
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((6, 14, 14), np.uint8))
    return "t10k-images-idx3-ubyte.gz", r"must be 28x28.*\(6, 14, 14\)"


def _corrupt_labels_2d(d: Path):
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros((12, 2), np.uint8))
    return "train-labels-idx1-ubyte.gz", "labels must be 1-D"


@pytest.mark.parametrize(
    "corrupt", [_corrupt_labels_count, _corrupt_labels_range, _corrupt_image_size, _corrupt_labels_2d]
)
def test_load_mnist_rejects_inconsistent_files(tmp_path, corrupt):
    d = tiny_mnist(tmp_path / "m")
    fname, problem = corrupt(d)
    with pytest.raises(DataError, match=problem) as exc:
        load_mnist(d, download=False)
    assert fname in str(exc.value)
    assert not (d / "mnist.npz").exists()


def test_explicit_dir_missing_files_without_download(tmp_path):
    d = tiny_mnist(tmp_path / "m")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing MNIST files t10k-labels-idx1-ubyte") as exc:
        load_mnist(d, download=False)
    assert str(d) in str(exc.value) and "download=True" in str(exc.value)


# ---------------------------------------------------------------- downloads from a loopback server


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A real HTTP server on 127.0.0.1: /good/ has the canonical gz files, /bad/ has altered copies."""
    if not all((SHIPPED / n).is_file() for n in CANONICAL_MD5):
        pytest.skip(f"MNIST not shipped in {SHIPPED}")
    root = tmp_path_factory.mktemp("mirror")
    (root / "good").mkdir()
    (root / "bad").mkdir()
    for name in CANONICAL_MD5:
        shutil.copyfile(SHIPPED / name, root / "good" / name)
        (root / "bad" / name).write_bytes((SHIPPED / name).read_bytes() + b"tampered")
    with loopback_server(root) as url:
        yield url


def test_download_verifies_and_loads(tmp_path, mirror):
    target = tmp_path / "dl"
    m = load_mnist(target, mirrors=[f"{mirror}/good/"], cache=False)
    assert Path(m.source) == target
    assert m.x_train.shape == (60000, 784) and m.y_test.shape == (10000,) and m.y_train[0] == 5
    assert sorted(p.name for p in target.iterdir()) == sorted(CANONICAL_MD5)  # no temp files left
    assert {n: md5(target / n) for n in CANONICAL_MD5} == CANONICAL_MD5
    assert all((target / n).stat().st_mode & 0o444 == 0o444 for n in CANONICAL_MD5)


def test_download_md5_mismatch_is_an_error_and_leaves_nothing(tmp_path, mirror):
    target = tmp_path / "dl"
    with pytest.raises(DataError, match="md5 mismatch for train-images-idx3-ubyte.gz") as exc:
        load_mnist(target, mirrors=[f"{mirror}/bad"])
    msg = str(exc.value)
    assert CANONICAL_MD5["train-images-idx3-ubyte.gz"] in msg and "got " in msg
    assert list(target.iterdir()) == []  # verified before the rename: no partial or bad file


def test_download_404_mirror_then_good_one(tmp_path, mirror):
    target = tmp_path / "dl"
    target.mkdir()
    for name in CANONICAL_MD5:  # only train-images is missing, so only it is fetched
        if name != "train-images-idx3-ubyte.gz":
            shutil.copyfile(SHIPPED / name, target / name)
    m = load_mnist(target, mirrors=[f"{mirror}/missing/", f"{mirror}/good/"], cache=False)
    assert md5(target / "train-images-idx3-ubyte.gz") == CANONICAL_MD5["train-images-idx3-ubyte.gz"]
    assert m.x_train.shape == (60000, 784) and m.x_test.shape == (10000, 784)


def test_download_all_mirrors_fail_lists_each(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("GPUMLP_MNIST_MIRRORS", f"{mirror}/missing/, {mirror}/bad/")
    with pytest.raises(DataError, match="every mirror failed") as exc:
        load_mnist(tmp_path / "dl")
    msg = str(exc.value)
    assert f"{mirror}/missing/train-images-idx3-ubyte.gz: HTTP Error 404" in msg
    assert f"{mirror}/bad/train-images-idx3-ubyte.gz: md5 mismatch" in msg
    assert "GPUMLP_MNIST_MIRRORS" in msg


def test_default_mirrors_and_cache_dir(tmp_path, monkeypatch):
    assert DEFAULT_MIRRORS and all(m.startswith(("http://", "https://")) for m in DEFAULT_MIRRORS)
    assert mnist_mod.default_cache_dir() == tmp_path / "cache" / "mnist"
    monkeypatch.delenv("GPUMLP_CACHE")
    assert mnist_mod.default_cache_dir() == tmp_path / "home" / ".cache" / "gpumlp" / "mnist"


# ---------------------------------------------------------------- search order and the npz cache


def test_gpumlp_data_env_wins_over_cwd(tmp_path, monkeypatch):
    env_dir = tiny_mnist(tmp_path / "env", n_train=13)
    tiny_mnist(tmp_path / "work" / "data" / "mnist", n_train=14, gz=False)
    monkeypatch.chdir(tmp_path / "work")
    assert len(load_mnist(download=False, cache=False).y_train) == 14  # ./data/mnist beats the shipped copy
    monkeypatch.setenv("GPUMLP_DATA", str(env_dir))
    m = load_mnist(download=False, cache=False)
    assert Path(m.source) == env_dir and len(m.y_train) == 13


def test_gpumlp_data_without_files_falls_through(tmp_path, monkeypatch):
    tiny_mnist(tmp_path / "work" / "data" / "mnist", n_train=14)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("GPUMLP_DATA", str(tmp_path / "empty"))
    assert len(load_mnist(download=False, cache=False).y_train) == 14


def test_npz_cache_created_reused_and_rebuilt(tmp_path):
    d = tiny_mnist(tmp_path / "m")
    first = load_mnist(d)
    npz = d / "mnist.npz"
    assert npz.is_file()
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]

    # reused while the IDX files are unchanged
    t = npz.stat().st_mtime_ns
    again = load_mnist(d)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    np.testing.assert_array_equal(again.y_test, first.y_test)
    assert npz.stat().st_mtime_ns == t  # not rewritten

    # a corrupt cache is ignored and rebuilt from (good again) IDX files
    tiny_mnist(d, seed=1)
    fresh = load_mnist(d, cache=False)
    npz.write_bytes(b"not a zip file")
    os.utime(npz, ns=(t + 10**10, t + 10**10))
    rebuilt = load_mnist(d)
    np.testing.assert_array_equal(rebuilt.x_train, fresh.x_train)
    with np.load(npz) as z:
        np.testing.assert_array_equal(z["x_train"], fresh.x_train)


def test_npz_cache_stale_when_idx_is_newer(tmp_path):
    d = tiny_mnist(tmp_path / "m", seed=0)
    load_mnist(d)
    npz = d / "mnist.npz"
    t = npz.stat().st_mtime_ns
    tiny_mnist(d, seed=1)
    for stem in STEMS:
        os.utime(d / f"{stem}.gz", ns=(t + 10**9, t + 10**9))
    m = load_mnist(d)
    np.testing.assert_array_equal(m.x_train, load_mnist(d, cache=False).x_train)
    assert npz.stat().st_mtime_ns > t  # rewritten


def test_cache_is_world_readable(tmp_path):
    d = tiny_mnist(tmp_path / "m")
    load_mnist(d)
    assert (d / "mnist.npz").stat().st_mode & 0o444 == 0o444


# ---------------------------------------------------------------- preprocessing


def test_scale_pixels_ranges(shipped):
    x = shipped.x_test
    a = scale_pixels(x, "0,1")
    b = scale_pixels(x)
    assert a.dtype == np.float32 and a.shape == x.shape and a.min() == 0.0 and a.max() == 1.0
    assert b.dtype == np.float32 and b.min() == -1.0 and b.max() == 1.0
    np.testing.assert_allclose(b, (x / 255.0 - 0.5) * 2, atol=1e-6)
    assert scale_pixels(x[:3], dtype=np.float64).dtype == np.float64
    with pytest.raises(DataError, match="unknown mode '0,255'"):
        scale_pixels(x, "0,255")


def test_split_train_valid_takes_last_rows(shipped):
    x_tr, y_tr, x_va, y_va = split_train_valid(shipped.x_train, shipped.y_train)
    assert (len(x_tr), len(y_tr), len(x_va), len(y_va)) == (55000, 55000, 5000, 5000)
    np.testing.assert_array_equal(x_va, shipped.x_train[55000:])
    np.testing.assert_array_equal(y_va, shipped.y_train[55000:])
    np.testing.assert_array_equal(y_tr, shipped.y_train[:55000])
    with pytest.raises(DataError, match="n_valid=60000"):
        split_train_valid(shipped.x_train, shipped.y_train, n_valid=60000)
    with pytest.raises(DataError, match="rows"):
        split_train_valid(shipped.x_train, shipped.y_test)


def test_standardize_zero_mean_unit_std():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, (500, 6)).astype(np.float32)
    x[:, 2] = 7.0  # a constant feature: centred, never divided by ~0
    test = rng.normal(3.0, 5.0, (50, 6)).astype(np.float32)
    xs, ts = standardize(x, test)
    assert xs.dtype == np.float32 and ts.shape == (50, 6)
    np.testing.assert_allclose(xs.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.delete(xs.std(axis=0), 2), 1.0, rtol=1e-5)
    assert np.all(xs[:, 2] == 0) and np.all(np.abs(ts[:, 2]) < 1e3)
    np.testing.assert_allclose(ts, (test - x.mean(0)) / np.where(x.std(0) < 1e-8, 1, x.std(0)), rtol=1e-4)
    assert standardize(np.arange(12).reshape(4, 3))[0].dtype == np.float32
    with pytest.raises(DataError, match="expected"):
        standardize(x, test[:, :5])


# ---------------------------------------------------------------- toy data sets

TOYS = {
    "xor": (make_xor, 2),
    "circles": (make_circles, 2),
    "moons": (make_moons, 2),
    "spirals": (make_spirals, 3),
}


@pytest.mark.parametrize("name", list(TOYS))
@pytest.mark.parametrize("n", [400, 301])
def test_toy_shapes_balance_determinism(name, n):
    make, k = TOYS[name]
    x, y = make(n=n, seed=3)
    assert x.shape == (n, 2) and x.dtype == np.float64 and y.shape == (n,) and y.dtype == np.int64
    counts = np.bincount(y)
    assert len(counts) == k and counts.max() - counts.min() <= 1
    x2, y2 = make(n=n, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(make(n=n, seed=4)[0], x)
    assert np.isfinite(x).all() and len(np.unique(x, axis=0)) > n // 2


def test_toy_geometry_and_errors():
    x, y = make_circles(n=200, noise=0.0, factor=0.3)
    r = np.hypot(x[:, 0], x[:, 1])
    np.testing.assert_allclose(r[y == 0], 1.0)
    np.testing.assert_allclose(r[y == 1], 0.3)
    x, y = make_xor(n=200, noise=0.0)
    assert np.all((np.sign(x[:, 0]) != np.sign(x[:, 1])) == (y == 1))
    x, y = make_spirals(n=500, classes=5)
    assert len(np.bincount(y)) == 5
    with pytest.raises(DataError, match="noise"):
        make_moons(noise=-1)
    with pytest.raises(DataError, match="factor"):
        make_circles(factor=1.5)
    with pytest.raises(DataError, match="classes"):
        make_spirals(n=10, classes=1)
