"""The residual join's CPU kernels against NumPy, serial and parallel compilations alike."""

import numpy as np
import pytest

from nbcnn.kernels import residual
from nbcnn.kernels._cpu import SERIAL_BELOW


@pytest.mark.parametrize("size", [7, SERIAL_BELOW + 13])
@pytest.mark.parametrize("fused", [False, True])
def test_join_and_fork_match_numpy(rng, size, fused):
    a, b, x = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    y = residual.residual_add_forward_cpu(np.full_like(a, np.nan), a, b, relu=fused)
    np.testing.assert_array_equal(y, np.maximum(a + b, 0) if fused else a + b)
    dx = residual.residual_add_backward_cpu(np.full_like(a, np.nan), a, b, x, mask=fused)
    np.testing.assert_array_equal(dx, np.where(x > 0, a + b, 0) if fused else a + b)
    for join in (residual._residual_add_forward_cpu.parallel, residual._residual_add_forward_cpu.serial):
        out = np.full_like(a, np.nan)
        join(out, a, b, fused)
        np.testing.assert_array_equal(out, y)


def test_the_output_may_be_an_input(rng):
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    want = a + b
    residual.residual_add_forward_cpu(a, a, b)
    np.testing.assert_array_equal(a, want)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"b has shape \(3,\), expected \(4,\)"):
        residual.residual_add_forward_cpu(np.zeros(4), np.zeros(4), np.zeros(3))
    with pytest.raises(ValueError, match="mask=True needs x"):
        residual.residual_add_backward_cpu(np.zeros(4), np.zeros(4), np.zeros(4), mask=True)
    with pytest.raises(TypeError, match="b is float32 but y is float64"):
        residual.residual_add_forward_cpu(np.zeros(4), np.zeros(4), np.zeros(4, np.float32))
