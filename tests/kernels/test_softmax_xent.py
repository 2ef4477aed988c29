"""Softmax cross-entropy CPU kernels against NumPy and finite differences."""

import numpy as np
import pytest

from nbcnn.kernels.softmax_xent import softmax_xent_backward_cpu, softmax_xent_forward_cpu
from tests import reference as ref
from tests.gradcheck import assert_grad_close, numerical_grad


def forward(logits, labels):
    loss = np.full(1, np.nan, logits.dtype)
    probs = np.full_like(logits, np.nan)
    value = softmax_xent_forward_cpu(loss, probs, logits, labels)
    assert value == float(loss[0])
    return value, probs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N, M", [(1, 1), (1, 10), (7, 3), (128, 10)])
def test_match_numpy(rng, N, M, dtype):
    logits = (3 * rng.standard_normal((N, M))).astype(dtype)
    labels = rng.integers(0, M, N).astype(np.int32)
    loss, probs = forward(logits, labels)
    want_loss, want_probs = ref.softmax_xent(logits.astype(float), labels)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(loss, want_loss, **tol)
    np.testing.assert_allclose(probs, want_probs, **tol)
    dlogits = softmax_xent_backward_cpu(np.full_like(logits, np.nan), probs, labels)
    np.testing.assert_allclose(dlogits, ref.softmax_xent_grad(logits.astype(float), labels), **tol)


def test_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], np.float32)
    loss, probs = forward(logits, np.array([0, 0], np.int64))
    # Row 0 is certain and right (loss 0); row 1 is certain and wrong by 1e5 (loss 1e5).
    np.testing.assert_allclose(loss, (0.0 + 1e5) / 2, rtol=1e-6)
    assert np.isfinite(probs).all()


def test_gradient_matches_finite_differences(rng):
    logits = rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    loss, probs = forward(logits, labels)
    d = softmax_xent_backward_cpu(np.empty_like(logits), probs, labels)
    assert_grad_close(d, numerical_grad(lambda: forward(logits, labels)[0], logits))


def test_bad_arguments():
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) for 4 classes, got values in \[0, 4\]"):
        forward(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels has shape \(2,\), expected \(3,\)"):
        forward(logits, np.array([0, 1]))
    with pytest.raises(TypeError, match="labels must be int32 or int64, got float64"):
        forward(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"loss has shape \(2,\), expected \(1,\)"):
        softmax_xent_forward_cpu(np.zeros(2), np.zeros((3, 4)), logits, np.array([0, 1, 2]))
