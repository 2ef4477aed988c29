"""Where arrays live and computations run: "cpu" (NumPy arrays) or "cuda" (GPU arrays).

A device is resolved once: ``resolve_device("auto")`` picks CUDA when a usable GPU is
present, else the CPU; the environment variable ``NBCNN_DEVICE`` ("cpu" or "cuda")
overrides "auto". Asking for CUDA where it cannot run raises ``DeviceUnavailableError``
with the reason and what to do instead.
"""

import os

import numpy as np

# The one probe of CUDA's availability lives beside the kernels that need it.
from nbcnn.kernels._cuda import SIMULATOR, CudaUnavailableError, cuda_unavailable_reason

DEVICES = ("cpu", "cuda")


class DeviceUnavailableError(CudaUnavailableError):
    """The requested device cannot be used on this machine."""


def cuda_available():
    """True when CUDA kernels can run here: a usable GPU, or the CUDA simulator."""
    return cuda_unavailable_reason() is None


def resolve_device(device="auto"):
    """"auto" | "cpu" | "cuda" -> "cpu" or "cuda"; ``NBCNN_DEVICE`` overrides "auto"."""
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        override = os.environ.get("NBCNN_DEVICE", "").strip().lower()
        if override:
            if override not in DEVICES:
                raise ValueError(f"NBCNN_DEVICE must be 'cpu' or 'cuda', got {override!r}")
            name = override
        else:
            return "cuda" if cuda_available() else "cpu"
    if name not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu' or 'cuda'")
    if name == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise DeviceUnavailableError(f"CUDA is not usable here: {reason}; use --device cpu (or device='cpu')")
    return name


def device_of(array):
    """"cpu" for a NumPy array, "cuda" for a GPU array (anything with ``__cuda_array_interface__``)."""
    if isinstance(array, np.ndarray):
        return "cpu"
    if hasattr(array, "__cuda_array_interface__") or (SIMULATOR and hasattr(array, "copy_to_host")):
        return "cuda"
    raise TypeError(f"expected a NumPy or GPU array, got {type(array).__name__}")


def to_device(array, device):
    """A copy of ``array`` on ``device`` ("cpu", "cuda" or "auto"); the array itself when already there."""
    device = resolve_device(device)
    if device == "cpu":
        return to_numpy(array)
    from numba import cuda

    if not isinstance(array, np.ndarray):
        if device_of(array) == "cuda":
            return array if SIMULATOR or hasattr(array, "copy_to_host") else cuda.as_cuda_array(array)
    return cuda.to_device(np.ascontiguousarray(array))


def to_numpy(array):
    """A NumPy array with the contents of ``array`` (copied from the GPU when it lives there)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    if hasattr(array, "__cuda_array_interface__"):
        from numba import cuda

        return cuda.as_cuda_array(array).copy_to_host()
    return np.asarray(array)
