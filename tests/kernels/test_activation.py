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


# ------------------------------------------------------------------ the other activations

from nbcnn.kernels.activation import KINDS, activation_backward_cpu, activation_forward_cpu  # noqa: E402
from tests import reference as ref  # noqa: E402


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_match_the_formulas(rng, name, dtype):
    x = (4 * rng.standard_normal((3, 4, 5))).astype(dtype)
    x.reshape(-1)[:4] = [0.0, -30.0, 30.0, -1e-3]  # the kink, both saturations (sigmoid's exp must not overflow)
    y = activation_forward_cpu(np.full_like(x, np.nan), x, name, negative_slope=0.2)
    want, slope = ref.activation(name, x, 0.2)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(y, want, **tol)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = activation_backward_cpu(np.full_like(x, np.nan), dy, x, y, name, negative_slope=0.2)
    np.testing.assert_allclose(dx, dy * slope, **tol)


@pytest.mark.parametrize("name", list(KINDS))
def test_activation_gradients_match_finite_differences(rng, name):
    x = 2 * rng.standard_normal((2, 3, 4))
    x[np.abs(x) < 1e-3] = 0.5  # away from leaky_relu's kink
    r = rng.standard_normal(x.shape)

    def loss():
        return float((activation_forward_cpu(np.empty_like(x), x, name, 0.3) * r).sum())

    y = activation_forward_cpu(np.empty_like(x), x, name, 0.3)
    dx = activation_backward_cpu(np.empty_like(x), r, x, y, name, 0.3)
    assert_grad_close(dx, numerical_grad(loss, x))


def test_activation_bad_arguments():
    x = np.zeros(4)
    with pytest.raises(ValueError, match="unknown activation 'swish': choose one of leaky_relu, tanh, sigmoid, gelu"):
        activation_forward_cpu(np.zeros(4), x, "swish")
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        activation_forward_cpu(np.zeros(4), x, "leaky_relu", negative_slope="0.1")
    with pytest.raises(ValueError, match=r"y has shape \(3,\), expected \(4,\)"):
        activation_backward_cpu(np.zeros(4), x, x, np.zeros(3), "tanh")
