"""ReLU, dense, softmax cross-entropy, optimizers and 1-D convolution: CUDA against CPU."""

import numpy as np
import pytest

from nbcnn.kernels.activation import relu_backward_cpu, relu_backward_cuda, relu_forward_cpu, relu_forward_cuda
from nbcnn.kernels.conv1d import (
    conv1d_backward_cpu,
    conv1d_backward_cuda,
    conv1d_forward_cpu,
    conv1d_forward_cuda,
    toeplitz_matrix_cpu,
    toeplitz_matrix_cuda,
)
from nbcnn.kernels.dense import (
    dense_backward_bias_cpu,
    dense_backward_bias_cuda,
    dense_backward_input_cpu,
    dense_backward_input_cuda,
    dense_backward_weight_cpu,
    dense_backward_weight_cuda,
    dense_forward_cpu,
    dense_forward_cuda,
)
from nbcnn.kernels.optim import adam_update_cpu, adam_update_cuda, fill_cuda, sgd_update_cpu, sgd_update_cuda
from nbcnn.kernels.softmax_xent import (
    softmax_xent_backward_cpu,
    softmax_xent_backward_cuda,
    softmax_xent_forward_cpu,
    softmax_xent_forward_cuda,
)
from tests.cuda.helpers import assert_close, dev, empty_like, host

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 5, 7)).astype(dtype)  # 210 elements: not a multiple of 256
    y = relu_forward_cpu(np.empty_like(x), x)
    y_d = empty_like(y)
    relu_forward_cuda(y_d, dev(x))
    np.testing.assert_array_equal(host(y_d), y)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx_d = empty_like(x)
    relu_backward_cuda(dx_d, dev(dy), y_d)
    np.testing.assert_array_equal(host(dx_d), relu_backward_cpu(np.empty_like(x), dy, y))


@pytest.mark.parametrize(
    "N, IN, OUT, dtype",
    # The last case spans two 16x16 tiles along every axis of every product.
    [(1, 1, 1, np.float64), (5, 17, 3, np.float32), (5, 17, 3, np.float64), (18, 33, 20, np.float32)],
)
def test_dense(N, IN, OUT, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, IN)).astype(dtype)
    w = rng.standard_normal((OUT, IN)).astype(dtype)
    b = rng.standard_normal(OUT).astype(dtype)
    dy = rng.standard_normal((N, OUT)).astype(dtype)
    y_d = empty_like(np.empty((N, OUT), dtype))
    dense_forward_cuda(y_d, dev(x), dev(w), dev(b))
    assert_close(host(y_d), dense_forward_cpu(np.empty((N, OUT), dtype), x, w, b), dtype)
    dense_forward_cuda(y_d, dev(x), dev(w))
    assert_close(host(y_d), dense_forward_cpu(np.empty((N, OUT), dtype), x, w), dtype)
    for launch, cpu, out, args in [
        (dense_backward_input_cuda, dense_backward_input_cpu, x, (dy, w)),
        (dense_backward_weight_cuda, dense_backward_weight_cpu, w, (dy, x)),
        (dense_backward_bias_cuda, dense_backward_bias_cpu, b, (dy,)),
    ]:
        got = empty_like(out)
        launch(got, *(dev(a) for a in args))
        assert_close(host(got), cpu(np.empty_like(out), *args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, M", [(1, 3), (45, 10)])
def test_softmax_xent(N, M, dtype):
    rng = np.random.default_rng(2)
    logits = (4 * rng.standard_normal((N, M))).astype(dtype)
    labels = rng.integers(0, M, N).astype(np.int64)
    loss, probs = np.empty(1, dtype), np.empty((N, M), dtype)
    softmax_xent_forward_cpu(loss, probs, logits, labels)
    loss_d, probs_d = empty_like(loss), empty_like(probs)
    softmax_xent_forward_cuda(loss_d, probs_d, dev(logits), dev(labels))
    assert_close(host(loss_d), loss, dtype)
    assert_close(host(probs_d), probs, dtype)
    d_d = empty_like(probs)
    softmax_xent_backward_cuda(d_d, probs_d, dev(labels))
    assert_close(host(d_d), softmax_xent_backward_cpu(np.empty_like(probs), probs, labels), dtype)


def test_softmax_xent_bad_label_gives_nan():
    loss_d = empty_like(np.empty(1, np.float32))
    softmax_xent_forward_cuda(loss_d, empty_like(np.empty((2, 3), np.float32)), dev(np.zeros((2, 3), np.float32)),
                              dev(np.array([0, 3], np.int32)))
    assert np.isnan(host(loss_d)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizers(dtype):
    rng = np.random.default_rng(3)
    shape = (4, 3, 5, 5)  # 300 elements
    p = rng.standard_normal(shape).astype(dtype)
    state = [np.zeros(shape, dtype) for _ in range(3)]
    p_sgd, v_sgd = dev(p), dev(state[0])
    p_adam, m_adam, s_adam = dev(p), dev(state[1]), dev(state[2])
    p_cpu_sgd, p_cpu_adam = p.copy(), p.copy()
    for t in range(1, 4):
        g = rng.standard_normal(shape).astype(dtype)
        sgd_update_cpu(p_cpu_sgd, state[0], g, 0.1, 0.9, 1e-3)
        sgd_update_cuda(p_sgd, v_sgd, dev(g), 0.1, 0.9, 1e-3)
        adam_update_cpu(p_cpu_adam, state[1], state[2], g, 1e-2, 0.9, 0.999, 1e-8, t)
        adam_update_cuda(p_adam, m_adam, s_adam, dev(g), 1e-2, 0.9, 0.999, 1e-8, t)
    assert_close(host(p_sgd), p_cpu_sgd, dtype)
    assert_close(host(v_sgd), state[0], dtype)
    assert_close(host(p_adam), p_cpu_adam, dtype)
    assert_close(host(m_adam), state[1], dtype)
    assert_close(host(s_adam), state[2], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("la, lb", [(3, 4), (1, 9), (130, 5)])
def test_conv1d(la, lb, dtype):
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal(la).astype(dtype), rng.standard_normal(lb).astype(dtype)
    d = conv1d_forward_cpu(np.empty(la + lb - 1, dtype), a, b)
    d_d = empty_like(d)
    conv1d_forward_cuda(d_dd := d_d, dev(a), dev(b))
    assert_close(host(d_dd), d, dtype)
    dd = rng.standard_normal(d.shape).astype(dtype)
    da, db = conv1d_backward_cpu(np.empty_like(a), np.empty_like(b), dd, a, b)
    da_d, db_d = empty_like(a), empty_like(b)
    conv1d_backward_cuda(da_d, db_d, dev(dd), dev(a), dev(b))
    assert_close(host(da_d), da, dtype)
    assert_close(host(db_d), db, dtype)
    t = toeplitz_matrix_cpu(np.empty((la + lb - 1, lb), dtype), a)
    t_d = empty_like(t)
    toeplitz_matrix_cuda(t_d, dev(a))
    np.testing.assert_array_equal(host(t_d), t)


def test_fill():
    a = dev(np.ones((3, 5, 7), np.float32))
    fill_cuda(a, 2.5)
    np.testing.assert_array_equal(host(a), 2.5)


def test_gather_rows_and_count_correct():
    from nbcnn.kernels.gather import gather_rows_cuda
    from nbcnn.kernels.softmax_xent import count_correct_cpu, count_correct_cuda

    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 1, 2, 3)).astype(np.float32)
    idx = rng.permutation(40)[:9].astype(np.int32)
    out = empty_like(np.empty((9, 1, 2, 3), np.float32))
    gather_rows_cuda(out, dev(x), dev(idx))
    np.testing.assert_array_equal(host(out), x[idx])
    logits = rng.standard_normal((300, 10)).astype(np.float32)  # rows past one block's threads
    labels = rng.integers(0, 10, 300).astype(np.int64)
    count = dev(np.zeros(1, np.int64))
    count_correct_cuda(count, dev(logits), dev(labels))
    assert host(count)[0] == count_correct_cpu(np.zeros(1, np.int64), logits, labels)
