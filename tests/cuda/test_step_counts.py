"""What a training step of the default model costs the host on the CUDA path, counted in the simulator:
kernel launches per step, device allocations in the steady state, host synchronisations per step.

The launches are counted and skipped (their results do not matter to the counts, and the
simulator would take minutes per step at batch 64): this measures the framework above the
kernels, exactly what these counts are about.
"""

import numpy as np
import pytest
from numba import cuda

import nbcnn
from nbcnn.kernels._cuda import SIMULATOR
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.models import MODELS
from nbcnn.optim import Adam
from nbcnn.step import Trainer

pytestmark = pytest.mark.skipif(not SIMULATOR, reason="counts launches by wrapping the simulator's kernels")


@pytest.fixture
def counted(monkeypatch):
    from numba.cuda.simulator import kernel as simulated
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    counts = dict(launches=0, host_arguments=0, allocations=0, syncs=0)
    real_call = simulated.FakeCUDAKernel.__call__

    def launch(self, *args):
        if self._device or simulated._kernel_context:  # a device function called from a kernel
            return real_call(self, *args)
        counts["launches"] += 1
        # a NumPy array given to a kernel is a hidden copy to the device and back
        counts["host_arguments"] += sum(isinstance(a, np.ndarray) for a in args)

    monkeypatch.setattr(simulated.FakeCUDAKernel, "__call__", launch)
    for name in ("device_array", "device_array_like", "to_device", "pinned_array", "mapped_array"):
        real = getattr(cuda, name)

        def allocate(*args, _real=real, **kwargs):
            counts["allocations"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cuda, name, allocate)
    real_copy = FakeCUDAArray.copy_to_host

    def copy_to_host(self, *args, **kwargs):
        counts["syncs"] += 1
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(FakeCUDAArray, "copy_to_host", copy_to_host)
    monkeypatch.setattr(cuda, "synchronize", lambda: counts.__setitem__("syncs", counts["syncs"] + 1))
    return counts


def test_default_model_step_counts(counted):
    rng = np.random.default_rng(0)
    steps, batch = 100, 64
    x = nbcnn.to_device(rng.standard_normal((steps * batch, 1, 28, 28)).astype(np.float32), "cuda")
    y = nbcnn.to_device(rng.integers(0, 10, steps * batch).astype(np.int32), "cuda")
    order = nbcnn.to_device(np.arange(steps * batch, dtype=np.int32), "cuda")
    model = MODELS["lenet"]().to("cuda")
    trainer = Trainer(model, SoftmaxCrossEntropy(), Adam(model.parameters()))
    trainer.run_epoch(x, y, order[: 2 * batch], batch)  # plans, allocates
    for key in counted:
        counted[key] = 0
    trainer.run_epoch(x, y, order, batch)
    launches_per_step = (counted["launches"] - 1) / steps  # less the epoch's one reset of the sums
    assert launches_per_step <= 20, counted
    assert counted["allocations"] == 0, counted
    assert counted["syncs"] <= 5, counted  # every 25 steps, and the epoch's end
    assert counted["host_arguments"] == 0, counted
    print(f"per step: {launches_per_step} launches; per {steps} steps: {counted['syncs']} host synchronisations, "
          f"{counted['allocations']} allocations")


def test_the_users_loop_on_cuda_allocates_nothing(counted):
    rng = np.random.default_rng(1)
    x = nbcnn.to_device(rng.standard_normal((64, 1, 28, 28)).astype(np.float32), "cuda")
    y = nbcnn.to_device(rng.integers(0, 10, 64).astype(np.int32), "cuda")
    model = MODELS["lenet"]().to("cuda")
    loss_fn, opt = SoftmaxCrossEntropy(), Adam(model.parameters())

    def step():
        loss_fn.forward(model.forward(x), y)  # returns a float: one synchronisation, as the contract says
        model.backward(loss_fn.backward(), need_dx=False)
        opt.step()

    step()
    for key in counted:
        counted[key] = 0
    for _ in range(10):
        step()
    assert counted["allocations"] == 0 and counted["syncs"] == 10 and counted["host_arguments"] == 0, counted
    # The Trainer's step less its gather: forward 6 (two convolutions and two dense layers, ReLU
    # fused, two poolings), the loss 1, backward 11 (each dense layer 2, each pooling 1, conv2 3:
    # its input gradient, the weight gradient's batch chunks and their sum, conv1 2: no input
    # gradient), Adam 1.
    assert counted["launches"] == 10 * 19, counted
