"""The training loop on the emulated device's streams: one stream per run, uploads ordered
before the first reads, graph replays on the stream that waits for their inputs. The race
checker is on (StreamRaceError fails a test); the deferred schedule runs the cuda-emu
training tests again with the streams' work interleaved in seeded orders."""

import numpy as np

from gpumlp import checkpoint
from gpumlp.model import MLP


def _data(n=230, features=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, features)).astype(np.float32), rng.integers(0, classes, n)


FIT = dict(epochs=3, batch_size=50, optimizer="momentum", lr=0.1, seed=1)


def test_uploads_are_ordered_before_the_epochs_first_reads():
    """X, y, the weights and the loop's fills are uploaded on the default stream; the epoch's
    stream must wait for them before its first gather (or the labels it reads are garbage)."""
    X, y = _data()
    curves = {
        name: MLP("16-8-3", backend=name, seed=2).fit(X, y, **FIT)["loss"] for name in ("numpy", "cuda-emu")
    }
    np.testing.assert_allclose(curves["cuda-emu"], curves["numpy"], rtol=1e-5)


def test_resumed_weights_are_ordered_before_the_next_epoch(tmp_path):
    """Weights and optimizer state loaded from a checkpoint are uploads too."""
    X, y = _data()
    path = tmp_path / "run.npz"
    straight = MLP("16-8-3", backend="cuda-emu", seed=2)
    h = straight.fit(X, y, **FIT)
    first = MLP("16-8-3", backend="cuda-emu", seed=2)
    first.fit(X, y, **{**FIT, "epochs": 1}, checkpoint_path=path)
    assert checkpoint.read(path)[1]["train"]["epoch"] == 1
    resumed = MLP("16-8-3", backend="cuda-emu", seed=2)
    h_resumed = resumed.fit(X, y, **FIT, checkpoint_path=path, resume=True)
    assert h_resumed["loss"] == h["loss"]
