"""Run tracking: per-epoch scalars as TensorBoard event files, with the standard library only.

An event file is a TFRecord stream (``uint64 length, uint32 masked CRC-32C of
the length, data, uint32 masked CRC-32C of the data``, little-endian) of
``tensorflow.Event`` protocol buffers: the first holds ``file_version``, each
later one a ``Summary`` of ``simple_value`` scalars at a step (the epoch).
Only the few protobuf fields those need are encoded here, so neither
TensorFlow, TensorBoard nor PyTorch is needed to write them.

Use it as a training callback: ``model.fit(..., callbacks=[TensorBoardWriter("runs/tb")])``
or ``gpumlp train --tensorboard runs/tb``; then ``tensorboard --logdir runs/tb``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

# History record key -> TensorBoard tag; other numeric keys keep their own name.
TAGS = {
    "loss": "loss/train",
    "valid_loss": "loss/valid",
    "train_acc": "accuracy/train",
    "valid_acc": "accuracy/valid",
    "lr": "lr",
    "seconds": "seconds/epoch",
}


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TFRecord framing uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord frame around ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2: strings and messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(
    wall_time: float, step: int = 0, scalars: dict[str, float] | None = None, version: str = ""
) -> bytes:
    """An encoded ``Event``: wall_time (1, double), step (2, int64), file_version (3) or a
    ``Summary`` (5) of ``Value``s with tag (1) and simple_value (2, float)."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if version:
        out += _field(3, version.encode())
    if scalars:
        values = (
            _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", v) for tag, v in scalars.items()
        )
        out += _field(5, b"".join(_field(1, v) for v in values))
    return out


class TensorBoardWriter:
    """A training callback writing each epoch record's numbers as scalars at step = epoch
    (tags in :data:`TAGS`) to a new event file in ``logdir``, flushed after every epoch."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = Path(logdir)
        self.path: Path | None = None

    def _open(self) -> Path:
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{id(self)}"
        path = self.logdir / name
        path.write_bytes(tfrecord(event(time.time(), version="brain.Event:2")))
        return path

    def __call__(self, record: dict, model=None) -> None:
        """Write one epoch record (a :class:`gpumlp.train.History` row); never asks to stop."""
        if self.path is None:
            self.path = self._open()
        scalars = {
            TAGS.get(key, key): float(value)
            for key, value in record.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        with open(self.path, "ab") as f:
            f.write(tfrecord(event(time.time(), int(record["epoch"]), scalars)))
