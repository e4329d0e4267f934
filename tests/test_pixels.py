"""Training images kept as 8-bit codes (gpumlp.data.Pixels): the same training, bit for bit, as on
the floats they stand for, on every backend; the type's checks; the CLI's use of it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import loadable_backends

from gpumlp.augment import Augment
from gpumlp.data import DataError, Pixels, load_mnist, scale_pixels
from gpumlp.model import MLP
from gpumlp.optim import Optimizer
from gpumlp.presets import Prep
from gpumlp.step import TrainState, TrainStep


@pytest.fixture(scope="module")
def mnist():
    m = load_mnist()
    return m.x_train[:600], m.y_train[:600]  # real uint8 images (28, 28) and labels


def _weights(model) -> list[np.ndarray]:
    return [model.be.to_host(w) for _, w, _, _ in model.param_groups()]


def _fit_both(name, x, y, dtype, mode, **kw):
    """The same fit on scale_pixels floats and on Pixels -> ((history, weights), (history, weights))."""
    runs = []
    for X in (scale_pixels(x, mode, dtype), Pixels(x, mode)):
        model = MLP("784-16-10", backend=name, dtype=dtype, seed=3)
        history = model.fit(X, y, epochs=2, batch_size=50, optimizer="adam", lr=2e-3, seed=5, **kw)
        runs.append((history, _weights(model)))
    return runs


@pytest.mark.parametrize("name", loadable_backends())
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["-1,1", "0,1"])
def test_fit_on_pixels_is_fit_on_their_floats_bit_for_bit(mnist, name, dtype, mode):
    rows = 600 if name in ("numpy", "numba") else 250  # the emulated device is slow
    x, y = mnist[0][:rows], mnist[1][:rows]
    (h_float, w_float), (h_codes, w_codes) = _fit_both(name, x, y, dtype, mode, valid_split=100)
    for key in ("loss", "train_acc", "valid_loss", "valid_acc"):
        assert h_codes[key] == h_float[key], key
    assert h_codes["loss"][-1] < h_codes["loss"][0]  # it trained
    for a, b in zip(w_codes, w_float):
        assert a.dtype == np.dtype(dtype) and np.array_equal(a, b)


@pytest.mark.parametrize("name", loadable_backends())
def test_fit_on_pixels_with_augmentation_or_graphs_is_fit_on_their_floats(mnist, name):
    """Shifts gather codes (gather_shifted_pixels); rotations decode them once first. CUDA graphs
    replay both pixel gathers."""
    x, y = mnist[0][:250], mnist[1][:250]
    options = [{"augment_shift": 2}, {"augment": Augment(shift=1, rotate=5.0)}]
    if name == "cuda-emu":
        options += [{"augment_shift": 1, "cuda_graphs": True}, {"cuda_graphs": True}]
    for kw in options:
        (h_float, w_float), (h_codes, w_codes) = _fit_both(name, x, y, "float32", "-1,1", **kw)
        assert h_codes["loss"] == h_float["loss"], kw
        assert all(np.array_equal(a, b) for a, b in zip(w_codes, w_float)), kw


@pytest.mark.parametrize("shift", [0, 2])
def test_a_numba_step_graph_replays_the_pixel_gathers(mnist, shift):
    if "numba" not in loadable_backends():
        pytest.skip("numba is not installed")
    x, y = mnist
    model = MLP("784-16-10", backend="numba", seed=3)
    be, opt = model.be, Optimizer("adam", lr=1e-3)
    opt_state = [opt.init_state(be, w) for _, w, _, _ in model.param_groups()]
    step = TrainStep(model, opt, opt_state, 100, 600, "mean")
    step.configure(True, Augment(shift=shift), False)
    loss, _ = step.epoch(Pixels(x), y.astype(np.int32), opt.lr, TrainState(epoch=0, step=0, seed=1))
    assert step.graph is not None and step.use_graphs  # captured, not fallen back to kernel by kernel
    assert np.isfinite(loss)


@pytest.mark.parametrize("mode", ["-1,1", "0,1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixels_decode_to_scale_pixels_and_keep_their_rows(mnist, mode, dtype):
    images = mnist[0][:20]
    p = Pixels(images, mode)
    assert p.shape == (20, 784) and len(p) == 20 and p.codes.dtype == np.uint8
    expected = scale_pixels(images.reshape(20, -1), mode, dtype)
    np.testing.assert_array_equal(p.decode(dtype), expected)
    np.testing.assert_array_equal(p[5:9].decode(dtype), expected[5:9])
    np.testing.assert_array_equal(p[np.array([3, 0, 3])].decode(dtype), expected[[3, 0, 3]])
    assert np.asarray(p).dtype == np.float32
    with pytest.raises(ValueError, match="new array"):
        np.asarray(p, copy=False)
    lo, hi = (-1.0, 1.0) if mode == "-1,1" else (0.0, 1.0)
    assert Pixels(np.array([[0, 255]], np.uint8), mode).decode(dtype).tolist() == [[lo, hi]]


def test_pixels_pickle_for_search_workers(mnist):
    p = pickle.loads(pickle.dumps(Pixels(mnist[0][:5], "0,1")))
    assert p.mode == "0,1" and np.array_equal(p.codes, mnist[0][:5].reshape(5, -1))


def test_pixels_refuse_what_they_cannot_stand_for():
    with pytest.raises(DataError, match="codes must be uint8 pixel values"):
        Pixels(np.zeros((3, 4), np.float32))
    with pytest.raises(DataError, match=r"\(N, F\) or \(N, H, W\)"):
        Pixels(np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="unknown mode 'standardize'"):
        Pixels(np.zeros((3, 4), np.uint8), "standardize")
    with pytest.raises(IndexError, match="not one row"):
        Pixels(np.zeros((3, 4), np.uint8))[1]
    strided = Pixels(np.zeros((4, 6), np.uint8)[:, ::2])
    assert strided.codes.flags.c_contiguous and strided.shape == (4, 3)


def test_fit_checks_the_width_of_pixels(mnist):
    x, y = mnist
    with pytest.raises(ValueError, match="784 features per sample but the model's input layer expects 100"):
        MLP("100-8-10", backend="numpy").fit(Pixels(x), y, epochs=1)


@pytest.mark.parametrize("scale", ["-1,1", "0,1", "standardize"])
def test_the_cli_trains_on_codes_under_a_pixel_scale(mnist, scale):
    x = mnist[0].reshape(600, -1)
    prep = Prep.fit(x, scale)
    given = prep.training_input(x)
    if scale == "standardize":
        assert isinstance(given, np.ndarray)
    else:
        assert isinstance(given, Pixels) and given.mode == scale
    np.testing.assert_array_equal(np.asarray(given), prep.apply(x))
    floats = x.astype(np.float64)  # values 0..255 that are not uint8 stay floats
    assert isinstance(prep.training_input(floats), np.ndarray)


@pytest.mark.parametrize("name", [n for n in ("numpy", "numba") if n in loadable_backends()])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_estimator_trains_on_pixels_as_on_their_floats(mnist, name, dtype):
    """float64: the codes are decoded in float64, not to float32 first (as np.asarray would)."""
    from gpumlp import MLPClassifier

    x, y = mnist
    floats, test = (scale_pixels(a.reshape(len(a), -1), dtype=dtype) for a in (x, x[:100]))
    kw = dict(hidden_layer_sizes=(16,), epochs=2, random_state=0, backend=name, validation_fraction=0.1)
    on_floats = MLPClassifier(**kw, dtype=dtype).fit(floats, y)
    on_codes = MLPClassifier(**kw, dtype=dtype).fit(Pixels(x), y)
    on_floats.partial_fit(floats, y)
    on_codes.partial_fit(Pixels(x), y)
    assert on_codes.n_features_in_ == 784
    assert on_codes.loss_curve_ == on_floats.loss_curve_
    assert on_codes.validation_scores_ == on_floats.validation_scores_
    a, b = on_floats.model_.state_arrays(), on_codes.model_.state_arrays()
    assert all(np.array_equal(a[key], b[key]) for key in a)
    np.testing.assert_array_equal(on_codes.predict_proba(Pixels(x[:100])), on_floats.predict_proba(test))
