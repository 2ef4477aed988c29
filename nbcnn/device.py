"""Where arrays live and computations run: the CPU (NumPy arrays) or a GPU (Numba device arrays).

A device is resolved once into a ``Device``: ``resolve_device("auto")`` picks CUDA when a
usable GPU is present (one that compiles, launches and returns a test kernel), else the CPU,
saying why in one line where a GPU is present but cannot be used; the environment variable ``NBCNN_DEVICE`` ("cpu" or
"cuda") overrides "auto". Asking for CUDA where it cannot run raises
``DeviceUnavailableError`` with the reason and what to do instead. A model carries its
``Device``; everything it allocates, it allocates through it (``empty``, ``zeros``), so the
one place that creates arrays is here, and a test can count what a training step allocates.

A ``Device`` is a ``str`` ("cpu" or "cuda") with a GPU ``index`` (None on the CPU), so
``model.device == "cuda"`` reads naturally and it prints and serialises as its name.
"""

import os
import sys

import numpy as np

# The one probe of CUDA's availability lives beside the kernels that need it.
from nbcnn.kernels._cuda import SIMULATOR, CudaUnavailableError, cuda_unavailable_reason, gpu_present

DEVICES = ("cpu", "cuda")


class DeviceUnavailableError(CudaUnavailableError):
    """The requested device cannot be used on this machine."""


class Device(str):
    """"cpu" or "cuda", with the GPU's ``index`` on CUDA; allocates and moves arrays.

    ``allocations`` counts the arrays this process has allocated through any Device: a
    planned training step allocates nothing, and the tests hold it to that.
    """

    allocations = 0

    def __new__(cls, kind, index=None):
        self = super().__new__(cls, kind)
        self.kind = kind
        self.index = index if kind == "cuda" else None
        return self

    def __repr__(self):
        return f"Device({self.kind!r})" if self.index is None else f"Device({self.kind!r}, {self.index})"

    def __reduce__(self):
        return (Device, (self.kind, self.index))

    # -------------------------------------------------------------------------- arrays

    def empty(self, shape, dtype):
        """An uninitialised array of ``shape`` on this device."""
        Device.allocations += 1
        if self.kind == "cpu":
            return np.empty(shape, dtype)
        from numba import cuda

        return cuda.device_array(shape, dtype)

    def zeros(self, shape, dtype):
        """An array of zeros on this device."""
        if self.kind == "cpu":
            a = self.empty(shape, dtype)
            a.fill(0)
            return a
        from numba import cuda

        Device.allocations += 1
        return cuda.to_device(np.zeros(shape, dtype))  # once, when a plan is made: the copy does not matter

    def put(self, array):
        """``array`` on this device: the array itself when already there, else a copy."""
        return to_device(array, self)

    def owns(self, array):
        """Whether ``array`` lives on this device's kind of memory."""
        return device_of(array) == self.kind


CPU = Device("cpu")


def cuda_available():
    """True when CUDA kernels can run here: a usable GPU, or the CUDA simulator."""
    return cuda_unavailable_reason() is None


def resolve_device(device="auto"):
    """"auto" | "cpu" | "cuda" (or a ``Device``) -> a ``Device``; ``NBCNN_DEVICE`` overrides "auto"."""
    if isinstance(device, Device):
        return device
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
            name = "cuda" if cuda_available() else _fall_back_to_cpu()
    if name not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu' or 'cuda'")
    if name == "cpu":
        return CPU
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise DeviceUnavailableError(f"CUDA is not usable here: {reason}; use --device cpu (or device='cpu')")
    return Device("cuda", _current_gpu())


_SAID = set()


def _fall_back_to_cpu():
    """"cpu", saying why in one line on stderr (once a process) where a GPU is present but unusable."""
    if gpu_present():
        line = f"nbcnn: a GPU is present but CUDA is not usable ({cuda_unavailable_reason()}); running on the CPU"
        if line not in _SAID:
            _SAID.add(line)
            print(line, file=sys.stderr)
    return "cpu"


def _current_gpu():
    if SIMULATOR:
        return 0
    from numba import cuda

    return cuda.get_current_device().id


def device_of(array):
    """"cpu" for a NumPy array, "cuda" for a GPU array (anything with ``__cuda_array_interface__``)."""
    if isinstance(array, np.ndarray):
        return "cpu"
    if getattr(array, "requires_grad", False):  # PyTorch refuses its interface then: say why here
        raise TypeError("a tensor that requires grad: pass x.detach() (nbcnn computes its own gradients)")
    if hasattr(array, "__cuda_array_interface__") or (SIMULATOR and hasattr(array, "copy_to_host")):
        return "cuda"
    raise TypeError(f"expected a NumPy or GPU array, got {type(array).__name__}")


def to_device(array, device):
    """A copy of ``array`` on ``device`` ("cpu", "cuda", "auto" or a ``Device``); the array itself when already there."""
    device = resolve_device(device)
    if device.kind == "cpu":
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


def copy_into(dst, src):
    """Copy ``src`` into the existing array ``dst`` (host or GPU, either way), without allocating."""
    if isinstance(dst, np.ndarray):
        if isinstance(src, np.ndarray):
            np.copyto(dst, src)
        else:
            to_gpu_view(src).copy_to_host(dst)
    else:
        dst.copy_to_device(src if isinstance(src, np.ndarray) else to_gpu_view(src))


def to_gpu_view(array):
    """A Numba view of a GPU array (a Numba device array as it is, a foreign one through its interface)."""
    if SIMULATOR or hasattr(array, "copy_to_host"):
        return array
    from numba import cuda

    return cuda.as_cuda_array(array)
