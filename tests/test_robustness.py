"""Bad input through the Python API, damaged files, and property-based tests (hypothesis).

Every hyper-parameter is checked at construction with its valid range; predict refuses
what it cannot compute exactly; loaded state is verified (checksum, keys, exact shapes);
the IDX reader and checkpoint reader raise only their own error types on any bytes.
The corrupted-checkpoint fuzz test has a fixed time budget (FUZZ_SECONDS).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpumlp import MLP, checkpoint
from gpumlp.data import DataError, load_mnist
from gpumlp.data.idx import parse_idx
from gpumlp.train import TrainingDiverged

FUZZ_SECONDS = float(os.environ.get("GPUMLP_FUZZ_SECONDS", "10"))
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def toy(n: int = 60, f: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, f)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(np.int64)


# ------------------------------------------------------------------ hyper-parameters at construction
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dropout=-0.1), r"dropout rate must be a finite number in \[0, 1\)"),
        (dict(dropout=float("nan")), r"dropout rate .*\[0, 1\)"),
        (dict(spec=[4, 16.9, 2]), "integer widths"),
        (dict(spec=[4, True, 2]), "integer widths"),
        (dict(seed=-1), r"seed must be an integer \[0, 4294967295\]"),
        (dict(batchnorm="no"), "batchnorm must be True or False"),
    ],
)
def test_bad_model_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(**{"spec": "4-3-2", "backend": "numpy", **kwargs})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epochs=2.5), r"epochs must be an integer >= 1, got 2.5"),
        (dict(tol=float("nan")), r"tol must be a finite number > 0"),
        (dict(patience=0, valid_split=10), r"patience must be an integer >= 1"),
        (dict(patience=2), "patience needs validation data"),
        (dict(valid_split=1.5), "valid_split must be an integer"),
        (dict(optimizer="momentum", momentum=-5), r"momentum must be a finite number in \[0, 1\)"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
    ],
)
def test_bad_fit_hyper_parameters(kwargs, message):
    model = MLP("4-3-2", backend="numpy")
    before = model.state_arrays()
    with pytest.raises(ValueError, match=message):
        model.fit(*toy(), epochs=kwargs.pop("epochs", 1), **kwargs)
    for key, a in model.state_arrays().items():
        np.testing.assert_array_equal(a, before[key])


@pytest.mark.parametrize("batch_size", [-1, 0, 1.5, None])
def test_predict_batch_size_is_validated(batch_size):
    model = MLP("4-3-2", backend="numpy")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        model.predict(toy()[0], batch_size=batch_size)


def test_float32_overflow_and_complex_input_are_refused():
    model = MLP("4-3-2", backend="numpy")
    X = toy()[0].astype(np.float64)
    X[3, 1] = 1e39  # finite in float64, inf in the model's float32
    with pytest.raises(ValueError, match="beyond the float32 range"):
        model.predict_proba(X)
    with pytest.raises(ValueError, match="beyond the float32 range"):
        model.fit(X, toy()[1], epochs=1)
    with pytest.raises(TypeError, match="complex"):
        model.predict(toy()[0] + 1j)
    assert MLP("4-3-2", dtype="float64", backend="numpy").predict(X).shape == (60,)  # fits float64


# ------------------------------------------------------------------ batch norm and a batch of one
def test_batchnorm_refuses_a_training_batch_of_one():
    model = MLP("4-8-2", batchnorm=True, backend="numpy")
    X, y = toy(n=21)
    with pytest.raises(ValueError, match="batch of 1"):  # 21 = 2 x 10 + 1: refused before training
        model.fit(X, y, epochs=1, batch_size=10)
    with pytest.raises(ValueError, match="at least 2 samples"):
        model.forward(model.be.asarray(X[:1]), train=True)
    assert model.predict(X[:1]).shape == (1,)  # eval mode uses the running statistics: fine
    model.fit(X[:20], y[:20], epochs=1, batch_size=10)


# ------------------------------------------------------------------ verified loads
def test_a_shape_1_state_never_broadcasts(tmp_path):
    model = MLP("4-8-2", batchnorm=True, backend="numpy")
    model.fit(*toy(n=40), epochs=2, batch_size=10, optimizer="adam", checkpoint_path=tmp_path / "c.npz")
    arrays, meta = checkpoint.read(tmp_path / "c.npz")
    key = next(k for k in arrays if k.endswith("running_var"))
    bad = {**arrays, key: arrays[key][:1]}
    checkpoint.write(tmp_path / "bad.npz", bad, meta)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{key}' has shape \(1,\), expected \(8,\)"):
        MLP.load(tmp_path / "bad.npz")
    opt_key = next(k for k in arrays if k.startswith("opt/"))
    checkpoint.write(tmp_path / "bad_opt.npz", {**arrays, opt_key: arrays[opt_key][:1]}, meta)
    fresh = MLP("4-8-2", batchnorm=True, backend="numpy")
    init = fresh.state_arrays()
    with pytest.raises(checkpoint.CheckpointError, match="has shape"):
        fresh.fit(*toy(n=40), epochs=3, batch_size=10, optimizer="adam",
                  checkpoint_path=tmp_path / "bad_opt.npz", resume=True)  # fmt: skip
    for key, a in fresh.state_arrays().items():  # verified before anything was loaded
        np.testing.assert_array_equal(a, init[key])


def test_checksum_catches_a_change_the_zip_crc_cannot(tmp_path):
    """Rewrite one array with a valid zip (fresh CRC) but the old checksum: refused."""
    model = MLP("4-3-2", backend="numpy")
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        payload = {k: z[k] for k in z.files}
    payload["param/0.W"] = payload["param/0.W"] + np.float32(1e-3)
    np.savez(tmp_path / "edited.npz", **payload)
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        MLP.load(tmp_path / "edited.npz")
    del payload["__sha256__"]
    np.savez(tmp_path / "stripped.npz", **payload)
    with pytest.raises(checkpoint.CheckpointError, match="checksum is missing"):
        MLP.load(tmp_path / "stripped.npz")


def test_model_file_missing_an_array_or_a_key(tmp_path):
    MLP("4-3-2", backend="numpy").save(tmp_path / "m.npz")
    arrays, meta = checkpoint.read(tmp_path / "m.npz")
    checkpoint.write(tmp_path / "a.npz", {k: v for k, v in arrays.items() if k != "param/1.b"}, meta)
    with pytest.raises(checkpoint.CheckpointError, match=r"a.npz: array 'param/1.b' is missing"):
        MLP.load(tmp_path / "a.npz")
    model_meta = {k: v for k, v in meta["model"].items() if k != "act"}
    checkpoint.write(tmp_path / "k.npz", arrays, {**meta, "model": model_meta})
    with pytest.raises(checkpoint.CheckpointError, match=r"k.npz: model config has keys"):
        MLP.load(tmp_path / "k.npz")


def test_files_written_before_checksums_still_load(tmp_path):
    """A model file of an earlier gpumlp (no checksum, no 'checksum' in its header) loads."""
    model = MLP("4-3-2", backend="numpy")
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        payload = {k: z[k] for k in z.files if k != "__sha256__"}
    meta = json.loads(payload["__meta__"].tobytes())
    del meta["checksum"]
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "old.npz", **payload)
    old = MLP.load(tmp_path / "old.npz")
    np.testing.assert_array_equal(old.predict(toy()[0]), model.predict(toy()[0]))


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("fuzz") / "c.npz"
    model = MLP("6-5-3", batchnorm=True, backend="numpy")
    X = np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32)
    model.fit(X, np.arange(40) % 3, epochs=2, batch_size=10, optimizer="adam", checkpoint_path=path)
    return path, model.state_arrays()


def test_corrupted_checkpoint_fuzz(trained_checkpoint, tmp_path):
    """Bit flips and truncations for FUZZ_SECONDS: every load either gives the exact saved
    weights or raises CheckpointError; never another exception, never different weights."""
    path, saved = trained_checkpoint
    good = path.read_bytes()
    rng = np.random.default_rng(12)
    target = tmp_path / "bad.npz"
    t_end, tries, refused = time.monotonic() + FUZZ_SECONDS, 0, 0
    while time.monotonic() < t_end:
        data = bytearray(good)
        if tries % 4 == 3:
            data = data[: int(rng.integers(0, len(good)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, len(data)))
                data[pos] ^= 1 << int(rng.integers(0, 8))
        target.write_bytes(bytes(data))
        tries += 1
        try:
            model = MLP.load(target, backend="numpy")
        except checkpoint.CheckpointError:
            refused += 1
            continue
        for key, a in model.state_arrays().items():
            np.testing.assert_array_equal(a, saved[key])
    assert tries >= 50 and refused >= tries // 2, (tries, refused)


def test_corrupted_checkpoint_resume_fuzz(trained_checkpoint, tmp_path):
    """The resume path (training state, optimizer arrays) on damaged files: CheckpointError only."""
    path, _ = trained_checkpoint
    good = path.read_bytes()
    rng = np.random.default_rng(7)
    X = np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32)
    t_end, tries = time.monotonic() + FUZZ_SECONDS / 2, 0
    while time.monotonic() < t_end:
        data = bytearray(good)
        data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        bad = tmp_path / f"r{tries % 2}.npz"
        bad.write_bytes(bytes(data))
        tries += 1
        model = MLP("6-5-3", batchnorm=True, backend="numpy")
        try:  # epochs=2: the run is complete, so fit only loads and verifies the checkpoint
            model.fit(X, np.arange(40) % 3, epochs=2, batch_size=10, optimizer="adam",
                      checkpoint_path=bad, resume=True)  # fmt: skip
        except checkpoint.CheckpointError:
            pass
    assert tries >= 20


@PROPS
@given(st.binary(max_size=400))
def test_checkpoint_reader_on_arbitrary_bytes(tmp_path, blob):
    p = tmp_path / "x.npz"
    p.write_bytes(blob)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read(p)


_dtypes = st.sampled_from([np.float32, np.float64, np.int32, np.uint8])


@PROPS
@given(
    st.dictionaries(
        st.text("abcdefgh/._0123456789", min_size=1, max_size=12).filter(lambda k: not k.startswith("__")),
        st.tuples(_dtypes, st.lists(st.integers(0, 4), max_size=3)),
        max_size=5,
    ),
    st.dictionaries(
        st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=10), st.none()), max_size=4
    ),
)
def test_checkpoint_round_trip(tmp_path, spec, meta):
    rng = np.random.default_rng(0)
    arrays = {k: (rng.standard_normal(shape) * 100).astype(dt) for k, (dt, shape) in spec.items()}
    checkpoint.write(tmp_path / "rt.npz", arrays, meta)
    got, got_meta = checkpoint.read(tmp_path / "rt.npz")
    assert got_meta == meta and got.keys() == arrays.keys()
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape
        np.testing.assert_array_equal(got[k], a)


# ------------------------------------------------------------------ API validation properties
@PROPS
@given(st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.booleans(), st.text(max_size=3)))
def test_dropout_is_accepted_exactly_in_its_range(p):
    ok = not isinstance(p, (bool, str)) and 0 <= p < 1
    if ok:
        assert MLP("4-3-2", dropout=p, backend="numpy").dropout == float(p)
    else:
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            MLP("4-3-2", dropout=p, backend="numpy")


@PROPS
@given(st.lists(st.one_of(st.integers(-3, 40), st.floats(-3, 40), st.booleans()), min_size=0, max_size=4))
def test_spec_lists_are_integers_or_refused(widths):
    valid = len(widths) >= 2 and all(type(w) is int for w in widths) and min(widths) >= 1 and widths[-1] >= 2
    if valid:
        assert MLP(widths, backend="numpy").widths == widths
    else:
        with pytest.raises(ValueError, match="bad layer spec"):
            MLP(widths, backend="numpy")


@PROPS
@given(st.one_of(st.integers(-3, 3), st.floats(-3, 3, allow_nan=False), st.booleans(), st.none()))
def test_predict_batch_size_property(bs):
    model = MLP("4-3-2", backend="numpy")
    X = toy(n=7)[0]
    if type(bs) is int and bs >= 1 or (isinstance(bs, float) and bs >= 1 and bs.is_integer()):
        np.testing.assert_array_equal(model.predict(X, batch_size=bs), model.predict(X))
    else:
        with pytest.raises(ValueError, match="batch_size"):
            model.predict(X, batch_size=bs)


# ------------------------------------------------------------------ IDX reader and the data cache
def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@PROPS
@given(st.binary(max_size=64))
def test_idx_parser_on_arbitrary_bytes(blob):
    try:
        a = parse_idx(blob, "fuzz.idx")
    except DataError as e:
        assert "fuzz.idx" in str(e)
    else:
        assert a.dtype == np.uint8 and a.size == len(blob) - 4 - 4 * a.ndim


@PROPS
@given(st.lists(st.integers(0, 5), min_size=1, max_size=3), st.integers(0, 255))
def test_idx_round_trip(shape, fill):
    arr = np.full(shape, fill, dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr)), arr)


def test_idx_dims_that_overflow_int64_name_the_file():
    header = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    with pytest.raises(DataError, match=r"huge.idx: truncated IDX data: dims .* need 7922816\d+ bytes"):
        parse_idx(header + b"\0" * 8, "huge.idx")


def write_mnist(d: Path, seed: int, n_train: int = 10, n_test: int = 10) -> None:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (d / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
        (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(np.arange(n, dtype=np.uint8)))
        )


def test_cache_is_keyed_by_content_not_mtime(tmp_path):
    d, other = tmp_path / "m", tmp_path / "other"
    write_mnist(d, seed=0)
    write_mnist(other, seed=1)
    first = load_mnist(d)
    assert (d / "mnist.npz").is_file()
    old = (d / "mnist.npz").stat().st_mtime_ns - 10**10
    for f in other.iterdir():  # as `cp -p` / `rsync -a` / tar: new content, older mtime
        (d / f.name).write_bytes(f.read_bytes())
        os.utime(d / f.name, ns=(old, old))
    second = load_mnist(d)
    np.testing.assert_array_equal(second.x_train, load_mnist(other, cache=False).x_train)
    assert not np.array_equal(second.x_train, first.x_train)
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    os.utime(d / "train-images-idx3-ubyte.gz", ns=(old, old))
    with pytest.raises(DataError, match="train-images"):
        load_mnist(d)


def test_an_empty_split_is_refused_when_loading(tmp_path):
    write_mnist(tmp_path / "m", seed=0, n_test=0)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz holds 0 images"):
        load_mnist(tmp_path / "m", download=False)


# ------------------------------------------------------------------ predict inputs: PNG modes, pixel range
@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    rng = np.random.default_rng(3)
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = rng.integers(150, 256, (16, 4))  # a bright stroke on black, like MNIST
    return img


def test_png_modes_read_as_the_same_gray_pixels(digit, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from gpumlp.data.images import read_png

    Image.fromarray(digit, "L").save(tmp_path / "l.png")
    la = np.stack([digit, np.full_like(digit, 255)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")  # gray + opaque alpha
    masked = np.stack([np.full_like(digit, 255), digit], axis=-1)  # white ink, alpha = the digit
    Image.fromarray(masked, "LA").save(tmp_path / "ink.png")
    rgba = np.concatenate([np.repeat(digit[..., None], 3, axis=-1), np.full_like(digit, 255)[..., None]], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "i16.png")  # 16-bit gray
    ref = read_png(tmp_path / "l.png")
    np.testing.assert_array_equal(ref, digit)
    for name in ("la", "ink", "rgba", "i16"):
        np.testing.assert_allclose(read_png(tmp_path / f"{name}.png"), digit, atol=0.5, err_msg=name)


def test_predict_input_pixel_range(digit, tmp_path):
    from gpumlp.cli import as_pixels, read_images
    from gpumlp.data.images import to_pixels_255

    x = np.stack([digit.reshape(-1), digit.reshape(-1) // 2])
    np.savez(tmp_path / "raw.npz", x=x)
    np.savez(tmp_path / "scaled.npz", x=x / 255.0)

    def pixels(name, mode="auto"):
        return as_pixels(read_images(str(tmp_path / name), 784), str(tmp_path / name), mode)

    np.testing.assert_allclose(pixels("scaled.npz"), pixels("raw.npz"), atol=1e-9)
    np.testing.assert_array_equal(pixels("scaled.npz", "0-255"), x / 255.0)
    with pytest.raises(DataError, match=r"outside 0-1"):
        to_pixels_255(x.astype(float), "0-1", "x")
    with pytest.raises(DataError, match=r"outside 0-255"):
        to_pixels_255(np.array([[1e39, 0.0]]), "auto", "x")
    with pytest.raises(DataError, match="real pixel values"):
        to_pixels_255(np.array([[1 + 2j]]), "auto", "x")


# ------------------------------------------------------------------ divergence through the API
def test_diverged_epoch_never_overwrites_the_checkpoint(tmp_path):
    ckpt = tmp_path / "c.npz"
    X, y = toy(n=200, f=8)
    model = MLP("8-16-2", backend="numpy")
    model.fit(X, y, epochs=1, optimizer="adam", lr=0.01, checkpoint_path=ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(TrainingDiverged, match="grew") as e:
        model.fit(X, y, epochs=5, optimizer="adam", lr=1e6, checkpoint_path=ckpt, resume=True)
    assert e.value.epoch == 2 and ckpt.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    again = MLP("8-16-2", backend="numpy")
    again.fit(X, y, epochs=1, optimizer="adam", lr=0.01)
    for key, a in again.state_arrays().items():  # the checkpoint holds exactly epoch 1's weights
        np.testing.assert_array_equal(a, checkpoint.read(ckpt)[0][key])
