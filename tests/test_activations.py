"""The activation table (kernels/activations.py) is the one definition every backend follows:
its codes match device_common.h's, unknown codes fail loudly in every kernel, the layers keep
the pre-activation only where the derivative needs it, and the newer activations (GELU exact and
tanh, SiLU, softplus) agree with PyTorch forward and backward and train alike under CUDA graphs.
(Per-kernel parity and finite-difference checks of every activation are in test_kernel_parity.py
and test_gradients.py, parametrised over the table.)"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import loadable_backends

from gpumlp.backend import BackendUnavailable, get_backend, make_cuda_backend
from gpumlp.kernels import activations, numba_cpu
from gpumlp.kernels import reference as ref
from gpumlp.layers import Activation, Dense
from gpumlp.model import MLP

HEADER = Path(activations.__file__).parent / "cuda" / "device_common.h"
NEW = ("gelu", "gelu_tanh", "silu", "softplus")


def test_device_common_codes_are_the_tables():
    defined = {m[1]: int(m[2]) for m in re.finditer(r"#define ACT_(\w+) (\d+)", HEADER.read_text())}
    assert defined == {row.name.upper(): row.code for row in activations.TABLE.values()}


def test_codes_are_distinct_and_below_the_internal_passes():
    codes = [row.code for row in activations.TABLE.values()]
    assert sorted(codes) == list(range(len(codes)))
    assert activations.ACTIVATIONS == ref.ACTIVATIONS == tuple(activations.TABLE)
    assert min(numba_cpu._NEGATE, numba_cpu._SIGMOID_FINISH) >= activations.CODE_LIMIT > max(codes)


def test_every_switch_on_codes_has_a_case_per_activation():
    """activate / activate_grad in device_common.h and numba_cpu's two kernels branch on every code."""
    text = HEADER.read_text()
    for fn in ("activate", "activate_grad"):
        body = text[text.index(f"__device__ __forceinline__ T {fn}(") :].split("\n}\n", 1)[0]
        cases = set(re.findall(r"case ACT_(\w+):", body))
        assert cases == {name.upper() for name in activations.ACTIVATIONS}, fn
        assert "default: __trap();" in body, fn
    for kernel in (numba_cpu._bias_act_rows, numba_cpu._act_grad_range):
        source = inspect.getsource(kernel.py_func)
        codes = {int(c) for c in re.findall(r"code == (\d+)", source)}
        assert codes == {row.code for row in activations.TABLE.values()}, kernel
        assert 'raise ValueError("' in source.split("    else:")[-1], kernel


def test_unknown_activation_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'; choose one of identity, .*softplus"):
        activations.activation("swish")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        Dense(3, "swish")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        Activation("swish")


def test_an_unknown_code_traps_in_the_cuda_kernels():
    """device_common.h's default case is __trap(): the emulated launch fails, naming the kernel,
    instead of returning the input as if it were the identity."""
    try:
        emu = get_backend("cuda-emu")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    z = emu.asarray(np.ones((2, 3), np.float32))
    b, out = emu.asarray(np.zeros(3, np.float32)), emu.xp.empty((2, 3), dtype=np.float32)
    n, slope = np.int64(6), np.float32(0.01)
    bias_act = emu.k._kernel("bias_act", "f32")
    with pytest.raises(RuntimeError, match=r"kernel bias_act_f32 .* called __trap\(\)"):
        bias_act((1,), (32,), (z, b, out, out, n, np.int32(3), np.int32(99), np.int32(0), slope))
    act_grad = emu.k._kernel("act_grad", "f32")
    with pytest.raises(RuntimeError, match=r"kernel act_grad_f32 .* called __trap\(\)"):
        act_grad((1,), (32,), (z, z, z, out, n, np.int32(activations.CODE_LIMIT), slope))
    ok = emu.k.bias_act(z, b, "relu")  # the device is still usable after a trapped launch
    np.testing.assert_array_equal(emu.to_host(ok), np.ones((2, 3), np.float32))


def test_an_unknown_code_raises_in_the_numba_kernels():
    z = np.ones((2, 3))
    with pytest.raises(ValueError, match="unknown activation code"):
        numba_cpu._bias_act_serial(z, z[0], np.empty_like(z), z, False, 99)
    with pytest.raises(ValueError, match="unknown activation code"):
        numba_cpu._act_grad_serial(z.ravel(), z.ravel(), z.ravel(), np.empty(6), 99)


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_layers_keep_the_pre_activation_only_where_the_derivative_needs_it(act):
    be = get_backend("numpy")
    dense = Dense(4, act)
    dense.build(be, 3, np.dtype(np.float64), np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(5, 3))
    dense.forward(x, train=True)
    kept = {name for name, _ in dense._workspace}
    assert kept == ({"z", "y", "pre"} if activations.needs_input(act) else {"z", "y"})
    dense.forward(x, train=False)  # inference keeps nothing for a backward pass
    assert {name for name, _ in dense._eval_workspace} == {"z", "y"}
    layer = Activation(act)
    layer.build(be, 3, np.dtype(np.float64), np.random.default_rng(0))
    layer.forward(x, train=True)
    assert (layer._pre is x) == activations.needs_input(act)  # its input is the pre-activation


def _torch_act(torch, act: str):
    F = torch.nn.functional
    return {
        "gelu": lambda s: F.gelu(s, approximate="none"),
        "gelu_tanh": lambda s: F.gelu(s, approximate="tanh"),
        "silu": F.silu,
        "softplus": F.softplus,
    }[act]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", NEW)
def test_dense_forward_and_backward_match_torch(be, act, dtype):
    """y = act(x W + b) and dx, dW, db of sum(y * r) against torch.nn.functional on the same
    numbers, pre-activations over about [-10, 10]."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    layer = Dense(7, act)
    layer.build(be, 5, np.dtype(dtype), rng)
    x = rng.uniform(-3, 3, size=(16, 5)).astype(dtype)
    r = rng.normal(size=(16, 7)).astype(dtype)
    y = be.to_host(layer.forward(be.asarray(x), train=True))
    dx = be.to_host(layer.backward(be.asarray(r), need_dx=True))
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(be.to_host(layer.params["W"]), requires_grad=True)
    tb = torch.tensor(be.to_host(layer.params["b"]), requires_grad=True)
    ty = _torch_act(torch, act)(tx @ tw + tb)
    (ty * torch.tensor(r)).sum().backward()
    rtol, atol = (1e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-13)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=rtol, atol=atol, err_msg="y")
    grads = (("dx", dx, tx.grad), ("dW", layer.grads["W"], tw.grad), ("db", layer.grads["b"], tb.grad))
    for name, got, want in grads:  # dW and db sum 16 rows: a reduction's tolerance
        np.testing.assert_allclose(be.to_host(got), want.numpy(), 10 * rtol, 10 * atol, err_msg=name)


@pytest.mark.parametrize("act", NEW)
def test_reference_matches_torch_over_a_wide_range(act):
    """The table's NumPy definitions, value and derivative, on a grid over [-30, 30] in float64
    (softplus to 20 only: torch's softplus is the identity beyond its threshold 20)."""
    torch = pytest.importorskip("torch")
    s = np.linspace(-30, 20 if act == "softplus" else 30, 5001)
    ts = torch.tensor(s, requires_grad=True)
    ty = _torch_act(torch, act)(ts)
    ty.sum().backward()
    y = ref.bias_act(s[None, :], np.zeros(1), act)[0]
    d = ref.act_grad(np.ones((1, s.size)), y[None, :], act, pre=s[None, :])[0]
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d, ts.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("act", NEW)
def test_reference_keeps_its_relative_accuracy_in_the_negative_tail(act):
    """Where the values are tiny (s in [-30, -5]), GELU through erfc and its tanh form through
    sigmoid(2u) do not cancel as 1 + erf / 1 + tanh would (torch's float64 GELU gives 0 there):
    checked against 50-digit mpmath."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    exact = {
        "gelu": lambda s: s * mp.erfc(-s / mp.sqrt(2)) / 2,
        "gelu_tanh": lambda s: s / (1 + mp.exp(-2 * mp.sqrt(2 / mp.pi) * (s + mp.mpf("0.044715") * s**3))),
        "silu": lambda s: s / (1 + mp.exp(-s)),
        "softplus": lambda s: mp.log1p(mp.exp(s)),
    }[act]
    s = np.linspace(-30, -5, 251)
    y = ref.bias_act(s[None, :], np.zeros(1), act)[0]
    want = np.array([float(exact(mp.mpf(float(v)))) for v in s])
    normal = np.abs(want) > 1e-300  # subnormal results keep no relative accuracy anywhere
    assert normal.sum() > 100
    np.testing.assert_allclose(y[normal], want[normal], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", [n for n in loadable_backends() if n != "numpy"])
def test_new_activations_train_like_the_reference(name):
    """A few seeded Adam epochs on toy data: gelu (pre-activation kept by Dense), silu after batch
    norm (kept by Activation: its input) and softplus (from the output) follow numpy's loss curve;
    on CUDA backends a replayed graph step trains exactly like the eager one."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 12)).astype(np.float32), rng.integers(0, 3, 300)
    kw = dict(epochs=3, batch_size=32, optimizer="adam", lr=1e-2, seed=1)
    for act, extra in (("gelu", {}), ("gelu_tanh", {}), ("silu", {"batchnorm": True}), ("softplus", {})):
        curves, states = [], []
        variants = [("numpy", {}), (name, {})] + ([(name, {"cuda_graphs": True})] if "cu" in name else [])
        for backend, fit_extra in variants:
            if backend != "numpy" and "cu" in name:
                try:
                    backend = make_cuda_backend(name, gemm="own")  # graphs use our GEMM: like with like
                except BackendUnavailable as e:
                    pytest.skip(str(e))
            model = MLP("12-16-8-3", act=act, backend=backend, seed=1, **extra)
            curves.append(np.array(model.fit(X, y, **kw, **fit_extra)["loss"]))
            states.append(model.state_arrays())
        for curve in curves[1:]:
            np.testing.assert_allclose(curve, curves[0], rtol=1e-3, err_msg=act)
        assert curves[0][-1] < curves[0][0], act  # it learns
        if len(states) == 3:  # eager and graph steps on the CUDA backend: bit for bit
            for key, eager in states[1].items():
                np.testing.assert_array_equal(states[2][key], eager, err_msg=f"{act} {key}")


@pytest.mark.parametrize("act", ["gelu", "softplus"])
def test_cli_trains_with_the_tables_activations(act, tmp_path):
    """``--act`` offers every row of the table (one that needs the pre-activation, one that does not)."""
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    args = ["--limit", "2000", "--spec", "784-32-10", "--optimizer", "adam", "--lr", "0.003", "--no-progress"]
    cmd = [sys.executable, "-m", "gpumlp", "train", *args, "--act", act, "--epochs", "1", "--out", tmp_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["model"]["act"] == act and metrics["test_accuracy"] > 0.6
    usage = subprocess.run([*cmd[:4], "--help"], capture_output=True, text=True, timeout=60, env=env).stdout
    assert "{" + ",".join(activations.ACTIVATIONS) + "}" in usage.replace("\n", "").replace(" ", "")


@pytest.mark.parametrize("act", NEW)
def test_bench_torch_peer_builds_the_same_network(act):
    """The benchmark's PyTorch peer maps the activation through the export's table: same logits."""
    torch = pytest.importorskip("torch")
    from gpumlp.bench.peers import TorchRecipe

    recipe = TorchRecipe([12, 16, 8, 3], act, "softmax_xent", "sgd", 0.1, dtype="float64", seed=2)
    model = MLP([12, 16, 8, 3], act=act, dtype="float64", backend="numpy", seed=2)
    x = np.random.default_rng(0).normal(size=(10, 12)) * 3
    with torch.no_grad():
        got = recipe.model(torch.from_numpy(x).to(recipe.device)).cpu().numpy()
    # the peer's Linear layers hold the weights rounded through float32; GELU's two forms differ by ~1e-3
    np.testing.assert_allclose(got, model.forward(x), rtol=1e-5, atol=1e-6)
