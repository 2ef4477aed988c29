"""Every CUDA kernel with the argument types its launcher passes, and how it is launched.

What compiles a kernel without a GPU needs: ``cuda.compile_ptx`` takes a kernel's Python
function and the Numba types of its arguments. The tests compile every entry for sm_90
(``tests/kernels/test_ptx.py``) and ``nbcnn profile --static`` (``nbcnn/perf/static.py``) links
each one with nvJitLink to report registers, spills, shared memory, occupancy and the
instructions of its inner loop.

``threads`` and ``shared`` are the block size and dynamic shared memory of the launch the
static report assumes: what the launcher uses, for the default model's shapes where it
depends on them (a 5x5 filter at stride 1; 16 input channels).
"""

import numpy as np
from numba import types
from numba.np.numpy_support import from_dtype

from . import (activation, augment, batchnorm, conv1d, dense, dropout, gather, global_pool, optim, pool2d, residual,
               softmax_xent)
from ._cuda import REDUCE_THREADS
from .conv2d import cuda as conv2d

MODULES = [conv2d, pool2d, activation, residual, dense, softmax_xent, optim, conv1d, gather, batchnorm, dropout,
           global_pool, augment]
I, F, B = types.int64, types.float64, types.boolean  # what Python ints, floats and bools are typed as

# Kernels that sum in float64 on purpose (the loss and the count of correct answers: see softmax_xent.py).
FLOAT64_BY_DESIGN = {"_softmax_xent_forward_kernel", "_softmax_xent_backward_kernel", "_count_correct_kernel",
                     "_softmax_xent_step_kernel", "_grad_norm_kernel"}


class Launch:
    """One kernel as one launcher calls it: the argument types, threads per block, dynamic shared bytes."""

    def __init__(self, kernel, sig, threads=256, shared=0):
        self.kernel, self.sig, self.threads, self.shared = kernel, tuple(sig), threads, shared

    @property
    def name(self):
        return self.kernel.py_func.__name__


def launches(dtype):
    """A ``Launch`` for every kernel, as its launcher calls it with ``dtype`` arrays."""
    def A(ndim, dt=dtype):  # a C-contiguous array, as every launcher requires
        return types.Array(from_dtype(np.dtype(dt)), ndim, "C")

    S = from_dtype(np.dtype(dtype))  # a scalar the launcher converts to the arrays' dtype
    item = np.dtype(dtype).itemsize
    pool = pool2d.POOL_W * pool2d.POOL_H
    gemm = conv2d.GEMM_THREADS
    out = [
        Launch(conv2d._conv2d_forward_kernel, (A(4), A(4), A(4), A(1), I, I, I, I, B), conv2d.TILE_W * conv2d.TILE_H,
               conv2d.forward_shared_bytes(5, 5, 1, 1, item)),
        Launch(conv2d._conv2d_backward_input_kernel, (A(4), A(4), A(4), A(4), I, I, I, I, B),
               conv2d.GATHER_W * conv2d.GATHER_H),
        Launch(conv2d._conv2d_backward_weight_partial_kernel, (A(5), A(2), A(4), A(4), I, I, I, I), REDUCE_THREADS),
        Launch(conv2d._conv2d_backward_weight_reduce_kernel, (A(4), A(1), A(5), A(2))),
        Launch(conv2d._conv2d_backward_bias_kernel, (A(1), A(4), A(2), A(1, np.uint32)), REDUCE_THREADS),
        Launch(conv2d._conv2d_forward_gemm_kernel, (A(4), A(1), A(4), A(1), A(4), A(1), A(1), I, I, I, I, B), gemm,
               conv2d.gemm_table_bytes(16 * 5 * 5)),
        Launch(conv2d._conv2d_backward_input_gemm_kernel, (A(4), A(1), A(4), A(1), A(4), A(1), A(4), A(1), I, I, B),
               gemm, conv2d.gemm_table_bytes(32 * 5 * 5, 3)),
        Launch(conv2d._conv2d_backward_weight_gemm_kernel, (A(5), A(1), A(2), A(4), A(1), A(4), A(1), I, I, I, I),
               gemm),
        Launch(pool2d._avgpool2d_forward_kernel, (A(4), A(4)) + (I,) * 6, pool),
        Launch(pool2d._avgpool2d_backward_kernel, (A(4), A(4), A(4)) + (I,) * 6 + (B,), pool),
        Launch(activation._relu_forward_kernel, (A(1), A(1))),
        Launch(activation._relu_backward_kernel, (A(1), A(1), A(1))),
        Launch(activation._activation_forward_kernel, (A(1), A(1), I, F)),
        Launch(activation._activation_backward_kernel, (A(1),) * 4 + (I, F)),
        Launch(residual._residual_add_forward_kernel, (A(1),) * 3 + (B,)),
        Launch(residual._residual_add_backward_kernel, (A(1),) * 4 + (B,)),
        Launch(dense._matmul_kernel, (A(2), A(2), A(2), A(1), A(2), A(1)) + (B,) * 6, dense.TILE * dense.TILE),
        Launch(dense._gemm_nt_kernel, (A(2), A(1), A(1), I, A(1), A(2), A(1)) + (B,) * 4, dense.GEMM_THREADS),
        Launch(dense._gemm_nn_kernel, (A(2), A(1), A(1), I, A(1), A(2), A(1)) + (B,) * 4, dense.GEMM_THREADS),
        Launch(dense._gemm_tn_kernel, (A(2), A(1), A(1), I, A(1), A(2), A(1)) + (B,) * 4, dense.GEMM_THREADS),
        Launch(dense._dense_backward_bias_kernel, (A(1), A(2), A(2), A(1, np.uint32)), REDUCE_THREADS),
        Launch(optim._sgd_update_kernel, (A(1), A(1), A(1), F, F, F)),
        Launch(optim._adam_update_kernel, (A(1),) * 4 + (F,) * 8),
        Launch(optim._fill_kernel, (A(1), F)),
        Launch(optim._grad_norm_kernel, (A(1, np.float64), A(1, np.float64), A(1), F, A(2, np.float64),
                                         A(1, np.uint32)), REDUCE_THREADS),
        Launch(optim._scale_by_kernel, (A(1), A(1, np.float64))),
        Launch(conv1d._conv1d_forward_kernel, (A(1), A(1), A(1)), conv1d.THREADS),
        Launch(conv1d._conv1d_backward_kernel, (A(1),) * 5, conv1d.THREADS),
        Launch(conv1d._toeplitz_matrix_kernel, (A(2), A(1)), conv1d.THREADS),
        Launch(batchnorm._batchnorm2d_stats_kernel, (A(1),) * 4 + (A(4), S, S, B), REDUCE_THREADS),
        Launch(batchnorm._batchnorm2d_normalize_kernel, (A(1),) * 6 + (I, I, B)),
        Launch(batchnorm._batchnorm2d_backward_reduce_kernel, (A(1), A(1), A(4), A(4), A(1), A(1)), REDUCE_THREADS),
        Launch(batchnorm._batchnorm2d_backward_input_kernel, (A(1),) * 8 + (I, I, B)),
        Launch(dropout._dropout_kernel, (A(1), A(1), I, I, I, S)),
        Launch(global_pool._global_avgpool_forward_kernel, (A(1), A(1), I)),
        Launch(global_pool._global_avgpool_backward_kernel, (A(1), A(1), A(1), I, B)),
        Launch(augment._shift_flip_kernel, (A(1), A(1)) + (I,) * 7 + (B, S)),
    ]
    sums = (A(2, np.float64), A(1, np.uint32))  # a grid-wide sum's partials and tickets
    for it in (np.int32, np.int64):  # argmax and labels come as either
        out += [
            Launch(pool2d._maxpool2d_forward_kernel, (A(4), A(4, it), A(4)) + (I,) * 6, pool),
            Launch(pool2d._maxpool2d_backward_kernel, (A(4), A(4), A(4, it), A(4)) + (I,) * 6 + (B,), pool),
            Launch(softmax_xent._softmax_xent_forward_kernel, (A(1), A(2), A(2), A(1, it)) + sums, REDUCE_THREADS),
            Launch(softmax_xent._softmax_xent_backward_kernel, (A(2), A(2), A(1, it))),
            Launch(softmax_xent._count_correct_kernel, (A(1, np.int64), A(2), A(1, it)) + sums, REDUCE_THREADS),
            Launch(softmax_xent._softmax_xent_step_kernel, (A(1, np.float64), A(2), A(2), A(2), A(1, it), B, F) + sums,
                   REDUCE_THREADS),
            Launch(gather._gather_batch_kernel, (A(2), A(1, it), A(2), A(1, it), A(1, it), B)),  # public gather_rows
            Launch(gather._gather_batch_kernel, (A(2, np.int32), A(1, it), A(2, np.int32), A(1, it), A(1, it), B)),
        ]
    return out


def launch_types(dtype):
    """(kernel, argument types) for every kernel, as its launcher calls it with ``dtype`` arrays."""
    return [(launch.kernel, launch.sig) for launch in launches(dtype)]
