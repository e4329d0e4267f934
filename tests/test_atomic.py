"""gpumlp.atomic.atomic_write: the one atomic writer behind checkpoints, run JSON, the MNIST cache
and MNIST downloads; each caller's file gets the same permissions and leaves no temp file."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from test_data import tiny_mnist

from gpumlp import checkpoint, rundir
from gpumlp.atomic import atomic_write
from gpumlp.data import load_mnist


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_the_file_with_umask_permissions(tmp_path, umask_022):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # not visible before the rename
        assert os.path.basename(f.name).startswith(f".a.bin.{os.getpid()}.") and f.name.endswith(".tmp")
    assert target.read_bytes() == b"new" and _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target, "w") as f:
        f.write("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_every_writer_goes_through_it(tmp_path, umask_022):
    """checkpoint.write, rundir.write_json and the MNIST cache: same permissions, no temp files left."""
    ck = checkpoint.write(tmp_path / "c.npz", {"w": np.arange(3.0)}, {"k": 1})
    rundir.write_json(tmp_path / "h.json", {"a": [1, 2]})
    d = tiny_mnist(tmp_path / "m")
    load_mnist(d)  # builds mnist.npz
    assert checkpoint.read(ck)[1]["k"] == 1 and json.loads((tmp_path / "h.json").read_text()) == {"a": [1, 2]}
    for path in (ck, tmp_path / "h.json", d / "mnist.npz"):
        assert _mode(path) == 0o644, path
    assert not list(tmp_path.rglob("*.tmp"))
