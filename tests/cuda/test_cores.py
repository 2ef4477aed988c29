"""Every core of the kernel registry on CUDA against the same core on the CPU, with the same arguments:
the fused epilogues (ReLU, masks), the weight and bias gradients in one pass (one batch chunk or
several), the loss step, the batch gather, the optimizers."""

import numpy as np
import pytest

from nbcnn.ops import REGISTRY
from tests import cores
from tests.cuda.helpers import assert_close

# Every case in float64 (tight tolerance); in float32 too where the simulator runs it quickly (the
# convolutions' float32 kernels are the same code, and tests/cuda/test_training.py runs them).
# Convolutions and dense layers have two CUDA algorithms: the register-blocked products (the
# default, "gemm") and the simpler kernels kept as references ("tiled"). Both run every case but
# the ones in cores.NOT_FOR_TILED (made to cross the products' tiles, or for the CPU alone).
CASES = [(dtype, *case, algorithm)
         for dtype in (np.float32, np.float64)
         for case in cores.cases(np.random.default_rng(1), dtype)
         if dtype == np.float64 or not case[1].startswith("conv2d")
         for algorithm in REGISTRY.algorithms(case[1], "cuda")
         if algorithm != "tiled" or not case[0].startswith(cores.NOT_FOR_TILED)]


@pytest.mark.parametrize("dtype, name, op, args, outputs, expected, algorithm", CASES,
                         ids=[f"{c[1]}-{np.dtype(c[0]).name}-{c[-1]}" for c in CASES])
def test_cuda_core_matches_cpu_core(dtype, name, op, args, outputs, expected, algorithm):
    want = cores.run(op, args, "cpu")
    got = cores.run(op, args, "cuda", algorithm)
    for i in outputs:
        if want[i] is None:
            assert got[i] is None
            continue
        tol_dtype = np.float64 if want[i].dtype == np.float64 and dtype == np.float64 else np.float32
        if want[i].dtype.kind in "iu":
            np.testing.assert_array_equal(got[i], want[i], err_msg=name)
        else:
            assert_close(got[i], want[i], tol_dtype)
