"""Central finite differences, in float64, for checking analytic gradients."""

import numpy as np


def numerical_grad(loss, x, eps=1e-6):
    """d loss() / d x by central differences, perturbing ``x`` in place one element at a time.

    ``loss`` is a function of no arguments that reads ``x`` and returns a float.
    Error is O(eps**2) plus rounding of about 1e-16 / eps.
    """
    assert x.dtype == np.float64, "finite differences need float64"
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = loss()
        flat[i] = old - eps
        down = loss()
        flat[i] = old
        grad.reshape(-1)[i] = (up - down) / (2 * eps)
    return grad


def assert_grad_close(analytic, numeric, rtol=1e-6, atol=1e-8):
    """Compare an analytic gradient with a numerical one, relative to the largest entry."""
    scale = max(1.0, float(np.abs(numeric).max()))
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol * scale)


def assert_network_grads_close(model, loss, rtol=1e-5, atol=1e-7):
    """Backpropagation through ``model`` against finite differences of ``loss()`` (a float64 forward of
    the model and its loss, on an input ``loss.x``), for the input and for every parameter."""
    loss()
    dx = model.backward(loss.loss_fn.backward())
    analytic = [p.grad.copy() for p in model.parameters()]
    assert_grad_close(dx, numerical_grad(loss, loss.x), rtol=rtol, atol=atol)
    for p, g in zip(model.parameters(), analytic):
        assert_grad_close(g, numerical_grad(loss, p.data), rtol=rtol, atol=atol)
