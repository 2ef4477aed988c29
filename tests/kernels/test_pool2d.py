"""Max and average pooling CPU kernels against the NumPy reference and finite differences."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcnn.kernels import pool2d
from nbcnn.kernels.pool2d import (
    avgpool2d_backward_cpu,
    avgpool2d_forward_cpu,
    maxpool2d_backward_cpu,
    maxpool2d_forward_cpu,
)
from tests import reference as ref
from tests.gradcheck import assert_grad_close, numerical_grad

# (N, C, H, W, window, stride, pad): overlapping windows, stride 2 with padding,
# rectangular windows, odd sizes that leave a remainder, batch 1.
CASES = [
    (2, 3, 8, 8, (2, 2), (2, 2), (0, 0)),
    (2, 3, 7, 9, (3, 3), (2, 2), (1, 1)),
    (1, 2, 6, 7, (3, 2), (1, 2), (1, 0)),
    (2, 2, 5, 5, (3, 3), (1, 1), (0, 0)),
    (3, 1, 9, 6, (2, 3), (3, 1), (1, 1)),
    (1, 4, 4, 4, (4, 4), (4, 4), (2, 2)),
    (2, 3, 7, 9, (2, 2), (2, 2), (0, 0)),  # the 2x2 fast path, with a row and a column left over
]
IDS = [f"N{c[0]}C{c[1]}H{c[2]}W{c[3]}F{c[4]}S{c[5]}P{c[6]}" for c in CASES]


def out_shape(case):
    N, C, H, W, f, s, p = case
    return (N, C, ref.out_size(H, f[0], s[0], p[0]), ref.out_size(W, f[1], s[1], p[1]))


def run_max(x, f, s, p, shape):
    y = np.full(shape, np.nan, x.dtype)
    argmax = np.full(shape, -7, np.int32)
    maxpool2d_forward_cpu(y, argmax, x, *f, *s, *p)
    return y, argmax


def run_max_backward(dy, argmax, x_shape, f, s, p):
    dx = np.full(x_shape, np.nan, dy.dtype)
    return maxpool2d_backward_cpu(dx, dy, argmax, *f, *s, *p)


def run_avg(x, f, s, p, shape):
    return avgpool2d_forward_cpu(np.full(shape, np.nan, x.dtype), x, *f, *s, *p)


def run_avg_backward(dy, f, s, p, x_shape):
    return avgpool2d_backward_cpu(np.full(x_shape, np.nan, dy.dtype), dy, *f, *s, *p)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_backward_match_reference(rng, case, dtype):
    N, C, H, W, f, s, p = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    shape = out_shape(case)
    dy = rng.standard_normal(shape).astype(dtype)
    x64, dy64 = x.astype(float), dy.astype(float)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-13)

    y, argmax = run_max(x, f, s, p, shape)
    np.testing.assert_array_equal(y, ref.maxpool2d(x64, f, s, p).astype(dtype))
    np.testing.assert_allclose(run_max_backward(dy, argmax, x.shape, f, s, p), ref.maxpool2d_grad(dy64, x64, f, s, p), **tol)

    np.testing.assert_allclose(run_avg(x, f, s, p, shape), ref.avgpool2d(x64, f, s, p), **tol)
    np.testing.assert_allclose(run_avg_backward(dy, f, s, p, x.shape), ref.avgpool2d_grad(dy64, x64, f, s, p), **tol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_finite_differences(rng, case):
    N, C, H, W, f, s, p = case
    # Distinct values spaced 1/size apart keep every window's maximum unique and far (>> eps)
    # from the runner-up, so max pooling is differentiable at x.
    size = N * C * H * W
    x = rng.permutation(size).reshape(N, C, H, W) / size
    shape = out_shape(case)
    r = rng.standard_normal(shape)

    _, argmax = run_max(x, f, s, p, shape)
    dx = run_max_backward(r, argmax, x.shape, f, s, p)
    assert_grad_close(dx, numerical_grad(lambda: float((run_max(x, f, s, p, shape)[0] * r).sum()), x))

    x = rng.standard_normal((N, C, H, W))
    dx = run_avg_backward(r, f, s, p, x.shape)
    assert_grad_close(dx, numerical_grad(lambda: float((run_avg(x, f, s, p, shape) * r).sum()), x))


def test_ties_send_the_whole_gradient_to_the_first_maximum():
    # Every window of a constant plane is all ties: the gradient goes to the window's
    # first element in row-major order (PyTorch's rule), never split.
    x = np.ones((1, 1, 4, 4))
    y, argmax = run_max(x, (2, 2), (2, 2), (0, 0), (1, 1, 2, 2))
    np.testing.assert_array_equal(argmax[0, 0], [[0, 2], [8, 10]])
    dx = run_max_backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), argmax, x.shape, (2, 2), (2, 2), (0, 0))
    want = np.zeros((4, 4))
    want[0, 0], want[0, 2], want[2, 0], want[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(dx[0, 0], want)


def test_tie_inside_window_picks_row_major_first():
    x = np.array([[[[0.0, 5.0, 1.0], [5.0, 2.0, 5.0]]]])  # three 5s in one 2x3 window
    _, argmax = run_max(x, (2, 3), (1, 1), (0, 0), (1, 1, 1, 1))
    assert argmax[0, 0, 0, 0] == 1


def test_overlapping_windows_accumulate_gradient():
    x = np.array([[[[0.0, 9.0, 0.0, 0.0]]]])  # 1x4 row, window 1x3, stride 1: both windows pick 9
    y, argmax = run_max(x, (1, 3), (1, 1), (0, 0), (1, 1, 1, 2))
    dx = run_max_backward(np.array([[[[1.5, 2.5]]]]), argmax, x.shape, (1, 3), (1, 1), (0, 0))
    np.testing.assert_array_equal(dx[0, 0, 0], [0, 4.0, 0, 0])


def test_padding_is_minus_infinity_for_max_and_zero_for_average():
    x = -np.ones((1, 1, 2, 2))
    y, _ = run_max(x, (2, 2), (1, 1), (1, 1), (1, 1, 3, 3))
    np.testing.assert_array_equal(y, -1.0)  # padding never wins, even over negative inputs
    a = run_avg(x, (2, 2), (1, 1), (1, 1), (1, 1, 3, 3))
    np.testing.assert_array_equal(a[0, 0], [[-0.25, -0.5, -0.25], [-0.5, -1, -0.5], [-0.25, -0.5, -0.25]])


def test_nan_propagates_through_max():
    x = np.array([[[[1.0, np.nan], [3.0, 2.0]]]])
    y, argmax = run_max(x, (2, 2), (2, 2), (0, 0), (1, 1, 1, 1))
    assert np.isnan(y[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == 1


def test_backward_ignores_an_argmax_outside_the_plane():
    dx = run_max_backward(np.ones((1, 1, 1, 1)), np.array([[[[99]]]], np.int32), (1, 1, 2, 2), (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(dx, 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_paths_equal_the_general_kernels(rng, dtype):
    """The 2x2 forward gives exactly what the general loops give, on data
    made of ties (the zeros ReLU leaves), NaNs at every window position, and infinities."""
    x = rng.standard_normal((3, 4, 9, 22)).astype(dtype)  # rows of vectors of windows and a tail
    x[0] = np.maximum(x[0], 0)  # half zeros: ties
    x[1, :2] = 0.0
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        x[2, k, 2 * k + i, 2 * k + j] = np.nan  # one NaN at each position of a window
    x[2, 0, 6:8, 6:8] = [[1.0, np.nan], [np.nan, 2.0]]  # two NaNs: the first one wins
    x[2, 1, 0, :4] = [-np.inf, -np.inf, np.inf, 1.0]
    x[2, 3, 4:6, 18:20] = [[2.0, np.nan], [np.nan, 1.0]]  # in a row's last windows too
    shape = (3, 4, 4, 11)
    y, argmax = run_max(x, (2, 2), (2, 2), (0, 0), shape)
    y_ref, argmax_ref = np.full(shape, np.nan, dtype), np.full(shape, -7, np.int32)
    pool2d._maxpool2d_forward_cpu(y_ref, argmax_ref, x, 2, 2, 2, 2, 0, 0)
    np.testing.assert_array_equal(y, y_ref)  # NaNs in the same places count as equal
    np.testing.assert_array_equal(argmax, argmax_ref)
    assert argmax[2, 0, 3, 3] == 6 * 22 + 7 and np.isnan(y[2, 0, 3, 3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# rows of fewer windows than a vector's half (one at a time), of one vector's, of one and an
# overlapping call for the last windows, and of several
@pytest.mark.parametrize("W", [7, 9, 14, 40])
def test_fast_backward_equals_the_general_kernel(rng, dtype, W):
    """The 2x2 backward (vector compares of the positions) gives exactly what the general loops give:
    every window position the maximum, ties (zeros), NaN and infinite gradients, masked by the
    input or not, a row and a column no window covers."""
    x = rng.standard_normal((3, 5, 9, W)).astype(dtype)
    x[0] = np.maximum(x[0], 0)  # ties, and zeros the mask drops
    y, argmax = run_max(x, (2, 2), (2, 2), (0, 0), (3, 5, 4, W // 2))
    assert set(np.unique(argmax % 2)) == {0, 1}  # maxima in both columns of a window (and both rows below)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dy[1, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    for mask in (False, True):
        dx = np.full(x.shape, np.nan, dtype)
        pool2d.maxpool2d_backward_core_cpu(dx, dy, argmax, x, 2, 2, 2, 2, 0, 0, mask)
        want = np.full(x.shape, -7.0, dtype)
        pool2d._maxpool2d_backward_cpu(want, dy, argmax, x, mask)
        np.testing.assert_array_equal(dx, want)


@st.composite
def pool_cases(draw):
    fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, fh // 2)), draw(st.integers(0, fw // 2))
    H, W = draw(st.integers(max(1, fh - 2 * ph), 9)), draw(st.integers(max(1, fw - 2 * pw), 9))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), H, W, (fh, fw),
            (draw(st.integers(1, 3)), draw(st.integers(1, 3))), (ph, pw))


@given(case=pool_cases(), seed=st.integers(0, 2**32 - 1))
def test_random_shapes(case, seed):
    rng = np.random.default_rng(seed)
    N, C, H, W, f, s, p = case
    x = rng.standard_normal((N, C, H, W))
    shape = out_shape(case)
    dy = rng.standard_normal(shape)
    y, argmax = run_max(x, f, s, p, shape)
    np.testing.assert_array_equal(y, ref.maxpool2d(x, f, s, p))
    np.testing.assert_allclose(run_max_backward(dy, argmax, x.shape, f, s, p), ref.maxpool2d_grad(dy, x, f, s, p), atol=1e-13)
    np.testing.assert_allclose(run_avg(x, f, s, p, shape), ref.avgpool2d(x, f, s, p), atol=1e-13)
    np.testing.assert_allclose(run_avg_backward(dy, f, s, p, x.shape), ref.avgpool2d_grad(dy, x, f, s, p), atol=1e-13)


def test_stride_defaults_to_window():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    y = np.empty((1, 1, 2, 2))
    maxpool2d_forward_cpu(y, np.empty((1, 1, 2, 2), np.int64), x, 2, 2)
    np.testing.assert_array_equal(y[0, 0], [[5, 7], [13, 15]])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: run_max(np.zeros((1, 1, 4, 4)), (3, 3), (1, 1), (2, 0), (1, 1, 6, 2)), ValueError,
         r"padding \(2, 0\) must be at most half the window \(3, 3\)"),
        (lambda: run_max(np.zeros((1, 1, 4, 4)), (0, 2), (1, 1), (0, 0), (1, 1, 4, 3)), ValueError,
         "kernel_h must be at least 1"),
        (lambda: run_avg(np.zeros((1, 1, 4, 4)), (2, 2), (2, 2), (0, 0), (1, 1, 3, 3)), ValueError,
         r"y has shape \(1, 1, 3, 3\), expected \(1, 1, 2, 2\)"),
        (lambda: maxpool2d_forward_cpu(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 4, 4)), 2, 2),
         TypeError, "argmax must be int32 or int64"),
        (lambda: maxpool2d_backward_cpu(np.zeros((1, 2, 4, 4)), np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int32),
                                        2, 2), ValueError, r"dy has shape \(1, 1, 2, 2\), expected \(1, 2, 2, 2\)"),
        (lambda: maxpool2d_backward_cpu(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int32),
                                        2, 2, 1, 1), ValueError, r"dy has shape \(1, 1, 2, 2\), expected \(1, 1, 3, 3\)"),
        (lambda: run_avg(np.zeros((1, 1, 4, 4), np.float32), (5, 5), (1, 1), (0, 0), (1, 1, 1, 1)), ValueError,
         "window height 5 is larger than the padded input height 4"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
