import numpy as np
import pytest

import nbcnn
from nbcnn.device import DeviceUnavailableError, cuda_available, device_of, resolve_device

no_cuda = pytest.mark.skipif(cuda_available(), reason="a GPU (or the simulator) is usable here")


def test_auto_resolves_to_cpu_without_gpu_and_env_overrides(monkeypatch):
    monkeypatch.delenv("NBCNN_DEVICE", raising=False)
    assert resolve_device("auto") == ("cuda" if cuda_available() else "cpu")
    monkeypatch.setenv("NBCNN_DEVICE", "cpu")
    assert resolve_device("auto") == "cpu"
    assert resolve_device("CPU") == "cpu"
    monkeypatch.setenv("NBCNN_DEVICE", "tpu")
    with pytest.raises(ValueError, match="NBCNN_DEVICE must be 'cpu' or 'cuda', got 'tpu'"):
        resolve_device("auto")


@pytest.mark.parametrize("bad, error", [("gpu", ValueError), ("", ValueError), (0, TypeError)])
def test_unknown_device(bad, error):
    with pytest.raises(error, match="auto.*cpu.*cuda"):
        resolve_device(bad)


@no_cuda
def test_cuda_without_gpu_says_why_and_what_to_do():
    with pytest.raises(DeviceUnavailableError, match=r"CUDA is not usable here: .*; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError):
        nbcnn.to_device(np.zeros(3), "cuda")


def test_transfers_on_the_cpu():
    a = np.arange(6.0).reshape(2, 3)
    assert nbcnn.to_device(a, "cpu") is a
    assert nbcnn.to_numpy(a) is a
    assert device_of(a) == "cpu"
    with pytest.raises(TypeError, match="expected a NumPy or GPU array, got list"):
        device_of([1, 2])


@pytest.fixture
def gpu_that_fails_the_probe(monkeypatch):
    """A machine whose driver sees a GPU and whose compiler is installed, but where the test kernel
    fails (a toolkit newer than the driver, say): what --device auto must not choose."""
    from numba import cuda
    from numba.cuda.cudadrv import nvvm

    from nbcnn import device
    from nbcnn.kernels import _cuda

    monkeypatch.delenv("NBCNN_DEVICE", raising=False)
    monkeypatch.setattr(_cuda, "SIMULATOR", False)
    monkeypatch.setattr(device, "SIMULATOR", False)
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(nvvm, "is_available", lambda: True)
    monkeypatch.setattr(_cuda, "numpy_incompatibility", lambda: None)
    monkeypatch.setattr(_cuda, "_PROBED", ["a test kernel failed to compile or run (CudaAPIError: "
                                           "CUDA_ERROR_UNSUPPORTED_PTX_VERSION)"])
    monkeypatch.setattr(device, "_SAID", set())


def test_auto_falls_back_to_the_cpu_when_the_test_kernel_fails(gpu_that_fails_the_probe, capsys):
    assert resolve_device("auto") == "cpu"
    assert resolve_device("auto") == "cpu"
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line, once
    assert "a GPU is present but CUDA is not usable" in err and "UNSUPPORTED_PTX_VERSION" in err
    assert "running on the CPU" in err
    with pytest.raises(DeviceUnavailableError, match="UNSUPPORTED_PTX_VERSION.*use --device cpu"):
        resolve_device("cuda")


def test_the_probe_reports_a_failing_launch(monkeypatch):
    """The probe itself: any exception from compiling or launching becomes one line, remembered."""
    from numba import cuda

    from nbcnn.kernels import _cuda

    def broken(*args, **kwargs):
        raise RuntimeError("driver too old\nfor this toolkit")

    monkeypatch.setattr(_cuda, "_PROBED", [])
    monkeypatch.setattr(cuda, "device_array", broken)
    reason = _cuda.probe_failure()
    assert reason == "a test kernel failed to compile or run (RuntimeError: driver too old for this toolkit)"
    monkeypatch.setattr(cuda, "device_array", lambda *a: pytest.fail("probed twice"))
    assert _cuda.probe_failure() == reason
