"""The optimizer table (gpumlp.optim.RULES) and what reads it: every rule's kernel on every
backend, PyTorch oracles (torch.optim where it has the rule, the Lion paper's algorithm in torch
ops where it has not), CUDA-graph replay, exact resume, the CLI, the estimator and the bench peer.
Kernel parity per backend is in test_kernel_parity.py (test_optimizer_steps reads the table)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpumlp import checkpoint
from gpumlp.backend import BackendUnavailable, make_cuda_backend
from gpumlp.kernels import reference as ref
from gpumlp.model import MLP
from gpumlp.optim import DECAYS, HYPERS, OPTIMIZERS, RULES, Optimizer

TWINS = [n for n in OPTIMIZERS if RULES[n].torch]


def _toy(n=130, f=16, k=3, seed=2):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, f)).astype(np.float32), rng.integers(0, k, n)


# ------------------------------------------------------------------ the table itself
def test_every_rule_names_a_kernel_every_backend_has_with_its_arguments(be):
    """kernel(w, g, *state, lr, ...), its state parameters named as the rule's, takes each
    hyper-parameter the rule passes, plus l2 and l1 (and t where the rule says so)."""
    for name, rule in RULES.items():
        params = list(inspect.signature(getattr(be.k, rule.kernel)).parameters)
        if params[0] == "self":
            params = params[1:]
        assert params[: 3 + len(rule.state)] == ["w", "g", *rule.state, "lr"], name
        assert ("t" in params) == rule.step, name
        kwargs = Optimizer(name).kernel_kwargs(1, decayed=True)
        assert set(kwargs) <= set(params), (name, set(kwargs) - set(params))
        assert set(rule.hyper.values()) <= set(HYPERS), name


def test_specific_hypers_are_exactly_those_some_rule_takes():
    """The CLI's flags and a run config's keys for optimizer hyper-parameters (SPECIFIC_HYPERS) are
    every hyper-parameter some optimizer takes, and nothing every optimizer takes (lr, l1, l2)."""
    from gpumlp.optim import HYPERS, RULES, SPECIFIC_HYPERS

    taken = {h for rule in RULES.values() for h in rule.hyper.values()}
    assert sorted(SPECIFIC_HYPERS) == sorted(taken) and taken <= set(HYPERS)
    assert len(set(SPECIFIC_HYPERS)) == len(SPECIFIC_HYPERS)


def test_decays_apply_to_decayed_parameters_only():
    for name in OPTIMIZERS:
        opt = Optimizer(name, l1=1e-3, l2=1e-2, weight_decay=0.1)
        plain = opt.kernel_kwargs(1, decayed=False)
        decayed = opt.kernel_kwargs(1, decayed=True)
        assert plain["l1"] == plain["l2"] == 0 and decayed["l1"] == 1e-3 and decayed["l2"] == 1e-2
        if "weight_decay" in RULES[name].hyper:
            assert plain["weight_decay"] == 0 and decayed["weight_decay"] == 0.1
        assert {k: v for k, v in plain.items() if k not in DECAYS} == {
            k: v for k, v in decayed.items() if k not in DECAYS
        }


def test_per_optimizer_defaults_and_clear_errors():
    assert Optimizer("adamw").weight_decay == 0.01  # torch.optim.AdamW's default
    assert (Optimizer("lion").beta1, Optimizer("lion").beta2) == (0.9, 0.99)  # the Lion paper's
    assert Optimizer("adam").beta2 == 0.999 and Optimizer("adam").weight_decay == 0.0
    assert Optimizer("lion", beta2=0.98).to_dict()["beta2"] == 0.98
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; choose one of sgd, .*adamw, lion"):
        Optimizer("lamb")
    with pytest.raises(ValueError, match="optimizer weight_decay must be a finite number >= 0, got -1"):
        Optimizer("adamw", weight_decay=-1)
    with pytest.raises(ValueError, match=r"optimizer beta2 must be a finite number in \[0, 1\), got 1"):
        Optimizer("lion", beta2=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 0}, r"optimizer eps must be > 0 \(it keeps a denominator off zero\), got 0; leave it None"),
        ({"eps": -1e-8}, r"optimizer eps must be a finite number > 0, got -1e-08"),
        ({"eps": float("nan")}, r"optimizer eps must be a finite number > 0, got nan"),
        ({"eps": float("inf")}, r"optimizer eps must be a finite number > 0, got inf"),
        ({"beta1": 1.0}, r"optimizer beta1 must be a finite number in \[0, 1\), got 1.0"),
        ({"beta2": -0.1}, r"optimizer beta2 must be a finite number in \[0, 1\), got -0.1"),
        ({"rho": float("nan")}, r"optimizer rho must be a finite number in \[0, 1\), got nan"),
        ({"momentum": 1}, r"optimizer momentum must be a finite number in \[0, 1\), got 1"),
    ],
)
@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "adam", "adamw"])
def test_eps_and_rates_out_of_range_fail_at_construction(name, kwargs, message):
    """eps <= 0 (0/0 on an exactly-zero gradient), NaN or inf, and a decay rate outside [0, 1):
    a ValueError when the optimizer is built, and fit fails before any step."""
    with pytest.raises(ValueError, match=message):
        Optimizer(name, **kwargs)
    model = MLP("5-4-3", backend="numpy")
    before = model.state_arrays()
    with pytest.raises(ValueError, match=message):
        model.fit(*_toy(n=20, f=5), epochs=1, optimizer=name, **kwargs)
    for key, a in model.state_arrays().items():
        np.testing.assert_array_equal(a, before[key])
    assert Optimizer(name, eps=1e-30).eps == 1e-30  # tiny but positive is fine


# ------------------------------------------------------------------ PyTorch oracles
@pytest.mark.parametrize("name", TWINS)
def test_torch_optim_twin_matches_the_reference(name):
    """Five steps of torch.optim.<twin> on float64 tensors == five reference kernel steps
    (with L2, or AdamW's decoupled decay, so the decay path is checked too)."""
    torch = pytest.importorskip("torch")
    opt = Optimizer(name, lr=0.05, l2=0.0 if name == "adamw" else 1e-2, weight_decay=0.1)
    cls, kwargs = opt.torch_twin()
    rng = np.random.default_rng(7)
    w = rng.standard_normal(40)
    p = torch.nn.Parameter(torch.tensor(w.copy()))
    peer = getattr(torch.optim, cls)([p], lr=opt.lr, **kwargs)
    state = [np.zeros_like(w) for _ in opt.rule.state]
    for t in range(1, 6):
        g = rng.standard_normal(40)
        p.grad = torch.tensor(g.copy())
        peer.step()
        getattr(ref, opt.rule.kernel)(w, g, *state, opt.lr, **opt.kernel_kwargs(t, decayed=True))
    np.testing.assert_allclose(w, p.detach().numpy(), rtol=1e-12, atol=1e-13)


def _lion_torch(params, grads, moments, lr, beta1, beta2, wd):
    """Chen et al. 2023, Program 1 (Lion), in torch ops: update = sign(interp(g, m, b1)) + wd*w;
    w -= lr*update; m = interp(g, m, b2)."""
    import torch

    for w, g, m in zip(params, grads, moments):
        update = torch.sign(beta1 * m + (1 - beta1) * g) + wd * w
        w.sub_(lr * update)
        m.copy_(beta2 * m + (1 - beta2) * g)


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_lion_matches_the_paper_written_in_torch(wd):
    torch = pytest.importorskip("torch")
    opt = Optimizer("lion", lr=0.01, weight_decay=wd)
    rng = np.random.default_rng(8)
    w, m = rng.standard_normal(60), np.zeros(60)
    tw, tm = torch.tensor(w.copy()), torch.zeros(60, dtype=torch.float64)
    for t in range(1, 8):
        g = rng.standard_normal(60)
        _lion_torch([tw], [torch.tensor(g)], [tm], opt.lr, opt.beta1, opt.beta2, wd)
        ref.lion_step(w, g, m, opt.lr, **opt.kernel_kwargs(t, decayed=True))
    np.testing.assert_allclose(w, tw.numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(m, tm.numpy(), rtol=1e-12, atol=1e-15)


def test_adamw_trains_like_torch_adamw_end_to_end():
    """A whole fit with AdamW (numpy, float64, one full batch per epoch) against torch.optim.AdamW
    on the same MLP, its biases in a group without decay (gpumlp decays weights only)."""
    torch = pytest.importorskip("torch")
    X, y = _toy(n=64, f=6, k=3)
    X = X.astype(np.float64)
    kw = dict(act="tanh", dtype="float64", backend="numpy", seed=4)
    params = [la.params[k] for la in MLP("6-8-3", **kw).layers if "W" in la.params for k in ("W", "b")]
    tparams = [torch.tensor(a.copy(), requires_grad=True) for a in params]  # W0, b0, W1, b1
    groups = [{"params": tparams[0::2], "weight_decay": 0.2}, {"params": tparams[1::2], "weight_decay": 0.0}]
    peer = torch.optim.AdamW(groups, lr=0.02)
    xt, yt = torch.tensor(X), torch.tensor(y)
    for _ in range(6):
        peer.zero_grad()
        hidden = torch.tanh(xt @ tparams[0] + tparams[1])
        torch.nn.functional.cross_entropy(hidden @ tparams[2] + tparams[3], yt).backward()
        peer.step()
    model = MLP("6-8-3", **kw)
    model.fit(X, y, epochs=6, batch_size=64, optimizer="adamw", lr=0.02, weight_decay=0.2, shuffle=False)
    ours = [la.params[k] for la in model.layers if "W" in la.params for k in ("W", "b")]
    for i, (a, tp) in enumerate(zip(ours, tparams)):
        np.testing.assert_allclose(a, tp.detach().numpy(), rtol=1e-9, atol=1e-11, err_msg=f"param {i}")


# ------------------------------------------------------------------ the training loop
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_cuda_graph_replays_train_every_optimizer_bit_for_bit(opt):
    """Replayed CUDA graphs (the step number read on the device: Adam's and AdamW's bias
    correction) give the eager steps' weights and optimizer state exactly, on the emulated device."""
    try:
        be = make_cuda_backend("cuda-emu", gemm="own")  # eager steps on the GEMM graphs use
    except BackendUnavailable as e:
        pytest.skip(str(e))
    X, y = _toy()
    kw = dict(epochs=2, batch_size=20, optimizer=opt, lr=10 * RULES[opt].lr, l2=1e-3, weight_decay=0.05)
    kw["seed"] = 3
    results = []
    for graphs in (False, True):
        model = MLP("16-12-3", backend=be, seed=1)
        hist = model.fit(X, y, **kw, cuda_graphs=graphs)
        results.append((hist["loss"], model.state_arrays()))
    assert results[1][0] == results[0][0]
    for key, eager in results[0][1].items():
        np.testing.assert_array_equal(results[1][1][key], eager, err_msg=key)


def test_resume_refuses_a_checkpoint_with_other_optimizer_state(tmp_path):
    """The number of state arrays per parameter group comes from the table: an Adam checkpoint
    relabelled as Lion (two moments where Lion keeps one) is refused before anything loads."""
    X, y = _toy(n=40, f=4)
    path = tmp_path / "c.npz"
    MLP("4-8-3", backend="numpy").fit(X, y, epochs=1, batch_size=10, optimizer="adam", checkpoint_path=path)
    arrays, meta = checkpoint.read(path)
    meta["train"]["optimizer"]["name"] = "lion"
    relabelled = checkpoint.write(tmp_path / "relabelled.npz", arrays, meta)
    fresh = MLP("4-8-3", backend="numpy")
    init = fresh.state_arrays()
    with pytest.raises(checkpoint.CheckpointError, match=r"holds 2 optimizer arrays .* lion keeps 1 \(m\)"):
        fresh.fit(X, y, epochs=2, batch_size=10, optimizer="lion", checkpoint_path=relabelled, resume=True)
    for key, a in fresh.state_arrays().items():
        np.testing.assert_array_equal(a, init[key])


@pytest.mark.parametrize("opt, lr", [("adamw", "0.003"), ("lion", "0.001")])
def test_cli_trains_with_the_new_optimizers(opt, lr, tmp_path):
    """``gpumlp train --optimizer adamw|lion --weight-decay`` end to end on an MNIST slice: the
    hyper-parameters line shows the decay, it learns, and the run's config keeps it for --resume."""
    out = tmp_path / "run"
    args = ["train", "--limit", "1000", "--spec", "784-32-10", "--optimizer", opt, "--lr", lr]
    args += ["--weight-decay", "0.05", "--epochs", "2", "--schedule", "constant", "--no-progress"]
    args += ["--out", str(out)]
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    proc = subprocess.run([sys.executable, "-m", "gpumlp", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"optimizer {opt}, lr {lr}, weight_decay 0.05," in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5
    assert metrics["config"]["fit"]["weight_decay"] == 0.05
    again = ["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "gpumlp", *again], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((out / "history.json").read_text())["records"]) == 3


def _cli(*args) -> subprocess.CompletedProcess:
    """``python -m gpumlp ARGS`` on the numpy backend."""
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    cmd = [sys.executable, "-m", "gpumlp", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _takers(key: str) -> str:
    return ", ".join(n for n in OPTIMIZERS if key in RULES[n].hyper.values())


@pytest.mark.parametrize(
    "opt, rates",
    [
        ("adam", {"beta1": 0.8, "beta2": 0.95, "eps": 1e-6}),
        ("rmsprop", {"rho": 0.8, "eps": 1e-4}),
        ("lion", {"beta1": 0.5, "beta2": 0.9}),
        ("nesterov", {"momentum": 0.5}),
    ],
)
def test_cli_rate_flags_reach_the_optimizer_and_the_run_records(opt, rates, tmp_path):
    """``--rho/--beta1/--beta2/--eps``: in the hyper-parameters line and config.json, so a plain
    --resume keeps them; the checkpoint's optimizer (the one fit built) has them, and they change
    the training (the loss of the same run with the defaults differs)."""
    flags = [arg for key, value in rates.items() for arg in (f"--{key}", value)]
    run = ["train", "--limit", "1000", "--spec", "784-32-10", "--optimizer", opt, "--lr", "0.003"]
    run += ["--epochs", "1", "--schedule", "constant", "--no-progress"]
    out = tmp_path / "run"
    proc = _cli(*run, *flags, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert ", ".join(f"{key} {value:g}" for key, value in rates.items()) in proc.stderr
    config = json.loads((out / "config.json").read_text())["fit"]
    assert {key: config[key] for key in rates} == rates
    proc = _cli("train", "--out", out, "--resume", "--epochs", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    _, meta = checkpoint.read(out / "checkpoint.npz")
    used = meta["train"]["optimizer"]
    assert meta["train"]["epoch"] == 2 and {key: used[key] for key in rates} == rates
    resumed = json.loads((out / "config.json").read_text())["fit"]
    assert {key: resumed[key] for key in rates} == rates
    default = _cli(*run, "--out", tmp_path / "default")
    assert default.returncode == 0, default.stderr
    history = [json.loads((d / "history.json").read_text()) for d in (out, tmp_path / "default")]
    assert history[0]["records"][0]["loss"] != history[1]["records"][0]["loss"]


def _not_for(key: str, opt: str) -> str:
    flag = "--" + key.replace("_", "-")
    return f"{flag} does not apply to optimizer {opt}; it is a hyper-parameter of {_takers(key)}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--optimizer", "adam", "--beta1", "1"], "argument --beta1: '1' is not a number in [0, 1)"),
        (["--optimizer", "lion", "--beta2", "-0.5"], "argument --beta2: '-0.5' is not a number in [0, 1)"),
        (["--optimizer", "rmsprop", "--rho", "1.5"], "argument --rho: '1.5' is not a number in [0, 1)"),
        (["--optimizer", "adam", "--eps", "0"], "argument --eps: '0' is not a number > 0"),
        (["--optimizer", "sgd", "--beta2", "0.9"], f"--beta2 does not apply to optimizer sgd; it is a "
                                                   f"hyper-parameter of {_takers('beta2')}"),
        (["--optimizer", "lion", "--eps", "1e-6"], f"--eps does not apply to optimizer lion; it is a "
                                                   f"hyper-parameter of {_takers('eps')}"),
        (["--preset", "seed", "--rho", "0.9"], f"--rho does not apply to optimizer sgd; it is a "
                                               f"hyper-parameter of {_takers('rho')}"),
        (["--optimizer", "momentum", "--momentum", "1"], "argument --momentum: '1' is not a number in "
                                                         "[0, 1)"),
        (["--optimizer", "adam", "--momentum", "0.5"], _not_for("momentum", "adam")),
        (["--preset", "seed", "--momentum", "0.9"], _not_for("momentum", "sgd")),
        (["--optimizer", "adam", "--weight-decay", "0.1"], _not_for("weight_decay", "adam")),
        (["--optimizer", "momentum", "--weight-decay", "0"], _not_for("weight_decay", "momentum")),
    ],
)  # fmt: skip
def test_cli_rate_flags_are_checked(flags, message, tmp_path):
    """A rate outside [0, 1), eps <= 0, or a flag the run's optimizer does not take (from --optimizer
    or the preset; --momentum and --weight-decay too, which the presets set): one error line naming
    the optimizers that take it, exit 2, no run config written."""
    proc = _cli("train", *flags, "--epochs", "1", "--out", tmp_path / "run")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert message in proc.stderr and not (tmp_path / "run" / "config.json").exists()


def test_estimator_takes_every_optimizer_and_weight_decay():
    pytest.importorskip("sklearn")
    from sklearn.base import clone

    from gpumlp import MLPClassifier

    X, y = _toy(n=90, f=5)
    est = MLPClassifier((8,), optimizer="lion", lr=3e-3, weight_decay=0.1, epochs=3, backend="numpy")
    assert clone(est).get_params()["weight_decay"] == 0.1
    assert est.fit(X, y).n_iter_ == 3 and est.predict(X).shape == (90,)


def test_bench_torch_peer_uses_the_table():
    pytest.importorskip("torch")
    from gpumlp.bench.peers import TorchRecipe

    peer = TorchRecipe([4, 3, 2], "relu", "softmax_xent", "adamw", 0.01)
    assert type(peer.opt).__name__ == "AdamW" and peer.opt.defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="no twin of 'lion'; the torch peer implements sgd, .*adamw$"):
        TorchRecipe([4, 3, 2], "relu", "softmax_xent", "lion", 0.01)
