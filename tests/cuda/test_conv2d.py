import numpy as np
import pytest

from nbcnn.kernels.conv2d import (
    conv2d_backward_bias_cpu,
    conv2d_backward_bias_cuda,
    conv2d_backward_input_cpu,
    conv2d_backward_input_cuda,
    conv2d_backward_weight_cpu,
    conv2d_backward_weight_cuda,
    conv2d_forward_cpu,
    conv2d_forward_cuda,
)
from tests.cuda.helpers import assert_close, dev, empty_like, host

# Tiny shapes (the simulator is slow) that still cover: widths and heights that are not
# multiples of the 16x8 tile, stride 2 with padding, rectangular filters and strides,
# batch 1, K not a multiple of the 4 filters per block, 1x1 filters.
# float64 runs on the two cheapest cases only: it is the same code, and the simulator is slow.
CASES = [
    ((2, 1, 7, 6, 5, 3, 3, (1, 1), (0, 0)), np.float32),
    ((2, 2, 9, 18, 3, 3, 2, (2, 1), (1, 1)), np.float32),
    ((1, 2, 10, 7, 2, 3, 3, (2, 2), (1, 1)), np.float32),
    ((1, 2, 10, 7, 2, 3, 3, (2, 2), (1, 1)), np.float64),
    ((2, 1, 5, 17, 6, 1, 1, (1, 1), (0, 0)), np.float32),
    ((2, 1, 5, 17, 6, 1, 1, (1, 1), (0, 0)), np.float64),
]
IDS = [f"N{c[0]}C{c[1]}H{c[2]}W{c[3]}K{c[4]}F{c[5]}x{c[6]}S{c[7]}P{c[8]}-{np.dtype(t).name}" for c, t in CASES]


@pytest.mark.parametrize("case, dtype", CASES, ids=IDS)
def test_matches_cpu(case, dtype):
    rng = np.random.default_rng(7)
    N, C, H, W, K, FH, FW, s, p = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    OH, OW = (H + 2 * p[0] - FH) // s[0] + 1, (W + 2 * p[1] - FW) // s[1] + 1
    y = conv2d_forward_cpu(np.empty((N, K, OH, OW), dtype), x, w, b, *s, *p)
    y_d = empty_like(y)
    conv2d_forward_cuda(y_d, dev(x), dev(w), dev(b), *s, *p)
    assert_close(host(y_d), y, dtype)
    conv2d_forward_cuda(y_d, dev(x), dev(w), None, *s, *p)
    assert_close(host(y_d), y - b[None, :, None, None], dtype)

    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = conv2d_backward_input_cpu(np.empty_like(x), dy, w, *s, *p)
    dw = conv2d_backward_weight_cpu(np.empty_like(w), dy, x, *s, *p)
    db = conv2d_backward_bias_cpu(np.empty_like(b), dy)
    dx_d, dw_d, db_d = empty_like(dx), empty_like(dw), empty_like(db)
    conv2d_backward_input_cuda(dx_d, dev(dy), dev(w), *s, *p)
    conv2d_backward_weight_cuda(dw_d, dev(dy), dev(x), *s, *p)
    conv2d_backward_bias_cuda(db_d, dev(dy))
    assert_close(host(dx_d), dx, dtype)
    assert_close(host(dw_d), dw, dtype)
    assert_close(host(db_d), db, dtype)


def test_weight_gradient_is_deterministic():
    rng = np.random.default_rng(3)
    x = dev(rng.standard_normal((2, 1, 6, 6)).astype(np.float32))
    dy = dev(rng.standard_normal((2, 1, 4, 4)).astype(np.float32))
    first = host(conv2d_backward_weight_cuda(empty_like(np.empty((1, 1, 3, 3), np.float32)), dy, x))
    again = host(conv2d_backward_weight_cuda(empty_like(np.empty((1, 1, 3, 3), np.float32)), dy, x))
    np.testing.assert_array_equal(first, again)


def test_host_arrays_are_refused():
    x = np.zeros((1, 1, 4, 4), np.float32)
    w = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(TypeError, match="x is a NumPy array in host memory; CUDA kernels take GPU arrays"):
        conv2d_forward_cuda(empty_like(np.zeros((1, 1, 2, 2), np.float32)), x, dev(w))


def test_shapes_are_checked_before_launch():
    with pytest.raises(ValueError, match=r"y has shape \(1, 1, 3, 3\), expected \(1, 1, 2, 2\)"):
        conv2d_forward_cuda(empty_like(np.zeros((1, 1, 3, 3), np.float32)), dev(np.zeros((1, 1, 4, 4), np.float32)),
                            dev(np.zeros((1, 1, 3, 3), np.float32)))
