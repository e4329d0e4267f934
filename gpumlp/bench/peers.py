"""The PyTorch peer: the same recipe as gpumlp.train.fit, written the way a PyTorch user would.

Same layers (initialised from the gpumlp model built with the same seed), same
activation and loss (the seed's logistic cost is BCEWithLogits against one-hot
targets, summed over classes), same optimizer, batch size, per-epoch shuffled
permutation (the same NumPy generator), one gather per minibatch, loss and
accuracy accumulated on the device and read once per epoch, device synchronised
before the clock stops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

_THREADS_SET = False


def torch_unavailable() -> str | None:
    """None when torch imports, else the reason (install hint included)."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"PyTorch is not installed ({e}); pip install 'gpumlp[peer]'"
    return None


def peer_variants() -> dict[str, str]:
    """Peer name -> description of what runs: eager everywhere, compiled/graphs on a GPU."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    names = {"torch": f"PyTorch {torch.__version__} eager on {dev}"}
    if dev == "cuda":
        names["torch-graphs"] = f"PyTorch {torch.__version__} torch.compile(mode='reduce-overhead') on cuda"
    return names


def _setup_threads() -> None:
    global _THREADS_SET
    import torch

    if not _THREADS_SET:
        torch.set_num_threads(os.cpu_count() or 1)
        _THREADS_SET = True


class TorchRecipe:
    """A torch.nn MLP + optimizer mirroring one gpumlp config, ready to train on device data."""

    def __init__(
        self,
        widths: Sequence[int],
        act: str,
        loss: str,
        optimizer: str,
        lr: float,
        dtype: str = "float32",
        seed: int = 0,
        name: str = "torch",
        lr_gamma: float = 1.0,
    ):
        import torch

        from gpumlp.export import TORCH_ACTIVATIONS
        from gpumlp.model import MLP
        from gpumlp.optim import OPTIMIZERS, Optimizer

        _setup_threads()
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, dtype)
        act_name, act_kwargs = TORCH_ACTIVATIONS[act]
        ref = MLP(list(widths), act=act, loss=loss, dtype=dtype, backend="numpy", seed=seed)
        layers: list = []
        dense = [la for la in ref.layers if "W" in la.params]
        for i, la in enumerate(dense):
            lin = torch.nn.Linear(*la.params["W"].shape)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(la.params["W"].T)))
                lin.bias.copy_(torch.from_numpy(la.params["b"]))
            layers.append(lin)
            if i < len(dense) - 1:
                layers.append(getattr(torch.nn, act_name)(**act_kwargs))
        self.model = torch.nn.Sequential(*layers).to(self.device, self.dtype)
        self.logistic = ref.loss.name == "logistic"
        if ref.loss.name not in ("logistic", "softmax_xent"):
            raise ValueError(f"the torch peer implements logistic and softmax_xent, not {loss!r}")
        twin = Optimizer(optimizer, lr=lr).torch_twin()
        if twin is None:
            names = ", ".join(n for n in OPTIMIZERS if Optimizer(n).torch_twin())
            raise ValueError(f"torch.optim has no twin of {optimizer!r}; the torch peer implements {names}")
        self.opt = getattr(torch.optim, twin[0])(self.model.parameters(), lr=lr, **twin[1])
        self.forward = self.model
        if name == "torch-graphs":
            self.forward = torch.compile(self.model, mode="reduce-overhead")
        self.n_classes = int(widths[-1])
        self.lr, self.lr_gamma = lr, lr_gamma  # per-epoch exponential decay, as gpumlp's Schedule("exp")

    def sync(self) -> None:
        """Wait for the device (no-op on the CPU)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def upload(self, X: np.ndarray, y: np.ndarray):
        """Host float X (n,F), int y (n,) -> device tensors (X, y, one-hot y)."""
        torch = self.torch
        Xd = torch.from_numpy(np.ascontiguousarray(X)).to(self.device, self.dtype)
        yd = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device)
        onehot = torch.nn.functional.one_hot(yd, self.n_classes).to(self.dtype)
        return Xd, yd, onehot

    def _loss_sum(self, scores, yb, tb):
        F = self.torch.nn.functional
        if self.logistic:
            return F.binary_cross_entropy_with_logits(scores, tb, reduction="sum")
        return F.cross_entropy(scores, yb, reduction="sum")

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        epochs: int,
        batch_size: int,
        reduction: str = "mean",
        seed: int = 0,
        callbacks: Sequence[Callable[[dict, TorchRecipe], bool | None]] = (),
    ) -> list[dict]:
        """Train like gpumlp.train.fit; -> per-epoch records (seconds, loss, train_acc).
        A callback returning True stops training."""
        torch = self.torch
        Xd, yd, td = self.upload(X, y)
        n, B = Xd.shape[0], min(batch_size, Xd.shape[0])
        rng = np.random.default_rng(seed)
        records = []
        self.model.train()
        for epoch in range(epochs):
            t0 = time.perf_counter()
            for group in self.opt.param_groups:
                group["lr"] = self.lr * self.lr_gamma**epoch
            perm = torch.from_numpy(rng.permutation(n)).to(self.device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.int64, device=self.device)
            for s in range(0, n, B):
                idx = perm[s : s + B]
                xb, yb, tb = Xd.index_select(0, idx), yd.index_select(0, idx), td.index_select(0, idx)
                scores = self.forward(xb)
                loss = self._loss_sum(scores, yb, tb)
                scale = 1.0 / idx.shape[0] if reduction == "mean" else 1.0
                self.opt.zero_grad(set_to_none=True)
                (loss * scale).backward()
                self.opt.step()
                loss_sum += loss.detach()
                correct += (scores.detach().argmax(1) == yb).sum()
            self.sync()
            rec = {
                "epoch": epoch + 1,
                "loss": float(loss_sum) / n,
                "train_acc": int(correct) / n,
                "seconds": time.perf_counter() - t0,
            }
            records.append(rec)
            if any(cb(rec, self) for cb in callbacks):
                break
        return records

    def accuracy(self, X: np.ndarray, y: np.ndarray, batch_size: int = 2000) -> float:
        """Test accuracy on host data, in eval mode without gradients."""
        torch = self.torch
        Xd, yd, _ = self.upload(X, y)
        correct = 0
        with torch.no_grad():
            for s in range(0, Xd.shape[0], batch_size):
                correct += int((self.model(Xd[s : s + batch_size]).argmax(1) == yd[s : s + batch_size]).sum())
        return correct / Xd.shape[0]
