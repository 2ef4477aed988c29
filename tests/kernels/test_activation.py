"""ReLU CPU kernels against NumPy and finite differences."""

import numpy as np
import pytest

from nbcnn.kernels.activation import relu_backward_cpu, relu_forward_cpu
from tests.gradcheck import assert_grad_close, numerical_grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5), (1, 1, 1, 1)])
def test_forward_backward_match_numpy(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[0] = 0.0  # the kink: gradient 0 there, as PyTorch
    y = relu_forward_cpu(np.full_like(x, np.nan), x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    dy = rng.standard_normal(shape).astype(dtype)
    dx = relu_backward_cpu(np.full_like(x, np.nan), dy, y)
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0))


def test_in_place_forward(rng):
    x = rng.standard_normal((4, 6))
    want = np.maximum(x, 0)
    relu_forward_cpu(x, x)
    np.testing.assert_array_equal(x, want)


def test_gradient_matches_finite_differences(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    r = rng.standard_normal(x.shape)
    y = relu_forward_cpu(np.empty_like(x), x)
    dx = relu_backward_cpu(np.empty_like(x), r, y)
    assert_grad_close(dx, numerical_grad(lambda: float((relu_forward_cpu(np.empty_like(x), x) * r).sum()), x))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"x has shape \(3,\), expected \(4,\)"):
        relu_forward_cpu(np.zeros(4), np.zeros(3))
    with pytest.raises(TypeError, match="dy is float32 but dx is float64"):
        relu_backward_cpu(np.zeros(4), np.zeros(4, np.float32), np.zeros(4))
