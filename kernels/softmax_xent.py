"""Softmax cross-entropy: the loss of a classifier, forward and backward, numerically stable.

Letters: N batch, M classes. logits (N, M), labels (N,) integer class ids in [0, M),
probs (N, M) the softmax, kept by forward for backward.

    probs[n, j] = exp(z[n, j] - max_j z[n]) / sum_j exp(z[n, j] - max_j z[n])
    loss = (1/N) sum_n ( log sum_j exp(z[n, j] - m_n) - (z[n, labels[n]] - m_n) )
    dlogits[n, j] = (probs[n, j] - [j == labels[n]]) / N

Subtracting the row maximum m_n keeps every exp in (0, 1], so large logits cannot
overflow, and the log of the sum is at least 0, so the loss never takes log(0).
The mean is summed in float64 in a fixed order: the loss is the same on every run.

Label smoothing (the training step's ``smoothing`` = e, PyTorch's ``label_smoothing``): the
target is (1 - e) on the label and e/M spread over every class, so with lse_n the log of the
row's sum of exp(z[n, j] - m_n)::

    loss_n = (1 - e) * (-log probs[n, label]) + (e/M) * sum_j (-log probs[n, j])
           = lse_n - (1 - e) * (z[n, label] - m_n) - e * mean_j (z[n, j] - m_n)
    dlogits[n, j] = (probs[n, j] - e/M - (1 - e) * [j == labels[n]]) / N

written from the logits, never as log(probs), which underflows to log(0) for a far-off class.
``count_correct`` counts the rows whose largest logit (the first, on ties) is at the
label: the accuracy's numerator, computed where the logits are.

A label outside [0, M) makes the loss NaN rather than read out of bounds: the CPU entry
points reject such labels before launching; the CUDA launchers do not look at labels
(that would copy them to the host), so there a NaN loss is the signal. Backward
overwrites dlogits.
"""

import math

import numpy as np
from numba import cuda, int32, njit, prange
from numba import float64 as numba_float64

from ._checks import check_arrays, check_ndim, check_shape, on_host
from ._cuda import (REDUCE_THREADS, blocks, gpu_arrays, grid_sum, grid_sum_pair, on_gpu, reduce_parts,
                    reduce_scratch, stream)
from ._index import compile_twice

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


def check_count_correct(fn, on_device, count, logits, labels):
    check_softmax_xent(fn, on_device, {"logits": logits}, labels)
    check_arrays(fn, on_device, {}, {"count": count})
    check_shape(fn, "count", count, (1,))


# ---------------------------------------------------- per-row work, shared by CPU and CUDA


def softmax_row(probs, logits, labels, n):
    """Write the softmax of row n into probs[n]; return the row's loss (NaN for a bad label)."""
    M = logits.shape[1]
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
        return math.log(s) - (logits[n, label] - m)
    return math.nan


def row_correct(logits, labels, n):
    """1 when row n's first largest logit is at its label, else 0."""
    best = 0
    for j in range(1, logits.shape[1]):
        if logits[n, j] > logits[n, best]:
            best = j
    return 1 if best == labels[n] else 0


def smoothed_row(loss, logits, n, smoothing):
    """Row n's loss with label smoothing, from its loss without (-log probs[n, label]):
    (1 - e) * loss + e * mean_j (-log probs[n, j]), the mean being lse - mean_j (z[n, j] - m)."""
    M = logits.shape[1]
    m = logits[n, 0]
    for j in range(1, M):
        m = max(m, logits[n, j])
    s = 0.0
    shifted = 0.0
    for j in range(M):
        s += math.exp(logits[n, j] - m)
        shifted += logits[n, j] - m
    return (1.0 - smoothing) * loss + smoothing * (math.log(s) - shifted / M)


def gradient_row(dlogits, probs, labels, n, N, smoothing):
    """Write row n of the mean loss's gradient, (probs[n] - target) / N, the target being
    onehot(labels[n]) with label smoothing e = ``smoothing`` taken out: (1 - e) on the label,
    e/M on every class."""
    M = probs.shape[1]
    spread = smoothing / M
    for j in range(M):
        dlogits[n, j] = (probs[n, j] - spread) / N
    label = labels[n]
    if 0 <= label < M:
        dlogits[n, label] -= (1.0 - smoothing) / N


def store_sums(sums, total, correct, accumulate):
    """sums[0] and sums[1] (the summed loss, the correct count) become, or grow by, total and correct."""
    if accumulate:
        sums[0] += total
        sums[1] += correct
    else:
        sums[0] = total
        sums[1] = correct


softmax_row_cpu, softmax_row_cuda = compile_twice(softmax_row)
store_sums_cpu, store_sums_cuda = compile_twice(store_sums)
gradient_row_cpu, gradient_row_cuda = compile_twice(gradient_row)
smoothed_row_cpu, smoothed_row_cuda = compile_twice(smoothed_row)
row_correct_cpu, row_correct_cuda = compile_twice(row_correct)


# ----------------------------------------------------------------------------- CPU kernels


@njit(cache=True)
def _softmax_xent_forward_cpu(loss, probs, logits, labels):
    """Row by row: stable softmax into probs, and the mean loss into loss[0]."""
    N = logits.shape[0]
    total = 0.0
    for n in range(N):
        total += softmax_row_cpu(probs, logits, labels, n)
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


@njit(cache=True)
def _count_correct_cpu(count, logits, labels):
    """count[0] = number of rows n whose first largest logit is at labels[n]."""
    total = 0
    for n in range(logits.shape[0]):
        total += row_correct_cpu(logits, labels, n)
    count[0] = total


@njit(cache=True)
def _softmax_xent_step_cpu(sums, probs, dlogits, logits, labels, accumulate, smoothing):
    """Everything a training step needs of the loss, in one pass over the rows: the softmax into
    probs, the gradient into dlogits, and into sums (2,) float64 the sum of the rows' losses and
    the number of correct rows, added to what sums holds (``accumulate``) or replacing it. With
    ``smoothing`` (in [0, 1]) the loss and its gradient are label-smoothed (see the module's
    docstring); the correct count is not affected."""
    N = logits.shape[0]
    total = 0.0
    correct = 0.0
    for n in range(N):
        loss = softmax_row_cpu(probs, logits, labels, n)
        total += smoothed_row_cpu(loss, logits, n, smoothing) if smoothing != 0 else loss
        correct += row_correct_cpu(logits, labels, n)
        gradient_row_cpu(dlogits, probs, labels, n, N, smoothing)
    store_sums_cpu(sums, total, correct, accumulate)


# ---------------------------------------------------------------- public entry points


def count_correct_cpu(count, logits, labels):
    """Number of rows of ``logits`` (N, M) whose argmax equals ``labels`` (N,), into ``count`` (1,) int64.
    Returns the count as a Python int."""
    fn = "count_correct_cpu"
    check_count_correct(fn, on_host, count, logits, labels)
    _count_correct_cpu(count, logits, labels)
    return int(count[0])



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


def softmax_xent_step_workspace_cpu(n):
    """The CPU step needs no scratch (see ``softmax_xent_step_workspace_cuda``)."""
    return {}


def softmax_xent_step_core_cpu(sums, probs, dlogits, logits, labels, accumulate, smoothing=0.0, ws=None):
    """Unchecked (labels are not range-checked: a bad one gives a NaN loss): see
    ``_softmax_xent_step_cpu``. ``ws`` is unused: the CPU needs no scratch."""
    _softmax_xent_step_cpu(sums, probs, dlogits, logits, labels, accumulate, float(smoothing))


# ---------------------------------------------------------------------------- CUDA kernels


@cuda.jit(cache=True)
def _softmax_xent_forward_kernel(loss, probs, logits, labels, partials, tickets):
    """Thread i of the grid takes rows i, i + gridsize, ...: their softmax into probs, their losses
    summed in float64. Each block adds its threads' sums (block_sum) into partials[0, block]; the
    last block to finish adds the partials in order (see ``_cuda.finished_last``): the loss is the
    same on every run."""
    N = logits.shape[0]
    total = 0.0
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        total += softmax_row_cuda(probs, logits, labels, n)
    scratch = cuda.shared.array(REDUCE_THREADS, dtype=numba_float64)
    flag = cuda.shared.array(1, dtype=int32)
    last, total = grid_sum(scratch, flag, partials, tickets, 0, total)
    if last and cuda.threadIdx.x == 0:
        loss[0] = total / N


@cuda.jit(cache=True)
def _softmax_xent_backward_kernel(dlogits, probs, labels):
    """dlogits[n, j] = (probs[n, j] - [j == labels[n]]) / N; one thread per element."""
    N, M = probs.shape
    i = cuda.grid(1)
    if i >= N * M:
        return
    n, j = i // M, i % M
    onehot = 1.0 if labels[n] == j else 0.0
    dlogits[n, j] = (probs[n, j] - onehot) / N


@cuda.jit(cache=True)
def _count_correct_kernel(count, logits, labels, partials, tickets):
    """Rows shared out as in ``_softmax_xent_forward_kernel``, the counts summed the same way (exact
    in float64 for any realistic N)."""
    N = logits.shape[0]
    total = 0.0
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        total += row_correct_cuda(logits, labels, n)
    scratch = cuda.shared.array(REDUCE_THREADS, dtype=numba_float64)
    flag = cuda.shared.array(1, dtype=int32)
    last, total = grid_sum(scratch, flag, partials, tickets, 0, total)
    if last and cuda.threadIdx.x == 0:
        count[0] = int(total)


@cuda.jit(cache=True)
def _softmax_xent_step_kernel(sums, probs, dlogits, logits, labels, accumulate, smoothing, partials, tickets):
    """The CUDA twin of ``_softmax_xent_step_cpu``. Thread i of the grid takes rows i, i + gridsize,
    ...; each block adds its threads' losses and counts into partials[0 and 1, block], and the last
    block to finish adds those in order and alone writes sums (see ``_cuda.finished_last``): the
    same result on every run, however the blocks are scheduled."""
    N = logits.shape[0]
    total = 0.0
    correct = 0.0
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        loss = softmax_row_cuda(probs, logits, labels, n)
        total += smoothed_row_cuda(loss, logits, n, smoothing) if smoothing != 0 else loss
        correct += row_correct_cuda(logits, labels, n)
        gradient_row_cuda(dlogits, probs, labels, n, N, smoothing)
    scratch = cuda.shared.array(REDUCE_THREADS, dtype=numba_float64)
    flag = cuda.shared.array(1, dtype=int32)
    last, total, correct = grid_sum_pair(scratch, flag, partials, tickets, total, correct)
    if last and cuda.threadIdx.x == 0:
        store_sums_cuda(sums, total, correct, accumulate)


# --------------------------------------------------------------------------- CUDA launchers


def count_correct_cuda(count, logits, labels):
    """The number of correct rows on the GPU into ``count`` (1,) int64, left on the device."""
    fn = "count_correct_cuda"
    count, logits, labels = gpu_arrays(fn, count=count, logits=logits, labels=labels)
    check_count_correct(fn, on_gpu, count, logits, labels)
    parts = reduce_parts(logits.shape[0])
    partials, tickets = reduce_scratch(1, parts, np.float64)
    _count_correct_kernel[parts, REDUCE_THREADS, stream()](count, logits, labels, partials, tickets)
    return count



def softmax_xent_forward_cuda(loss, probs, logits, labels):
    """Mean softmax cross-entropy on the GPU into ``loss`` (1,), a device array; the
    arguments of ``softmax_xent_forward_cpu``. Returns ``loss``, left on the device:
    reading it (``loss.copy_to_host()[0]``) waits for the GPU, so the caller decides when."""
    fn = "softmax_xent_forward_cuda"
    loss, probs, logits, labels = gpu_arrays(fn, loss=loss, probs=probs, logits=logits, labels=labels)
    check_softmax_xent(fn, on_gpu, {"logits": logits, "probs": probs}, labels, loss)
    parts = reduce_parts(logits.shape[0])
    partials, tickets = reduce_scratch(1, parts, np.float64)
    _softmax_xent_forward_kernel[parts, REDUCE_THREADS, stream()](loss, probs, logits, labels, partials, tickets)
    return loss


def softmax_xent_backward_cuda(dlogits, probs, labels):
    """``dlogits = (probs - onehot(labels)) / N`` on the GPU; the arguments of ``softmax_xent_backward_cpu``."""
    fn = "softmax_xent_backward_cuda"
    dlogits, probs, labels = gpu_arrays(fn, dlogits=dlogits, probs=probs, labels=labels)
    check_softmax_xent(fn, on_gpu, {"probs": probs, "dlogits": dlogits}, labels)
    _softmax_xent_backward_kernel[blocks(probs.size, 256), 256, stream()](dlogits, probs, labels)
    return dlogits


def softmax_xent_step_core_cuda(sums, probs, dlogits, logits, labels, accumulate, smoothing, ws):
    """Unchecked twin of ``softmax_xent_step_core_cpu``: one launch, nothing read back. ``ws`` holds
    the scratch of ``softmax_xent_step_workspace_cuda`` for these logits' rows."""
    parts = ws.partials.shape[1]
    _softmax_xent_step_kernel[parts, REDUCE_THREADS, stream()](sums, probs, dlogits, logits, labels, accumulate,
                                                               float(smoothing), ws.partials, ws.tickets)


def softmax_xent_step_workspace_cuda(n):
    """{name: (shape, dtype)} of the step's scratch for ``n`` rows, every array zeroed once when
    allocated: the blocks' partial losses and counts, and the ticket of the last block to finish."""
    return {"partials": ((2, reduce_parts(n)), np.float64), "tickets": ((1,), np.uint32)}
