"""Dense CPU kernels against NumPy and finite differences."""

import numpy as np
import pytest

from nbcnn.kernels.dense import (
    dense_backward_bias_cpu,
    dense_backward_input_blas_cpu,
    dense_backward_input_cpu,
    dense_backward_weight_blas_cpu,
    dense_backward_weight_cpu,
    dense_forward_blas_cpu,
    dense_forward_cpu,
)
from tests.gradcheck import assert_grad_close, numerical_grad

SHAPES = [(1, 1, 1), (1, 7, 3), (4, 5, 3), (13, 33, 10), (64, 400, 120)]  # (N, IN, OUT)


# The direct loops and the BLAS variants run the same tests.
IMPLS = {
    "direct": (dense_forward_cpu, dense_backward_input_cpu, dense_backward_weight_cpu),
    "blas": (dense_forward_blas_cpu, dense_backward_input_blas_cpu, dense_backward_weight_blas_cpu),
}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return request.param


def forward(x, w, b, impl="direct"):
    return IMPLS[impl][0](np.full((x.shape[0], w.shape[0]), np.nan, x.dtype), x, w, b)


def backward(dy, x, w, impl="direct"):
    dx = IMPLS[impl][1](np.full(x.shape, np.nan, x.dtype), dy, w)
    dw = IMPLS[impl][2](np.full(w.shape, np.nan, x.dtype), dy, x)
    db = dense_backward_bias_cpu(np.full(w.shape[0], np.nan, x.dtype), dy)
    return dx, dw, db


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N, IN, OUT", SHAPES)
def test_match_numpy(rng, N, IN, OUT, dtype, impl):
    x = rng.standard_normal((N, IN)).astype(dtype)
    w = rng.standard_normal((OUT, IN)).astype(dtype)
    b = rng.standard_normal(OUT).astype(dtype)
    dy = rng.standard_normal((N, OUT)).astype(dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    x64, w64, dy64 = x.astype(float), w.astype(float), dy.astype(float)
    np.testing.assert_allclose(forward(x, w, b, impl), x64 @ w64.T + b, **tol)
    np.testing.assert_allclose(forward(x, w, None, impl), x64 @ w64.T, **tol)
    dx, dw, db = backward(dy, x, w, impl)
    np.testing.assert_allclose(dx, dy64 @ w64, **tol)
    np.testing.assert_allclose(dw, dy64.T @ x64, **tol)
    np.testing.assert_allclose(db, dy64.sum(axis=0), **tol)


def test_gradients_match_finite_differences(rng, impl):
    x, w, b = rng.standard_normal((3, 6)), rng.standard_normal((4, 6)), rng.standard_normal(4)
    r = rng.standard_normal((3, 4))

    def loss():
        return float((forward(x, w, b, impl) * r).sum())

    dx, dw, db = backward(r, x, w, impl)
    assert_grad_close(dx, numerical_grad(loss, x))
    assert_grad_close(dw, numerical_grad(loss, w))
    assert_grad_close(db, numerical_grad(loss, b))


def test_bad_arguments():
    x, w = np.zeros((2, 5)), np.zeros((3, 5))
    with pytest.raises(ValueError, match=r"w has shape \(3, 4\), expected \(3, 5\) \(OUT=3, IN=5\)"):
        dense_forward_cpu(np.zeros((2, 3)), x, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"x must have 2 dimensions \(N, IN\), got shape \(2, 1, 5, 1\)"):
        dense_forward_cpu(np.zeros((2, 3)), x.reshape(2, 1, 5, 1), w)
    with pytest.raises(ValueError, match=r"y has shape \(3, 2\), expected \(2, 3\)"):
        dense_forward_cpu(np.zeros((3, 2)), x, w)
    with pytest.raises(ValueError, match=r"db has shape \(2,\), expected \(3,\)"):
        dense_backward_bias_cpu(np.zeros(2), np.zeros((2, 3)))
