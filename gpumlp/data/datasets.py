"""Any labelled data set as (x_train, y_train[, x_test, y_test]): .npz, .csv/.tsv, IDX dirs, known sets.

Features come back as a 2-D numeric array (N, F): uint8 pixels 0..255 for images
(``pixels=True``), else the file's numbers. Labels come back as they are in the
file (ints or strings); :func:`encode_labels` maps them to classes 0..K-1 and
:func:`decode_labels` maps predictions back. Known sets (``mnist``,
``fashion-mnist``, ``kmnist``) are found in or downloaded into the cache only
(``$GPUMLP_CACHE/<name>``), md5-verified, from mirrors that
``$GPUMLP_<NAME>_MIRRORS`` or ``mirrors=`` override.
"""

from __future__ import annotations

import csv
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpumlp.data.idx import DataError, read_idx_splits
from gpumlp.data.mnist import cache_root, download_files, load_mnist

NPZ_LAYOUTS = (("X", "y", "X_test", "y_test"), ("x_train", "y_train", "x_test", "y_test"))
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")  # fmt: skip


@dataclass(frozen=True)
class KnownSet:
    """A data set fetched by name: four IDX .gz files (MNIST names), each with the md5 of the
    published archive and of its decompressed IDX bytes (repackaged copies verify by the latter)."""

    md5: dict[str, tuple[str, str | None]]  # file name -> (archive md5, content md5 or None)
    mirrors: tuple[str, ...]


def _names(md5s: Sequence[tuple[str, str | None]]) -> dict[str, tuple[str, str | None]]:
    return {f"{stem}.gz": pair for stem, pair in zip(_MNIST_STEMS, md5s)}


KNOWN_SETS = {
    "fashion-mnist": KnownSet(
        _names([
            ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
            ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
            ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
        ]),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    ),
    "kmnist": KnownSet(
        _names([
            ("bdb82020997e1d708af4cf47b453dcf7", None),
            ("e144d726b3acfaa3e44228e80efcd344", None),
            ("5c965bf0a639b31b8f53240b1b52f4d7", None),
            ("7320c461ea6c1c855c0b718fb2a4b134", None),
        ]),
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    ),
}  # fmt: skip
DATASET_NAMES = ("mnist", *KNOWN_SETS)


@dataclass(frozen=True, eq=False)
class Dataset:
    """x_* (N, F) numeric features (uint8 0..255 when ``pixels``), y_* (N,) labels as in the file;
    x_test/y_test None when the data has no held-out split; ``source`` says where it came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    source: str
    pixels: bool = False

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self) -> str:
        test = "none" if self.y_test is None else len(self.y_test)
        return f"Dataset(train={len(self.y_train)}, test={test}, features={self.n_features}, {self.source!r})"


# ---------------------------------------------------------------- labels
def encode_labels(y, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) of any values -> (classes (K,) sorted, ids (N,) int64 in 0..K-1).

    With ``classes`` given (e.g. a trained model's), maps onto them; an unseen label is a DataError."""
    y = _as_labels(y)
    if classes is None:
        classes, ids = np.unique(y, return_inverse=True)
        return classes, ids.astype(np.int64)
    classes = np.asarray(classes)
    if (y.dtype.kind in "US") != (classes.dtype.kind in "US"):
        raise DataError(f"labels of dtype {y.dtype} cannot match the model's classes {_show(classes)}")
    pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    unseen = classes[pos] != y
    if unseen.any():
        raise DataError(
            f"label {classes_to_json(y[unseen][:1])[0]!r} is not one of the {len(classes)} classes the model "
            f"was trained on ({_show(classes)}); evaluate on data with the same labels"
        )
    return classes, pos.astype(np.int64)


def decode_labels(classes: np.ndarray, ids) -> np.ndarray:
    """Class ids (N,) -> the original label values."""
    return np.asarray(classes)[np.asarray(ids)]


def classes_to_json(classes: np.ndarray) -> list:
    """Classes as a JSON-able list (ints, floats or strings)."""
    return [c.item() if isinstance(c, np.generic) else c for c in np.asarray(classes)]


def _as_labels(y) -> np.ndarray:
    """(N,) labels; whole-number floats become ints, text digits stay text unless all are integers."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels must be 1-D (one per sample), got shape {y.shape}")
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    if y.dtype.kind == "O":
        y = y.astype(str)
    if y.dtype.kind not in "iufUS":
        raise DataError(f"labels must be numbers or strings, got dtype {y.dtype}")
    return y


def _show(classes: np.ndarray, n: int = 8) -> str:
    items = ", ".join(map(str, classes_to_json(classes[:n])))
    return items + (", ..." if len(classes) > n else "")


# ---------------------------------------------------------------- .npz
def load_npz(path: str | os.PathLike) -> Dataset:
    """An .npz with ``X``/``y`` (optionally ``X_test``/``y_test``), or ``x_train``, ``y_train``,
    ``x_test``, ``y_test``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    for xk, yk, xt, yt in NPZ_LAYOUTS:
        if xk in arrays and yk in arrays:
            has_test = xt in arrays and yt in arrays
            test = (arrays[xt], arrays[yt]) if has_test else (None, None)
            return _dataset(arrays[xk], arrays[yk], *test, source=str(path))
    raise DataError(
        f"{path}: holds arrays {sorted(arrays)}; expected 'X' and 'y' (optionally 'X_test', 'y_test') "
        "or 'x_train', 'y_train', 'x_test', 'y_test'"
    )


# ---------------------------------------------------------------- .csv / .tsv
def load_table(path: str | os.PathLike, label_column: str | int | None = None) -> Dataset:
    """A .csv/.tsv: one row per sample, numeric features, one label column (a name from the header,
    or an index, negative from the end; default the last). A header is detected when the first row
    is not all numbers."""
    path = Path(path)
    header, cells = _read_table(path)
    col = _label_index(path, label_column, header, cells.shape[1])
    y = cells[:, col].astype(str)
    if all(re.fullmatch(r"[+-]?\d+", v.strip()) for v in y):
        y = y.astype(np.int64)
    return _dataset(_numbers(path, np.delete(cells, col, axis=1)), y, None, None, source=str(path))


def table_features(
    path: str | os.PathLike, n_features: int, label_column: str | int | None = None
) -> np.ndarray:
    """The (N, n_features) feature rows of a .csv/.tsv to predict on; a table with one column more
    is taken to hold labels too, and that column (``label_column``, default the last) is dropped."""
    path = Path(path)
    header, cells = _read_table(path)
    if cells.shape[1] == n_features + 1:
        cells = np.delete(cells, _label_index(path, label_column, header, cells.shape[1]), axis=1)
    if cells.shape[1] != n_features:
        raise DataError(f"{path}: rows have {cells.shape[1]} columns; the model takes {n_features} features")
    return _numbers(path, cells)


def _read_table(path: Path) -> tuple[list[str] | None, np.ndarray]:
    """(header or None, (N, W) object array of the text cells)."""
    rows = _read_rows(path)
    header = None if all(_is_number(v) for v in rows[0]) else rows.pop(0)
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    width = len(header or rows[0])
    bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if bad is not None:
        raise DataError(
            f"{path}: row {bad + 1 + (header is not None)} has {len(rows[bad])} fields, not {width}"
        )
    return header, np.array(rows, dtype=object)


def _numbers(path: Path, cells: np.ndarray) -> np.ndarray:
    """Text cells -> float32, or a DataError naming the first cell that is not a number."""
    try:
        return cells.astype(np.float64).astype(np.float32)
    except ValueError:
        r, c = next((r, c) for r in range(cells.shape[0]) for c in range(cells.shape[1])
                    if not _is_number(cells[r, c]))  # fmt: skip
        raise DataError(
            f"{path}: feature value {cells[r, c]!r} in row {r + 1} is not a number; features must be "
            "numeric (encode categories as numbers, or pick the label column with --label-column)"
        ) from None


def _read_rows(path: Path) -> list[list[str]]:
    delimiter = TABLE_SUFFIXES.get(path.suffix.lower(), ",")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f, delimiter=delimiter) if r and any(v.strip() for v in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the table ({e})") from None
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _label_index(path: Path, label_column: str | int | None, header: list | None, width: int) -> int:
    """The label column's index from a name, an index (as int or text) or None (the last)."""
    if width < 2:
        raise DataError(f"{path}: needs at least one feature column and one label column")
    if label_column is None:
        return width - 1
    text = str(label_column).strip()
    if header is not None and text in [h.strip() for h in header]:
        return [h.strip() for h in header].index(text)
    if re.fullmatch(r"[+-]?\d+", text) and -width <= int(text) < width:
        return int(text) % width
    names = f"; columns: {', '.join(h.strip() for h in header)}" if header else " (the file has no header)"
    raise DataError(f"{path}: no label column {text!r}: give a column name or an index 0..{width - 1}{names}")


# ---------------------------------------------------------------- IDX directories
def find_idx_files(directory: Path) -> dict[str, Path]:
    """The four IDX files of a directory by role (x_train, y_train, x_test, y_test), by name:
    MNIST/Fashion-MNIST/KMNIST (``train-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) or EMNIST
    (``emnist-letters-train-images-idx3-ubyte``); raw or .gz. Test files are optional."""
    found: dict[str, list[Path]] = {}
    for p in sorted(directory.iterdir()):
        name = p.name.lower().removesuffix(".gz")
        if not p.is_file() or "idx" not in name:
            continue
        split = "train" if "train" in name else "test" if ("t10k" in name or "test" in name) else None
        kind = "x" if ("idx3" in name or "image" in name) else None
        kind = kind or ("y" if ("idx1" in name or "label" in name) else None)
        if split and kind:
            found.setdefault(f"{kind}_{split}", []).append(p)
    roles = {}
    for role, paths in found.items():
        raw = [p for p in paths if p.suffix != ".gz"]  # a raw file and its .gz are one file
        if len({p.name.removesuffix(".gz") for p in paths}) > 1:
            raise DataError(
                f"{directory}: several {role} IDX files ({', '.join(p.name for p in paths)}); keep one "
                "data set per directory or name the files with --idx-files"
            )
        roles[role] = (raw or paths)[0]
    missing = [r for r in ("x_train", "y_train") if r not in roles]
    if missing or (("x_test" in roles) != ("y_test" in roles)):
        raise DataError(
            f"{directory}: no IDX {' and '.join(missing) or 'test images/labels pair'} found; expected files "
            "like train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] (t10k-* for the test split), "
            "or name them with --idx-files"
        )
    return roles


def load_idx_dir(directory: str | os.PathLike, files: Sequence[str] | None = None) -> Dataset:
    """A directory of IDX files with images of any size (N, H, W) or vectors (N, F) and labels of
    any class count; ``files``: explicit names (train images, train labels[, test images, test labels])."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise DataError(f"data directory {directory} {what}; pass a directory holding IDX files")
    if files:
        if len(files) not in (2, 4):
            raise DataError(
                f"give 2 or 4 IDX file names (train images, train labels[, test ...]), got {len(files)}"
            )
        paths = dict(zip(("x_train", "y_train", "x_test", "y_test"), (directory / f for f in files)))
    else:
        paths = find_idx_files(directory)
    arrays = read_idx_splits(paths)
    test = (arrays.get("x_test"), arrays.get("y_test"))
    return _dataset(arrays["x_train"], arrays["y_train"], *test, source=str(directory), pixels=True)


# ---------------------------------------------------------------- known sets
def load_known(name: str, mirrors: Sequence[str] | None = None) -> Dataset:
    """A known set by name: found in ``$GPUMLP_CACHE/<name>`` or downloaded there (md5-verified).

    ``mnist`` uses the MNIST search order (shipped copy, ``$GPUMLP_DATA``, cache, download)."""
    if name == "mnist":
        m = load_mnist(mirrors=mirrors)
        return Dataset(m.x_train, m.y_train, m.x_test, m.y_test, source=m.source, pixels=True)
    if name not in KNOWN_SETS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    known = KNOWN_SETS[name]
    target = cache_root() / name
    env = "GPUMLP_" + re.sub(r"\W", "_", name.upper()) + "_MIRRORS"
    download_files(target, known.md5, mirrors, known.mirrors, env, what=name)
    return load_idx_dir(target)


def load_path(path: str | os.PathLike, label_column: str | int | None = None) -> Dataset:
    """Any supported file or directory: .npz, .csv/.tsv or a directory of IDX files."""
    p = Path(path).expanduser()
    if p.is_dir():
        return load_idx_dir(p)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return load_npz(p)
    if suffix in TABLE_SUFFIXES or suffix == ".txt":
        return load_table(p, label_column)
    raise DataError(f"{p}: unknown data format {suffix!r}; use .npz, .csv, .tsv or a directory of IDX files")


# ---------------------------------------------------------------- checks
def _dataset(x, y, x_test, y_test, *, source: str, pixels: bool | None = None) -> Dataset:
    """Validate and flatten (N, ...) features to (N, F); labels stay as given."""
    x, y = _check_pair(x, y, source, "train")
    if x_test is not None:
        x_test, y_test = _check_pair(x_test, y_test, source, "test")
        if x_test.shape[1] != x.shape[1]:
            raise DataError(
                f"{source}: test samples have {x_test.shape[1]} features, training samples {x.shape[1]}"
            )
    if pixels is None:
        pixels = x.dtype == np.uint8
    return Dataset(x, y, x_test, y_test, source=source, pixels=pixels)


def _check_pair(x, y, source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), _as_labels(np.asarray(y).reshape(-1) if np.ndim(y) == 2 and 1 in np.shape(y) else y)
    if x.ndim < 2:
        raise DataError(f"{source}: {split} features must be (N, F) or (N, H, W), got shape {x.shape}")
    if x.dtype.kind not in "uifb":
        raise DataError(f"{source}: {split} features must be numeric, got dtype {x.dtype}")
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} {split} samples but {len(y)} labels; the counts must match")
    if len(x) == 0:
        raise DataError(f"{source}: the {split} split is empty")
    return np.ascontiguousarray(x.reshape(len(x), -1)), y


def holdout(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """``ds`` itself when it has a test split, else a seeded random ``fraction`` of its rows held out."""
    if ds.x_test is not None:
        return ds
    n = len(ds.y_train)
    n_test = int(round(n * fraction))
    if not 0 < n_test < n:
        raise DataError(
            f"{ds.source} has no test split and --test-split {fraction} of {n} rows leaves {n_test} "
            "test rows; "
            "pick a fraction in (0, 1) that keeps both sides non-empty"
        )
    order = np.random.default_rng(seed).permutation(n)
    tr, te = np.sort(order[n_test:]), np.sort(order[:n_test])
    return Dataset(ds.x_train[tr], ds.y_train[tr], ds.x_train[te], ds.y_train[te], ds.source, ds.pixels)
