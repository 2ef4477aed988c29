"""Residual blocks and the resnet model on the CPU: against PyTorch (outputs and every gradient),
against central finite differences in float64, fused against unfused, saved and loaded. (The join's
CUDA kernels are checked against these in tests/cuda.)"""

import numpy as np
import pytest

import nbcnn
from nbcnn import layers as L
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.models import resnet
from tests.gradcheck import assert_network_grads_close


def float64(model):
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    return model


def block_with_projection(cin=3, cout=4, stride=2):
    block = [L.Conv2D(cin, cout, 3, stride=stride, padding=1, bias=False), L.BatchNorm2D(cout), L.ReLU(),
             L.Conv2D(cout, cout, 3, padding=1, bias=False), L.BatchNorm2D(cout)]
    return L.Residual(block, [L.Conv2D(cin, cout, 1, stride=stride, bias=False), L.BatchNorm2D(cout)])


def small_network():
    """A stem and ReLU (its mask fused into the first block's backward), a block with a projection,
    the ReLU after it (fused into its join), an identity block with a GELU inside, then the head."""
    return nbcnn.Sequential([L.Conv2D(2, 3, 3, padding=1), L.ReLU(), block_with_projection(), L.ReLU(),
                             L.Residual([L.Conv2D(4, 4, 3, padding=1), L.GELU()]), L.GlobalAvgPool2D(),
                             L.Dense(4, 5)])


class NetworkLoss:
    """loss() of ``model`` on a fixed input and labels, for the finite differences."""

    def __init__(self, model, x, labels, smoothing=0.0):
        self.model, self.x, self.labels = model, x, labels
        self.loss_fn = SoftmaxCrossEntropy(label_smoothing=smoothing)

    def __call__(self):
        return self.loss_fn.forward(self.model.forward(self.x), self.labels)


def test_the_plan_fuses_the_relus_around_a_block():
    model = small_network()
    model.forward(np.zeros((2, 2, 8, 8), np.float32))
    plans = model._current.plans
    assert plans[2].mask and plans[1].in_next  # the ReLU before: masked in the block's backward
    assert plans[2].relu and plans[3].in_previous  # the ReLU after: applied by the join
    assert plans[4].mask and plans[3].in_next  # the same ReLU is also the one before the next block
    assert not plans[4].relu  # nothing after the second block to fuse


def test_fused_equals_unfused():
    """The same network with each ReLU in a nested Sequential (nothing fuses across its edges)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
    labels = np.array([0, 4, 2])

    def run(fused):
        L.set_seed(3)
        layers = small_network().layers
        if not fused:
            layers = [nbcnn.Sequential([layer]) if isinstance(layer, L.ReLU) else layer for layer in layers]
        model = nbcnn.Sequential(layers)
        loss_fn = SoftmaxCrossEntropy()
        loss = loss_fn.forward(model.forward(x), labels)
        return loss, model.backward(loss_fn.backward()).copy(), [p.grad.copy() for p in model.parameters()]

    loss_f, dx_f, grads_f = run(True)
    loss_u, dx_u, grads_u = run(False)
    assert loss_f == loss_u
    np.testing.assert_array_equal(dx_f, dx_u)
    for a, b in zip(grads_f, grads_u):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_network_gradients_match_finite_differences(training):
    rng = np.random.default_rng(1)
    L.set_seed(4)
    model = float64(small_network()).train(training)
    x = rng.standard_normal((3, 2, 6, 6))
    assert_network_grads_close(model, NetworkLoss(model, x, np.array([1, 0, 3]), smoothing=0.1))


def test_identity_block_alone_matches_finite_differences():
    """A Residual used as a layer by itself (planned on its own, not inside a Sequential)."""
    rng = np.random.default_rng(2)
    block = float64(nbcnn.Sequential([L.Conv2D(2, 2, 3, padding=1), L.Tanh()]))
    layer = L.Residual(block)
    x = rng.standard_normal((2, 2, 5, 4))
    w = rng.standard_normal((2, 2, 5, 4))

    def loss():
        return float((w * layer.forward(x)).sum())

    from tests.gradcheck import assert_grad_close, numerical_grad

    loss()
    dx = layer.backward(w.copy()).copy()
    grads = [p.grad.copy() for p in layer.parameters()]
    assert_grad_close(dx, numerical_grad(loss, x))
    for p, g in zip(layer.parameters(), grads):
        assert_grad_close(g, numerical_grad(loss, p.data))


def test_parameters_buffers_modes_and_checkpoints(tmp_path):
    L.set_seed(5)
    block = block_with_projection()
    names = [tuple(p.shape) for p in block.parameters()]
    assert names == [(4, 3, 3, 3), (4,), (4,), (4, 4, 3, 3), (4,), (4,), (4, 3, 1, 1), (4,), (4,)]  # block, then shortcut
    assert sorted(block.buffers()) == ["block.1.running_mean", "block.1.running_var", "block.4.running_mean",
                                       "block.4.running_var", "shortcut.1.running_mean", "shortcut.1.running_var"]
    model = nbcnn.Sequential([block, L.GlobalAvgPool2D(), L.Dense(4, 2)])
    x = np.random.default_rng(6).standard_normal((4, 3, 6, 6)).astype(np.float32)
    model.forward(x)  # moves the running statistics
    model.eval()
    assert not block.block.layers[1].training and not block.shortcut.layers[1].training
    y = model.forward(x).copy()
    model.save(tmp_path / "m.npz")
    again = nbcnn.Sequential.load(tmp_path / "m.npz")
    assert again.config() == model.config() and not again.training
    np.testing.assert_array_equal(again.forward(x), y)
    text = model.summary((4, 3, 6, 6))
    assert "  shortcut:" in text and "Residual" in text


def test_misuse_is_refused_in_one_line():
    with pytest.raises(TypeError, match="Residual: block must be a Sequential or a list of layers"):
        L.Residual(L.ReLU())
    with pytest.raises(TypeError, match="Residual: shortcut must be"):
        L.Residual([L.ReLU()], shortcut="projection")
    with pytest.raises(TypeError, match="item 0 is a int"):
        L.Residual([3])
    with pytest.raises(ValueError, match="the block has no layers"):
        L.Residual([])
    layer = L.Residual([L.Conv2D(3, 4, 3, padding=1)])
    with pytest.raises(ValueError, match=r"the block outputs \(2, 4, 5, 5\) but the input \(the identity shortcut\) "
                                         r"is \(2, 3, 5, 5\)"):
        layer.forward(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="Residual"):
        nbcnn.Sequential.from_config({"layers": [{"type": "Residual", "args": {"shortcut": None}}]})


def test_resnet_fits_grey_and_colour_images():
    assert resnet(1, 10, 28).output_shape((5, 1, 28, 28)) == (5, 10)
    assert resnet(3, 100, 32).output_shape((5, 3, 32, 32)) == (5, 100)
    model = resnet(1, 10, 28)
    residuals = [layer for layer in model.layers if isinstance(layer, L.Residual)]
    assert len(residuals) == 3 and residuals[0].shortcut is None  # 16 -> 16: the identity
    assert all(r.shortcut is not None for r in residuals[1:])  # the two that halve the size and widen


# ---------------------------------------------------------------------------------- PyTorch

torch = pytest.importorskip("torch")
from nbcnn.perf.peer import torch_module  # noqa: E402


def torch_of(layer):
    """The PyTorch module of an nbcnn layer (nbcnn's float64 weights), and its parameters in nbcnn's order."""
    return torch_module(torch, layer, torch.float64)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_a_small_resnet_step_matches_pytorch(smoothing):
    """The zoo's resnet (narrow), one training step: loss, input gradient and every parameter's gradient
    against PyTorch's autograd, then the running statistics both keep."""
    rng = np.random.default_rng(7)
    L.set_seed(8)
    model = float64(resnet(3, 6, 12, widths=(4, 6, 8)))
    ours, params = torch_of(model)
    x = rng.standard_normal((5, 3, 12, 12))
    labels = rng.integers(0, 6, 5)
    loss_fn = SoftmaxCrossEntropy(label_smoothing=smoothing)
    loss = loss_fn.forward(model.forward(x), labels)
    dx = model.backward(loss_fn.backward())
    xt = torch.tensor(x, requires_grad=True)
    want = torch.nn.functional.cross_entropy(ours(xt), torch.tensor(labels), label_smoothing=smoothing)
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    assert len(params) == len(model.parameters())
    for p, q in zip(model.parameters(), params):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-9, atol=1e-12)
    bns = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    mine = [v for k, v in model.buffers().items() if k.endswith("running_var")]
    assert len(bns) == len(mine)
    for m, v in zip(bns, mine):
        np.testing.assert_allclose(v, m.running_var.numpy(), rtol=1e-12)


@pytest.mark.parametrize("name", ["LeakyReLU", "Tanh", "Sigmoid", "GELU"])
def test_activation_layers_match_pytorch(name):
    rng = np.random.default_rng(9)
    x = 3 * rng.standard_normal((4, 3, 5, 6))
    layer = L.LeakyReLU(0.2) if name == "LeakyReLU" else getattr(L, name)()
    theirs = torch.nn.LeakyReLU(0.2) if name == "LeakyReLU" else getattr(torch.nn, name)()
    y = layer.forward(x)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-15)
    x32 = x.astype(np.float32)  # the float32 kernels: float32 arithmetic, close to PyTorch's
    y32 = layer.forward(x32)
    np.testing.assert_allclose(y32, theirs(torch.tensor(x32)).numpy(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_label_smoothing_matches_pytorch(smoothing):
    rng = np.random.default_rng(10)
    logits = 5 * rng.standard_normal((7, 4))
    labels = rng.integers(0, 4, 7)
    loss_fn = SoftmaxCrossEntropy(label_smoothing=smoothing)
    loss = loss_fn.forward(logits, labels)
    zt = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(zt, torch.tensor(labels), label_smoothing=smoothing)
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-12)
    np.testing.assert_allclose(loss_fn.backward(), zt.grad.numpy(), rtol=1e-12, atol=1e-15)
