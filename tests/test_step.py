"""The planned training step on the CPU: what it allocates (nothing, once planned), flat parameter
buffers and one optimizer call, the Trainer against the user's own loop, modes and buffers."""

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import nbcnn
from nbcnn import layers as L
from nbcnn.device import Device
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.models import MODELS
from nbcnn.ops import REGISTRY
from nbcnn.optim import SGD, Adam
from nbcnn.step import Trainer


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


class Counting:
    """A kernel source that counts the calls of each op (and runs them)."""

    def __init__(self):
        self.calls = {}

    def get(self, op, device, algorithm=None):
        kernel = REGISTRY.get(op, device, algorithm)
        counts = self.calls

        class Counted:
            workspace = kernel.workspace

            @staticmethod
            def run(*args):
                counts[op] = counts.get(op, 0) + 1
                kernel.run(*args)

        return Counted


def test_import_nbcnn_makes_the_submodules_usable():
    code = ("import nbcnn; nbcnn.optim.SGD; nbcnn.optim.Adam; nbcnn.layers.Conv2D; nbcnn.losses.SoftmaxCrossEntropy; "
            "import sys; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"  # and importing nbcnn imports no PyTorch


class NoAllocation:
    """Fails when the steps run inside allocate: no array through the Device (the one place nbcnn
    allocates), no NumPy array left alive, and no transient allocation of 8 KiB or more (every
    activation and gradient of a batch-64 step but the logits and the biases' is larger; what
    Python itself makes and drops in a step, views and tuples, peaks near 1.5 KiB)."""

    def __enter__(self):
        tracemalloc.start()
        self.arrays = Device.allocations
        self.start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc):
        _, peak = tracemalloc.get_traced_memory()
        numpy_blocks = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)]).traces
        tracemalloc.stop()
        if exc[0] is None:
            assert Device.allocations == self.arrays
            assert len(numpy_blocks) == 0
            assert peak - self.start < 8 * 1024
        return False


@pytest.mark.parametrize("model_name", ["lenet", "mnist-example", "resnet"])
def test_the_users_loop_allocates_nothing_once_planned(model_name):
    model, loss_fn = MODELS[model_name](), SoftmaxCrossEntropy()
    opt = Adam(model.parameters())
    x, y = batch(64)

    def step():
        logits = model.forward(x)
        loss = loss_fn.forward(logits, y)
        model.backward(loss_fn.backward(), need_dx=False)
        opt.step()
        return loss, logits

    losses = [step()[0] for _ in range(2)]
    grads = [id(p.grad) for p in model.parameters()]
    with NoAllocation():
        outputs = {id(step()[1]) for _ in range(4)}
    assert len(outputs) == 1  # the same logits buffer every step
    assert [id(p.grad) for p in model.parameters()] == grads  # gradients written in place
    assert np.isfinite(step()[0]) and np.isfinite(losses).all()


def test_the_trainer_allocates_nothing_and_alternates_plans_freely():
    model = MODELS["lenet"]()
    trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.01, momentum=0.9))
    x, y = batch(160)
    order = np.random.default_rng(1).permutation(160).astype(np.int32)
    trainer.run_epoch(x, y, order, 64)  # batches of 64, 64 and 32: two plans
    trainer.evaluate(x, y, batch_size=100)  # 100 and 60: two more
    with NoAllocation():
        for _ in range(2):
            trainer.run_epoch(x, y, order, 64)
            trainer.evaluate(x, y, batch_size=100)


def test_label_smoothing_and_gradient_clipping_allocate_nothing_once_planned():
    from nbcnn.step import ClipGradNorm

    model = MODELS["resnet"](widths=(4, 8, 8))
    trainer = Trainer(model, SoftmaxCrossEntropy(label_smoothing=0.1), SGD(model.parameters(), lr=0.01),
                      hooks=[ClipGradNorm(0.5)])
    x, y = batch(96)
    order = np.random.default_rng(2).permutation(96).astype(np.int32)
    trainer.run_epoch(x, y, order, 64)
    with NoAllocation():
        trainer.run_epoch(x, y, order, 64)


def test_parameters_live_in_one_flat_buffer_and_the_optimizer_makes_one_call():
    model = MODELS["lenet"]()
    counting = Counting()
    opt = Adam(model.parameters(), kernels=counting)
    assert opt.buffer is model.buffer
    data, grad = model.buffer.data, model.buffer.grad
    for p, lo in zip(model.parameters(), model.buffer.offsets):
        assert np.shares_memory(p.data, data) and np.shares_memory(p.grad, grad)
        assert p.data.ctypes.data == data.ctypes.data + 4 * lo
    loss_fn = SoftmaxCrossEntropy()
    x, y = batch()
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward(), need_dx=False)
    opt.step()
    opt.zero_grad()
    assert counting.calls == {"adam_update": 1, "fill": 1}
    assert not grad.any()


def test_reassigning_a_parameter_keeps_it_in_the_buffer_or_repacks():
    model = nbcnn.Sequential([L.Dense(3, 2)])
    opt = SGD(model.parameters(), lr=0.1)
    w = model.layers[0].weight
    w.data = np.ones((2, 3), np.float32)  # same shape and dtype: copied into the view
    assert w.buffer is model.buffer and (model.buffer.data[:6] == 1).all()
    w.data = np.ones((2, 3))  # float64: its own storage, the whole model follows at the next plan
    model.layers[0].bias.data = np.zeros(2)
    x = np.ones((1, 3))
    assert model.forward(x).dtype == np.float64
    assert model.buffer.dtype == np.float64 and w.buffer is model.buffer
    model.backward(np.ones((1, 2)))
    opt.step()  # the optimizer finds the new buffer
    assert opt.buffer is model.buffer
    np.testing.assert_allclose(w.data, 1 - 0.1 * np.ones((2, 3)))


def test_the_trainer_and_the_users_loop_train_the_same_model():
    x, y = batch(32, seed=3)
    params = []
    for use_trainer in (False, True):
        L.set_seed(0)
        model = MODELS["tiny"]()
        loss_fn, opt = SoftmaxCrossEntropy(), Adam(model.parameters(), lr=1e-2)
        if use_trainer:
            trainer = Trainer(model, loss_fn, opt)
            trainer.run_epoch(x, y, np.arange(32, dtype=np.int32), 8)
        else:
            for start in range(0, 32, 8):
                loss_fn.forward(model.forward(x[start:start + 8]), y[start:start + 8])
                model.backward(loss_fn.backward(), need_dx=False)
                opt.step()
        params.append([p.data.copy() for p in model.parameters()])
    for a, b in zip(*params):
        np.testing.assert_array_equal(a, b)


def test_the_trainer_reads_the_loss_every_few_steps():
    model = MODELS["tiny"]()
    trainer = Trainer(model, SoftmaxCrossEntropy(), Adam(model.parameters()), read_every=10)
    reads = []
    real_read = trainer.read
    trainer.read = lambda *a: reads.append(1) or real_read(*a)
    x, y = batch(64)
    seen = []
    loss = trainer.run_epoch(x, y, np.arange(64, dtype=np.int32), 2, progress=lambda done, *_: seen.append(done))
    assert len(reads) == 4 and seen == [20, 40, 60, 64]  # steps 10, 20, 30 and the last of 32
    assert np.isfinite(loss)


def test_a_hook_runs_between_backward_and_the_update():
    model = MODELS["tiny"]()
    opt = SGD(model.parameters(), lr=0.1)
    seen = []

    def clip(trainer):  # what gradient clipping or an allreduce would do: act on the flat gradient buffer
        g = trainer.optimizer.buffer.grad
        seen.append(float(np.abs(g).max()))
        g[:] = 0

    trainer = Trainer(model, SoftmaxCrossEntropy(), opt, hooks=[clip])
    before = model.buffer.data.copy()
    x, y = batch(4)
    trainer.step(x, y)
    assert seen and seen[0] > 0
    np.testing.assert_array_equal(model.buffer.data, before)  # zeroed gradients: nothing moved


class Scaled(L.Layer):
    """A layer with a buffer (not a parameter), as BatchNorm's running statistics will be."""

    def __init__(self):
        self.scale = np.ones(1, np.float32)

    def buffers(self):
        return {"scale": self.scale}


def test_modes_and_buffers_travel_with_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setitem(L.LAYERS, "Scaled", Scaled)
    model = nbcnn.Sequential([L.Dense(2, 2), Scaled()])
    assert model.training and model.eval() is model and not model.training
    assert not model.layers[0].training and model.train() is model and model.layers[1].training
    model.layers[1].scale[0] = 3.0
    model.eval()
    model.save(tmp_path / "m.npz")
    again = nbcnn.Sequential.load(tmp_path / "m.npz")
    assert again.layers[1].scale[0] == 3.0 and not again.training
    assert "buffers scale" in again.summary((1, 2))


PROBE = """
import ctypes, sys
if sys.argv[1] == "openmp-first":
    ctypes.CDLL("libgomp.so.1")  # what importing PyTorch first does
import numpy as np
import numba
import nbcnn
from nbcnn import kernels
from nbcnn.kernels.activation import relu_forward_cpu
relu_forward_cpu(np.zeros(1 << 16, np.float32), np.zeros(1 << 16, np.float32))  # starts the threads
print(kernels.OPENMP_LOADED_FIRST, numba.threading_layer())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_an_openmp_runtime_loaded_first_is_noticed_and_numba_keeps_its_layer():
    """The benchmarks report an OpenMP runtime that came first (PyTorch imported first); Numba's
    threading layer is its own choice either way (measured faster than the workqueue there, see
    nbcnn.kernels)."""
    import ctypes.util

    if ctypes.util.find_library("gomp") is None:
        pytest.skip("no libgomp on this machine to load first")
    seen = {}
    for order in ("nbcnn-first", "openmp-first"):
        done = subprocess.run([sys.executable, "-c", PROBE, order], capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"})
        assert done.returncode == 0, done.stderr
        seen[order] = done.stdout.split()
    assert seen["openmp-first"][0] == "True" and seen["nbcnn-first"][0] == "False"
    assert seen["openmp-first"][1] == seen["nbcnn-first"][1] != "workqueue"  # Numba's default, OpenMP or TBB


OPENBLAS_PROBE = """
import ctypes, os
{first}
paths = [line.split(None, 5)[5].strip() for line in open("/proc/self/maps")
         if line.count(" ") >= 5 and "openblas" in line.rsplit("/", 1)[-1].lower()]
seen = ctypes.CDLL(paths[0]).openblas_thread_timeout() if paths else "none"
print(nbcnn.BLAS_THREAD_TIMEOUT, os.environ.get("OPENBLAS_THREAD_TIMEOUT"), seen)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("first, exported, want", [
    ("import nbcnn", None, "4"),  # nbcnn first: set before NumPy loads OpenBLAS
    ("import numpy, nbcnn", None, "4"),  # NumPy first: OpenBLAS reads it again
    ("import numpy, nbcnn", "9", "9"),  # the user's value is kept
])
def test_openblas_threads_are_told_to_sleep_between_products(first, exported, want):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if exported:
        env["OPENBLAS_THREAD_TIMEOUT"] = exported
    code = OPENBLAS_PROBE.format(first=first)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    told, variable, seen = done.stdout.split()
    if seen == "none":
        pytest.skip("NumPy here does not use OpenBLAS")
    assert told == variable == seen == want  # what nbcnn reports is what OpenBLAS uses


def test_a_sequential_inside_a_sequential_plans_too():
    L.set_seed(1)
    inner = nbcnn.Sequential([L.Conv2D(1, 2, 3), L.ReLU()])
    outer = nbcnn.Sequential([inner, L.MaxPool2D(2), L.Flatten(), L.Dense(2 * 3 * 3, 3)])
    flat = nbcnn.Sequential(inner.layers + outer.layers[1:])
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    dy = np.ones((2, 3), np.float32)
    y, dx = outer.forward(x).copy(), outer.backward(dy).copy()
    np.testing.assert_allclose(flat.forward(x), y, rtol=1e-6)
    np.testing.assert_allclose(flat.backward(dy), dx, rtol=1e-6, atol=1e-6)  # the flat model fuses its first layer


def test_parameter_assignments_are_checked():
    w = L.Dense(3, 2).weight
    with pytest.raises(TypeError, match="Parameter.data must be a NumPy or GPU array, got list"):
        w.data = [[1.0, 2.0, 3.0]] * 2
    with pytest.raises(TypeError, match="Parameter.data must be float32 or float64, got int64"):
        w.data = np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match=r"a gradient of shape \(3, 2\)"):
        w.grad = np.zeros((3, 2), np.float32)
    w.data = np.ones((3, 4))[:, :2].T  # float64 and not contiguous: stored as a contiguous copy
    assert w.data.flags.c_contiguous and w.dtype == np.float64


@pytest.mark.parametrize("channels, relu", [(1, True), (3, False), (5, True)])
def test_a_first_convolution_computes_the_pooling_after_it(channels, relu):
    """Conv2D -> [ReLU] -> MaxPool2D(2) at the start of a model is one op (nbcnn.kernels.conv2d.pooled):
    the same outputs and gradients as the two layers' own kernels (a Conv2D with its algorithm named
    keeps them), for few input channels (the CPU's own kernels) and more. The input gradient, when
    asked for: with few input channels from the pooled gradient by a kernel of its own, the op
    staying fused; with more, through the two ops, unfused from then on."""
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((3, channels, 11, 10)).astype(np.float32)
    models = []
    for algorithm in (None, "gemm"):
        L.set_seed(0)
        middle = [L.ReLU()] if relu else []
        models.append(nbcnn.Sequential([L.Conv2D(channels, 5, 3, padding=1, algorithm=algorithm)] + middle
                                       + [L.MaxPool2D(2), L.Flatten(), L.Dense(5 * 5 * 5, 4)]))
    fused, plain = models
    y, want = fused.forward(x), plain.forward(x)
    assert fused._current.pooled and not plain._current.pooled
    np.testing.assert_array_equal(y, want)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    conv, pool = fused._current.plans[0], fused._current.plans[2 if relu else 1]
    assert pool.in_previous and conv.pool is pool and conv.y is None  # the convolution's output never stored
    fused_still = True
    for need_dx in (False, True, False):
        dx, want_dx = fused.backward(dy, need_dx=need_dx), plain.backward(dy, need_dx=need_dx)
        for p, q in zip(fused.parameters(), plain.parameters()):
            np.testing.assert_allclose(p.grad, q.grad, rtol=1e-6, atol=1e-6)
        if need_dx and channels <= 3:  # summed in another order than the unfused ops
            np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6)
        elif need_dx:
            np.testing.assert_array_equal(dx, want_dx)
        else:
            assert dx is None
        # asked for dx once, a plan without the kernel runs the two ops from then on
        fused_still = fused_still and (channels <= 3 or not need_dx)
        assert fused._current.pooled == fused_still
        np.testing.assert_array_equal(fused.forward(x), plain.forward(x))
    assert fused._current.pooled == pool.in_previous == (channels <= 3)


@pytest.mark.parametrize("relu, before", [(True, True), (False, False), (True, False)])
def test_a_later_convolution_does_the_pooling_backward(relu, before):
    """A later Conv2D -> [ReLU] -> MaxPool2D(2) runs the two ops' backward as one, from the pooled
    gradient and the maxima (nbcnn.kernels.conv2d.maxima): the same gradients as the two layers' own
    kernels (a Conv2D with its algorithm named keeps them), the pooling's full-size gradient never
    allocated; with a ReLU before the convolution (its mask in dx) or not; dx asked for or not."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 2, 12, 11)).astype(np.float32)
    models = []
    for algorithm in (None, "gemm"):
        L.set_seed(0)
        models.append(nbcnn.Sequential(
            [L.Conv2D(2, 6, 3, padding=1)] + ([L.ReLU()] if before else [])
            + [L.Conv2D(6, 5, 3, algorithm=algorithm)] + ([L.ReLU()] if relu else [])
            + [L.MaxPool2D(2), L.Flatten(), L.Dense(5 * 5 * 4, 4)]))
    fused, plain = models
    np.testing.assert_array_equal(fused.forward(x), plain.forward(x))
    plans = fused._current.plans
    conv, pool = plans[2 if before else 1], plans[-3]
    assert conv.pool_backward is pool and pool.backward_in_previous and pool.dx is None
    assert all(p.pool_backward is None for p in plain._current.plans if hasattr(p, "pool_backward"))
    dy = rng.standard_normal((3, 4)).astype(np.float32)
    for need_dx in (True, False):
        dx, want_dx = fused.backward(dy, need_dx=need_dx), plain.backward(dy, need_dx=need_dx)
        for p, q in zip(fused.parameters(), plain.parameters()):
            np.testing.assert_allclose(p.grad, q.grad, rtol=1e-5, atol=1e-5)
        if need_dx:
            np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)


def test_only_a_first_convolution_and_a_2x2_pooling_fuse():
    def pooled(layers):
        model = nbcnn.Sequential(layers)
        model.forward(np.zeros((2, 2, 8, 8), np.float32))
        return model._current.pooled

    assert not pooled([L.ReLU(), L.Conv2D(2, 3, 3), L.MaxPool2D(2)])  # not the first layer
    assert not pooled([L.Conv2D(2, 3, 3), L.MaxPool2D(3)])  # not 2x2
    assert not pooled([L.Conv2D(2, 3, 3), L.MaxPool2D(2, stride=1)])
    assert not pooled([L.Conv2D(2, 3, 3), L.ReLU(), L.AvgPool2D(2)])
    assert not pooled([L.Conv2D(2, 3, 3, algorithm="direct"), L.MaxPool2D(2)])  # a named algorithm keeps its kernels
    assert pooled([L.Conv2D(2, 3, 3, stride=2), L.ReLU(), L.MaxPool2D(2)])


@pytest.mark.parametrize("layers, pooled", [
    (lambda: [L.Conv2D(1, 4, 3), L.ReLU(), L.MaxPool2D(2)], True),
    (lambda: [L.Conv2D(1, 4, 3), L.MaxPool2D(2)], True),
    (lambda: [L.Conv2D(1, 4, 3), L.ReLU(), L.AvgPool2D(2)], False),  # only max pooling
    (lambda: [L.Conv2D(1, 4, 3), L.ReLU(), L.MaxPool2D(3)], False),  # only the 2x2 window
    (lambda: [L.Conv2D(1, 4, 3), L.ReLU(), L.MaxPool2D(2, stride=1)], False),
    (lambda: [L.Conv2D(1, 4, 3, algorithm="direct"), L.ReLU(), L.MaxPool2D(2)], False),  # a named algorithm
    (lambda: [L.ReLU(), L.Conv2D(1, 4, 3), L.MaxPool2D(2)], False),  # only the first layer
    (lambda: [L.Conv2D(1, 4, 3), L.ReLU(), L.ReLU(), L.MaxPool2D(2)], False),  # a ReLU left in between
])
def test_fusion_asks_the_plans(layers, pooled):
    """layers.fuse: the first convolution computes a following 2x2 max pooling and nothing else; every
    ReLU is taken over by the layers around it that can."""
    model = nbcnn.Sequential(layers() + [L.Flatten()])
    model.forward(np.ones((2, 1, 10, 10), np.float32))
    plan = model._current
    assert plan.pooled == pooled
    for i, p in enumerate(plan.plans):
        if p.is_relu and i > 0:
            assert p.in_previous == plan.plans[i - 1].relu
