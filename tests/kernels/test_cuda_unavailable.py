"""Without a GPU (and without the simulator) every CUDA launcher fails with one clear line."""

import inspect

import numpy as np
import pytest

from nbcnn.kernels import (activation, augment, batchnorm, conv1d, conv2d, dense, dropout, gather, global_pool, optim,
                           pool2d, residual, softmax_xent)

MODULES = (conv2d, pool2d, activation, residual, dense, softmax_xent, optim, conv1d, gather, batchnorm, dropout,
           global_pool, augment)
from nbcnn.kernels._cuda import CudaUnavailableError, cuda_unavailable_reason

LAUNCHERS = [
    obj
    for m in MODULES
    for name, obj in vars(m).items()
    if name.endswith("_cuda") and inspect.isfunction(obj) and obj.__module__.startswith(m.__name__)
    and "_core_" not in name and "_workspace_" not in name  # the unchecked cores a planned step calls
]


def test_every_op_has_a_cuda_launcher():
    names = {f.__name__ for f in LAUNCHERS}
    assert len(names) == 37
    for m in MODULES:
        cpu = {
            name[: -len("_cpu")]
            for name, obj in vars(m).items()
            if name.endswith("_cpu") and inspect.isfunction(obj) and obj.__module__.startswith(m.__name__)
            and "_gemm_" not in name and "_blas_" not in name  # second CPU routes to the same ops
            and "_core_" not in name and "_workspace_" not in name
        }
        assert {c + "_cuda" for c in cpu} <= names, f"{m.__name__} has a CPU kernel without a CUDA twin"


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="CUDA is usable here (a GPU or the simulator)")
@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda f: f.__name__)
def test_launch_without_gpu_raises_clear_error(launcher):
    required = [p for p in inspect.signature(launcher).parameters.values() if p.default is inspect.Parameter.empty]
    with pytest.raises(CudaUnavailableError) as info:
        launcher(*[np.zeros(1, np.float32)] * len(required))
    message = str(info.value)
    assert message.startswith(f"{launcher.__name__}: CUDA is not usable here: ")
    assert "_cpu kernel" in message and "\n" not in message


def test_a_numpy_without_row_stack_is_named_as_the_reason(monkeypatch):
    from nbcnn.kernels import _cuda

    monkeypatch.delattr(np, "row_stack", raising=False)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.30.4")
    assert "pip install 'numpy<2.5'" in _cuda.numpy_incompatibility()
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.31.0")  # a release that may have fixed it
    assert _cuda.numpy_incompatibility() is None
