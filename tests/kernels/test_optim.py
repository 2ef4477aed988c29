"""Optimizer update kernels against NumPy references over several steps."""

import numpy as np
import pytest

from nbcnn.kernels.optim import adam_update_cpu, fill_cpu, sgd_update_cpu
from tests import reference as ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-2)])
def test_sgd_matches_reference(rng, momentum, weight_decay, dtype):
    p = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    vel = np.zeros_like(p)
    want_p, want_v = p.astype(float), vel.astype(float)
    for _ in range(5):
        g = rng.standard_normal(p.shape).astype(dtype)
        sgd_update_cpu(p, vel, g, 0.1, momentum, weight_decay)
        want_p, want_v = ref.sgd(want_p, want_v, g.astype(float), 0.1, momentum, weight_decay)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(p, want_p, rtol=tol, atol=tol)
    np.testing.assert_allclose(vel, want_v, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_matches_reference(rng, dtype):
    p = rng.standard_normal((10, 7)).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    want = (p.astype(float), m.astype(float), v.astype(float))
    for t in range(1, 6):
        g = rng.standard_normal(p.shape).astype(dtype)
        adam_update_cpu(p, m, v, g, 1e-2, 0.9, 0.999, 1e-8, t)
        want = ref.adam(*want, g.astype(float), 1e-2, 0.9, 0.999, 1e-8, t)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for got, exp in zip((p, m, v), want):
        np.testing.assert_allclose(got, exp, rtol=tol, atol=tol)


def test_adam_first_step_moves_each_weight_by_lr():
    # With zero state, Adam's first bias-corrected step is lr * g / (|g| + eps): about lr per weight.
    p = np.zeros(4)
    adam_update_cpu(p, np.zeros(4), np.zeros(4), np.array([3.0, -0.5, 1e-3, 20.0]), 0.01, 0.9, 0.999, 1e-8, 1)
    np.testing.assert_allclose(p, [-0.01, 0.01, -0.01, -0.01], rtol=1e-4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda a: sgd_update_cpu(a, a.copy(), a.copy(), -0.1), ValueError, "lr must be at least 0.0, got -0.1"),
        (lambda a: sgd_update_cpu(a, a.copy(), a.copy(), float("nan")), ValueError, "lr must be finite"),
        (lambda a: sgd_update_cpu(a, a.copy(), a.copy(), "0.1"), TypeError, "lr must be a real number"),
        (lambda a: sgd_update_cpu(a, a[:2].copy(), a.copy(), 0.1), ValueError, r"velocity has shape \(2,\)"),
        (lambda a: adam_update_cpu(a, a.copy(), a.copy(), a.copy(), 0.1, 1.0, 0.999, 1e-8, 1), ValueError,
         "beta1 must be less than 1.0"),
        (lambda a: adam_update_cpu(a, a.copy(), a.copy(), a.copy(), 0.1, 0.9, 0.999, 0.0, 1), ValueError,
         "eps must be greater than 0.0"),
        (lambda a: adam_update_cpu(a, a.copy(), a.copy(), a.copy(), 0.1, 0.9, 0.999, 1e-8, 0), ValueError,
         "step must be at least 1"),
    ],
)
def test_bad_hyperparameters(call, error, match):
    with pytest.raises(error, match=match):
        call(np.zeros(3))


def test_fill():
    a = np.ones((3, 4), np.float32)
    assert fill_cpu(a, 0.0) is a
    np.testing.assert_array_equal(a, 0.0)
    with pytest.raises(TypeError, match="value must be a real number"):
        fill_cpu(a, None)
