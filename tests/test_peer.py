"""nbcnn.perf.peer: every zoo network as its PyTorch peer computes what nbcnn computes, and a
layer without a counterpart is refused, never replaced."""

import numpy as np
import pytest

from nbcnn import layers as L
from nbcnn.model import Sequential
from nbcnn.models import MODELS
from nbcnn.perf.peer import torch_module

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_zoo_model_and_its_peer_agree(name):
    L.set_seed(3)
    model = MODELS[name]().eval()
    peer, params = torch_module(torch, model)
    peer.eval()
    assert [tuple(p.shape) for p in params] == [p.shape for p in model.parameters()]
    x = np.random.default_rng(4).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        want = peer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.forward(x), want, rtol=1e-4, atol=1e-4)


def test_the_other_layers_convert():
    L.set_seed(5)
    model = Sequential([L.Conv2D(2, 3, 3, padding=1), L.LeakyReLU(0.2), L.AvgPool2D(2, padding=1), L.Tanh(),
                        L.Conv2D(3, 4, 1, bias=False), L.Sigmoid(), L.GELU(), L.Flatten(), L.Dropout(0.3),
                        L.Dense(4 * 3 * 3, 5, bias=False)]).eval()
    peer, params = torch_module(torch, model, torch.float64)
    peer.eval()
    assert len(params) == len(model.parameters()) == 4
    x = np.random.default_rng(6).standard_normal((2, 2, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = peer(torch.from_numpy(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(model.forward(x), want, rtol=1e-5, atol=1e-5)


def test_a_layer_without_a_counterpart_is_refused():
    class Square(L.ReLU):  # a subclass may compute something else: refused as well
        pass

    class Mystery(L.Layer):
        pass

    for layer in (Sequential([L.Flatten(), Mystery()]), Square()):
        with pytest.raises(TypeError, match="torch_module: no PyTorch counterpart for"):
            torch_module(torch, layer)
