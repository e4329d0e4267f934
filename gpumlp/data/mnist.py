"""MNIST: find the four IDX files, validate them, cache a compressed .npz, download if absent.

Search order when no ``data_dir`` is given (the first directory holding all four
files, ``.gz`` or raw, wins): ``$GPUMLP_DATA`` -> ``./data/mnist`` (cwd) -> the
checkout's shipped ``data/mnist`` -> ``$GPUMLP_CACHE/mnist`` (default
``~/.cache/gpumlp/mnist``) -> download into that cache directory. Downloads try each
mirror in turn, verify md5 before an atomic rename, and time out after 30 s.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpumlp.atomic import atomic_write
from gpumlp.data.idx import DataError, read_idx_splits

log = logging.getLogger(__name__)

# field of MNIST -> file stem (the files are "<stem>.gz" or raw "<stem>")
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DEFAULT_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
CACHE_NAME = "mnist.npz"
CACHE_KEY = "source_sha256"  # the cache's array holding _source_key() of the files it was built from
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


@dataclass(frozen=True, eq=False)
class MNIST:
    """MNIST arrays: x_* (N, 784) uint8 pixels 0..255, y_* (N,) int64 labels 0..9; ``source``: the dir."""

    x_train: np.ndarray  # (60000, 784) uint8
    y_train: np.ndarray  # (60000,) int64
    x_test: np.ndarray  # (10000, 784) uint8
    y_test: np.ndarray  # (10000,) int64
    source: str

    def __repr__(self) -> str:
        return f"MNIST(train={len(self.y_train)}, test={len(self.y_test)}, source={self.source!r})"


# ---------------------------------------------------------------- locating files


def _find_file(directory: Path, stem: str) -> Path | None:
    """The raw file if present (faster to read), else the .gz, else None."""
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def _missing(directory: Path) -> list[str]:
    """Stems of the four MNIST files that ``directory`` lacks."""
    return [stem for stem in FILES.values() if _find_file(directory, stem) is None]


def cache_root() -> Path:
    """The download cache: ``$GPUMLP_CACHE``, default ``~/.cache/gpumlp`` (one subdirectory per data set)."""
    root = os.environ.get("GPUMLP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "gpumlp"


def default_cache_dir() -> Path:
    """Where MNIST downloads go: ``$GPUMLP_CACHE/mnist``, default ``~/.cache/gpumlp/mnist``."""
    return cache_root() / "mnist"


def _search_dirs() -> list[Path]:
    """Candidate directories in search order, duplicates removed."""
    dirs = []
    if os.environ.get("GPUMLP_DATA"):
        dirs.append(Path(os.environ["GPUMLP_DATA"]).expanduser())
    dirs.append(Path.cwd() / "data" / "mnist")
    dirs.append(Path(__file__).resolve().parents[2] / "data" / "mnist")  # the checkout's shipped copy
    dirs.append(default_cache_dir())
    seen, out = set(), []
    for d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


# ---------------------------------------------------------------- downloading


def _mirrors(
    mirrors: Sequence[str] | None, default: Sequence[str] = DEFAULT_MIRRORS, env: str = "GPUMLP_MNIST_MIRRORS"
) -> list[str]:
    """Explicit mirrors, else ``$env`` (comma-separated base URLs), else ``default``."""
    if mirrors is None:
        mirrors = [m.strip() for m in os.environ.get(env, "").split(",") if m.strip()] or list(default)
    if isinstance(mirrors, str):
        raise DataError(f"mirrors must be a list of base URLs, not the string {mirrors!r}; wrap it in a list")
    return list(mirrors)


def _download_file(url: str, dest: Path, md5: str | tuple[str, str | None], timeout: float) -> None:
    """Stream ``url`` to a temp file beside ``dest``, check its md5, then rename it into place atomically.

    ``md5`` is the archive's md5, or (archive md5, md5 of the gunzipped bytes): a repackaged copy
    (recompressed, so another archive md5) is accepted when its content md5 matches."""
    want, content_md5 = (md5, None) if isinstance(md5, str) else md5
    digest = hashlib.md5()
    req = urllib.request.Request(url, headers={"User-Agent": "gpumlp"})
    with atomic_write(dest) as f, urllib.request.urlopen(req, timeout=timeout) as resp:
        while chunk := resp.read(_CHUNK):
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        got = digest.hexdigest()
        if got != want and not (content_md5 and _gunzip_md5(Path(f.name)) == content_md5):
            raise DataError(f"md5 mismatch for {dest.name} from {url}: expected {want}, got {got}")


def _gunzip_md5(path: Path) -> str | None:
    """md5 of a gzip file's decompressed bytes, or None when it is not valid gzip."""
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def download_files(
    target: str | os.PathLike,
    md5s: Mapping[str, str | tuple[str, str | None]],
    mirrors: Sequence[str] | None = None,
    default_mirrors: Sequence[str] = DEFAULT_MIRRORS,
    env: str = "GPUMLP_MNIST_MIRRORS",
    what: str = "MNIST",
) -> Path:
    """Download the files of ``md5s`` (name -> md5) that ``target`` lacks (as ``name`` or without
    ``.gz``), trying each mirror (``mirrors``, else ``$env``, else ``default_mirrors``); md5-verified,
    atomic. Returns ``target``."""
    target = Path(target).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"{target}: cannot create the {what} download directory ({e}); pick a writable dir"
        raise DataError(msg) from e
    urls = _mirrors(mirrors, default_mirrors, env)
    for name, md5 in md5s.items():
        if _find_file(target, name.removesuffix(".gz")) is not None:
            continue
        failures = []
        for base in urls:
            url = base.rstrip("/") + "/" + name
            log.info("downloading %s", url)
            try:
                _download_file(url, target / name, md5, DOWNLOAD_TIMEOUT_S)
                break
            except (OSError, DataError) as e:  # URLError, HTTPError, timeouts are OSErrors
                failures.append(f"  {url}: {e}")
        else:
            raise DataError(
                f"could not download {name} into {target}; every mirror failed:\n"
                + "\n".join(failures)
                + f"\nFix: check the network/proxy, set {env}=url1,url2 to other mirrors, "
                f"or copy the {what} .gz files into {target} by hand"
                + (" (or set GPUMLP_DATA)" if what == "MNIST" else "")
            )
    return target


def download_mnist(target: str | os.PathLike, mirrors: Sequence[str] | None = None) -> Path:
    """Download the missing MNIST .gz files into ``target`` (md5-verified, atomic); returns the dir."""
    return download_files(target, MD5, mirrors)


# ---------------------------------------------------------------- parsing and validation


def _check_split(images: np.ndarray, labels: np.ndarray, img_name: str, lbl_name: str) -> None:
    """Raise DataError unless images are (N, 28, 28) or (N, 784) and labels (N,) in 0..9."""
    if images.ndim == 3:
        shape_ok = images.shape[1:] == (28, 28)
    else:
        shape_ok = images.ndim == 2 and images.shape[1] == 784
    if not shape_ok:
        raise DataError(
            f"{img_name}: images must be 28x28 (N, 28, 28), got shape {images.shape}; not an MNIST image file"
        )
    if labels.ndim != 1:
        raise DataError(f"{lbl_name}: labels must be 1-D, got shape {labels.shape}; not an MNIST label file")
    if len(images) == 0:
        raise DataError(f"{img_name} holds 0 images; an empty split cannot train or test a model")
    if len(images) != len(labels):
        raise DataError(
            f"{img_name} has {len(images)} images but {lbl_name} has {len(labels)} labels; "
            "the counts must match (mixed-up or truncated files?)"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        bad = int(np.flatnonzero((labels < 0) | (labels > 9))[0])
        raise DataError(
            f"{lbl_name}: labels must be in 0..9, found {int(labels[bad])} at index {bad}; corrupt label file"
        )


def _read_dir(directory: Path) -> dict[str, np.ndarray]:
    """Read and validate the four IDX files of ``directory`` -> the MNIST arrays by field name."""
    paths = {k: _find_file(directory, stem) for k, stem in FILES.items()}
    raw = read_idx_splits(paths)
    out = {}
    for split in ("train", "test"):
        xi, yi = f"x_{split}", f"y_{split}"
        _check_split(raw[xi], raw[yi], str(paths[xi]), str(paths[yi]))
        out[xi] = np.ascontiguousarray(raw[xi].reshape(len(raw[xi]), 784))
        out[yi] = raw[yi].astype(np.int64)
    return out


# ---------------------------------------------------------------- npz cache


def _source_key(directory: Path) -> np.ndarray:
    """SHA-256 of the four IDX files' names and bytes, as uint8: what the cache was built from.
    Content, not mtime: ``cp -p``, ``rsync -a`` or tar can replace a file with an older mtime."""
    h = hashlib.sha256()
    for stem in FILES.values():
        p = _find_file(directory, stem)
        h.update(f"{p.name}\0".encode())
        h.update(p.read_bytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def _load_npz(directory: Path, key: np.ndarray) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``mnist.npz`` was built from IDX files with content ``key`` and is valid,
    else None (never raises)."""
    npz = directory / CACHE_NAME
    if not npz.is_file():
        return None
    try:
        with np.load(npz, allow_pickle=False) as z:
            if CACHE_KEY not in z.files or not np.array_equal(z[CACHE_KEY], key):
                return None
            arrays = {k: z[k] for k in FILES}
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.dtype != np.uint8 or y.dtype != np.int64 or x.ndim != 2:
                raise DataError(f"{npz}: wrong dtypes or shapes in the cache")
            _check_split(x, y, str(npz), str(npz))
        return arrays
    except Exception as e:  # a corrupt cache is never fatal: zip, pickle, key, dtype errors alike
        log.warning("ignoring unusable MNIST cache %s (%s); rebuilding it", npz, e)
        return None


def _save_npz(directory: Path, arrays: dict[str, np.ndarray], key: np.ndarray) -> None:
    """Write ``mnist.npz`` (with the source ``key``) atomically if ``directory`` is writable;
    failures are only logged."""
    try:
        with atomic_write(directory / CACHE_NAME) as f:
            np.savez_compressed(f, **arrays, **{CACHE_KEY: key})
    except OSError as e:
        log.debug("not caching MNIST in %s (%s)", directory, e)


# ---------------------------------------------------------------- entry point


def _resolve_dir(data_dir: str | os.PathLike | None, download: bool, mirrors: Sequence[str] | None) -> Path:
    """The directory to load from, downloading into it first when needed and allowed."""
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        missing = _missing(directory)
        if not missing:
            return directory
        if not download:
            raise DataError(
                f"{directory}: missing MNIST files {', '.join(missing)} (.gz or raw); copy them there, "
                "or call load_mnist(download=True), or drop data_dir to use the default search"
            )
        return download_mnist(directory, mirrors)
    searched = _search_dirs()
    for d in searched:
        if not _missing(d):
            return d
    if not download:
        raise DataError(
            "MNIST files not found; searched "
            + ", ".join(str(d) for d in searched)
            + ". Fix: set GPUMLP_DATA to a directory holding the four IDX files, pass data_dir, "
            "or call load_mnist(download=True)"
        )
    return download_mnist(default_cache_dir(), mirrors)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    cache: bool = True,
) -> MNIST:
    """Load MNIST -> MNIST(x_train (60000,784) uint8, y_train (60000,) int64, x_test, y_test, source)."""
    directory = _resolve_dir(data_dir, download, mirrors)
    key = _source_key(directory) if cache else None
    arrays = _load_npz(directory, key) if cache else None
    if arrays is None:
        arrays = _read_dir(directory)
        if cache:
            _save_npz(directory, arrays, key)
    return MNIST(**arrays, source=str(directory))
