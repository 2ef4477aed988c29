"""nbcnn.kernels: the raw CNN kernels, one module per op, CPU (``@njit``) and CUDA (``@cuda.jit``).

Modules: ``conv2d`` (a package: direct and im2col + BLAS CPU kernels, CUDA kernels),
``pool2d``, ``activation``, ``dense``, ``softmax_xent``, ``optim``, ``conv1d``. Index and
output-size arithmetic lives once in ``_index``, argument checks in ``_checks``, what
CUDA launchers share in ``_cuda``. This package imports only NumPy and Numba, never
the rest of nbcnn. Nothing is compiled at import: each kernel compiles on its first
call (CPU kernels are cached on disk).
"""

import os

# Numba's parallel kernels run on an OpenMP thread pool whose threads, by default, spin
# for a while after each parallel loop. The im2col kernels alternate Numba loops with
# BLAS calls whose own threads then compete with the spinning ones: on 2 cores this
# made each convolution 3 to 5 times slower (measured). Passive waiting avoids it. It
# must be set before the OpenMP runtime loads; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _openmp_already_loaded():
    """Whether an OpenMP runtime (GNU or Intel) is already in this process, loaded by another library."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line or "libiomp" in line for line in maps)
    except OSError:  # no /proc (macOS, Windows): nothing to go on
        return False


# When another library (PyTorch, for one) has started an OpenMP runtime before nbcnn is imported,
# the runtime has already read its wait policy, and it is the default, active one: Numba's OpenMP
# threads would then spin after every parallel loop and starve the BLAS threads the convolutions
# call next (measured: a default-model step at batch 128 took 75 ms instead of 30). Numba's own
# "workqueue" pool, whose threads sleep on a condition variable, does not care what was loaded
# first (33 ms with PyTorch imported first). A layer the user chose (NUMBA_THREADING_LAYER) is kept.
OPENMP_LOADED_FIRST = _openmp_already_loaded()
if "NUMBA_THREADING_LAYER" not in os.environ and OPENMP_LOADED_FIRST:
    import numba

    numba.config.THREADING_LAYER = "workqueue"
