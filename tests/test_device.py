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
