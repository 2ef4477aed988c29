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


class _ForeignTensor:
    """Stands in for a PyTorch CUDA tensor: the interface, ``requires_grad`` and ``device.index``."""

    def __init__(self, requires_grad=False, index=0):
        from types import SimpleNamespace

        self.requires_grad = requires_grad
        self.device = SimpleNamespace(index=index)

    @property
    def __cuda_array_interface__(self):
        if self.requires_grad:  # what PyTorch does
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.")
        raise AttributeError("no GPU here")


def test_a_tensor_that_requires_grad_is_one_clear_type_error():
    from nbcnn.kernels._cuda import foreign_view

    with pytest.raises(TypeError, match=r"x is a tensor that requires grad; pass x.detach\(\)"):
        foreign_view("conv2d_forward_cuda", "x", _ForeignTensor(requires_grad=True))
    with pytest.raises(TypeError, match="requires grad"):
        device_of(_ForeignTensor(requires_grad=True))


def test_a_tensor_on_another_gpu_is_one_clear_value_error(monkeypatch):
    from types import SimpleNamespace

    from numba import cuda

    from nbcnn.kernels._cuda import foreign_view

    monkeypatch.setattr(cuda, "get_current_device", lambda: SimpleNamespace(id=0))
    with pytest.raises(ValueError, match=r"w is on GPU 1 but nbcnn runs on GPU 0; move it with .to\('cuda:0'\)"):
        foreign_view("dense_forward_cuda", "w", _ForeignTensor(index=1))


def test_streams_are_per_thread_and_nest(monkeypatch):
    import threading

    from numba import cuda

    from nbcnn import on_stream
    from nbcnn.kernels import _cuda

    monkeypatch.setattr(_cuda, "SIMULATOR", False)
    monkeypatch.setattr(cuda, "external_stream", lambda handle: ("external", handle))

    class TorchStream:  # PyTorch's stream: .cuda_stream is the CUstream handle
        cuda_stream = 1234

    class CupyStream:  # CuPy's: .ptr
        ptr = 99

    assert _cuda.stream() == 0
    seen = []
    with on_stream(TorchStream()) as outer:
        assert outer == ("external", 1234) and _cuda.stream() == outer
        with on_stream(CupyStream()):
            assert _cuda.stream() == ("external", 99)
            worker = threading.Thread(target=lambda: seen.append(_cuda.stream()))
            worker.start()
            worker.join()
        assert _cuda.stream() == outer
        with on_stream(0):  # a null handle is the default stream
            assert _cuda.stream() == 0
    assert _cuda.stream() == 0 and seen == [0]  # another thread keeps the default stream
    with pytest.raises(TypeError, match="expected a CUDA stream .* got str"):
        with on_stream("fast"):
            pass
