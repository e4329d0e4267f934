"""The public training step (gpumlp.step) and fit's options object (gpumlp.train.FitConfig)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
from conftest import loadable_backends

from gpumlp.augment import Augment
from gpumlp.model import MLP
from gpumlp.optim import Optimizer
from gpumlp.step import TrainState, TrainStep
from gpumlp.train import FitConfig, fit


def test_fit_keywords_are_the_fit_config_fields_with_the_same_defaults():
    params = inspect.signature(fit).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords.pop("X_valid") is None and keywords.pop("y_valid") is None
    assert keywords == {f.name: f.default for f in dataclasses.fields(FitConfig)}


def test_fit_config_is_frozen_and_checks_its_options():
    cfg = FitConfig(epochs=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    model = MLP("4-3-2", backend="numpy")
    with pytest.raises(ValueError, match="patience needs validation data"):
        FitConfig(patience=2).check(model, 10, has_valid=False)
    with pytest.raises(ValueError, match="reduction"):
        FitConfig(reduction="max").check(model, 10, has_valid=False)


@pytest.mark.parametrize(
    "name, graphs",
    [("numpy", False), *(("cuda-emu", g) for g in (False, True) if "cuda-emu" in loadable_backends())],
)
def test_train_step_by_hand_is_what_fit_runs(name, graphs):
    """Epochs of TrainStep driven directly (as the GPU step profiler does) give the same bits as fit."""
    rng = np.random.default_rng(2)
    X, y = rng.random((70, 16)).astype(np.float32), rng.integers(0, 3, 70)
    kw = dict(epochs=2, batch_size=32, optimizer="adam", lr=1e-3, seed=4, clip_norm=1.0, augment_shift=1)
    fitted = MLP("16-8-3", backend=name, seed=1, dropout=0.1)
    history = fitted.fit(X, y, **kw, cuda_graphs=graphs, divergence_factor=None)

    model = MLP("16-8-3", backend=name, seed=1, dropout=0.1)
    be, opt = model.be, Optimizer("adam", lr=1e-3)
    opt_state = [opt.init_state(be, w) for _, w, _, _ in model.param_groups()]
    step = TrainStep(model, opt, opt_state, 32, 70, "mean", 1.0)
    step.configure(True, Augment(shift=1), graphs)
    state = TrainState(epoch=0, step=0, seed=4)
    Xd, yd = be.asarray(X), be.asarray(y.astype(np.int32))
    losses = []
    for _ in range(2):
        losses.append(step.epoch(Xd, yd, opt.lr, state)[0])
        state.epoch += 1
    assert state.step == 2 * step.steps_per_epoch == 6
    assert losses == history["loss"]
    for (_, w_fit, _, _), (_, w, _, _) in zip(fitted.param_groups(), model.param_groups()):
        assert np.array_equal(be.to_host(w_fit), be.to_host(w))
