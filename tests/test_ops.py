"""The dispatcher's host array pool: arrays come back only once nothing else can see them."""

import numpy as np

from nbcnn import ops
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.optim import Adam
from nbcnn.train import MODELS


def test_pool_reuses_only_dead_arrays():
    pool = ops.HostPool()
    a = pool.empty((3, 4), np.float32)
    b = pool.empty((3, 4), np.float32)
    assert a is not b  # a is still held
    a_id = id(a)
    del a
    c = pool.empty((3, 4), np.float32)
    assert id(c) == a_id  # a was dropped: recycled
    view = c[1:]
    del c
    assert id(pool.empty((3, 4), np.float32)) != a_id  # a view keeps its base alive
    del view
    assert id(pool.empty((3, 4), np.float32)) == a_id
    assert pool.empty((3, 4), np.float64).dtype == np.float64  # dtypes and shapes never mix
    assert pool.empty((4, 3), np.float32).shape == (4, 3)


def test_pool_limits():
    pool = ops.HostPool(per_shape=2, limit=1000)
    held = [pool.empty((10,), np.float32) for _ in range(4)]  # only 2 are kept
    assert pool.nbytes == 80 and len(pool.arrays[((10,), np.dtype(np.float32))]) == 2
    big = pool.empty((1000,), np.float32)  # over the byte limit: handed out, not kept
    assert big.shape == (1000,) and pool.nbytes == 80
    del held, big


def test_training_steady_state_allocates_nothing():
    model, loss_fn = MODELS["lenet"](), SoftmaxCrossEntropy()
    opt = Adam(model.parameters())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)

    def step():
        loss = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), need_dx=False)
        opt.step()
        return loss

    losses = [step() for _ in range(3)]
    fresh, grads = ops.host_pool.fresh, [id(p.grad) for p in model.parameters()]
    losses += [step() for _ in range(3)]
    assert ops.host_pool.fresh == fresh  # every array of these steps was a recycled one
    assert [id(p.grad) for p in model.parameters()] == grads  # gradients written in place
    assert losses[-1] < losses[0]  # and it still trains
