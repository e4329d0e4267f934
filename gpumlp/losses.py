"""Costs: softmax cross-entropy, logistic (sigmoid cross-entropy) and MSE.

Each cost is fused with its gradient in one kernel call and works from
integer class labels. The network's last layer emits raw scores; a cost says
which activation turns scores into outputs (``output_act``) and how to turn
them into class probabilities for ``predict_proba``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpumlp.backend import Backend


@dataclass(frozen=True)
class Loss:
    """A cost: ``kernel`` names the fused loss+gradient kernel of the contract;
    ``output_act`` is the activation of the last Dense layer (identity when the
    kernel applies its own, as softmax and sigmoid cross-entropy do)."""

    name: str
    kernel: str
    output_act: str

    def __call__(self, be: Backend, scores, labels, grad=None, grad_scale: float = 1.0, loss=None):
        """scores: (B,K), labels: (B,) int -> (0-d summed loss, (B,K) scaled gradient);
        with ``loss`` (0-d, scores' dtype) the batch sum is added into it on the device."""
        return getattr(be.k, self.kernel)(scores, labels, grad=grad, grad_scale=grad_scale, loss=loss)

    @property
    def proba_act(self) -> str | None:
        """The elementwise activation that turns scores into probabilities (identity: the outputs
        are the probabilities, as for MSE), or None where that is not elementwise (softmax)."""
        return {"softmax_xent": None, "sigmoid_bce": "sigmoid"}.get(self.kernel, "identity")

    def probabilities(self, be: Backend, scores, out=None):
        """(B,K) scores -> (B,K) class probabilities (or outputs, for MSE), into ``out`` when
        given (``out=scores`` works in place)."""
        if self.kernel == "softmax_xent":
            return be.k.softmax(scores, out=out)
        act = self.proba_act
        if act != "identity":
            return be.k.bias_act(scores, be.xp.zeros(scores.shape[1], dtype=scores.dtype), act, out=out)
        if out is not None and out is not scores:
            out[...] = scores
            return out
        return scores


LOSSES = {
    "softmax_xent": Loss("softmax_xent", "softmax_xent", "identity"),
    "logistic": Loss("logistic", "sigmoid_bce", "identity"),
    "mse": Loss("mse", "mse", "sigmoid"),
}
ALIASES = {
    "cross_entropy": "softmax_xent",
    "xent": "softmax_xent",
    "sigmoid_bce": "logistic",
    "bce": "logistic",
}


def get_loss(name: str) -> Loss:
    """Look a cost up by name (``softmax_xent``, ``logistic``, ``mse`` or an alias)."""
    key = ALIASES.get(name, name)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join([*LOSSES, *ALIASES])}")
    return LOSSES[key]
