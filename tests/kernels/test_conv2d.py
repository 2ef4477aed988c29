"""conv2d CPU kernels against the NumPy reference, scipy, and finite differences."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.signal import correlate

from nbcnn.kernels.conv2d import (
    conv2d_backward_bias_cpu,
    conv2d_backward_gemm_cpu,
    conv2d_backward_input_cpu,
    conv2d_backward_input_gemm_cpu,
    conv2d_backward_weight_cpu,
    conv2d_backward_weight_gemm_cpu,
    conv2d_forward_cpu,
    conv2d_forward_gemm_cpu,
)
from tests import reference as ref
from tests.gradcheck import assert_grad_close, numerical_grad

# (N, C, H, W, K, FH, FW, stride, pad): odd sizes, stride 2 with padding, rectangular
# filters and strides, batch 1, a 1x1 filter, a filter as large as the padded input.
CASES = [
    (2, 3, 7, 6, 4, 3, 3, (1, 1), (0, 0)),
    (2, 3, 7, 6, 4, 3, 3, (1, 1), (1, 1)),
    (3, 2, 9, 8, 5, 3, 3, (2, 2), (1, 1)),
    (2, 3, 8, 11, 2, 2, 4, (1, 2), (1, 0)),
    (1, 1, 28, 28, 8, 5, 5, (1, 1), (2, 2)),
    (1, 4, 5, 7, 3, 1, 1, (1, 1), (0, 0)),
    (2, 2, 3, 4, 3, 5, 6, (1, 1), (1, 1)),
    (2, 3, 10, 9, 2, 3, 2, (3, 2), (2, 1)),
    (2, 5, 6, 7, 3, 3, 3, (1, 1), (1, 1)),  # the implicit product, dx by the full convolution
    (2, 5, 6, 7, 3, 3, 2, (1, 1), (0, 0)),  # the implicit product, dx by the scatter
    (2, 8, 9, 7, 9, 3, 3, (1, 1), (1, 1)),  # Winograd for y and dx (odd output, tail of MR in K)
    (3, 9, 6, 13, 8, 3, 3, (1, 1), (0, 0)),  # Winograd, no padding (dx pads dy by 2)
]
IDS = [f"N{c[0]}C{c[1]}H{c[2]}W{c[3]}K{c[4]}F{c[5]}x{c[6]}S{c[7]}P{c[8]}" for c in CASES]


def make(rng, case, dtype):
    N, C, H, W, K, FH, FW, stride, pad = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    OH, OW = ref.out_size(H, FH, stride[0], pad[0]), ref.out_size(W, FW, stride[1], pad[1])
    return x, w, b, (N, K, OH, OW)


# The direct kernels, the im2col + matrix-product kernels, and the one-call backward that
# reuses the forward pass's im2col matrix (what Conv2D runs on the CPU): the same tests run on all.
IMPLS = {
    "direct": (conv2d_forward_cpu, conv2d_backward_input_cpu, conv2d_backward_weight_cpu),
    "gemm": (conv2d_forward_gemm_cpu, conv2d_backward_input_gemm_cpu, conv2d_backward_weight_gemm_cpu),
    "fused": (conv2d_forward_gemm_cpu, None, None),
}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return request.param


def forward(x, w, b, stride, pad, shape, impl="direct"):
    y = np.full(shape, np.nan, dtype=x.dtype)  # NaN shows any element the kernel forgets
    return IMPLS[impl][0](y, x, w, b, *stride, *pad)


def backward(dy, x, w, stride, pad, impl="direct"):
    dx = np.full(x.shape, np.nan, dtype=x.dtype)
    dw = np.full(w.shape, np.nan, dtype=x.dtype)
    db = np.full(w.shape[0], np.nan, dtype=x.dtype)
    if impl == "fused":
        cols = forward_cols(x, w, stride, pad, dy.shape)
        conv2d_backward_gemm_cpu(dx, dw, db, dy, x, w, *stride, *pad, cols=cols)
        return dx, dw, db
    IMPLS[impl][1](dx, dy, w, *stride, *pad)
    IMPLS[impl][2](dw, dy, x, *stride, *pad)
    conv2d_backward_bias_cpu(db, dy)
    return dx, dw, db


def forward_cols(x, w, stride, pad, y_shape):
    """The im2col matrix a forward pass leaves in ``cols`` (NaN first, so a forgotten entry shows)."""
    (N, C, _, _), (_, _, FH, FW) = x.shape, w.shape
    cols = np.full((C * FH * FW, N * y_shape[2] * y_shape[3]), np.nan, x.dtype)
    conv2d_forward_gemm_cpu(np.empty(y_shape, x.dtype), x, w, None, *stride, *pad, cols=cols)
    return cols


TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_reference(rng, case, dtype, impl):
    x, w, b, shape = make(rng, case, dtype)
    stride, pad = case[7], case[8]
    y = forward(x, w, b, stride, pad, shape, impl)
    np.testing.assert_allclose(y, ref.conv2d(x.astype(float), w.astype(float), b.astype(float), stride, pad),
                               **TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_scipy_correlate(rng, case, impl):
    x, w, b, shape = make(rng, case, np.float64)
    (sh, sw), (ph, pw) = case[7], case[8]
    y = forward(x, w, None, (sh, sw), (ph, pw), shape, impl)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    for n in range(x.shape[0]):
        for k in range(w.shape[0]):
            # Correlating over (C, H, W) with a filter as deep as the input leaves one channel.
            full = correlate(xp[n], w[k], mode="valid")[0]
            np.testing.assert_allclose(y[n, k], full[::sh, ::sw], rtol=1e-12, atol=1e-12)


def test_forward_without_bias_equals_zero_bias(rng):
    x, w, b, shape = make(rng, CASES[2], np.float64)
    y0 = forward(x, w, None, (2, 2), (1, 1), shape)
    y1 = forward(x, w, np.zeros_like(b), (2, 2), (1, 1), shape)
    np.testing.assert_array_equal(y0, y1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_reference(rng, case, dtype, impl):
    x, w, b, shape = make(rng, case, dtype)
    stride, pad = case[7], case[8]
    dy = rng.standard_normal(shape).astype(dtype)
    got = backward(dy, x, w, stride, pad, impl)
    want = ref.conv2d_grads(dy.astype(float), x.astype(float), w.astype(float), stride, pad)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, **TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_finite_differences(rng, case, impl):
    x, w, b, shape = make(rng, case, np.float64)
    stride, pad = case[7], case[8]
    r = rng.standard_normal(shape)  # L = sum(y * r), so dL/dy = r

    def loss():
        return float((forward(x, w, b, stride, pad, shape, impl) * r).sum())

    dx, dw, db = backward(r, x, w, stride, pad, impl)
    assert_grad_close(dx, numerical_grad(loss, x))
    assert_grad_close(dw, numerical_grad(loss, w))
    assert_grad_close(db, numerical_grad(loss, b))


@st.composite
def conv_cases(draw):
    FH, FW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    H = draw(st.integers(max(1, FH - 2 * ph), 9))
    W = draw(st.integers(max(1, FW - 2 * pw), 9))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), H, W, draw(st.integers(1, 4)), FH, FW,
            (sh, sw), (ph, pw))


@given(case=conv_cases(), seed=st.integers(0, 2**32 - 1))
def test_random_shapes_forward_and_backward(case, seed):
    rng = np.random.default_rng(seed)
    x, w, b, shape = make(rng, case, np.float64)
    stride, pad = case[7], case[8]
    dy = rng.standard_normal(shape)
    want_y = ref.conv2d(x, w, b, stride, pad)
    want_grads = ref.conv2d_grads(dy, x, w, stride, pad)
    for impl in IMPLS:
        np.testing.assert_allclose(forward(x, w, b, stride, pad, shape, impl), want_y, rtol=1e-12, atol=1e-12)
        for g, e in zip(backward(dy, x, w, stride, pad, impl), want_grads):
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_backward_skips_what_it_is_told_to(rng, case):
    """dx=None and db=None leave dw unchanged; without cols the matrix is recomputed, same result."""
    x, w, b, shape = make(rng, case, np.float64)
    stride, pad = case[7], case[8]
    dy = rng.standard_normal(shape)
    full = backward(dy, x, w, stride, pad, "fused")
    dw = np.full(w.shape, np.nan)
    assert conv2d_backward_gemm_cpu(None, dw, None, dy, x, w, *stride, *pad) == (None, dw, None)
    np.testing.assert_allclose(dw, full[1], rtol=1e-12, atol=1e-12)
    dx, db = np.full(x.shape, np.nan), np.full(w.shape[0], np.nan)
    conv2d_backward_gemm_cpu(dx, dw, db, dy, x, w, *stride, *pad)
    for got, want in zip((dx, dw, db), full):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C, F, pad", [(1, 3, 1), (2, 3, 3), (5, 3, 0), (8, 3, 1), (5, 3, 3)])
def test_backward_twice_after_one_forward(rng, C, F, pad):
    """A planned layer's backward may run again after one forward (the same gradients): no way
    of computing them spoils what the forward left in the scratch (few channels with the
    implicit scatter and with im2col, the implicit product, Winograd, im2col)."""
    from types import SimpleNamespace

    from nbcnn.kernels.conv2d import gemm

    N, H, W, K = 2, 7, 6, 4 if C < 8 else 8
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C, F, F)), rng.standard_normal(K)
    y = np.empty(ref.conv2d(x, w, b, (1, 1), (pad, pad)).shape)
    ws = SimpleNamespace(**{name: np.full(shape, np.nan) for name, shape in gemm.conv2d_workspace_cpu(
        x.shape, w.shape, y.shape, (1, 1), (pad, pad), True, np.float64).items()})
    gemm.conv2d_forward_core_cpu(y, x, w, b, 1, 1, pad, pad, False, ws)
    dy = rng.standard_normal(y.shape)
    want = ref.conv2d_grads(dy, x, w, pad=(pad, pad))
    for _ in range(2):
        dx, dw, db = np.full(x.shape, np.nan), np.full(w.shape, np.nan), np.full(K, np.nan)
        gemm.conv2d_backward_core_cpu(dx, dw, db, dy, x, w, 1, 1, pad, pad, False, ws)
        for got, expected in zip((dx, dw, db), want):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("samples", [1, 2])  # a chunk per sample; two a chunk, the last one short
@pytest.mark.parametrize("stride, pad", [((1, 1), (1, 2)), ((2, 1), (1, 0))])
def test_input_gradient_in_batch_chunks(rng, monkeypatch, samples, stride, pad):
    """The input gradient's product and col2im run a chunk of the batch at a time (dcols_shape);
    with chunks of one and two samples of a batch of three, the public entry point and the planned
    step's core give the reference's dx."""
    from types import SimpleNamespace

    from nbcnn.kernels.conv2d import gemm

    x, w = rng.standard_normal((3, 2, 7, 8)), rng.standard_normal((4, 2, 3, 2))
    dy = rng.standard_normal(ref.conv2d(x, w, np.zeros(4), stride, pad).shape)
    want = ref.conv2d_grads(dy, x, w, stride, pad)[0]
    rows, plane = 2 * 3 * 2, dy.shape[2] * dy.shape[3]
    monkeypatch.setattr(gemm, "DCOLS_BYTES", samples * rows * plane * 8)
    assert gemm.dcols_shape(rows, 3, dy.shape[2], dy.shape[3], 8) == (rows, samples * plane)
    got = conv2d_backward_input_gemm_cpu(np.full(x.shape, np.nan), dy, w, *stride, *pad)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    shapes = gemm.conv2d_workspace_cpu(x.shape, w.shape, dy.shape, stride, pad, True, np.float64)
    ws = SimpleNamespace(**{name: np.empty(shape) for name, shape in shapes.items()})
    gemm.conv2d_forward_core_cpu(np.empty(dy.shape), x, w, np.zeros(4), *stride, *pad, False, ws)
    dx = np.full(x.shape, np.nan)
    gemm.conv2d_backward_core_cpu(dx, np.empty(w.shape), None, dy, x, w, *stride, *pad, False, ws)
    np.testing.assert_allclose(dx, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C, stride, pad, path", [
    (2, (1, 1), (1, 1), "few channels"), (2, (1, 1), (3, 3), "few channels"), (5, (1, 1), (1, 1), "implicit"),
    (64, (1, 1), (1, 1), "winograd"), (5, (1, 1), (3, 3), "im2col"), (5, (2, 2), (1, 1), "im2col")])
def test_public_entry_points_run_what_a_layer_runs(rng, monkeypatch, C, stride, pad, path):
    """Without ``cols`` the public entry points take the planned step's way for the shape (the
    implicit product's forward for few input channels at stride 1, any padding; Winograd for 3x3
    filters at stride 1 (64 channels on 16 x 16: Winograd on any CPU); the implicit product at stride 1 with padding under the filter's size;
    im2col otherwise); with it, im2col."""
    from nbcnn.kernels.conv2d import gemm

    names = {"few channels": "conv2d_forward_implicit_core", "implicit": "conv2d_forward_implicit_core",
             "winograd": "conv2d_forward_winograd_core", "im2col": "im2col"}
    seen = []
    for name in set(names.values()):
        monkeypatch.setattr(gemm, name, lambda *a, fn=getattr(gemm, name), name=name: (seen.append(name), fn(*a))[1])
    K = 8 if path == "winograd" else 3
    H, W = (16, 16) if path == "winograd" else (6, 7)  # outputs Winograd takes on every tile
    x, w = rng.standard_normal((2, C, H, W)), rng.standard_normal((K, C, 3, 3))
    y = np.empty(ref.conv2d(x, w, np.zeros(K), stride, pad).shape)
    conv2d_forward_gemm_cpu(y, x, w, None, *stride, *pad)
    np.testing.assert_allclose(y, ref.conv2d(x, w, np.zeros(K), stride, pad), rtol=1e-12, atol=1e-12)
    assert seen == [names[path]]
    seen.clear()
    cols = np.empty((C * 9, 2 * y.shape[2] * y.shape[3]))
    conv2d_forward_gemm_cpu(y, x, w, None, *stride, *pad, cols=cols)
    assert seen == ["im2col"]


def test_cols_argument_is_checked(rng):
    x, w, b, shape = make(rng, CASES[0], np.float32)
    dy, dw = np.ones(shape, np.float32), np.empty(w.shape, np.float32)
    good = (3 * 3 * 3, 2 * shape[2] * shape[3])
    with pytest.raises(ValueError, match=r"cols has shape \(28, 40\), expected \(27, 40\)"):
        conv2d_forward_gemm_cpu(np.empty(shape, np.float32), x, w, b, cols=np.empty((good[0] + 1, good[1]), np.float32))
    with pytest.raises(TypeError, match="cols is float64 but x is float32"):
        conv2d_backward_gemm_cpu(None, dw, None, dy, x, w, cols=np.empty(good))
    with pytest.raises(ValueError, match="C-contiguous"):
        conv2d_backward_weight_gemm_cpu(dw, dy, x, cols=np.empty(good[::-1], np.float32).T)


def test_lecture_example_shape():
    # 32x32x3 input, 10 filters of 5x5, P=0, S=1 -> 28x28x10, each filter 5*5*3 + 1 = 76 parameters.
    x = np.ones((1, 3, 32, 32), np.float32)
    w = np.ones((10, 3, 5, 5), np.float32)
    b = np.ones(10, np.float32)
    y = forward(x, w, b, (1, 1), (0, 0), (1, 10, 28, 28))
    assert y.shape == (1, 10, 28, 28)
    assert w[0].size + 1 == 76 and w.size + b.size == 760
    np.testing.assert_array_equal(y, 76.0)  # all-ones input and weights: 75 products plus the bias


# ------------------------------------------------------------------------ bad arguments


def args32(shape_x=(2, 3, 7, 6), shape_w=(4, 3, 3, 3), shape_y=(2, 4, 5, 4)):
    return (np.zeros(shape_y, np.float32), np.zeros(shape_x, np.float32), np.zeros(shape_w, np.float32),
            np.zeros(shape_w[0], np.float32))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: (np.zeros((2, 4, 5, 5), np.float32),) + a[1:], ValueError, r"y has shape \(2, 4, 5, 5\), expected \(2, 4, 5, 4\)"),
        (lambda a: (a[0], np.zeros((2, 2, 7, 6), np.float32)) + a[2:], ValueError, "w has 3 input channels"),
        (lambda a: (a[0], a[1][0]) + a[2:], ValueError, "x must have 4 dimensions"),
        (lambda a: a[:3] + (np.zeros(5, np.float32),), ValueError, r"b has shape \(5,\), expected \(4,\)"),
        (lambda a: (a[0], a[1].astype(np.float64)) + a[2:], TypeError, "w is float32 but x is float64"),
        (lambda a: (a[0], a[1].astype(np.int32)) + a[2:], TypeError, "x must be float32 or float64"),
        (lambda a: (a[0], a[1].tolist()) + a[2:], TypeError, "x must be an array"),
        (lambda a: (a[0], np.zeros((2, 3, 6, 7), np.float32).transpose(0, 1, 3, 2)) + a[2:], ValueError, "x must be C-contiguous"),
    ],
)
def test_bad_arrays_raise_clear_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        conv2d_forward_cpu(*mutate(args32()))


@pytest.mark.parametrize(
    "stride_pad, error, match",
    [
        ((0, 1, 0, 0), ValueError, "stride_h must be at least 1, got 0"),
        ((1, 1, -1, 0), ValueError, "pad_h must be at least 0, got -1"),
        ((1.5, 1, 0, 0), TypeError, "stride_h must be an integer"),
        ((1, True, 0, 0), TypeError, "stride_w must be an integer"),
    ],
)
def test_bad_stride_or_padding(stride_pad, error, match):
    with pytest.raises(error, match=match):
        conv2d_forward_cpu(*args32(), *stride_pad)


def test_filter_larger_than_padded_input():
    y, x, w, b = args32((1, 1, 3, 3), (1, 1, 5, 5), (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"window height 5 is larger than the padded input height 3 \+ 2\*0 = 3"):
        conv2d_forward_cpu(y, x, w, b)


def test_backward_shapes_checked():
    dy = np.zeros((2, 4, 5, 4), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="dy has shape"):
        conv2d_backward_input_cpu(np.zeros((2, 3, 8, 6), np.float32), dy, w)
    with pytest.raises(ValueError, match=r"dw must have 4 dimensions \(K, C, FH, FW\), got shape \(4, 3, 3\)"):
        conv2d_backward_weight_cpu(np.zeros((4, 3, 3), np.float32), dy, np.zeros((2, 3, 7, 6), np.float32))
    with pytest.raises(ValueError, match=r"db has shape \(3,\), expected \(4,\)"):
        conv2d_backward_bias_cpu(np.zeros(3, np.float32), dy)
