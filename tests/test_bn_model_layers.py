"""The layers the ``bn`` model adds (BatchNorm2D, Dropout, GlobalAvgPool2D) on the CPU: against the
NumPy references, against central finite differences in float64, and against PyTorch where it is
installed (AdamW, the bn model's optimizer, there too). Their CUDA kernels are checked against
these in tests/cuda."""

import numpy as np
import pytest

import nbcnn
from nbcnn import layers as L
from nbcnn.kernels._random import hash32
from nbcnn.kernels.dropout import threshold
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.optim import AdamW
from tests import reference as ref
from tests.gradcheck import assert_grad_close, assert_network_grads_close, numerical_grad

# ------------------------------------------------------------------------------ references


def bn_layer(C, rng, dtype=np.float32, **kw):
    bn = L.BatchNorm2D(C, **kw)
    bn.weight.data = rng.standard_normal(C).astype(dtype)
    bn.bias.data = rng.standard_normal(C).astype(dtype)
    return bn


# ---------------------------------------------------------------------------- BatchNorm2D


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 2, 3, 1), (7, 1, 1, 2)])
def test_batchnorm_training_forward_and_running_statistics(shape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)  # a large mean: two-pass variance matters
    bn = bn_layer(shape[1], rng, momentum=0.2)
    y = bn.forward(x)
    want, mean, _, unbiased = ref.batchnorm(x, bn.weight.data, bn.bias.data, 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, 0.2 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, 0.8 + 0.2 * unbiased, rtol=1e-5)


def test_batchnorm_eval_uses_the_running_statistics():
    rng = np.random.default_rng(2)
    bn = bn_layer(3, rng)
    bn.running_mean[...] = [0.5, -1.0, 2.0]
    bn.running_var[...] = [4.0, 0.25, 1.0]
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    before = (bn.running_mean.copy(), bn.running_var.copy())
    y = bn.eval().forward(x)
    want = ((x - bn.running_mean[None, :, None, None]) / np.sqrt(bn.running_var + 1e-5)[None, :, None, None]
            * bn.weight.data[None, :, None, None] + bn.bias.data[None, :, None, None])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bn.running_mean, before[0])  # evaluation updates nothing
    np.testing.assert_array_equal(bn.running_var, before[1])


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients_match_finite_differences(training):
    rng = np.random.default_rng(3)
    bn = bn_layer(3, rng, dtype=np.float64)
    bn.running_mean = rng.standard_normal(3)
    bn.running_var = rng.random(3) + 0.5
    bn.train(training)
    x = rng.standard_normal((3, 3, 4, 2)) * 2 + 1
    w = rng.standard_normal((3, 3, 4, 2))  # loss = sum(w * y): every output matters differently

    def loss():
        return float((w * bn.forward(x)).sum())

    loss()
    dx = bn.backward(w.copy())
    dgamma, dbeta = bn.weight.grad.copy(), bn.bias.grad.copy()
    assert_grad_close(dx, numerical_grad(loss, x), rtol=1e-5, atol=1e-7)
    assert_grad_close(dgamma, numerical_grad(loss, bn.weight.data), rtol=1e-5, atol=1e-7)
    assert_grad_close(dbeta, numerical_grad(loss, bn.bias.data), rtol=1e-5, atol=1e-7)


def test_batchnorm_is_refused_where_it_cannot_normalise():
    with pytest.raises(ValueError, match="num_features must be at least 1"):
        L.BatchNorm2D(0)
    with pytest.raises(ValueError, match="BatchNorm2D: eps must be greater than 0.0, got 0.0"):
        L.BatchNorm2D(3, eps=0)
    with pytest.raises(ValueError, match="BatchNorm2D: momentum must be at most 1.0, got 1.5"):
        L.BatchNorm2D(3, momentum=1.5)
    with pytest.raises(ValueError, match="expects input"):
        L.BatchNorm2D(3).forward(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="more than one value per channel"):
        L.BatchNorm2D(3).forward(np.zeros((1, 3, 1, 1), np.float32))
    L.BatchNorm2D(3).eval().forward(np.zeros((1, 3, 1, 1), np.float32))  # one value is fine to evaluate


def test_conv_batchnorm_relu_fused_equals_unfused():
    """A ReLU after BatchNorm2D is applied in its forward; the result is the same as separate layers."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    labels = np.array([0, 1, 2, 1])

    def run(fused):
        L.set_seed(5)
        layers = [L.Conv2D(2, 3, 3, padding=1), L.BatchNorm2D(3), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(3, 3)]
        if fused:
            model = nbcnn.Sequential(layers)
        else:  # the ReLU in a nested Sequential: no fusion across the boundary
            model = nbcnn.Sequential(layers[:2] + [nbcnn.Sequential([layers[2]])] + layers[3:])
        loss_fn = SoftmaxCrossEntropy()
        loss_fn.forward(model.forward(x), labels)
        dx = model.backward(loss_fn.backward())
        return dx, [p.grad.copy() for p in model.parameters()], model

    dx_f, g_f, model = run(True)
    assert model._current.plans[1].relu and model._current.plans[2].in_previous
    dx_u, g_u, _ = run(False)
    np.testing.assert_allclose(dx_f, dx_u, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_f, g_u):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------- Dropout


def test_dropout_hash_matches_python_integers():
    """The kernels' hash (int64 arithmetic that wraps) against Python's unbounded integers."""
    from nbcnn.kernels._random import hash32_cpu
    from numba import njit

    @njit
    def many(seed, step, n):
        out = np.empty(n, np.int64)
        for i in range(n):
            out[i] = hash32_cpu(seed, step, i)
        return out

    for seed, step in [(0, 0), (1, 1), (2**31 - 1, 10**6), (123456789, 7)]:
        got = many(seed, step, 300)
        assert [int(v) for v in got] == [hash32(seed, step, i) for i in range(300)]


def test_dropout_is_inverted_reproducible_and_masks_backward():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 8, 10, 10)).astype(np.float32)
    L.set_seed(9)
    d = L.Dropout(0.3)
    y = d.forward(x).copy()
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01  # 51,200 draws: 4 standard deviations is 0.008
    np.testing.assert_allclose(y[kept], x[kept] / np.float32(0.7), rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = d.backward(dy)
    np.testing.assert_array_equal(dx != 0, kept)
    np.testing.assert_allclose(dx[kept], dy[kept] / np.float32(0.7), rtol=1e-6)
    # the mask of element i is the hash of (seed, step, i) against p * 2**32
    seed, step = int(d.state[0]), int(d.state[1])
    flat_kept = kept.reshape(-1)
    assert all(flat_kept[i] == (hash32(seed, step, i) >= threshold(0.3)) for i in range(0, x.size, 997))
    # a new mask each step, and the same masks again from the same seed
    assert not np.array_equal(d.forward(x) != 0, kept)
    L.set_seed(9)
    again = L.Dropout(0.3)
    np.testing.assert_array_equal(again.forward(x), y)


def test_dropout_in_eval_and_with_p_zero_is_the_identity():
    x = np.random.default_rng(6).standard_normal((3, 4)).astype(np.float32)
    assert L.Dropout(0.5).eval().forward(x) is x
    np.testing.assert_array_equal(L.Dropout(0.0).forward(x), x)
    for p, error, match in ((-0.1, ValueError, "at least 0.0"), (1.0, ValueError, "less than 1.0"),
                            (1.5, ValueError, "less than 1.0"), (float("nan"), ValueError, "finite"),
                            ("0.5", TypeError, "a real number"), (True, TypeError, "a real number")):
        with pytest.raises(error, match=f"Dropout: p must be {match}, got"):
            L.Dropout(p)


def test_dropout_gradient_matches_finite_differences_for_its_mask():
    rng = np.random.default_rng(7)
    d = L.Dropout(0.4)
    x = rng.standard_normal((5, 7))
    w = rng.standard_normal((5, 7))
    d.forward(x)
    step = int(d.state[1])

    def loss():  # the same mask every time: the step is held
        d.state[1] = step - 1
        return float((w * d.forward(x)).sum())

    loss()
    dx = d.backward(w.copy())
    assert_grad_close(dx, numerical_grad(loss, x), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------ GlobalAvgPool2D


def test_global_average_pooling_and_its_gradient():
    rng = np.random.default_rng(8)
    g = L.GlobalAvgPool2D()
    x = rng.standard_normal((3, 4, 5, 2))
    w = rng.standard_normal((3, 4))
    np.testing.assert_allclose(g.forward(x), x.mean(axis=(2, 3)), rtol=1e-12)

    def loss():
        return float((w * g.forward(x)).sum())

    loss()
    assert_grad_close(g.backward(w.copy()), numerical_grad(loss, x), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="expects input"):
        g.forward(np.zeros((2, 3), np.float32))


def test_a_whole_bn_network_matches_finite_differences():
    L.set_seed(11)
    model = nbcnn.Sequential([L.Conv2D(2, 3, 3, padding=1), L.BatchNorm2D(3), L.ReLU(), L.Dropout(0.25),
                              L.Conv2D(3, 4, 3), L.BatchNorm2D(4), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(4, 3)])
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 2, 5, 5))
    labels = np.array([0, 2, 1, 2])
    loss_fn = SoftmaxCrossEntropy()
    dropout = model.layers[3]
    loss_fn.forward(model.forward(x), labels)
    step = int(dropout.state[1])

    def loss():
        dropout.state[1] = step - 1  # the same dropout mask at every evaluation
        return loss_fn.forward(model.forward(x), labels)

    loss.x, loss.loss_fn = x, loss_fn
    assert_network_grads_close(model, loss, rtol=1e-5, atol=1e-7)


def test_save_and_load_carry_buffers_and_the_mode(tmp_path):
    L.set_seed(13)
    model = nbcnn.Sequential([L.Conv2D(1, 2, 3), L.BatchNorm2D(2), L.ReLU(), L.Dropout(0.2), L.GlobalAvgPool2D(),
                              L.Dense(2, 3)])
    x = np.random.default_rng(14).standard_normal((4, 1, 6, 6)).astype(np.float32)
    for _ in range(3):
        model.forward(x)
    model.eval()
    model.save(tmp_path / "m.npz")
    loaded = nbcnn.Sequential.load(tmp_path / "m.npz")
    assert not loaded.training
    for name, a in model.buffers().items():
        np.testing.assert_array_equal(loaded.buffers()[name], a)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert "running_mean" in model.summary((1, 1, 6, 6))


# ------------------------------------------------------------------------- against PyTorch


def test_against_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    x = (rng.standard_normal((5, 3, 4, 4)) * 2 + 1).astype(np.float32)
    bn = bn_layer(3, rng, momentum=0.3)
    tbn = torch.nn.BatchNorm2d(3, momentum=0.3)
    tbn.weight.data, tbn.bias.data = torch.tensor(bn.weight.data), torch.tensor(bn.bias.data)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for _ in range(2):
        xt = torch.tensor(x, requires_grad=True)
        tbn.zero_grad()
        yt = tbn(xt)
        yt.backward(torch.tensor(dy))
        y = bn.forward(x)
        dx = bn.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.weight.grad, tbn.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.bias.grad, tbn.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.eval().forward(x), tbn.eval()(torch.tensor(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)

    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x), 1).numpy()[:, :, 0, 0]
    np.testing.assert_allclose(L.GlobalAvgPool2D().forward(x), pooled, rtol=1e-6)

    # dropout: the same law (kept fraction, scaling), and the identity in eval, as PyTorch's
    big = np.ones((200, 500), np.float32)
    ours, theirs = L.Dropout(0.2).forward(big), torch.nn.Dropout(0.2)(torch.tensor(big)).numpy()
    assert set(np.unique(ours)) == set(np.unique(theirs)) == {0.0, np.float32(1 / 0.8)}
    assert abs((ours == 0).mean() - (theirs == 0).mean()) < 0.01

    layer = L.Dense(6, 2)
    params = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in layer.parameters()]
    ours_opt = AdamW(layer.parameters(), lr=0.02, weight_decay=0.1)
    theirs_opt = torch.optim.AdamW(params, lr=0.02, weight_decay=0.1)
    for _ in range(4):
        for p, tp in zip(layer.parameters(), params):
            g = rng.standard_normal(p.shape).astype(np.float32)
            p.grad[...] = g
            tp.grad = torch.tensor(g)
        ours_opt.step()
        theirs_opt.step()
    for p, tp in zip(layer.parameters(), params):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
