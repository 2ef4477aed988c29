"""Sums over the whole grid (``_cuda.finished_last``): many blocks, the last to finish adding their
partial sums in order. Against the CPU, with more blocks than one, with more items than the grid
covers in one pass (each thread then takes several), twice in a row with the same tickets (they
must come back to zero), and the same bits on every run."""

from types import SimpleNamespace

import numpy as np
import pytest

from nbcnn.kernels import _cuda
from nbcnn.kernels.conv2d import conv2d_backward_bias_cpu, conv2d_backward_bias_cuda
from nbcnn.kernels.dense import dense_backward_bias_cpu, dense_backward_bias_cuda
from nbcnn.kernels.softmax_xent import (
    count_correct_cpu,
    count_correct_cuda,
    softmax_xent_forward_cpu,
    softmax_xent_forward_cuda,
    softmax_xent_step_core_cpu,
    softmax_xent_step_core_cuda,
    softmax_xent_step_workspace_cuda,
)
from tests.cuda.helpers import assert_close, dev, empty_like, host


@pytest.fixture(params=["one pass", "several passes"])
def grid_cap(request, monkeypatch):
    """The grid as launched, or capped at 3 blocks so every thread strides over several items."""
    if request.param == "several passes":
        monkeypatch.setattr(_cuda, "REDUCE_BLOCKS", 3)
    return request.param


def test_parts_fill_the_grid_up_to_the_cap():
    T, cap = _cuda.REDUCE_THREADS, _cuda.REDUCE_BLOCKS
    assert _cuda.reduce_parts(1) == 1
    assert _cuda.reduce_parts(T + 1) == 2
    assert _cuda.reduce_parts(10**9) == cap
    assert _cuda.reduce_parts(10**9, rows=5) == cap // 5
    assert _cuda.reduce_parts(10**9, rows=10 * cap) == 1


@pytest.mark.parametrize("N", [1, 45, 301])
def test_count_correct_and_loss(N, grid_cap):
    rng = np.random.default_rng(N)
    logits = 3 * rng.standard_normal((N, 7))
    labels = rng.integers(0, 7, N).astype(np.int32)
    count = dev(np.zeros(1, np.int64))
    count_correct_cuda(count, dev(logits), dev(labels))
    assert host(count)[0] == count_correct_cpu(np.zeros(1, np.int64), logits, labels)
    loss, probs = empty_like(np.zeros(1)), empty_like(logits)
    softmax_xent_forward_cuda(loss, probs, dev(logits), dev(labels))
    want = softmax_xent_forward_cpu(np.zeros(1), np.empty_like(logits), logits, labels)
    assert_close(host(loss), [want], np.float64)


@pytest.mark.parametrize("N, K, OH, OW", [(1, 2, 1, 1), (9, 3, 5, 7), (70, 2, 3, 3)])
def test_conv_bias(N, K, OH, OW, grid_cap):
    dy = np.random.default_rng(K).standard_normal((N, K, OH, OW)).astype(np.float32)
    db = empty_like(np.zeros(K, np.float32))
    conv2d_backward_bias_cuda(db, dev(dy))
    assert_close(host(db), conv2d_backward_bias_cpu(np.empty(K, np.float32), dy), np.float32)


@pytest.mark.parametrize("N, OUT", [(1, 1), (40, 33), (333, 5)])  # 33: two column blocks, the second nearly empty
def test_dense_bias(N, OUT, grid_cap):
    dy = np.random.default_rng(OUT).standard_normal((N, OUT))
    db = empty_like(np.zeros(OUT))
    dense_backward_bias_cuda(db, dev(dy))
    assert_close(host(db), dense_backward_bias_cpu(np.empty(OUT), dy), np.float64)


def test_the_step_runs_again_with_the_same_scratch_and_gives_the_same_bits():
    N, M = 301, 10
    rng = np.random.default_rng(3)
    logits = (4 * rng.standard_normal((N, M))).astype(np.float32)
    labels = rng.integers(0, M, N).astype(np.int32)
    scratch = softmax_xent_step_workspace_cuda(N).items()
    ws = SimpleNamespace(**{name: dev(np.zeros(shape, dtype)) for name, (shape, dtype) in scratch})
    assert ws.partials.shape[1] > 1  # several blocks, or this tests nothing
    z, lab = dev(logits), dev(labels)
    probs, dlogits = empty_like(logits), empty_like(logits)
    results = []
    for accumulate in (False, True, True):
        sums = dev(np.array([0.5, 1.0]))
        softmax_xent_step_core_cuda(sums, probs, dlogits, z, lab, accumulate, 0.0, ws)
        results.append(host(sums))
        assert host(ws.tickets)[0] == 0  # back to zero, ready for the next launch
    want = np.array([0.5, 1.0])
    softmax_xent_step_core_cpu(want, np.empty_like(logits), np.empty_like(logits), logits, labels, True)
    assert_close(results[1], want, np.float32)  # float32 rows: the GPU and CPU round them differently
    assert results[1][1] == want[1]  # the count is exact
    np.testing.assert_array_equal(results[1], results[2])  # bit for bit, run to run
