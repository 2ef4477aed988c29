"""nbcnn.kernels: the raw CNN kernels, one module per op, CPU (``@njit``) and CUDA (``@cuda.jit``).

Modules: ``conv2d`` (a package: direct and matrix-product CPU kernels, CUDA kernels),
``matmul`` (the CPU's matrix product), ``pool2d``, ``activation``, ``residual`` (a residual
block's join), ``dense``, ``softmax_xent``, ``optim``, ``conv1d``, ``batchnorm``, ``dropout``,
``global_pool``, ``gather``, ``augment``. Index and
output-size arithmetic lives once in ``_index``, argument checks in ``_checks``, what
CUDA launchers share in ``_cuda``. This package imports only NumPy and Numba, never
the rest of nbcnn. Nothing is compiled at import: each kernel compiles on its first
call (CPU kernels are cached on disk).
"""

import os

# Numba's parallel kernels run on an OpenMP thread pool whose threads, by default, spin
# for a while after each parallel loop. Any other pool in the process (NumPy's OpenBLAS in a
# user's code, PyTorch's threads in a notebook comparing the two) then competes with the
# spinning ones: on 2 cores, when the convolutions alternated Numba loops with BLAS calls,
# this made each 3 to 5 times slower (measured). Passive waiting avoids it. It must be set
# before the OpenMP runtime loads; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _openmp_already_loaded():
    """Whether an OpenMP runtime (GNU or Intel) is already in this process, loaded by another library."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line or "libiomp" in line for line in maps)
    except OSError:  # no /proc (macOS, Windows): nothing to go on
        return False


# Whether another library (PyTorch, for one) had started an OpenMP runtime before nbcnn was
# imported: its threads then wait actively whatever OMP_WAIT_POLICY says now, and Numba's OpenMP
# layer shares them. Numba's own "workqueue" pool is the slower of the two there (2026-11-25,
# PyTorch imported first: 18.3 ms against 23.9 for the default model's step at batch 128, 3.4
# against 6.5 for LeNet-5 at 64), so Numba keeps its default. The flag is for the benchmarks,
# which report the case.
OPENMP_LOADED_FIRST = _openmp_already_loaded()
