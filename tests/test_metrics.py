"""gpumlp.metrics against hand-computed cases and identities; gpumlp.plots writes valid PNGs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpumlp.metrics import accuracy, classification_report, confusion_matrix, precision_recall_f1
from gpumlp.presets import PRESETS, Prep, get_preset

# Hand-computed case: 3 classes, 6 samples.
#   true 0 0 1 1 2 2
#   pred 0 1 1 1 0 0
# confusion [[1,1,0],[0,2,0],[2,0,0]]; tp = 1,2,0; predicted = 3,3,0; support = 2,2,2
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 0, 0])


def test_accuracy_hand_case():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(3 / 6)
    assert accuracy([], []) == 0.0


def test_confusion_matrix_hand_case():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [2, 0, 0]])
    assert cm.dtype == np.int64


def test_precision_recall_f1_hand_case():
    m = precision_recall_f1(Y_TRUE, Y_PRED, 3)
    np.testing.assert_allclose(m["precision"], [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(m["recall"], [1 / 2, 1.0, 0.0])
    np.testing.assert_allclose(m["f1"], [0.4, 0.8, 0.0])  # 2pr/(p+r): 2*(1/6)/(5/6), 2*(2/3)/(5/3)
    np.testing.assert_array_equal(m["support"], [2, 2, 2])
    assert m["macro_precision"] == pytest.approx(1 / 3)
    assert m["macro_recall"] == pytest.approx(1 / 2)
    assert m["macro_f1"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx(0.5)


def test_zero_division_is_zero_without_warning():
    # class 2 never occurs and is never predicted; class 1 is never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = precision_recall_f1([0, 1], [0, 0], 3)
    np.testing.assert_allclose(m["precision"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(m["recall"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(m["f1"], [2 / 3, 0.0, 0.0])


def test_perfect_prediction():
    y = np.arange(10) % 4
    m = precision_recall_f1(y, y, 4)
    assert m["macro_f1"] == 1.0 and m["accuracy"] == 1.0
    np.testing.assert_array_equal(confusion_matrix(y, y, 4), np.diag(np.bincount(y)))


@pytest.mark.parametrize(
    "args, match",
    [
        (([0, 1], [0], 2), "labels"),
        (([0, 3], [0, 1], 3), "outside"),
        (([0, -1], [0, 1], 3), "outside"),
        (([0.5, 1], [0, 1], 2), "integer"),
        (([[0, 1]], [[0, 1]], 2), "1-D"),
    ],
)
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(*args)


labels = st.integers(1, 6).flatmap(
    lambda k: st.tuples(
        st.just(k),
        st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=60),
    )
)


@settings(max_examples=60, deadline=None)
@given(labels)
def test_identities(case):
    k, pairs = case
    t, p = np.array(pairs).T
    cm = confusion_matrix(t, p, k)
    m = precision_recall_f1(t, p, k)
    assert cm.sum() == len(t)
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(t, minlength=k))  # rows: true counts
    np.testing.assert_array_equal(cm.sum(axis=0), np.bincount(p, minlength=k))  # cols: predicted counts
    assert np.trace(cm) / len(t) == pytest.approx(accuracy(t, p)) == pytest.approx(m["accuracy"])
    for key in ("precision", "recall", "f1"):
        assert np.all((0 <= m[key]) & (m[key] <= 1))
    # F1 is the harmonic mean, so it lies between min(p, r) and max(p, r)
    lo, hi = np.minimum(m["precision"], m["recall"]), np.maximum(m["precision"], m["recall"])
    assert np.all(m["f1"] >= lo - 1e-12) and np.all(m["f1"] <= hi + 1e-12)
    # support-weighted recall is accuracy
    assert np.sum(m["recall"] * m["support"]) / len(t) == pytest.approx(m["accuracy"])


def test_classification_report_table():
    text = classification_report(Y_TRUE, Y_PRED, 3)
    lines = text.splitlines()
    assert "precision" in lines[0] and "recall" in lines[0] and "f1-score" in lines[0]
    row1 = next(line for line in lines if line.split()[:1] == ["1"])
    assert row1.split() == ["1", "0.6667", "1.0000", "0.8000", "2"]
    assert any(line.split()[:2] == ["accuracy", "0.5000"] for line in lines)
    assert any(line.startswith("macro avg") and line.split()[-1] == "6" for line in lines)


# ------------------------------------------------------------------ presets / preprocessing
def test_presets_complete():
    assert set(PRESETS) >= {"seed", "fast"}
    seed = get_preset("seed")
    assert seed["model"]["spec"] == "784-100-10" and seed["model"]["act"] == "sigmoid"
    assert seed["fit"]["lr"] == 0.0005 and seed["fit"]["reduction"] == "sum" and seed["fit"]["epochs"] == 200
    assert seed["data"] == {"scale": "-1,1", "valid": 5000}
    seed["model"]["spec"] = "changed"
    assert PRESETS["seed"]["model"]["spec"] == "784-100-10"  # get_preset returns a copy
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")


def test_prep_modes():
    x = np.array([[0, 255, 51], [255, 255, 102]], dtype=np.uint8)
    np.testing.assert_allclose(Prep.fit(x, "0,1").apply(x), x / 255.0, rtol=1e-6)
    np.testing.assert_allclose(Prep.fit(x, "-1,1").apply(x), x / 127.5 - 1, rtol=1e-6, atol=1e-7)
    z = Prep.fit(x, "standardize").apply(x, np.float64)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z[:, [0, 2]].std(axis=0), 1)  # column 1 is constant: centred, not divided
    np.testing.assert_allclose(z[:, 1], 0)
    with pytest.raises(ValueError, match="scale mode"):
        Prep.fit(x, "bogus")


# ------------------------------------------------------------------ report (matplotlib optional)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 100 and data.startswith(PNG_MAGIC)


def test_plots_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from gpumlp import plots

    history = {
        "records": [
            {"epoch": e, "loss": 1 / e, "train_acc": 0.8 + e / 100, "valid_loss": 1.1 / e, "valid_acc": 0.8}
            for e in (1, 2, 3)
        ]
    }
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(40, 784)).astype(np.uint8)
    y_true, y_pred = rng.integers(0, 10, 40), rng.integers(0, 10, 40)
    _assert_png(plots.plot_history(history, tmp_path / "h.png"))
    _assert_png(plots.plot_misclassified(X, y_true, y_pred, tmp_path / "m.png"))
    _assert_png(plots.plot_misclassified(X, y_true, y_true, tmp_path / "none.png"))  # nothing wrong
    _assert_png(plots.plot_confusion(confusion_matrix(y_true, y_pred, 10), tmp_path / "sub" / "c.png"))
