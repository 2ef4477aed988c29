"""nbcnn: Numba kernels for convolutional neural networks, on the CPU and on NVIDIA GPUs.

The raw kernels are in ``nbcnn.kernels``; ``nbcnn.layers``, ``nbcnn.Sequential``,
``nbcnn.losses`` and ``nbcnn.optim`` build and train networks on either device.
"""

import os
import sys
import time


def _share_cores_between_ranks():
    """Under mpiexec, the ranks on one machine share its cores: unless the user chose, each takes
    its share of threads for Numba and for the BLAS, set here before NumPy starts OpenBLAS.
    Measured on 2 cores, default model, one epoch: 2 ranks with the default threads (2 OpenBLAS
    threads each) took 42 and 136 s; with one thread each, 8 s (one process of 2 threads: 12-16 s)."""
    local = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if not (local or "").isdigit() or int(local) <= 1:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    threads = str(max(1, cores // int(local)))
    for name in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, threads)


_share_cores_between_ranks()


def _blas_threads_sleep_between_calls():
    """OpenBLAS's threads spin for 2**28 cycles (about 0.1 s) after each product before they
    sleep; a convolution's im2col and epilogues run on Numba's threads between products, on the same
    cores, and lose to the spinning. 2**4 cycles (the least OpenBLAS takes): they sleep at once.
    OpenBLAS reads the variable when it loads, with NumPy. When NumPy came first (a script that
    imports it before nbcnn, PyTorch imported first), OpenBLAS is asked to read it again and to
    restart its threads, which take the timeout when they start. A value the user set is kept.
    Returns the value OpenBLAS uses, or None when it could not be set."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return os.environ["OPENBLAS_THREAD_TIMEOUT"]
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    if "numpy" not in sys.modules or _reread_openblas_settings():
        return "4"
    return None


def _reread_openblas_settings():
    """Whether an OpenBLAS already in this process read its environment again and stopped its
    threads (it starts them at its next product). Both functions are exported by OpenBLAS 0.3;
    another BLAS, or an OpenBLAS without them, is left as it is."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps
                     if line.count(" ") >= 5 and "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:  # no /proc: not Linux
        return False
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)  # the copy already loaded
            read_environment, stop_threads = library.openblas_read_env, library.blas_thread_shutdown_
        except (OSError, AttributeError):
            continue
        read_environment()
        stop_threads()
        return True
    return False


# What OpenBLAS's threads do between products (``nbcnn info`` says it): None means they spin.
BLAS_THREAD_TIMEOUT = _blas_threads_sleep_between_calls()

# When nbcnn was first imported: `nbcnn train` reports how long after this its first step ended
# (imports, the data, Numba's compilation or cache loads, the step itself).
STARTED = time.perf_counter()

__version__ = "0.1.0"

from nbcnn import layers, losses, optim  # noqa: E402  (usable as nbcnn.optim.SGD after import nbcnn)
from nbcnn.device import Device, resolve_device, to_device, to_numpy  # noqa: E402
from nbcnn.kernels._cuda import on_stream  # noqa: E402
from nbcnn.model import Sequential  # noqa: E402
from nbcnn.step import Trainer  # noqa: E402

__all__ = ["Device", "Sequential", "Trainer", "layers", "losses", "optim", "on_stream", "resolve_device", "to_device",
           "to_numpy",
           "__version__"]
