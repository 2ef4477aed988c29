import numpy as np
import pytest

from nbcnn import layers as L
from nbcnn.optim import SGD, Adam, AdamW
from tests import reference as ref


def params():
    L.set_seed(0)
    return L.Dense(4, 3).parameters()


def test_sgd_and_adam_update_parameters_as_the_references():
    p_sgd, p_adam = params(), params()
    sgd, adam = SGD(p_sgd, lr=0.1, momentum=0.9, weight_decay=1e-2), Adam(p_adam, lr=1e-2)
    want_sgd = [(p.data.astype(float), np.zeros(p.shape)) for p in p_sgd]
    want_adam = [(p.data.astype(float), np.zeros(p.shape), np.zeros(p.shape)) for p in p_adam]
    rng = np.random.default_rng(0)
    for t in range(1, 4):
        for i, (a, b) in enumerate(zip(p_sgd, p_adam)):
            g = rng.standard_normal(a.shape).astype(np.float32)
            a.grad, b.grad = g.copy(), g.copy()
            want_sgd[i] = ref.sgd(*want_sgd[i], g.astype(float), 0.1, 0.9, 1e-2)
            want_adam[i] = ref.adam(*want_adam[i], g.astype(float), 1e-2, 0.9, 0.999, 1e-8, t)
        sgd.step()
        adam.step()
    for p, w in zip(p_sgd, want_sgd):
        np.testing.assert_allclose(p.data, w[0], rtol=1e-5, atol=1e-6)
    for p, w in zip(p_adam, want_adam):
        np.testing.assert_allclose(p.data, w[0], rtol=1e-5, atol=1e-6)


def test_zero_grad():
    ps = params()
    for p in ps:
        p.grad[...] = 1.0
    SGD(ps, lr=0.1).zero_grad()
    assert all((p.grad == 0).all() for p in ps)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: SGD(p, lr=-0.1), ValueError, "lr must be greater than 0"),
        (lambda p: SGD(p, lr=0), ValueError, "lr must be greater than 0"),
        (lambda p: SGD(p, lr=0.1, momentum=1.5), ValueError, "momentum must be less than 1.0"),
        (lambda p: SGD(p, lr="big"), TypeError, "lr must be a real number"),
        (lambda p: Adam(p, betas=(1.0, 0.9)), ValueError, "beta1 must be less than 1.0"),
        (lambda p: Adam(p, betas=0.9), TypeError, "betas must be a pair"),
        (lambda p: Adam(p, eps=0), ValueError, "eps must be greater than 0"),
        (lambda p: Adam([]), ValueError, "got no parameters"),
    ],
)
def test_bad_hyperparameters(make, error, match):
    with pytest.raises(error, match=match):
        make(params())


def test_adamw_matches_its_definition():
    rng = np.random.default_rng(15)
    layer = L.Dense(4, 3)
    p0 = [p.data.copy().astype(np.float64) for p in layer.parameters()]
    opt = AdamW(layer.parameters(), lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.5)
    m = [np.zeros_like(p) for p in p0]
    v = [np.zeros_like(p) for p in p0]
    for t in range(1, 4):
        grads = [rng.standard_normal(p.shape) for p in p0]
        for p, g in zip(layer.parameters(), grads):
            p.grad[...] = g
        opt.step()
        for i, g in enumerate(grads):
            p0[i] *= 1 - 0.01 * 0.5
            m[i] = 0.8 * m[i] + 0.2 * g
            v[i] = 0.9 * v[i] + 0.1 * g * g
            p0[i] -= 0.01 / (1 - 0.8**t) * m[i] / (np.sqrt(v[i]) / np.sqrt(1 - 0.9**t) + 1e-6)
    for p, want in zip(layer.parameters(), p0):
        np.testing.assert_allclose(p.data, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="AdamW: weight_decay must be at least 0.0, got -1"):
        AdamW(layer.parameters(), weight_decay=-1)
