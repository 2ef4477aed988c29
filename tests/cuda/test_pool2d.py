import numpy as np
import pytest

from nbcnn.kernels.pool2d import (
    avgpool2d_backward_cpu,
    avgpool2d_backward_cuda,
    avgpool2d_forward_cpu,
    avgpool2d_forward_cuda,
    maxpool2d_backward_cpu,
    maxpool2d_backward_cuda,
    maxpool2d_forward_cpu,
    maxpool2d_forward_cuda,
)
from tests.cuda.helpers import assert_close, dev, empty_like, host

# Overlapping windows, stride 2 with padding, rectangular windows, widths past one warp.
CASES = [
    (2, 2, 8, 8, (2, 2), (2, 2), (0, 0)),
    (1, 3, 7, 9, (3, 3), (2, 2), (1, 1)),
    (2, 1, 6, 35, (3, 2), (1, 2), (1, 0)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_matches_cpu(case, dtype):
    rng = np.random.default_rng(5)
    N, C, H, W, f, s, p = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    x[0, 0, :2, :2] = 1.0  # a tie inside a window
    OH, OW = (H + 2 * p[0] - f[0]) // s[0] + 1, (W + 2 * p[1] - f[1]) // s[1] + 1
    y = np.empty((N, C, OH, OW), dtype)
    argmax = np.empty(y.shape, np.int32)
    maxpool2d_forward_cpu(y, argmax, x, *f, *s, *p)
    y_d, argmax_d = empty_like(y), empty_like(argmax)
    maxpool2d_forward_cuda(y_d, argmax_d, dev(x), *f, *s, *p)
    np.testing.assert_array_equal(host(y_d), y)
    np.testing.assert_array_equal(host(argmax_d), argmax)

    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = maxpool2d_backward_cpu(np.empty_like(x), dy, argmax, *f, *s, *p)
    dx_d = empty_like(dx)
    maxpool2d_backward_cuda(dx_d, dev(dy), argmax_d, *f, *s, *p)
    assert_close(host(dx_d), dx, dtype)

    a = avgpool2d_forward_cpu(np.empty_like(y), x, *f, *s, *p)
    a_d = empty_like(a)
    avgpool2d_forward_cuda(a_d, dev(x), *f, *s, *p)
    assert_close(host(a_d), a, dtype)
    da = avgpool2d_backward_cpu(np.empty_like(x), dy, *f, *s, *p)
    da_d = empty_like(da)
    avgpool2d_backward_cuda(da_d, dev(dy), *f, *s, *p)
    assert_close(host(da_d), da, dtype)
