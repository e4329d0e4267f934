"""TensorBoard event files written by gpumlp.tracking, read back with an independent
implementation: tensorboardX's CRC-32C and its copy of TensorFlow's Event protobuf schema."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from gpumlp import MLP
from gpumlp.tracking import TAGS, TensorBoardWriter, crc32c, masked_crc32c

tbx_proto = pytest.importorskip("tensorboardX.proto.event_pb2")
tbx_record = pytest.importorskip("tensorboardX.record_writer")


def read_events(logdir) -> list:
    """Every Event of the single event file in ``logdir``, each frame's two CRCs checked."""
    (name,) = [n for n in os.listdir(logdir) if "tfevents" in n]
    data, events, pos = (logdir / name).read_bytes(), [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == tbx_record.masked_crc32c(header)
        body = data[pos + 12 : pos + 12 + length]
        (crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert crc == tbx_record.masked_crc32c(body)
        events.append(tbx_proto.Event.FromString(body))
        pos += 16 + length
    return events


def scalars(events) -> dict[int, dict[str, float]]:
    """step -> {tag: value} of the summary events."""
    return {e.step: {v.tag: v.simple_value for v in e.summary.value} for e in events if e.summary.value}


def test_crc32c_matches_the_standard_and_tensorboardx():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 100, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == tbx_record.masked_crc32c(data)


def test_fit_callback_writes_every_epoch(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    model = MLP("6-8-2", backend="numpy")
    hist = model.fit(
        X, y, epochs=3, batch_size=50, optimizer="adam", lr=1e-2, valid_split=60,
        callbacks=[TensorBoardWriter(tmp_path / "tb")],
    )  # fmt: skip
    events = read_events(tmp_path / "tb")
    assert events[0].file_version == "brain.Event:2"
    got = scalars(events)
    assert sorted(got) == [1, 2, 3]
    for rec in hist.records:
        expected = {TAGS[k]: v for k, v in rec.items() if k != "epoch"}
        assert set(got[rec["epoch"]]) == set(expected) == set(TAGS.values())
        for tag, value in expected.items():
            assert got[rec["epoch"]][tag] == pytest.approx(value, rel=1e-6)  # stored as float32
    assert all(events[i].wall_time <= events[i + 1].wall_time for i in range(len(events) - 1))


def test_cli_train_tensorboard(tmp_path):
    out, tb = tmp_path / "run", tmp_path / "tb"
    args = ["train", "--limit", "1000", "--spec", "784-16-10", "--epochs", "2", "--schedule", "exp"]
    args += ["--no-progress", "--out", str(out), "--tensorboard", str(tb)]
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    proc = subprocess.run([sys.executable, "-m", "gpumlp", *args], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = scalars(read_events(tb))
    records = json.loads((out / "history.json").read_text())["records"]
    assert sorted(got) == [1, 2] == [r["epoch"] for r in records]
    for rec in records:
        assert got[rec["epoch"]]["loss/train"] == pytest.approx(rec["loss"], rel=1e-6)
        assert got[rec["epoch"]]["accuracy/valid"] == pytest.approx(rec["valid_acc"], rel=1e-6)
        assert got[rec["epoch"]]["lr"] == pytest.approx(rec["lr"], rel=1e-6)
    assert got[2]["lr"] < got[1]["lr"]  # the exp schedule, as recorded
