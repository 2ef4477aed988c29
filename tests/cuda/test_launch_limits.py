"""Every CUDA launch stays within the hardware's grid limits for any batch: gridDim.x below 2**31,
gridDim.y and gridDim.z at most 65535, at most 1024 threads a block. Checked without a GPU: in the
simulator, the launches of every core and launcher are recorded and skipped, at a batch of a
million; and the kernels that stride over a capped gridDim.z are run with the cap set to 1, so the
stride is taken, against the CPU."""

import numpy as np
import pytest
from numba import cuda

from nbcnn.kernels import _cuda
from nbcnn.kernels._cuda import SIMULATOR
from nbcnn.ops import REGISTRY
from tests import cores
from tests.cuda.helpers import assert_close

pytestmark = pytest.mark.skipif(not SIMULATOR, reason="records the launches of the simulator's kernels")

N = 1_000_000


@pytest.fixture
def launches(monkeypatch):
    from numba.cuda.simulator import kernel as simulated

    seen = []
    real_call = simulated.FakeCUDAKernel.__call__
    real_configure = simulated.FakeCUDAKernel.__getitem__

    def configure(self, configuration):
        self.nbcnn_stream = configuration[2] if len(configuration) > 2 else None
        return real_configure(self, configuration)

    def launch(self, *args):
        if self._device or simulated._kernel_context:
            return real_call(self, *args)
        grid = tuple(self.grid_dim) + (1,) * (3 - len(self.grid_dim))
        block = tuple(self.block_dim) + (1,) * (3 - len(self.block_dim))
        seen.append((self.fn.__name__, grid, block, self.nbcnn_stream))

    monkeypatch.setattr(simulated.FakeCUDAKernel, "__getitem__", configure)
    monkeypatch.setattr(simulated.FakeCUDAKernel, "__call__", launch)
    return seen


def empty(*shape, dtype=np.float32):
    return cuda.device_array(shape, dtype)  # never written: the launches are skipped


def huge_batch_calls(algorithm=None):
    """(op, arguments) of every CUDA core at a batch of N, small images so the arrays stay small
    (the convolution's scratch sized for ``algorithm``, its default if None)."""
    from types import SimpleNamespace

    x, w, b = empty(N, 2, 3, 3), empty(5, 2, 3, 3), empty(5)
    y = empty(N, 5, 3, 3)
    conv_ws = SimpleNamespace(**{k: empty(*s) for k, s in
                                 REGISTRY.get("conv2d_backward", "cuda", algorithm).workspace(
                                     x.shape, w.shape, y.shape, (1, 1), (1, 1), True, np.float32).items()})
    p, am = empty(N, 2, 1, 1), empty(N, 2, 1, 1, dtype=np.int32)
    d_in, d_out = empty(N, 7), empty(N, 3)
    dense_ws = SimpleNamespace(one=empty(1))
    loss_ws = SimpleNamespace(**{k: empty(*s, dtype=t) for k, (s, t) in
                                 REGISTRY.get("softmax_xent_step", "cuda").workspace(N).items()})
    clip_ws = SimpleNamespace(**{k: empty(*s, dtype=t) for k, (s, t) in
                                 REGISTRY.get("clip_grad_norm", "cuda").workspace(N * 45).items()})
    labels = empty(N, dtype=np.int32)
    flat = empty(10 * N)
    pooled_ws = SimpleNamespace(**{k: empty(*s) for k, s in REGISTRY.get("conv2d_maxpool_forward", "cuda").workspace(
        x.shape, w.shape, (1, 1), (1, 1), np.float32).items()})
    yp, amp = empty(N, 5, 1, 1), empty(N, 5, 1, 1, dtype=np.int32)
    return [
        ("conv2d_forward", (y, x, w, b, 1, 1, 1, 1, True, conv_ws)),
        ("conv2d_backward", (x, empty(5, 2, 3, 3), empty(5), y, x, w, 1, 1, 1, 1, True, conv_ws)),
        ("conv2d_maxpool_forward", (yp, amp, x, w, b, 1, 1, 1, 1, True, pooled_ws)),
        ("conv2d_maxpool_backward", (empty(5, 2, 3, 3), empty(5), yp, amp, yp, x, w, 1, 1, 1, 1, True, pooled_ws)),
        ("maxpool2d_forward", (p, am, x, 3, 3, 3, 3, 0, 0)),
        ("maxpool2d_backward", (x, p, am, x, 3, 3, 3, 3, 0, 0, True)),
        ("avgpool2d_forward", (p, x, 3, 3, 3, 3, 0, 0)),
        ("avgpool2d_backward", (x, p, x, 3, 3, 3, 3, 0, 0, True)),
        ("relu_forward", (y, y)),
        ("relu_backward", (y, y, y)),
        ("dense_forward", (d_out, d_in, empty(3, 7), empty(3), True, dense_ws)),
        ("dense_backward", (d_in, empty(3, 7), empty(3), d_out, d_in, empty(3, 7), True, dense_ws)),
        ("softmax_xent_step", (empty(2, dtype=np.float64), d_out, d_out, d_out, labels, True, 0.1, loss_ws)),
        ("gather_batch", (x, labels, x, labels, labels)),
        ("sgd_update", (flat, flat, flat, 0.1, 0.9, 0.0)),
        ("adam_update", (flat, flat, flat, flat, 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001)),
        ("adamw_update", (flat, flat, flat, flat, 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001, 0.01)),
        ("fill", (flat, 0.0)),
        ("batchnorm2d_forward", (y, b, b, b, b, y, b, b, 1e-5, 0.1, True, True)),
        ("batchnorm2d_backward", (y, b, b, y, y, b, b, b, True)),
        ("dropout_forward", (y, y, 7, 3, 0.5)),
        ("dropout_backward", (y, y, 7, 3, 0.5)),
        ("global_avgpool2d_forward", (empty(N, 5), y)),
        ("global_avgpool2d_backward", (y, empty(N, 5), y, True)),
        ("shift_flip", (x, x, 1, 2, 2, True, 0.0)),
        ("activation_forward", (y, y, 4, 0.0)),
        ("activation_backward", (y, y, y, y, 4, 0.0)),
        ("residual_add_forward", (y, y, y, True)),
        ("residual_add_backward", (y, y, y, y, True)),
        ("clip_grad_norm", (y, empty(1, dtype=np.float64), 1.0, clip_ws)),
    ]


def test_every_core_launch_fits_the_grid_limits_at_a_million_images(launches):
    entries = [(op, algorithm) for op, device, algorithm in REGISTRY.entries if device == "cuda"]
    for algorithm in ("gemm", "tiled"):  # the convolution's and dense layer's two algorithms
        calls = dict(huge_batch_calls(algorithm))
        assert set(calls) == {op for op, _ in entries}
        for op, args in calls.items():
            if (op, algorithm) in entries or algorithm == "gemm" and len(REGISTRY.algorithms(op, "cuda")) == 1:
                REGISTRY.get(op, "cuda", None if (op, algorithm) not in entries else algorithm).run(*args)
    assert len(launches) >= len(entries)
    for name, grid, block, _ in launches:
        assert grid[0] < 2**31 and grid[1] <= 65535 and grid[2] <= 65535, (name, grid)
        assert block[0] * block[1] * block[2] <= 1024, (name, block)
    # the batch-sized dimension really was capped, not small by luck
    assert max(g[2] for _, g, _, _ in launches) == 65535
    assert any(name == "_conv2d_forward_kernel" for name, *_ in launches)  # the "tiled" kernels ran too
    assert any(name == "_conv2d_forward_gemm_kernel" for name, *_ in launches)


def test_every_launch_goes_to_the_callers_stream(launches):
    """Inside ``on_stream(s)`` every core launches on s (PyTorch's or CuPy's stream in real use);
    outside, on the default stream."""
    from nbcnn import on_stream

    s = cuda.stream()
    with on_stream(s):
        for op, args in huge_batch_calls():
            REGISTRY.get(op, "cuda").run(*args)
    inside = len(launches)
    op, args = huge_batch_calls()[0]
    REGISTRY.get(op, "cuda").run(*args)
    assert inside >= len(huge_batch_calls())
    assert [stream is s for *_, stream in launches[:inside]] == [True] * inside
    assert [stream for *_, stream in launches[inside:]] == [0] * (len(launches) - inside)


def test_the_public_launchers_fit_too(launches):
    from nbcnn.kernels.conv2d import conv2d_backward_input_cuda, conv2d_forward_cuda
    from nbcnn.kernels.pool2d import avgpool2d_backward_cuda, maxpool2d_forward_cuda

    x, w, y = empty(N, 2, 3, 3), empty(5, 2, 3, 3), empty(N, 5, 3, 3)
    conv2d_forward_cuda(y, x, w, empty(5), 1, 1, 1, 1)
    conv2d_backward_input_cuda(x, y, w, 1, 1, 1, 1)
    maxpool2d_forward_cuda(empty(N, 2, 1, 1), empty(N, 2, 1, 1, dtype=np.int32), x, 3, 3)
    avgpool2d_backward_cuda(x, empty(N, 2, 1, 1), 3, 3)
    for name, grid, block, _ in launches:
        assert grid[0] < 2**31 and grid[1] <= 65535 and grid[2] <= 65535, (name, grid)
    # the convolutions are matrix products over N*H*W columns along x; the pooling strides along z
    assert [g[0] > 65535 for _, g, _, _ in launches[:2]] == [True, True]
    assert [g[2] for _, g, _, _ in launches[2:]] == [65535] * 2


# (the convolution's striding kernels are its "tiled" ones: not the cases in cores.NOT_FOR_TILED)
STRIDED = [c for c in cores.cases(np.random.default_rng(2))
           if (c[1] in ("conv2d_forward", "conv2d_backward") or c[1].startswith(("maxpool2d", "avgpool2d")))
           and "dx=False" not in c[0] and not c[0].startswith(cores.NOT_FOR_TILED)][::2]


@pytest.mark.parametrize("name, op, args, outputs, expected", STRIDED, ids=[c[0] for c in STRIDED])
def test_kernels_stride_over_a_capped_grid(name, op, args, outputs, expected, monkeypatch):
    monkeypatch.setattr(_cuda, "MAX_GRID_Z", 1)  # one block along z: it takes every plane in turn
    want = cores.run(op, args, "cpu")
    # the convolution's kernels that use gridDim.z are the "tiled" ones (the products use x and y)
    got = cores.run(op, args, "cuda", "tiled" if op.startswith("conv2d") else None)
    for i in outputs:
        if want[i] is not None:
            assert_close(got[i], want[i], np.float64)
