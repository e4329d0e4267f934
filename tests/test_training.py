"""The training loop: learning on toy and MNIST data, optimizers, stopping
rules, exact resume, atomic checkpoints, divergence, backend parity."""

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import loadable_backends

from gpumlp import checkpoint
from gpumlp.backend import BackendUnavailable, get_backend, make_cuda_backend
from gpumlp.data import load_mnist, make_circles, make_xor, scale_pixels, split_train_valid
from gpumlp.model import MLP
from gpumlp.optim import OPTIMIZERS, RULES
from gpumlp.presets import PRESETS, Prep, fit_kwargs
from gpumlp.train import Carry, DeviceOutOfMemory, TrainingDiverged


@pytest.fixture(scope="module")
def mnist():
    """Real MNIST scaled to [-1, 1]: (x_train, y_train, x_valid, y_valid, x_test, y_test)."""
    d = load_mnist(download=False)
    x_tr, y_tr, x_va, y_va = split_train_valid(scale_pixels(d.x_train, "-1,1"), d.y_train, 5000)
    return x_tr, y_tr, x_va, y_va, scale_pixels(d.x_test, "-1,1"), d.y_test


@pytest.mark.parametrize("make", [make_circles, make_xor], ids=["circles", "xor"])
def test_nonlinear_activation_separates_what_a_linear_model_cannot(make):
    X, y = make(n=400, noise=0.05, seed=0)
    mlp = MLP("2-32-2", act="relu", backend="numpy", seed=0)
    mlp.fit(X, y, epochs=150, batch_size=32, optimizer="adam", lr=0.01)
    linear = MLP("2-2", backend="numpy", seed=0)  # no hidden layer: a linear boundary
    linear.fit(X, y, epochs=150, batch_size=32, optimizer="adam", lr=0.01)
    assert mlp.score(X, y) >= 0.97
    assert linear.score(X, y) < 0.8


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_every_optimizer_learns(opt):
    X, y = make_circles(n=300, noise=0.05, seed=1)
    # a new optimizer learns at 30x its usual (minibatch-mean, MNIST-sized) rate unless listed here
    lr = {"sgd": 0.5, "momentum": 0.1, "nesterov": 0.1, "adagrad": 0.5}.get(opt, 30 * RULES[opt].lr)
    # plain SGD leaves the circles' plateau after 20-60 epochs depending on the shuffle; by 80 it
    # is at ~0.05x the first loss for every shuffle seed tried
    epochs = 80 if opt == "sgd" else 40
    hist = MLP("2-16-2", act="tanh", backend="numpy", seed=1).fit(
        X, y, epochs=epochs, batch_size=30, optimizer=opt, lr=lr, l2=1e-4
    )
    assert hist["loss"][-1] < 0.6 * hist["loss"][0], hist["loss"]


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_stochastic_minibatch_and_full_batch_descent(batch_size):
    X, y = make_xor(n=200, noise=0.05, seed=2)
    hist = MLP("2-16-2", act="tanh", backend="numpy", seed=2).fit(
        X, y, epochs=20, batch_size=batch_size, optimizer="adam", lr=0.01 if batch_size > 1 else 0.002
    )
    assert len(hist) == 20 and hist["loss"][-1] < hist["loss"][0]


def test_seed_preset_recipe_cost_decreases_on_mnist(mnist):
    x_tr, y_tr, x_va, y_va, *_ = mnist
    model = MLP("784-100-10", act="sigmoid", loss="logistic", init="normal", backend="numpy", seed=1)
    hist = model.fit(
        x_tr,
        y_tr,
        X_valid=x_va,
        y_valid=y_va,
        epochs=2,
        batch_size=100,
        optimizer="sgd",
        lr=0.0005,
        l2=0.01,
        reduction="sum",
    )
    assert hist["loss"][1] < hist["loss"][0]
    assert hist["valid_acc"][1] > 0.85


def test_fast_preset_reaches_97_percent_test_accuracy_in_three_epochs(mnist):
    # Two epochs land at 96.9-97.8 % depending on the shuffle seed; three at 97.8-97.9 %.
    d = load_mnist(download=False)
    fast = PRESETS["fast"]
    prep = Prep.fit(d.x_train, fast["data"]["scale"])
    model = MLP(**fast["model"])  # auto backend: numba when installed
    fit_kw = {**fit_kwargs(fast), "epochs": 3}
    model.fit(prep.apply(d.x_train), d.y_train, valid_split=5000, **fit_kw)
    assert model.score(prep.apply(d.x_test), d.y_test) >= 0.97


def test_tol_stops_when_the_cost_change_is_small():
    X, y = make_circles(n=200, noise=0.05, seed=3)
    hist = MLP("2-8-2", act="tanh", backend="numpy").fit(
        X, y, epochs=500, optimizer="adam", lr=0.01, tol=1e-3
    )
    assert hist.stop_reason.startswith("converged") and len(hist) < 500
    assert abs(hist["loss"][-1] - hist["loss"][-2]) < 1e-3 <= abs(hist["loss"][-2] - hist["loss"][-3])


def test_patience_stops_and_restores_the_best_weights():
    X, y = make_circles(n=300, noise=0.3, seed=4)
    model = MLP("2-64-2", act="relu", backend="numpy", seed=4)
    hist = model.fit(X, y, epochs=300, batch_size=10, optimizer="adam", lr=0.05, valid_split=100, patience=5)
    assert hist.stop_reason.startswith("early stop") and len(hist) < 300
    best = max(hist["valid_acc"])
    assert model.score(X[-100:], y[-100:]) == pytest.approx(best)


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_resume_continues_bit_for_bit(tmp_path, opt):
    X, y = make_circles(n=250, noise=0.1, seed=5)
    kw = dict(act="relu", dropout=0.2, batchnorm=True, backend="numpy", seed=5)
    fit_kw = dict(batch_size=32, optimizer=opt, lr=0.01, l2=1e-3, weight_decay=0.05, valid_split=50, seed=9)
    straight = MLP("2-16-16-2", **kw)
    h_straight = straight.fit(X, y, epochs=2, **fit_kw)
    ckpt = tmp_path / "ck.npz"
    MLP("2-16-16-2", **kw).fit(X, y, epochs=1, checkpoint_path=ckpt, **fit_kw)
    resumed = MLP("2-16-16-2", **kw)
    h_resumed = resumed.fit(X, y, epochs=2, checkpoint_path=ckpt, resume=True, **fit_kw)
    assert [r["loss"] for r in h_resumed.records] == h_straight["loss"]
    for a, b in zip(straight.state_arrays().values(), resumed.state_arrays().values()):
        assert np.array_equal(a, b)


def test_resume_with_shuffle_and_shifts_continues_bit_for_bit(tmp_path):
    """The epoch's order and the step's shifts are functions of (seed, epoch / step), kept in
    the checkpoint: resuming reproduces them, even if the caller passes another seed."""
    rng = np.random.default_rng(0)
    X, y = rng.random((120, 25)), rng.integers(0, 3, 120)  # 5x5 "images"
    fit_kw = dict(batch_size=16, optimizer="momentum", lr=0.05, augment_shift=1, seed=7)
    straight = MLP("25-12-3", backend="numba" if "numba" in loadable_backends() else "numpy", seed=1)
    be = straight.be
    h_straight = straight.fit(X, y, epochs=3, **fit_kw)
    ckpt = tmp_path / "ck.npz"
    MLP("25-12-3", backend=be, seed=1).fit(X, y, epochs=1, checkpoint_path=ckpt, **fit_kw)
    resumed = MLP("25-12-3", backend=be, seed=1)
    h_resumed = resumed.fit(X, y, epochs=3, checkpoint_path=ckpt, resume=True, **{**fit_kw, "seed": 99})
    assert h_resumed["loss"] == h_straight["loss"]
    for a, b in zip(straight.state_arrays().values(), resumed.state_arrays().values()):
        assert np.array_equal(a, b)
    other = MLP("25-12-3", backend=be, seed=1).fit(X, y, epochs=3, **{**fit_kw, "seed": 8})
    assert other["loss"][0] != h_straight["loss"][0]  # the seed does pick the shuffle


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_fits_sharing_a_carry_are_the_epochs_of_one_run(opt):
    """fit(carry=) continues the optimizer state, step, epoch, seed and patience's best in memory:
    1 + 2 epochs give the bits of one 3-epoch run; each call returns its own records, and the
    carry keeps one record, not the whole history."""
    X, y = make_circles(n=250, noise=0.1, seed=5)
    kw = dict(act="relu", dropout=0.2, batchnorm=True, backend="numpy", seed=5)
    fit_kw = dict(batch_size=32, optimizer=opt, lr=0.01, l2=1e-3, schedule="exp", valid_split=50, seed=9)
    fit_kw.update(patience=5, tol=1e-12)
    straight = MLP("2-16-16-2", **kw)
    h_straight = straight.fit(X, y, epochs=3, **fit_kw)
    carried, carry = MLP("2-16-16-2", **kw), Carry()
    h1 = carried.fit(X, y, epochs=1, carry=carry, **fit_kw)
    h2 = carried.fit(X, y, epochs=2, carry=carry, **{**fit_kw, "seed": 99})  # the carried seed goes on
    assert [len(h1), len(h2)] == [1, 2] and h1["loss"] + h2["loss"] == h_straight["loss"]
    assert [r["epoch"] for r in h2.records] == [2, 3] and h2["lr"] == h_straight["lr"][1:]
    for a, b in zip(straight.state_arrays().values(), carried.state_arrays().values()):
        assert np.array_equal(a, b)
    assert carry.optimizer == opt and len(carry.meta["train"]["history"]["records"]) == 1
    with pytest.raises(ValueError, match="not both"):
        carried.fit(X, y, carry=carry, checkpoint_path="unused.npz", resume=True)


@pytest.mark.parametrize("name, graphs", [("numpy", False), ("cuda-emu", True)])
def test_epoch_order_is_the_reference_permutation(name, graphs):
    """Epoch e visits the rows in the order reference.permutation(salted seed, n, e): training
    on the pre-shuffled data without shuffling takes exactly the same steps."""
    from gpumlp.kernels import reference
    from gpumlp.step import SHUFFLE_SALT

    rng = np.random.default_rng(3)
    X, y = rng.random((90, 16)).astype(np.float32), rng.integers(0, 3, 90)
    kw = dict(epochs=1, batch_size=20, optimizer="momentum", lr=0.1, cuda_graphs=graphs)
    order = reference.permutation(5 ^ SHUFFLE_SALT, 90, epoch=0)
    shuffled = MLP("16-8-3", backend=name, seed=1)
    h_shuffled = shuffled.fit(X, y, seed=5, **kw)
    in_order = MLP("16-8-3", backend=name, seed=1)
    h_in_order = in_order.fit(X[order], y[order], shuffle=False, **kw)
    assert h_shuffled["loss"] == h_in_order["loss"]
    for a, b in zip(shuffled.state_arrays().values(), in_order.state_arrays().values()):
        np.testing.assert_array_equal(a, b)
    unshuffled = MLP("16-8-3", backend=name, seed=1).fit(X, y, shuffle=False, **kw)
    assert unshuffled["loss"] != h_shuffled["loss"]


def test_resume_refuses_a_checkpoint_from_before_device_shuffling(tmp_path):
    """Checkpoints of older versions stored a host RNG state instead of the seed."""
    X, y = make_xor(n=40)
    ckpt = tmp_path / "old.npz"
    MLP("2-4-2", backend="numpy").fit(X, y, epochs=1, checkpoint_path=ckpt)
    arrays, meta = checkpoint.read(ckpt)
    meta["train"]["rng"] = meta["train"].pop("seed")
    checkpoint.write(ckpt, arrays, meta)
    with pytest.raises(checkpoint.CheckpointError, match="before on-device shuffling.*start a new run"):
        MLP("2-4-2", backend="numpy").fit(X, y, epochs=2, checkpoint_path=ckpt, resume=True)


def test_shift_augmentation_needs_square_images():
    X, y = make_xor(n=20)
    with pytest.raises(ValueError, match="2 features is not a square"):
        MLP("2-4-2", backend="numpy").fit(X, y, epochs=1, augment_shift=1)
    with pytest.raises(ValueError, match=r"shift must be below the image side 2"):
        MLP("4-4-2", backend="numpy").fit(np.zeros((20, 4)), y, epochs=1, augment_shift=2)


def test_resume_with_patience_keeps_the_best_weights(tmp_path):
    X, y = make_circles(n=300, noise=0.3, seed=4)
    kw = dict(epochs=300, batch_size=10, optimizer="adam", lr=0.05, valid_split=100, patience=5, seed=1)
    straight = MLP("2-64-2", act="relu", backend="numpy", seed=4)
    h_straight = straight.fit(X, y, **kw)
    ckpt = tmp_path / "ck.npz"
    first = MLP("2-64-2", act="relu", backend="numpy", seed=4)
    first.fit(X, y, **{**kw, "epochs": len(h_straight) - 2}, checkpoint_path=ckpt)
    resumed = MLP("2-64-2", act="relu", backend="numpy", seed=4)
    h_resumed = resumed.fit(X, y, **kw, checkpoint_path=ckpt, resume=True)
    assert h_resumed.stop_reason == h_straight.stop_reason and len(h_resumed) == len(h_straight)
    for a, b in zip(straight.state_arrays().values(), resumed.state_arrays().values()):
        assert np.array_equal(a, b)  # both restored the same best epoch's weights


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    X, y = make_xor(n=100, seed=0)
    ckpt = tmp_path / "ck.npz"
    MLP("2-8-2", backend="numpy").fit(X, y, epochs=1, checkpoint_path=ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="written for model"):
        MLP("2-9-2", backend="numpy").fit(X, y, epochs=2, checkpoint_path=ckpt, resume=True)


def test_top_level_api():
    import gpumlp

    assert gpumlp.MLP is MLP and gpumlp.get_backend("numpy").name == "numpy"


def test_save_load_round_trip(tmp_path):
    X, y = make_circles(n=100, seed=6)
    model = MLP("2-8-2", act="tanh", batchnorm=True, backend="numpy", seed=6)
    model.fit(X, y, epochs=3, optimizer="adam", lr=0.01)
    model.save(tmp_path / "m.npz")
    again = MLP.load(tmp_path / "m.npz", backend="numpy")
    assert np.array_equal(model.predict_proba(X), again.predict_proba(X))
    proba = again.predict_proba(X)
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-6)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "m.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        MLP.load(bad)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        MLP.load(tmp_path / "missing.npz")


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from gpumlp import checkpoint
    big = np.random.default_rng(0).normal(size=(2000, 2000))  # ~32 MB per write
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        checkpoint.write(sys.argv[1], {"w": big + i}, {"i": i})
    """
)


def test_killed_checkpoint_write_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "ck.npz"
    checkpoint.write(path, {"w": np.zeros(3)}, {"i": 0})
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        arrays, meta = checkpoint.read(path)  # whichever version survived is complete
        if meta["i"] == 0:
            assert np.array_equal(arrays["w"], np.zeros(3))
        else:
            ref = np.random.default_rng(0).normal(size=(2000, 2000)) + meta["i"]
            assert np.array_equal(arrays["w"], ref)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ck.npz"]
    assert all(name.endswith(".tmp") for name in leftovers)


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    X, y = make_circles(n=200, seed=7)
    ckpt = tmp_path / "ck.npz"
    model = MLP("2-16-2", act="relu", backend="numpy", seed=7)
    model.fit(X, y, epochs=2, optimizer="sgd", lr=0.01, checkpoint_path=ckpt)
    diverging = np.errstate(over="ignore", invalid="ignore")  # the overflow is the point of the test
    with diverging, pytest.raises(TrainingDiverged, match=r"diverged.*epoch 3.*last good.*Lower the"):
        model.fit(X * 1e30, y, epochs=5, optimizer="sgd", lr=1e30, checkpoint_path=ckpt, resume=True)
    arrays, meta = checkpoint.read(ckpt)
    assert meta["train"]["epoch"] == 2 and all(np.isfinite(a).all() for a in arrays.values())


@pytest.mark.parametrize("name", loadable_backends())
def test_a_nan_weight_behind_relu_stops_training(name):
    """A NaN weight makes its unit's pre-activation NaN; ReLU must pass it on (as np.maximum does),
    so that the loss shows it. Taking NaN to 0, the numba and CUDA ReLU had hidden it: the loss
    stayed finite and the NaN stayed in the weights, into every checkpoint."""
    rng = np.random.default_rng(0)
    X, y = rng.random((256, 30), dtype=np.float32), rng.integers(0, 3, 256)
    model = MLP("30-16-3", act="relu", backend=name, seed=0)
    w = model.layers[0].params["W"]
    host = model.be.to_host(w).copy()
    host[3, 5] = np.nan
    w[...] = model.be.asarray(host)
    with np.errstate(invalid="ignore"), pytest.raises(TrainingDiverged, match="loss became nan"):
        model.fit(X, y, epochs=2, batch_size=64, seed=1)


@pytest.mark.parametrize(
    "X, y, message",
    [
        (np.zeros((4, 3)), np.zeros(4), "has 3 features per sample but the model's input layer expects 2"),
        (np.array([[0.0, np.nan]] * 4), np.zeros(4), "contains NaN or inf .first at row 0, column 1"),
        (np.array([[0.0, np.inf]] * 4), np.zeros(4), "NaN or inf"),
        (np.zeros((4, 2)), np.array([0, 1, 2, 1]), r"labels in \[0, 2\] but the model has 2 outputs"),
        (np.zeros((4, 2)), np.array([0, -1, 1, 1]), "must be in 0..1"),
        (np.zeros((4, 2)), np.array([0, 0.5, 1, 1]), "integer class ids"),
        (np.zeros((4, 2)), np.zeros(3), "3 labels but X has 4 samples"),
        (np.zeros((0, 2)), np.zeros(0), "empty"),
        (np.zeros((4, 2)), np.eye(2)[[0, 1, 0, 1]], "one-hot"),
        (np.array([["a", "b"]] * 4), np.zeros(4), "numeric array"),
    ],
)
def test_bad_training_input_is_a_clear_error(X, y, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MLP("2-4-2", backend="numpy").fit(X, y, epochs=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(spec="784-x-10"), "bad layer spec"),
        (dict(spec="784"), "at least input and output"),
        (dict(act="swish"), "unknown activation 'swish'"),
        (dict(loss="hinge"), "unknown loss 'hinge'"),
        (dict(init="zeros"), "unknown init"),
        (dict(dtype="float16"), "float32 or float64"),
        (dict(dropout=1.0), "dropout rate"),
    ],
)
def test_bad_model_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(**{"backend": "numpy", **kwargs})


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="unknown backend 'tpu'; choose one of auto, numpy"):
        MLP("2-2", backend="tpu")


def test_bad_fit_arguments_are_clear_errors():
    X, y = make_xor(n=20)
    model = MLP("2-4-2", backend="numpy")
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        model.fit(X, y, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr must be a finite number"):
        model.fit(X, y, lr=-1.0)
    with pytest.raises(ValueError, match="reduction must be"):
        model.fit(X, y, reduction="max")
    with pytest.raises(ValueError, match="valid_split=20"):
        model.fit(X, y, valid_split=20)


def test_device_out_of_memory_names_the_sizes_and_the_fix(monkeypatch, mnist):
    be = get_backend("cuda-emu")  # the emulated device accounts memory like a GPU
    monkeypatch.setitem(be.xp._MEMORY, "limit", 64 * 2**20)
    x_tr, y_tr, *_ = mnist
    with pytest.raises(
        DeviceOutOfMemory,
        match=r"training set needs 164.5 MiB \(55000x784 float32\).*"
        r"lower the batch size.*Out of memory allocating",
    ):
        MLP("784-100-10", backend=be).fit(x_tr, y_tr, epochs=1)


def test_cuda_graph_steps_match_the_reference(monkeypatch, mnist):
    """Full-size steps replayed as captured graphs on the emulated device give the
    reference's loss curve; the partial last batch runs eagerly."""
    x_tr, y_tr, *_ = mnist
    X, y = x_tr[:1525], y_tr[:1525]  # 30 full batches of 50 and a partial one of 25
    be = get_backend("cuda-emu")
    captures = []
    real_capture = be.capture
    monkeypatch.setattr(be, "capture", lambda fn: captures.append(fn) or real_capture(fn))
    kw = dict(epochs=2, batch_size=50, optimizer="momentum", lr=0.05, l2=1e-4, schedule="exp", seed=2)
    curves = {}
    for name, extra in (("numpy", {}), ("cuda-emu", {"cuda_graphs": True})):
        model = MLP("784-32-10", act="sigmoid", loss="logistic", init="normal", backend=name, seed=2)
        curves[name] = model.fit(X, y, **kw, **extra)["loss"]
    assert len(captures) == 2  # once per epoch: the lr changes each epoch
    np.testing.assert_allclose(curves["cuda-emu"], curves["numpy"], rtol=1e-4)


@pytest.mark.parametrize("name", ["cuda-emu", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_cuda_graphs_cover_adam_dropout_batchnorm_clipping_and_shifts(monkeypatch, mnist, name):
    """Everything that changes per step (Adam's t, dropout masks, batch-norm running
    statistics, the clipping norm, the augmentation shifts) is read or written on the device, so replayed
    graphs train exactly like eager steps: the same kernels (our GEMM in both), the
    same loss curve and weights bit for bit. The emulated device raises if any
    non-kernel work happens while capturing, so this also proves the step is pure kernels.
    On a real GPU the float atomics of the loss accumulator may add in another order."""
    x_tr, y_tr, *_ = mnist
    X, y = x_tr[:1030], y_tr[:1030]  # 20 full batches of 50 and a partial one of 30
    try:
        be = make_cuda_backend(name, gemm="own")  # eager steps on our GEMM too, as graphs use it
    except BackendUnavailable as e:
        pytest.skip(str(e))
    captures = []
    real_capture = be.capture
    monkeypatch.setattr(be, "capture", lambda fn: captures.append(fn) or real_capture(fn))
    kw = dict(
        epochs=2, batch_size=50, optimizer="adam", lr=2e-3, l2=1e-4, clip_norm=0.5, augment_shift=2, seed=4
    )
    results = {}
    for graphs in (False, True):
        model = MLP("784-48-32-10", act="relu", dropout=0.2, batchnorm=True, backend=be, seed=4)
        hist = model.fit(X, y, **kw, cuda_graphs=graphs)
        results[graphs] = (np.array(hist["loss"]), model.state_arrays())
    assert len(captures) == 1  # constant lr: one capture, then 39 replays
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=0 if name == "cuda-emu" else 1e-6)
    for key, eager in results[False][1].items():
        np.testing.assert_array_equal(results[True][1][key], eager, err_msg=key)
    assert any(key.endswith("running_var") for key in results[True][1])
    assert results[True][0][1] < results[True][0][0]  # and it learns


def test_cuda_graphs_need_a_cuda_backend():
    X, y = make_xor(n=40)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA backend"):
        MLP("2-4-2", backend="numpy").fit(X, y, cuda_graphs=True)


@pytest.mark.parametrize("name", [n for n in loadable_backends() if n != "numpy"])
def test_whole_training_parity_with_the_reference(name, mnist):
    """A few seeded epochs on an MNIST slice give the reference's loss curve: the same
    device-made shuffles, shifts and dropout masks on every backend."""
    x_tr, y_tr, x_va, y_va, *_ = mnist
    X, y = x_tr[:1500], y_tr[:1500]
    curves = {}
    for backend in ("numpy", name):
        model = MLP("784-64-32-10", act="relu", dropout=0.1, backend=backend, seed=3)
        hist = model.fit(
            X,
            y,
            X_valid=x_va[:500],
            y_valid=y_va[:500],
            epochs=3,
            batch_size=50,
            optimizer="adam",
            lr=1e-3,
            l2=1e-4,
            augment_shift=2,
            seed=3,
        )
        curves[backend] = np.array([hist["loss"], hist["valid_acc"]])
    # float32 rounding differs between BLAS calls and fused kernels; 3 epochs keep it small.
    np.testing.assert_allclose(curves[name][0], curves["numpy"][0], rtol=2e-3)
    np.testing.assert_allclose(curves[name][1], curves["numpy"][1], atol=0.01)


@pytest.mark.parametrize("name", loadable_backends())
def test_clip_grad_norm_bounds_the_global_norm(name):
    """Two gradient buffers (as the packed weights/others groups) scaled together to max_norm."""
    from gpumlp.optim import clip_grad_norm

    be = get_backend(name)
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(300).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    norm = float(np.sqrt(sum(np.sum(h.astype(np.float64) ** 2) for h in host)))
    for max_norm, expected in ((norm / 4, norm / 4), (2 * norm, norm)):
        grads = [be.asarray(h.copy()) for h in host]  # numpy backends would share memory
        sumsq = clip_grad_norm(be, grads, max_norm)
        assert float(be.to_host(sumsq)) == pytest.approx(norm**2, rel=1e-5)  # the pre-clip norm²
        got = [be.to_host(g) for g in grads]
        assert float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in got))) == pytest.approx(
            expected, rel=1e-5
        )
        np.testing.assert_allclose(got[1] / host[1], expected / norm, rtol=1e-5)  # one common factor


@pytest.mark.parametrize("name", [n for n in loadable_backends() if n != "numpy"])
def test_warped_and_elastic_augmentation_trains_alike_on_every_backend(name, mnist):
    """Rotation, scaling, sub-pixel shifts and elastic fields are drawn on the device from the
    same Philox streams everywhere, so every backend follows the reference's loss curve (CUDA
    backends with graph replay too: the augmentation kernels are captured with the step)."""
    from gpumlp.augment import Augment

    x_tr, y_tr, *_ = mnist
    X, y = x_tr[:600], y_tr[:600]
    aug = Augment(shift=1.5, rotate=12.0, scale=0.1, elastic_alpha=8.0, elastic_sigma=3.0)
    kw = dict(epochs=2, batch_size=50, optimizer="adam", lr=2e-3, augment=aug, seed=5)
    variants = [("numpy", {}), (name, {})] + ([(name, {"cuda_graphs": True})] if "cu" in name else [])
    curves = []
    for backend, extra in variants:
        model = MLP("784-32-10", backend=backend, seed=5)
        curves.append(np.array(model.fit(X, y, **kw, **extra)["loss"]))
    for curve in curves[1:]:
        np.testing.assert_allclose(curve, curves[0], rtol=1e-3)
    plain = MLP("784-32-10", backend="numpy", seed=5).fit(X, y, **{**kw, "augment": None})["loss"]
    assert curves[0][0] != pytest.approx(plain[0], rel=1e-3)  # the augmentation did change the data


@pytest.mark.parametrize("name", loadable_backends())
def test_sgd_folded_into_the_weight_gemm_matches_the_unfolded_step(name, mnist):
    """Plain SGD + L2 steps the dense weights inside their gradient GEMM (sgd_matmul_step).
    Clipping needs the whole gradient first, so with a bound never reached (factor exactly 1)
    the same training forms the gradient, then steps. Backends that form the product either
    way (numpy, the GPU ones) give identical weights; BLAS folds it into the GEMM's beta
    (numba): a GEMM's rounding apart."""
    X, y = mnist[0][:600], mnist[1][:600]
    runs = []
    for clip in (None, 1e30):
        model = MLP("784-32-16-10", act="sigmoid", loss="logistic", backend=name, seed=4)
        model.fit(X, y, epochs=2, batch_size=50, optimizer="sgd", lr=0.05, l2=1e-3, clip_norm=clip, seed=4)
        runs.append(model.state_arrays())
    for key, folded in runs[0].items():
        if name == "numba":
            np.testing.assert_allclose(folded, runs[1][key], rtol=1e-4, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(folded, runs[1][key], err_msg=key)
