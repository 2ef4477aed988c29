"""The lecture's 1-D convolution: polynomial product, Toeplitz matrix, gradients."""

import numpy as np
import pytest

from nbcnn.kernels.conv1d import conv1d_backward_cpu, conv1d_forward_cpu, toeplitz_matrix_cpu
from tests import reference as ref
from tests.gradcheck import assert_grad_close, numerical_grad


def full(a, b):
    return conv1d_forward_cpu(np.full(len(a) + len(b) - 1, np.nan, a.dtype), a, b)


def test_lecture_polynomial_product():
    # p(t) = 1 + 2t + 3t^2 and s(t) = 4 + 5t + 6t^2 + 7t^3: d_j = sum_i a_i b_{j-i}.
    a, b = np.array([1.0, 2, 3]), np.array([4.0, 5, 6, 7])
    d = full(a, b)
    np.testing.assert_array_equal(d, [4, 13, 28, 34, 32, 21])
    t = toeplitz_matrix_cpu(np.full((6, 4), np.nan), a)
    np.testing.assert_array_equal(t @ b, d)
    # The product's value at any t is p(t) * s(t).
    for tv in (-1.5, 0.3, 2.0):
        assert np.polyval(d[::-1], tv) == pytest.approx(np.polyval(a[::-1], tv) * np.polyval(b[::-1], tv))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("la, lb", [(1, 1), (1, 5), (5, 1), (3, 4), (8, 3), (17, 33)])
def test_matches_numpy_convolve_and_toeplitz(rng, la, lb, dtype):
    a, b = rng.standard_normal(la).astype(dtype), rng.standard_normal(lb).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    d = full(a, b)
    np.testing.assert_allclose(d, np.convolve(a.astype(float), b.astype(float)), rtol=tol, atol=tol)
    t = toeplitz_matrix_cpu(np.full((la + lb - 1, lb), np.nan, dtype), a)
    np.testing.assert_array_equal(t, ref.toeplitz(a, lb))
    np.testing.assert_allclose(t.astype(float) @ b, d, rtol=tol, atol=tol)


def test_gradients_match_finite_differences(rng):
    a, b = rng.standard_normal(4), rng.standard_normal(6)
    r = rng.standard_normal(9)
    da, db = conv1d_backward_cpu(np.full(4, np.nan), np.full(6, np.nan), r, a, b)
    loss = lambda: float(full(a, b) @ r)  # noqa: E731
    assert_grad_close(da, numerical_grad(loss, a))
    assert_grad_close(db, numerical_grad(loss, b))
    # The gradient of a convolution is a correlation with the upstream gradient.
    np.testing.assert_allclose(da, np.correlate(r, b, mode="valid"), atol=1e-13)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"d has shape \(5,\), expected \(6,\)"):
        conv1d_forward_cpu(np.zeros(5), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="a must hold at least one coefficient"):
        conv1d_forward_cpu(np.zeros(3), np.zeros(0), np.zeros(4))
    with pytest.raises(ValueError, match=r"t has shape \(5, 4\), expected \(6, 4\)"):
        toeplitz_matrix_cpu(np.zeros((5, 4)), np.zeros(3))
