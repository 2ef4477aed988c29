"""nbcnn's layers against PyTorch's forward results and gradients, where PyTorch is installed."""

import numpy as np
import pytest

from nbcnn import layers as L
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.optim import Adam

torch = pytest.importorskip("torch")
F = torch.nn.functional


def t(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1), ((1, 2), (2, 0))])
def test_conv2d_forward_and_gradients(stride, padding):
    rng = np.random.default_rng(0)
    layer = L.Conv2D(3, 4, (3, 2), stride=stride, padding=padding)
    for p in layer.parameters():
        p.data = p.data.astype(np.float64)
    x = rng.standard_normal((2, 3, 9, 8))
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    xt, wt, bt = t(x, True), t(layer.weight.data, True), t(layer.bias.data, True)
    yt = F.conv2d(xt, wt, bt, stride=stride, padding=padding)
    yt.backward(t(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_forward_and_gradients(kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 9))
    x[0, 0, :2, :2] = 5.0  # a tie
    layer = (L.MaxPool2D if kind == "max" else L.AvgPool2D)(3, stride=2, padding=1)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    xt = t(x, True)
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    yt = pool(xt, 3, stride=2, padding=1)
    yt.backward(t(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_dense_relu_softmax_xent_and_adam():
    rng = np.random.default_rng(2)
    L.set_seed(0)
    layer = L.Dense(6, 5)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    labels = np.array([0, 4, 2, 2], np.int32)
    wt = torch.tensor(layer.weight.data.copy(), requires_grad=True)
    bt = torch.tensor(layer.bias.data.copy(), requires_grad=True)
    opt_t = torch.optim.Adam([wt, bt], lr=1e-2)
    opt = Adam(layer.parameters(), lr=1e-2)
    relu, loss_fn = L.ReLU(), SoftmaxCrossEntropy()
    for _ in range(3):
        loss = loss_fn.forward(layer.forward(relu.forward(x)), labels)
        layer.backward(loss_fn.backward())
        opt.step()
        opt_t.zero_grad()
        loss_t = F.cross_entropy(F.linear(F.relu(torch.tensor(x)), wt, bt), torch.tensor(labels).long())
        loss_t.backward()
        opt_t.step()
        assert loss == pytest.approx(loss_t.item(), rel=1e-5)
    np.testing.assert_allclose(layer.weight.data, wt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias.data, bt.detach().numpy(), rtol=1e-5, atol=1e-6)
