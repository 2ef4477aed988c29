"""nbcnn.kernels: the raw CNN kernels, one module per op, CPU (``@njit``) and CUDA (``@cuda.jit``).

Modules: ``conv2d``, ``pool2d``, ``activation``, ``dense``, ``softmax_xent``, ``optim``,
``conv1d``. Index and output-size arithmetic lives once in ``_index``, argument checks
in ``_checks``. This package imports only NumPy and Numba, never the rest of nbcnn.
Nothing is compiled at import: each kernel compiles on its first call (and is cached).
"""
