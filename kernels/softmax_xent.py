"""Softmax cross-entropy: the loss of a classifier, forward and backward, numerically stable.

Letters: N batch, M classes. logits (N, M), labels (N,) integer class ids in [0, M),
probs (N, M) the softmax, kept by forward for backward.

    probs[n, j] = exp(z[n, j] - max_j z[n]) / sum_j exp(z[n, j] - max_j z[n])
    loss = (1/N) sum_n ( log sum_j exp(z[n, j] - m_n) - (z[n, labels[n]] - m_n) )
    dlogits[n, j] = (probs[n, j] - [j == labels[n]]) / N

Subtracting the row maximum m_n keeps every exp in (0, 1], so large logits cannot
overflow, and the log of the sum is at least 0, so the loss never takes log(0).
The mean is summed in float64 in a fixed order: the loss is the same on every run.
A label outside [0, M) makes the loss NaN rather than read out of bounds (the public
entry point rejects it before that). Backward overwrites dlogits.
"""

import math

from numba import njit, prange

from ._checks import check_arrays, check_ndim, check_shape, on_host

# ------------------------------------------------------------------------ argument checks


def check_softmax_xent(fn, on_device, floats, labels, loss=None):
    """``floats`` maps names to (N, M) arrays; ``labels`` (N,) integers; ``loss`` (1,) when
    given. Returns ``(N, M)``."""
    check_arrays(fn, on_device, floats if loss is None else {**floats, "loss": loss}, {"labels": labels})
    if loss is not None:
        check_shape(fn, "loss", loss, (1,))
    first = next(iter(floats))
    check_ndim(fn, first, floats[first], ("N", "M"))
    N, M = floats[first].shape
    for name, a in floats.items():
        check_shape(fn, name, a, (N, M), ("N", "M"))
    check_shape(fn, "labels", labels, (N,), ("N",))
    if N < 1 or M < 1:
        raise ValueError(f"{fn}: need at least one sample and one class, got logits of shape {(N, M)}")
    return N, M


def check_labels_in_range(fn, labels, M):
    """Host-side check that every label is a class id in [0, M)."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= M:
        raise ValueError(f"{fn}: labels must lie in [0, {M}) for {M} classes, got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------- CPU kernels


@njit(cache=True)
def _softmax_xent_forward_cpu(loss, probs, logits, labels):
    """Row by row: stable softmax into probs, and the mean loss into loss[0]."""
    N, M = logits.shape
    total = 0.0
    for n in range(N):
        m = logits[n, 0]
        for j in range(1, M):
            m = max(m, logits[n, j])
        s = 0.0
        for j in range(M):
            e = math.exp(logits[n, j] - m)
            probs[n, j] = e
            s += e
        for j in range(M):
            probs[n, j] /= s
        label = labels[n]
        if 0 <= label < M:
            total += math.log(s) - (logits[n, label] - m)
        else:
            total += math.nan
    loss[0] = total / N


@njit(parallel=True, cache=True)
def _softmax_xent_backward_cpu(dlogits, probs, labels):
    """dlogits = (probs - onehot(labels)) / N; one task per sample."""
    N, M = probs.shape
    for n in prange(N):
        for j in range(M):
            dlogits[n, j] = probs[n, j] / N
        label = labels[n]
        if 0 <= label < M:
            dlogits[n, label] -= 1.0 / N


# ---------------------------------------------------------------- public entry points


def softmax_xent_forward_cpu(loss, probs, logits, labels):
    """Mean softmax cross-entropy of ``logits`` (N, M) against ``labels`` (N,) into ``loss`` (1,),
    the softmax into ``probs`` (N, M). Returns the loss as a Python float."""
    fn = "softmax_xent_forward_cpu"
    _, M = check_softmax_xent(fn, on_host, {"logits": logits, "probs": probs}, labels, loss)
    check_labels_in_range(fn, labels, M)
    _softmax_xent_forward_cpu(loss, probs, logits, labels)
    return float(loss[0])


def softmax_xent_backward_cpu(dlogits, probs, labels):
    """Gradient of the mean loss: ``dlogits = (probs - onehot(labels)) / N``, all (N, M). Returns ``dlogits``."""
    fn = "softmax_xent_backward_cpu"
    _, M = check_softmax_xent(fn, on_host, {"probs": probs, "dlogits": dlogits}, labels)
    check_labels_in_range(fn, labels, M)
    _softmax_xent_backward_cpu(dlogits, probs, labels)
    return dlogits
