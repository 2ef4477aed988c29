"""Losses. SoftmaxCrossEntropy: softmax and cross-entropy in one numerically stable step."""

from nbcnn import ops
from nbcnn.device import to_numpy


class SoftmaxCrossEntropy:
    """Mean over the batch of -log softmax(logits)[label].

    ``forward(logits (N, M), labels (N,) ints) -> float``; ``backward() -> dlogits`` (N, M),
    the gradient of that mean. On a GPU only the scalar loss comes back to the host.
    """

    def __init__(self):
        self._probs = None
        self._labels = None

    def forward(self, logits, labels):
        loss, self._probs = ops.softmax_xent_forward(logits, labels)
        self._labels = labels
        return float(to_numpy(loss)[0])

    __call__ = forward

    def backward(self):
        if self._probs is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return ops.softmax_xent_backward(self._probs, self._labels)

    @property
    def probs(self):
        """The softmax of the last forward's logits."""
        return self._probs
