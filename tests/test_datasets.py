"""gpumlp.data.datasets: .npz, .csv/.tsv, IDX directories of any size and class count, known sets
downloaded from a real loopback HTTP server into the cache, and label classes."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import loopback_server

from gpumlp.data import DataError
from gpumlp.data import mnist as mnist_mod
from gpumlp.data.datasets import (
    KNOWN_SETS,
    decode_labels,
    encode_labels,
    holdout,
    load_idx_dir,
    load_known,
    load_npz,
    load_path,
    load_table,
    table_features,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (.ci/run installs it)
needs_fashion = pytest.mark.skipif(
    not (FASHION / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's env or writes into ~/.cache."""
    for var in ("GPUMLP_DATA", "GPUMLP_MNIST_MIRRORS", "GPUMLP_FASHION_MNIST_MIRRORS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPUMLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mnist_mod, "DOWNLOAD_TIMEOUT_S", 10.0)


def write_idx(path: Path, a: np.ndarray) -> Path:
    """``a`` (uint8) as an IDX file, gzipped when the name ends in .gz."""
    data = bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


def letters_dir(d: Path, side: int = 8, classes: int = 26, names=("train", "t10k"), prefix="") -> Path:
    """An IDX set of side x side images, ``classes`` classes (1..classes, as EMNIST letters)."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for split, n in zip(names, (260, 52)):
        y = (np.arange(n) % classes + 1).astype(np.uint8)
        x = rng.integers(0, 40, (n, side, side), dtype=np.uint8)
        x[np.arange(n), y % side, (y // side) % side] = 255  # a class-specific bright pixel
        write_idx(d / f"{prefix}{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{prefix}{split}-labels-idx1-ubyte.gz", y)
    return d


# ---------------------------------------------------------------- .npz
def test_npz_both_layouts_and_test_split(tmp_path):
    X, y = np.arange(20.0).reshape(10, 2), np.array([3, 7] * 5)
    np.savez(tmp_path / "a.npz", X=X, y=y)
    np.savez(tmp_path / "b.npz", x_train=X, y_train=y, x_test=X[:4], y_test=y[:4])
    a, b = load_npz(tmp_path / "a.npz"), load_path(tmp_path / "b.npz")
    assert a.x_test is None and a.x_train.shape == (10, 2) and not a.pixels
    assert b.x_test.shape == (4, 2) and b.y_test.tolist() == [3, 7, 3, 7]
    np.savez(tmp_path / "c.npz", features=X)
    with pytest.raises(DataError, match=r"holds arrays \['features'\]; expected 'X' and 'y'"):
        load_npz(tmp_path / "c.npz")


def test_a_damaged_npz_is_a_data_error(tmp_path):
    X, y = np.arange(20.0).reshape(10, 2), np.array([3, 7] * 5)
    np.savez(tmp_path / "a.npz", X=X, y=y)
    damaged = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(damaged[:30] + b"\x00" * 40 + damaged[70:])  # a broken zip header
    with pytest.raises(DataError, match=r"d.npz: not a readable .npz file"):
        load_npz(tmp_path / "d.npz")


def test_npz_images_are_flattened_and_count_mismatch_is_an_error(tmp_path):
    np.savez(tmp_path / "img.npz", X=np.zeros((6, 5, 5), np.uint8), y=np.arange(6))
    d = load_npz(tmp_path / "img.npz")
    assert d.x_train.shape == (6, 25) and d.pixels
    np.savez(tmp_path / "bad.npz", X=np.zeros((6, 3)), y=np.arange(5))
    with pytest.raises(DataError, match="6 train samples but 5 labels"):
        load_npz(tmp_path / "bad.npz")


# ---------------------------------------------------------------- .csv / .tsv
def test_csv_with_header_label_by_name_and_string_labels(tmp_path):
    p = tmp_path / "iris.csv"
    p.write_text("a,species,b\n1.5,setosa,2\n3,virginica,4.25\n5,setosa,6\n")
    d = load_table(p, "species")
    assert d.x_train.tolist() == [[1.5, 2.0], [3.0, 4.25], [5.0, 6.0]]
    assert d.y_train.tolist() == ["setosa", "virginica", "setosa"]
    with pytest.raises(DataError, match="no label column 'kind'.*columns: a, species, b"):
        load_table(p, "kind")


def test_tsv_without_header_default_last_column_and_index(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("1\t2\t0\n3\t4\t1\n5\t6\t1\n")
    last, first = load_table(p), load_table(p, "0")
    assert last.y_train.tolist() == [0, 1, 1] and last.y_train.dtype.kind == "i"
    assert first.y_train.tolist() == [1, 3, 5] and first.x_train[:, 0].tolist() == [2, 4, 6]
    assert load_table(p, -2).y_train.tolist() == [2, 4, 6]


def test_csv_bad_rows_and_non_numeric_features(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("x,y,label\n1,2,a\n3,b\n")
    with pytest.raises(DataError, match="row 3 has 2 fields, not 3"):
        load_table(p)
    p.write_text("x,y,label\n1,red,a\n")
    with pytest.raises(DataError, match="feature value 'red' in row 1 is not a number"):
        load_table(p)


def test_table_features_drops_the_label_column_only_when_present(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("a,b,label\n1,2,x\n3,4,y\n")
    assert table_features(p, 2, "label").tolist() == [[1, 2], [3, 4]]
    q = tmp_path / "q.csv"
    q.write_text("1,2\n3,4\n")
    assert table_features(q, 2).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(DataError, match="rows have 2 columns; the model takes 5 features"):
        table_features(q, 5)


# ---------------------------------------------------------------- IDX directories
def test_idx_dir_any_image_size_and_class_count(tmp_path):
    d = load_idx_dir(letters_dir(tmp_path / "letters"))
    assert d.x_train.shape == (260, 64) and d.x_test.shape == (52, 64) and d.pixels
    classes, ids = encode_labels(d.y_train)
    assert classes.tolist() == list(range(1, 27)) and ids.max() == 25


def test_idx_dir_emnist_names_and_explicit_names(tmp_path):
    d = letters_dir(tmp_path / "em", names=("train", "test"), prefix="emnist-letters-")
    assert load_idx_dir(d).x_test.shape == (52, 64)
    names = ["emnist-letters-train-images-idx3-ubyte.gz", "emnist-letters-train-labels-idx1-ubyte.gz"]
    assert load_idx_dir(d, names).x_test is None


def test_idx_dir_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no IDX x_train and y_train found"):
        load_idx_dir(empty)
    assert list(empty.iterdir()) == []  # nothing is ever downloaded into a user directory
    two = letters_dir(tmp_path / "two")
    letters_dir(two, prefix="emnist-digits-")
    with pytest.raises(DataError, match="several x_(train|test) IDX files"):
        load_idx_dir(two)
    with pytest.raises(DataError, match="does not exist"):
        load_idx_dir(tmp_path / "nope")


@pytest.mark.parametrize(
    "broken, problem",
    [
        ("train-labels-idx1-ubyte.gz", r"train-labels-idx1-ubyte.gz: labels must be 1-D .*swapped"),
        ("t10k-images-idx3-ubyte.gz", r"t10k-images-idx3-ubyte.gz has 7 images but .* 52 labels"),
    ],
)
def test_mnist_and_any_idx_dir_read_through_one_loader(tmp_path, broken, problem):
    """load_mnist and load_idx_dir read a directory the same way: the same arrays, the same errors."""
    from gpumlp.data import load_mnist

    d = letters_dir(tmp_path / "m", side=28, classes=9)  # labels 1..9: valid MNIST labels
    m, ds = load_mnist(d, download=False, cache=False), load_idx_dir(d)
    assert np.array_equal(m.x_train, ds.x_train) and np.array_equal(m.y_test, ds.y_test)
    bad = np.zeros((7, 28, 28) if "images" in broken else (260, 2), np.uint8)
    write_idx(d / broken, bad)
    for load in (lambda: load_mnist(d, download=False, cache=False), lambda: load_idx_dir(d)):
        with pytest.raises(DataError, match=problem):
            load()


# ---------------------------------------------------------------- labels and splits
def test_labels_map_to_classes_and_back():
    classes, ids = encode_labels(np.array(["dog", "cat", "dog", "emu"]))
    assert classes.tolist() == ["cat", "dog", "emu"] and ids.tolist() == [1, 0, 1, 2]
    assert decode_labels(classes, [2, 0]).tolist() == ["emu", "cat"]
    assert encode_labels([7.0, 3.0])[0].dtype.kind == "i"  # whole-number floats are ints
    with pytest.raises(DataError, match="label 'owl' is not one of the 3 classes"):
        encode_labels(np.array(["owl"]), classes)
    with pytest.raises(DataError, match="cannot match the model's classes"):
        encode_labels(np.array([1]), classes)


def test_holdout_is_seeded_disjoint_and_keeps_an_existing_test_split(tmp_path):
    np.savez(tmp_path / "a.npz", X=np.arange(100.0).reshape(50, 2), y=np.arange(50) % 2)
    d = load_npz(tmp_path / "a.npz")
    h1, h2 = holdout(d, 0.2, seed=3), holdout(d, 0.2, seed=3)
    assert len(h1.y_test) == 10 and np.array_equal(h1.x_test, h2.x_test)
    seen = set(h1.x_train[:, 0]) | set(h1.x_test[:, 0])
    assert len(seen) == 50 and not set(h1.x_train[:, 0]) & set(h1.x_test[:, 0])
    assert holdout(h1, 0.5, seed=0) is h1
    with pytest.raises(DataError, match="leaves 0 test rows"):
        holdout(d, 0.001, seed=0)


# ---------------------------------------------------------------- known sets from a loopback mirror
@pytest.fixture(scope="module")
def fashion_mirror(tmp_path_factory):
    """The loopback mirror of :func:`serve_fashion`'s base URL."""
    yield from serve_fashion(tmp_path_factory)


def serve_fashion(tmp_path_factory):
    """127.0.0.1 serving /good/ (Debian's Fashion-MNIST files) and /bad/ (altered copies); yields its URL."""
    if not (FASHION / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("fmirror")
    (root / "good").mkdir()
    (root / "bad").mkdir()
    for name in KNOWN_SETS["fashion-mnist"].md5:
        shutil.copyfile(FASHION / name, root / "good" / name)
        (root / "bad" / name).write_bytes(
            gzip.compress(gzip.decompress((FASHION / name).read_bytes()) + b"x", compresslevel=1)
        )
    with loopback_server(root) as url:
        yield url


@needs_fashion
def test_known_set_downloads_into_the_cache_verified_by_content(tmp_path, fashion_mirror, monkeypatch):
    """Debian recompressed the files (other archive md5s): the md5 of the IDX bytes still verifies them."""
    monkeypatch.setenv("GPUMLP_FASHION_MNIST_MIRRORS", f"{fashion_mirror}/missing/,{fashion_mirror}/good/")
    monkeypatch.chdir(tmp_path)
    d = load_known("fashion-mnist")
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)
    assert np.bincount(d.y_train).tolist() == [6000] * 10 and d.pixels
    cache = tmp_path / "cache" / "fashion-mnist"
    assert d.source == str(cache) and sorted(p.name for p in cache.iterdir()) == sorted(
        KNOWN_SETS["fashion-mnist"].md5
    )
    assert list(tmp_path.glob("*.gz")) == []  # nothing written into the working directory


@needs_fashion
def test_known_set_rejects_altered_files_and_leaves_nothing(tmp_path, fashion_mirror):
    with pytest.raises(DataError, match="md5 mismatch for train-images-idx3-ubyte.gz") as exc:
        load_known("fashion-mnist", mirrors=[f"{fashion_mirror}/bad/"])
    assert "GPUMLP_FASHION_MNIST_MIRRORS" in str(exc.value)
    assert list((tmp_path / "cache" / "fashion-mnist").iterdir()) == []


def test_unknown_data_set_is_a_clear_error():
    with pytest.raises(DataError, match="unknown data set 'cifar'; known: mnist, fashion-mnist, kmnist"):
        load_known("cifar")
