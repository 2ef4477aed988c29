"""Every CUDA kernel compiles to PTX for a real GPU (sm_90), with the types its launcher passes.

The simulator runs kernels as Python, so it accepts code that the CUDA compiler would
reject (an unsupported call, a type that does not unify). Compiling here, with NVRTC
and no GPU, catches that in the ordinary test run.
"""

import re

import numpy as np
import pytest
from numba import cuda, types
from numba.np.numpy_support import from_dtype

from nbcnn.kernels import activation, augment, batchnorm, conv1d, dense, dropout, gather, global_pool, optim, pool2d, softmax_xent
from nbcnn.kernels._cuda import SIMULATOR
from nbcnn.kernels.conv2d import cuda as conv2d

pytestmark = pytest.mark.skipif(SIMULATOR, reason="compiling PTX needs the real CUDA target, not the simulator")

MODULES = [conv2d, pool2d, activation, dense, softmax_xent, optim, conv1d, gather, batchnorm, dropout, global_pool, augment]
I, F, B = types.int64, types.float64, types.boolean  # what Python ints, floats and bools are typed as


def launch_types(dtype):
    """(kernel, argument types) for every kernel, as its launcher calls it with ``dtype`` arrays."""
    def A(ndim, dt=dtype):  # a C-contiguous array, as every launcher requires
        return types.Array(from_dtype(np.dtype(dt)), ndim, "C")

    S = from_dtype(np.dtype(dtype))  # a scalar the launcher converts to the arrays' dtype

    pairs = [
        (conv2d._conv2d_forward_kernel, (A(4), A(4), A(4), A(1), I, I, I, I, B)),
        (conv2d._conv2d_backward_input_kernel, (A(4), A(4), A(4), A(4), I, I, I, I, B)),
        (conv2d._conv2d_backward_weight_partial_kernel, (A(5), A(2), A(4), A(4), I, I, I, I)),
        (conv2d._conv2d_backward_weight_reduce_kernel, (A(4), A(1), A(5), A(2))),
        (conv2d._conv2d_backward_bias_kernel, (A(1), A(4))),
        (pool2d._avgpool2d_forward_kernel, (A(4), A(4)) + (I,) * 6),
        (pool2d._avgpool2d_backward_kernel, (A(4), A(4), A(4)) + (I,) * 6 + (B,)),
        (activation._relu_forward_kernel, (A(1), A(1))),
        (activation._relu_backward_kernel, (A(1), A(1), A(1))),
        (dense._matmul_kernel, (A(2), A(2), A(2), A(1), A(2), A(1)) + (B,) * 6),
        (dense._dense_backward_bias_kernel, (A(1), A(2))),
        (optim._sgd_update_kernel, (A(1), A(1), A(1), F, F, F)),
        (optim._adam_update_kernel, (A(1),) * 4 + (F,) * 8),
        (optim._fill_kernel, (A(1), F)),
        (conv1d._conv1d_forward_kernel, (A(1), A(1), A(1))),
        (conv1d._conv1d_backward_kernel, (A(1),) * 5),
        (conv1d._toeplitz_matrix_kernel, (A(2), A(1))),
        (batchnorm._batchnorm2d_stats_kernel, (A(1),) * 4 + (A(4), S, S, B)),
        (batchnorm._batchnorm2d_normalize_kernel, (A(1),) * 6 + (I, I, B)),
        (batchnorm._batchnorm2d_backward_reduce_kernel, (A(1), A(1), A(4), A(4), A(1), A(1))),
        (batchnorm._batchnorm2d_backward_input_kernel, (A(1),) * 8 + (I, I, B)),
        (dropout._dropout_kernel, (A(1), A(1), I, I, I, S)),
        (global_pool._global_avgpool_forward_kernel, (A(1), A(1), I)),
        (global_pool._global_avgpool_backward_kernel, (A(1), A(1), A(1), I, B)),
        (augment._shift_flip_kernel, (A(1), A(1)) + (I,) * 7 + (B, S)),
    ]
    for it in (np.int32, np.int64):  # argmax and labels come as either
        pairs += [
            (pool2d._maxpool2d_forward_kernel, (A(4), A(4, it), A(4)) + (I,) * 6),
            (pool2d._maxpool2d_backward_kernel, (A(4), A(4), A(4, it), A(4)) + (I,) * 6 + (B,)),
            (softmax_xent._softmax_xent_forward_kernel, (A(1), A(2), A(2), A(1, it))),
            (softmax_xent._softmax_xent_backward_kernel, (A(2), A(2), A(1, it))),
            (softmax_xent._count_correct_kernel, (A(1, np.int64), A(2), A(1, it))),
            (softmax_xent._softmax_xent_step_kernel, (A(1, np.float64), A(2), A(2), A(2), A(1, it), B)),
            (gather._gather_batch_kernel, (A(2), A(1, it), A(2), A(1, it), A(1, it), B)),  # public gather_rows
            (gather._gather_batch_kernel, (A(2, np.int32), A(1, it), A(2, np.int32), A(1, it), A(1, it), B)),
        ]
    return pairs


CASES = [(k, sig, dt) for dt in (np.float32, np.float64) for k, sig in launch_types(dt)]


def test_every_kernel_is_listed():
    found = {
        (m.__name__, name)
        for m in MODULES
        for name, obj in vars(m).items()
        if name.endswith("_kernel") and hasattr(obj, "py_func")
    }
    listed = {(k.py_func.__module__, k.py_func.__name__) for k, _, _ in CASES}
    assert found == listed


@pytest.mark.parametrize("kernel, sig, dtype", CASES,
                         ids=[f"{k.py_func.__name__}-{np.dtype(d).name}-{i}" for i, (k, _, d) in enumerate(CASES)])
def test_compiles_to_ptx_for_sm90(kernel, sig, dtype):
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert ".entry" in ptx  # a kernel, not just device functions


# Kernels that sum in float64 on purpose (the loss, the correct count: see softmax_xent.py).
FLOAT64_BY_DESIGN = {"_softmax_xent_forward_kernel", "_softmax_xent_backward_kernel", "_count_correct_kernel",
                     "_softmax_xent_step_kernel"}
F64_ARITHMETIC = re.compile(r"^\s*(add|sub|mul|fma|div|rcp|sqrt|neg|max|min|abs)\.[a-z.]*f64")


@pytest.mark.parametrize("kernel, sig", [(k, s) for k, s in launch_types(np.float32)
                                         if k.py_func.__name__ not in FLOAT64_BY_DESIGN],
                         ids=lambda v: getattr(getattr(v, "py_func", None), "__name__", ""))
def test_float32_kernels_do_float32_arithmetic(kernel, sig):
    """A float64 operation is many times slower than a float32 one on most GPUs; a stray Python
    float or a plain 0 in a float32 kernel turns its arithmetic into float64 silently. At most a
    constant or two computed once per thread (a pooling window's 1 / (FH*FW)) may remain."""
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    assert sum(1 for line in ptx.splitlines() if F64_ARITHMETIC.match(line)) <= 1
