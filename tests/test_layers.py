"""Layers and Sequential: backpropagation through a whole network against finite differences,
hyperparameter checks, summary, parameters, save and load."""

import os

import numpy as np
import pytest

import nbcnn
from nbcnn import layers as L
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.model import atomic_write
from tests.gradcheck import assert_network_grads_close


def small_net():
    L.set_seed(3)
    return nbcnn.Sequential([
        L.Conv2D(2, 3, (3, 2), stride=(1, 2), padding=1), L.ReLU(), L.MaxPool2D(2, stride=1),
        L.Conv2D(3, 2, 2, bias=False), L.AvgPool2D(2, padding=1), L.Flatten(), L.Dense(2 * 3 * 2, 5), L.ReLU(),
        L.Dense(5, 4),
    ])


def to_float64(model):
    for p in model.parameters():
        p.data = p.data.astype(np.float64)


def test_whole_network_gradients_match_finite_differences():
    model = small_net()
    to_float64(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 7, 6))
    labels = np.array([0, 3, 1])
    loss_fn = SoftmaxCrossEntropy()

    def loss():
        return loss_fn.forward(model.forward(x), labels)

    loss.x, loss.loss_fn = x, loss_fn
    assert_network_grads_close(model, loss, rtol=1e-5, atol=1e-7)


def test_backward_without_input_gradient_gives_the_same_parameter_gradients():
    model = small_net()
    x = np.random.default_rng(1).standard_normal((2, 2, 7, 6)).astype(np.float32)
    dy = np.ones((2, 4), np.float32)
    model.forward(x)
    assert model.backward(dy) is not None
    full = [p.grad.copy() for p in model.parameters()]
    model.forward(x)
    assert model.backward(dy, need_dx=False) is None
    for p, g in zip(model.parameters(), full):
        np.testing.assert_array_equal(p.grad, g)


def test_a_first_layer_asked_for_its_input_gradient_after_all_gets_the_room_it_needs():
    """A model plans its first layer without the input gradient; asked for it after all, every
    buffer of the layer's scratch is as large as the kernels ask for with it (a per-thread buffer
    kept at the forward's size let the input gradient write past its thread's row), and dx is the
    reference's."""
    from tests import reference as ref

    rng = np.random.default_rng(3)
    conv = L.Conv2D(3, 4, 3, padding=1)  # few input channels: the implicit scatter's dx
    model = nbcnn.Sequential([conv, L.Flatten(), L.Dense(4 * 12 * 12, 2)])
    x = rng.standard_normal((5, 3, 12, 12)).astype(np.float32)
    dy = rng.standard_normal((5, 2)).astype(np.float32)
    model.forward(x)
    dx = model.backward(dy)
    plan = model._current.plans[0]
    shape_args = (plan.in_shape, conv.weight.shape, plan.out_shape, conv.stride, conv.padding, True, plan.dtype)
    for name, shape in {**plan.fwd.workspace(*shape_args), **plan.bwd.workspace(*shape_args)}.items():
        assert all(a >= b for a, b in zip(getattr(plan.ws, name).shape, shape)), name
    dconv = (dy @ model.layers[2].weight.data).reshape(5, 4, 12, 12)  # no activation between
    want = ref.conv2d_grads(dconv.astype(np.float64), x.astype(np.float64), conv.weight.data.astype(np.float64),
                            (1, 1), (1, 1))[0]
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-4)


def test_parameters_in_order_weight_then_bias():
    model = small_net()
    shapes = [p.shape for p in model.parameters()]
    assert shapes == [(3, 2, 3, 2), (3,), (2, 3, 2, 2), (5, 12), (5,), (4, 5), (4,)]
    assert model.layers[0].weight.shape == (3, 2, 3, 2) and model.layers[0].bias.shape == (3,)
    assert model.layers[3].bias is None and L.ReLU().parameters() == []


def test_summary_shows_the_lecture_numbers(capsys):
    model = nbcnn.Sequential([L.Conv2D(3, 10, 5), L.ReLU(), L.Flatten(), L.Dense(10 * 28 * 28, 2)])
    text = model.summary((1, 3, 32, 32))
    assert "(1, 10, 28, 28)" in text and "760" in text  # 10 filters of 5*5*3 + 1 = 76
    assert f"total parameters: {760 + 7840 * 2 + 2:,}" in text
    assert capsys.readouterr().out.strip() == text.strip()


def test_he_initialisation_is_seeded_and_scaled():
    L.set_seed(7)
    a = L.Conv2D(16, 32, 3).weight.data
    L.set_seed(7)
    b = L.Conv2D(16, 32, 3).weight.data
    np.testing.assert_array_equal(a, b)
    assert abs(a.std() - np.sqrt(2 / (16 * 9))) < 0.01


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: L.Conv2D(3, 8, 0), ValueError, "Conv2D: kernel_size must be at least 1, got 0"),
        (lambda: L.Conv2D(3, 8, (3,)), TypeError, "kernel_size must be an int or a pair"),
        (lambda: L.Conv2D(3, 8, 3, stride=0), ValueError, "stride must be at least 1"),
        (lambda: L.Conv2D(3, 8, 3, padding=-1), ValueError, "padding must be at least 0"),
        (lambda: L.Conv2D(0, 8, 3), ValueError, "in_channels must be at least 1"),
        (lambda: L.Conv2D(3, 8.0, 3), TypeError, "out_channels must be an integer"),
        (lambda: L.MaxPool2D(2, padding=2), ValueError, "at most half the kernel size"),
        (lambda: L.AvgPool2D((2, 2), stride=(1, 0)), ValueError, "stride must be at least 1"),
        (lambda: L.Dense(0, 3), ValueError, "in_features must be at least 1"),
        (lambda: nbcnn.Sequential([L.ReLU(), "relu"]), TypeError, "item 1 is a str, not an nbcnn layer"),
    ],
)
def test_constructors_check_hyperparameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_wrong_inputs_give_one_line_errors():
    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"expects input \(N, 1, H, W\), got \(2, 3, 8, 8\)"):
        L.Conv2D(1, 4, 3).forward(x)
    with pytest.raises(ValueError, match="put a Flatten before it"):
        L.Dense(192, 4).forward(x)
    with pytest.raises(ValueError, match="expects 100 input features, got 192"):
        L.Dense(100, 4).forward(x.reshape(2, -1))
    with pytest.raises(ValueError, match="kernel height 9 is larger than the padded input height 8"):
        L.Conv2D(3, 4, 9).forward(x)
    with pytest.raises(TypeError, match="w is float32 but x is float64"):
        L.Conv2D(3, 4, 3).forward(x.astype(np.float64))
    with pytest.raises(RuntimeError, match="Conv2D.backward called before forward"):
        L.Conv2D(3, 4, 3).backward(np.zeros((2, 4, 6, 6), np.float32))
    with pytest.raises(TypeError, match="x must be a NumPy or GPU array, got list"):
        nbcnn.Sequential([L.ReLU()]).forward([1.0])


def test_save_and_load_round_trip(tmp_path):
    model = small_net()
    x = np.random.default_rng(2).standard_normal((2, 2, 7, 6)).astype(np.float32)
    path = tmp_path / "m.npz"
    model.save(path, mean=0.5)
    again = nbcnn.Sequential.load(path)
    np.testing.assert_array_equal(again.forward(x), model.forward(x))
    assert again.metadata == {"mean": 0.5}
    assert repr(again.layers[0]) == repr(model.layers[0])


def test_load_rejects_what_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="is not an nbcnn checkpoint"):
        nbcnn.Sequential.load(bad)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        nbcnn.Sequential.load(tmp_path / "missing.npz")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind
