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
