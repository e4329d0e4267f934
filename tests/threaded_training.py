"""The script of the tests that train from several threads at once, run in a subprocess (whose
environment sets the threading layer and BLAS threads): it trains 784-64-10 with Adam alone, then
from three threads together, and prints ``[] 3 True`` when none failed and every thread's weights
equal the lone run's bit for bit."""


def three_threads_training(setup: str = "", check_first: str = "") -> str:
    """The script, with ``setup`` run before the lone training and ``check_first`` after it (Python
    lines with the names of the script: np, numba, numba_cpu, numba_graph, train, want)."""
    return f"""
import threading, numba, numpy as np
from gpumlp.kernels import numba_cpu, numba_graph
from gpumlp.model import MLP
rng = np.random.default_rng(0)
X, y = rng.uniform(-1, 1, (700, 784)).astype(np.float32), rng.integers(0, 10, 700)
def train():
    m = MLP("784-64-10", act="relu", backend="numba", seed=0)
    m.fit(X, y, epochs=2, batch_size=100, optimizer="adam", lr=1e-3, seed=1)
    return m.state_arrays()
{setup}
want, got, errors = train(), [], []
{check_first}
def work():
    try:
        got.append(train())
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in threads]; [t.join() for t in threads]
print(errors, len(got), all(all(np.array_equal(g[k], want[k]) for k in want) for g in got))
"""
