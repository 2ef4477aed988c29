"""What every CUDA launcher needs: is there a GPU, GPU views of the caller's arrays, launch sizes.

Launchers accept Numba device arrays and any object with ``__cuda_array_interface__``
(CuPy arrays, PyTorch CUDA tensors), viewed in place with ``cuda.as_cuda_array``: no
copy is made, ever. Host (NumPy) arrays are refused with a message saying how to move
them, rather than copied silently to the GPU and back.

With ``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported, the same kernels run in
Numba's CUDA simulator (Python, on the CPU, slow): that is how they are tested
without a GPU.
"""

import threading
from contextlib import contextmanager

import numba
import numpy as np
from numba import cuda, uint32

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _DeviceArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DeviceArray


class CudaUnavailableError(RuntimeError):
    """A CUDA kernel was asked for on a machine where CUDA cannot run."""


def cuda_unavailable_reason():
    """None when CUDA kernels can run here (a GPU, or the simulator), else one line saying why not."""
    if SIMULATOR:
        return None
    try:
        if cuda.is_available():
            from numba.cuda.cudadrv import nvvm

            if not nvvm.is_available():
                return ("a GPU is present but NVVM, the CUDA compiler, is not installed: "
                        "pip install 'nbcnn[cuda13]' (or 'nbcnn[cuda12]', to match the driver)")
            return numpy_incompatibility() or probe_failure()

    except Exception as exc:  # the driver bindings raise many kinds of errors
        return f"the CUDA driver failed to start ({type(exc).__name__}: {exc})".replace("\n", " ")
    from numba.cuda.cudadrv.driver import driver

    detail = " ".join(str(getattr(driver, "initialization_error", "") or "").split())
    return detail or "no CUDA-capable GPU was found"


def numpy_incompatibility():
    """None, or why this NumPy cannot compile CUDA kernels: numba-cuda 0.30.4 and older refer to
    ``np.row_stack``, which NumPy 2.5 removed, so every kernel's compilation fails on it."""
    if hasattr(np, "row_stack"):
        return None
    from importlib.metadata import version

    try:
        numba_cuda = tuple(int(part) for part in version("numba-cuda").split(".")[:3])
    except Exception:  # not installed from a distribution, or an unusual version string
        return None
    if numba_cuda > (0, 30, 4):
        return None
    return (f"NumPy {np.__version__} removed np.row_stack, which numba-cuda {version('numba-cuda')} needs to "
            f"compile kernels: pip install 'numpy<2.5' (the nbcnn[cuda12], [cuda13] and [dev] extras pin it)")


@cuda.jit(cache=True)
def _probe_kernel(out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = 3 * i


_PROBED = []  # the probe's answer, once per process


def probe_failure():
    """None when a tiny kernel compiles, launches and gives the right answer on this GPU; else one
    line saying what failed. A GPU and a compiler can both be present and still not work together
    (a toolkit newer than the driver, a GPU the toolkit no longer supports): this is how
    ``--device auto`` finds out before choosing CUDA. Run once per process."""
    if not _PROBED:
        try:
            out = cuda.device_array(64, np.int32)
            _probe_kernel[1, 64](out)
            ok = (out.copy_to_host() == 3 * np.arange(64)).all()
            _PROBED.append(None if ok else "a test kernel ran but returned wrong values")
        except Exception as exc:  # the driver, the linker and the compiler raise many kinds of errors
            detail = " ".join(str(exc).split())[:200]
            _PROBED.append(f"a test kernel failed to compile or run ({type(exc).__name__}: {detail})")
    return _PROBED[0]


def gpu_present():
    """Whether the driver sees a GPU (usable or not)."""
    if SIMULATOR:
        return True
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def require_cuda(fn):
    """Raise ``CudaUnavailableError`` naming ``fn`` when CUDA cannot run here."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise CudaUnavailableError(
            f"{fn}: CUDA is not usable here: {reason}. Use the matching *_cpu kernel, or set "
            f"NUMBA_ENABLE_CUDASIM=1 before importing numba to run it in the simulator."
        )


def gpu_arrays(fn, **arrays):
    """GPU views of the named arrays, in order; None stays None. Raises for host arrays."""
    require_cuda(fn)
    views = []
    for name, a in arrays.items():
        if a is None or isinstance(a, _DeviceArray):
            views.append(a)
        elif not SIMULATOR and hasattr(type(a), "__cuda_array_interface__"):
            views.append(foreign_view(fn, name, a))
        elif isinstance(a, np.ndarray):
            raise TypeError(
                f"{fn}: {name} is a NumPy array in host memory; CUDA kernels take GPU arrays "
                f"(copy it with nbcnn.to_device(a, 'cuda') or numba.cuda.to_device(a))"
            )
        else:
            raise TypeError(f"{fn}: {name} must be a GPU array, got {type(a).__name__}")
    return views


# ---------------------------------------------------------------------------------- streams
#
# Every launch goes to ``stream()``: the default stream, unless the caller opened ``on_stream``.
# Work another library queued on one of its streams is then ordered with nbcnn's: PyTorch and
# CuPy launch on their current stream, which is often not the default one.

_local = threading.local()


def stream():
    """The stream this thread's launches go to (0, the default stream, outside ``on_stream``)."""
    stack = getattr(_local, "streams", None)
    return stack[-1] if stack else 0


def as_numba_stream(s):
    """A Numba stream for ``s``: a Numba stream as it is, a PyTorch stream (``.cuda_stream``), a CuPy
    stream (``.ptr``) or a raw CUstream handle (int) wrapped with ``cuda.external_stream``."""
    if s is None:
        return 0
    if SIMULATOR:  # the simulator's streams do nothing; the stream is only passed on
        return s
    if isinstance(s, int) and not isinstance(s, bool):
        return cuda.external_stream(s) if s else 0
    if hasattr(s, "handle") and type(s).__module__.startswith("numba"):
        return s
    for attr in ("cuda_stream", "ptr"):
        handle = getattr(s, attr, None)
        if isinstance(handle, int):
            return cuda.external_stream(handle) if handle else 0
    raise TypeError(f"expected a CUDA stream (Numba, PyTorch, CuPy or a handle), got {type(s).__name__}")


@contextmanager
def on_stream(s):
    """Launch nbcnn's CUDA kernels on stream ``s`` inside the block, for this thread::

        with nbcnn.on_stream(torch.cuda.current_stream()):
            y = model.forward(x)      # ordered after what PyTorch queued on that stream

    ``s``: a Numba stream, a PyTorch or CuPy stream, or a raw handle. The kernels are queued,
    not waited for: synchronise the stream before reading results on the host."""
    numba_stream = as_numba_stream(s)
    stack = getattr(_local, "streams", None)
    if stack is None:
        stack = _local.streams = []
    stack.append(numba_stream)
    try:
        yield numba_stream
    finally:
        stack.pop()


def foreign_view(fn, name, a):
    """A Numba view of another library's GPU array (PyTorch, CuPy: ``__cuda_array_interface__``),
    refused in one line where it cannot be used as it is: a tensor that requires grad (autograd
    would not see nbcnn's writes), or one on a GPU other than the one nbcnn runs on."""
    if getattr(a, "requires_grad", False):
        raise TypeError(f"{fn}: {name} is a tensor that requires grad; pass {name}.detach() (nbcnn computes "
                        f"its own gradients, autograd would not see them)")
    device = getattr(a, "device", None)
    index = getattr(device, "index", getattr(device, "id", None))
    if isinstance(index, int) and not isinstance(index, bool):
        current = cuda.get_current_device().id
        if index != current:
            raise ValueError(f"{fn}: {name} is on GPU {index} but nbcnn runs on GPU {current}; move it with "
                             f".to('cuda:{current}') or select GPU {index} first (numba.cuda.select_device)")
    try:
        return cuda.as_cuda_array(a)
    except Exception as exc:
        detail = " ".join(str(exc).split())
        raise TypeError(f"{fn}: {name} cannot be viewed as a GPU array ({type(exc).__name__}: {detail})") from None


def on_gpu(a):
    """CUDA kernels take GPU arrays (Numba device arrays, or objects with __cuda_array_interface__)."""
    return isinstance(a, _DeviceArray)


def flat(a):
    """A 1-D view of a C-contiguous device array."""
    return a.reshape(a.size)


# The largest gridDim.y and gridDim.z a launch may ask for (gridDim.x may reach 2**31 - 1). Kernels
# that put a batch-sized count of blocks along z take min(count, MAX_GRID_Z) and stride over the rest.
MAX_GRID_Z = 65535


def grid_z(count):
    """Blocks along z for ``count`` items of work: all of them up to MAX_GRID_Z, the kernel striding beyond."""
    return max(1, min(count, MAX_GRID_Z))


def blocks(n, threads):
    """Number of blocks of ``threads`` that cover ``n`` items: ceil(n / threads), at least 1."""
    return max(1, (n + threads - 1) // threads)


# Threads per block in block reductions, a power of two. The simulator runs every thread
# as a Python thread, so under it the blocks are smaller: the same code, tested faster.
REDUCE_THREADS = 32 if SIMULATOR else 256


@cuda.jit(device=True, inline="always")
def block_sum(scratch, value):
    """Sum ``value`` over the threads of a 1-D block of ``REDUCE_THREADS``, in a fixed order.

    ``scratch`` is a shared array of REDUCE_THREADS elements. Every thread of the block
    must call this (it contains barriers) and every thread gets the sum. The tree
    always pairs the same threads, so the result does not change from run to run.
    """
    t = cuda.threadIdx.x
    scratch[t] = value
    cuda.syncthreads()  # wait until every thread has stored its value
    step = REDUCE_THREADS // 2
    while step > 0:
        if t < step:
            scratch[t] += scratch[t + step]
        cuda.syncthreads()  # wait until this level of the tree is summed before the next level reads it
        step //= 2
    total = scratch[0]
    cuda.syncthreads()  # wait until every thread has read the sum before scratch can be reused
    return total


# ------------------------------------------------------------------ sums over the whole grid
#
# One block can keep one SM busy; a sum over many items uses many blocks, in one launch:
#
#   1. each block sums its share (block_sum) and writes the total to partials[row, blockIdx.x];
#   2. each block then takes a ticket (an atomic counter per row); the block whose ticket says it
#      is the last of its row to finish adds the row's partials, in index order, and writes the
#      result.
#
# Which block finishes last changes from run to run; the order of the additions does not, so the
# result is the same on every run, as with one block. The counter wraps back to 0 as the last
# block takes its ticket, ready for the next launch: tickets start at zero once, when allocated.

# Blocks of a grid-wide sum, all rows together: a few for each SM of the largest GPUs (132 on an
# H100); beyond that each thread takes more items. Fixed, so the order of a sum depends only on
# the shape, never on the GPU.
REDUCE_BLOCKS = 64 if SIMULATOR else 528


def reduce_parts(items, rows=1):
    """Blocks for each of ``rows`` grid-wide sums of ``items`` values: one per REDUCE_THREADS values,
    at most REDUCE_BLOCKS in all."""
    return max(1, min(blocks(items, REDUCE_THREADS), REDUCE_BLOCKS // rows))


def reduce_scratch(rows, parts, dtype, counters=None):
    """(partials (rows, parts) of ``dtype``, tickets (``counters``, by default ``rows``) uint32
    zeros) for a public launcher's grid-wide sum; a planned step allocates its own once."""
    tickets = cuda.to_device(np.zeros(rows if counters is None else counters, np.uint32), stream=stream())
    return cuda.device_array((rows, parts), dtype), tickets


@cuda.jit(device=True, inline="always")
def finished_last(flag, tickets, row):
    """True in every thread of the block that is the last of row ``row``'s gridDim.x blocks to get
    here, False in the others. Every thread of every block calls it once, after its block wrote its
    partial sums; ``flag`` is a shared int32 array of one element."""
    cuda.threadfence()  # this thread's writes reach global memory before its block is counted done
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        last = uint32(cuda.gridDim.x - 1)
        flag[0] = 1 if cuda.atomic.inc(tickets, row, last) == last else 0  # wraps to 0 at the last
    cuda.syncthreads()
    return flag[0] != 0


@cuda.jit(device=True, inline="always")
def partial_sum(partials, row, part):
    """partials[row, part], as another block wrote it: read with an atomic add of zero, which goes
    to the L2 cache, where the other blocks' writes are, never to a stale line of this SM's L1."""
    return cuda.atomic.add(partials, (row, part), partials.dtype.type(0))


@cuda.jit(device=True, inline="always")
def sum_of_parts(scratch, partials, row):
    """In the last block (see ``finished_last``): the sum of partials[row, :gridDim.x], in index
    order, returned to every thread (each read with ``partial_sum``)."""
    acc = partials.dtype.type(0)
    for part in range(cuda.threadIdx.x, cuda.gridDim.x, REDUCE_THREADS):
        acc += partial_sum(partials, row, part)
    return block_sum(scratch, acc)


@cuda.jit(device=True, inline="always")
def grid_sum(scratch, flag, partials, tickets, row, value):
    """The sum of ``value`` over every thread of a 1-D grid of REDUCE_THREADS-thread blocks, the
    whole recipe above in one call: returns ``(last, total)``, in the block that finished last
    ``(True, the grid's sum)`` in every thread, elsewhere ``(False, this block's sum)``. Every thread
    of every block calls it once; ``scratch`` (REDUCE_THREADS) and ``flag`` (1, int32) are shared
    arrays, ``partials[row]`` and ``tickets[row]`` this sum's."""
    total = block_sum(scratch, value)
    if cuda.threadIdx.x == 0:
        partials[row, cuda.blockIdx.x] = total
    if finished_last(flag, tickets, row):
        return True, sum_of_parts(scratch, partials, row)
    return False, total


@cuda.jit(device=True, inline="always")
def grid_sum_pair(scratch, flag, partials, tickets, first, second):
    """``grid_sum`` of two values at once, in rows 0 and 1 of ``partials``, counted by ``tickets[0]``:
    returns ``(last, first's sum, second's sum)``."""
    first = block_sum(scratch, first)
    second = block_sum(scratch, second)  # block_sum's last barrier makes scratch free again
    if cuda.threadIdx.x == 0:
        partials[0, cuda.blockIdx.x] = first
        partials[1, cuda.blockIdx.x] = second
    if finished_last(flag, tickets, 0):
        return True, sum_of_parts(scratch, partials, 0), sum_of_parts(scratch, partials, 1)
    return False, first, second
