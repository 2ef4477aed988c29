"""The CPU matrix product (kernels/matmul.py) and the implicit convolution built on it, against
NumPy and the reference convolution: every tile forced on this machine, 1 and 2 threads, shapes
that cross every blocking boundary."""

import itertools

import numba
import numpy as np
import pytest

from nbcnn.kernels import matmul as mm
from nbcnn.kernels.conv2d import implicit, winograd
from tests import reference as ref

MAX_MR, MAX_NR, KC = mm.MAX_MR, mm.MAX_NR, mm.KC

# (M, N, K): one of everything, tails of every tile's MR and NR (primes), a whole and a partial
# depth block (KC and KC + 1), several of them, a single row and a single column; and narrow
# products with a long depth, which two threads split along the depth (runs of whole blocks,
# one of them cut short), and a wider one whose A is large (``mm.deep``)
SHAPES = [(1, 1, 1), (1, 40, 3), (37, 1, 5), (7, 33, 1), (13, 97, KC), (29, 31, KC + 1), (50, 70, 2 * KC + 3),
          (97, 131, 300), (9, 5, 3 * KC + 7), (17, 20, 4 * KC + 1), (17, 70, 31 * KC + 5)]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    """One thread with the products' serial compilation where they are small (as in training), or
    two with the parallel one for every size (these shapes are all small)."""
    before = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    if request.param == 2:
        monkeypatch.setattr(mm, "SERIAL_PRODUCT_BELOW", 0)
    yield request.param
    numba.set_num_threads(before)


def operands(rng, M, N, K, trans_a, trans_b, dtype):
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    return a, b, want


@pytest.mark.parametrize("tile", mm.TILE_NAMES)
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_product_against_numpy_every_tile(rng, tile, M, N, K, threads):
    for trans_a in (False, True):
        for trans_b in (False, True):
            a, b, want = operands(rng, M, N, K, trans_a, trans_b, np.float32)
            c = np.full((M, N), np.nan, np.float32)
            mm.matmul_cpu(c, a, b, trans_a, trans_b, tile=tile)
            np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-4 * np.sqrt(K))
            c2 = c.copy()
            mm.matmul_cpu(c2, a, b, trans_a, trans_b, accumulate=True, tile=tile)  # c += the product again
            np.testing.assert_allclose(c2, 2 * want, rtol=1e-4, atol=2e-4 * np.sqrt(K))


@pytest.mark.parametrize("tile", ["avx512", "portable"])
def test_product_in_float64(rng, tile):
    a, b, want = operands(rng, 19, 45, KC + 7, False, True, np.float64)
    c = np.empty((19, 45))
    mm.matmul_cpu(c, a, b, trans_b=True, tile=tile)
    np.testing.assert_allclose(c, want, rtol=1e-12, atol=1e-12)


def test_depth_zero_gives_zeros_or_leaves_c(rng):
    a, b = np.ones((3, 0), np.float32), np.ones((0, 5), np.float32)
    c = np.full((3, 5), 7, np.float32)
    mm.matmul_cpu(c, a, b, accumulate=True)
    assert (c == 7).all()
    mm.matmul_cpu(c, a, b)
    assert (c == 0).all()


def test_product_on_views_of_a_larger_array(rng, threads):
    """Operands that are row ranges and column ranges of larger arrays (what the im2col path's
    chunks pass)."""
    big = rng.standard_normal((40, 300)).astype(np.float32)
    a, b = big[:17, 5:45], big[:40, 100:233]
    c = np.empty((17, 133), np.float32)
    mm.matmul_core_cpu(c, a, b, False, False, False, _scratch(17, 133, 40))
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


def _scratch(M, N, K, dtype=np.float32):
    from types import SimpleNamespace

    return SimpleNamespace(**{name: np.empty(shape, dtype) for name, shape in mm.matmul_workspace((M, N, K)).items()})


def test_same_bits_twice_and_whatever_the_thread_count(rng):
    """Each element of C is one task's, its depth blocks added in order: the bits do not depend on
    the number of threads."""
    a, b, _ = operands(rng, 70, 200, 3 * KC + 5, False, False, np.float32)
    results = []
    before = numba.get_num_threads()
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS), numba.get_num_threads()):
            numba.set_num_threads(n)
            for _ in range(2):
                results.append(mm.matmul_cpu(np.empty((70, 200), np.float32), a, b))
    finally:
        numba.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_bad_operands_are_named():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="do not multiply"):
        mm.matmul_cpu(np.empty((3, 5), np.float32), a, np.ones((5, 5), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        mm.matmul_cpu(np.empty((3, 5), np.float32), a.reshape(3, 2, 2), np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="tile must be one of"):
        mm.matmul_cpu(np.empty((3, 5), np.float32), a, np.ones((4, 5), np.float32), tile="sse9")


def test_the_measured_peak_counts_its_operations():
    out = np.zeros(1, np.float32)
    mm.fma_peak_cpu(out, 10)
    assert np.isfinite(out[0]) and out[0] != 0  # the chains ran and were summed
    MR, NR, V = mm.TILES[mm.TILE_NAMES[mm.TILE]]
    assert mm.peak_flops_per_step(mm.TILE) == 2 * MR * NR


def test_host_tile_follows_the_cpu_and_the_environment(monkeypatch):
    assert mm.host_tile() in mm.TILES
    monkeypatch.setenv("NBCNN_TILE", "portable")
    assert mm.host_tile() == "portable"
    monkeypatch.setenv("NBCNN_TILE", "sse9")
    with pytest.raises(ValueError, match="NBCNN_TILE must be one of"):
        mm.host_tile()


# ------------------------------------------------------------------ the implicit convolution

# (N, C, H, W, K, FH, FW, ph, pw): tails of MR in K and C, rows shorter and longer than NR,
# several depth blocks (C*FH*FW > KC), padding on one axis, a 1x1 filter, one value, more
# output pixels than a depth block (the weight gradient's depth), the folded input gradient's depth
# (K*FW) past a depth block, small samples taken a group a task (``sample_group``), padded or read
# in place, the last group short
CONVS = [(2, 4, 7, 9, 5, 3, 3, 1, 1), (3, 6, 12, 12, 16, 5, 5, 0, 0), (2, 17, 13, 13, 33, 3, 3, 1, 0),
         (1, 1, 1, 1, 1, 1, 1, 0, 0), (2, 70, 8, 8, 9, 3, 3, 2, 2), (2, 5, 6, 40, 3, 1, 1, 0, 0),
         (1, 2, 19, 21, 3, 3, 3, 1, 1), (2, 3, 9, 11, 7, 3, 5, 0, 1), (1, 2, 8, 9, 60, 3, 5, 0, 0),
         (5, 8, 3, 3, 12, 3, 3, 1, 1), (7, 4, 4, 5, 6, 3, 3, 0, 0)]


@pytest.mark.parametrize("tile", [mm.TILE_NAMES[mm.TILE], "portable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_implicit_convolution_against_the_reference(rng, tile, dtype, threads):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    index = mm.tile_index(tile)
    for N, C, H, W, K, FH, FW, ph, pw in CONVS:
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
        b = rng.standard_normal(K).astype(dtype)
        want = ref.conv2d(x, w, b, pad=(ph, pw))
        y = np.full(want.shape, np.nan, dtype)
        ws = implicit.implicit_scratch(x.shape, w.shape, y.shape, (ph, pw), True, dtype)
        # the input gradient both ways: the full convolution of dy and the scatter of w^T dy
        other = implicit.implicit_scratch(x.shape, w.shape, y.shape, (ph, pw), True, dtype,
                                          not hasattr(ws, "im_dyq"))
        # the product both ways round: the filters as the tile's rows, or the output pixels
        for relu, by_pixels in itertools.product((False, True), (False, True)):
            y[:] = np.nan
            implicit.conv2d_forward_implicit_core(y, x, w, b, ph, pw, relu, ws, index, by_pixels)
            np.testing.assert_allclose(y, np.maximum(want, 0) if relu else want, **tol)
        dy = rng.standard_normal(want.shape).astype(dtype)
        want_dx, want_dw, want_db = ref.conv2d_grads(dy, x, w, pad=(ph, pw))
        # the full convolution's product by pixels or not; the scatter with the filter's columns folded or not
        for mask, scratch, other_way in itertools.product((False, True), (ws, other), (False, True)):
            dx, dw = np.full(x.shape, np.nan, dtype), np.full(w.shape, np.nan, dtype)
            implicit.conv2d_backward_implicit_core(dx, dw, dy, x, w, ph, pw, mask, scratch, index, other_way, other_way)
            np.testing.assert_allclose(dx, want_dx * (x > 0) if mask else want_dx, **tol)
            np.testing.assert_allclose(dw, want_dw, **tol)
        db = np.full(K, np.nan, dtype)
        implicit.bias_gradient_cpu(db, dy)
        np.testing.assert_allclose(db, want_db, **tol)


def test_small_samples_are_grouped_evenly():
    """A task of the products by pixels takes enough small samples for GROUP_PIXELS pixels, as
    many tasks a thread, the samples spread evenly; large samples, or a batch no larger than the
    threads, a sample a task; never more padded values than GROUP_VALUES."""
    group = implicit.sample_group
    assert group(64, 9, 128 * 25, 2) == 16  # 64 samples of 3x3 on 2 threads: 4 tasks of 16
    assert group(64, 49, 64 * 81, 2) == 4  # 7x7: 16 tasks of 4
    assert group(64, implicit.GROUP_PIXELS, 10, 2) == 1 and group(2, 9, 10, 2) == 1
    assert group(64, 9, implicit.GROUP_VALUES // 3, 2) == 3
    for N in range(3, 70):
        g = group(N, 20, 100, 2)
        tasks = -(-N // g)
        assert g * 20 <= implicit.GROUP_PIXELS + 20 and (tasks % 2 == 0 or g == 1), (N, g)


# (N, C, H, W, K, ph, pw) of 3x3 convolutions by Winograd: odd outputs (a tile's last row and
# column dropped), runs of more tiles than a vector's lanes, chunks cut mid-row and a last one
# cut short, a tail of MR in K, more channels than a depth block (C > KC, and K > KC for the
# input gradient), padding 2 (dy not padded for dx), a single tile
WINOGRAD = [(2, 8, 9, 7, 9, 1, 1), (3, 16, 34, 40, 8, 1, 0), (2, KC + 4, 6, 6, 5, 0, 0), (5, 8, 13, 13, 33, 2, 2),
            (1, 8, 3, 3, 8, 0, 0)]


@pytest.mark.parametrize("tile", [mm.TILE_NAMES[mm.TILE], "portable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_against_the_reference(rng, tile, dtype, threads):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    index = mm.tile_index(tile)
    for N, C, H, W, K, ph, pw in WINOGRAD:
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        w = rng.standard_normal((K, C, 3, 3)).astype(dtype)
        b = rng.standard_normal(K).astype(dtype)
        want = ref.conv2d(x, w, b, pad=(ph, pw))
        ws = winograd.winograd_scratch(x.shape, w.shape, True, dtype)
        for relu in (False, True):
            y = np.full(want.shape, np.nan, dtype)
            winograd.conv2d_forward_winograd_core(y, x, w, b, ph, pw, relu, ws, index)
            np.testing.assert_allclose(y, np.maximum(want, 0) if relu else want, **tol)
        dy = rng.standard_normal(want.shape).astype(dtype)
        want_dx, want_dw, _ = ref.conv2d_grads(dy, x, w, pad=(ph, pw))
        for mask in (False, True):
            dx = np.full(x.shape, np.nan, dtype)
            winograd.winograd_input_gradient(dx, dy, w, x, ph, pw, mask, ws, index)
            np.testing.assert_allclose(dx, want_dx * (x > 0) if mask else want_dx, **tol)
        dw = np.full(w.shape, np.nan, dtype)
        winograd.winograd_weight_gradient(dw, dy, x, ph, pw, ws, index)
        np.testing.assert_allclose(dw, want_dw, **tol)


def test_winograd_gives_the_same_bits_on_any_thread_count(rng):
    """Each output is computed whole by one task: 1 and 2 threads give the same bits (the weight
    gradient's parts are summed in thread order, so its bits depend on the thread count and are
    checked for repeatability only)."""
    x = rng.standard_normal((4, 16, 20, 20)).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    ws = winograd.winograd_scratch(x.shape, w.shape, True, np.float32)
    before = numba.get_num_threads()
    ys = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            y = np.empty((4, 24, 20, 20), np.float32)
            winograd.conv2d_forward_winograd_core(y, x, w, np.zeros(24, np.float32), 1, 1, False, ws)
            ys.append(y)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(ys[0], ys[1])
    dws = [np.empty(w.shape, np.float32) for _ in range(2)]
    for dw in dws:
        winograd.winograd_weight_gradient(dw, ys[0], x, 1, 1, ws)
    assert np.array_equal(dws[0], dws[1])


# (N, C, H, W, K, FH, FW, ph, pw) of a first layer (few input channels) fused with its 2x2 max
# pooling: tails of MR in C*FH*FW and of NR in the planes, odd outputs (a row and a column the
# pooling drops), more filters than a depth block (K > KC)
POOLED = [(2, 1, 12, 12, 16, 5, 5, 2, 2), (3, 3, 9, 11, 5, 3, 3, 1, 0), (2, 2, 7, 6, 33, 3, 2, 0, 1),
          (1, 1, 6, 6, KC + 4, 3, 3, 1, 1), (3, 1, 8, 7, KC // 4 + 3, 5, 5, 2, 2)]


@pytest.mark.parametrize("tile", [mm.TILE_NAMES[mm.TILE], "portable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_pooling_follows_the_pooling_rule(rng, monkeypatch, tile, dtype):
    """The fused first layer's pooling (``pool_rows``, windows in vector lanes) picks what the
    pooling kernel picks: the first of equal values (filters of zeros: every window a tie), and a
    NaN over any number, the first NaN (a NaN in the input spreads over a 3x3 patch of outputs,
    across window borders); odd outputs drop a row and a column."""
    from types import SimpleNamespace

    from nbcnn.kernels.conv2d import pooled
    from nbcnn.kernels.conv2d.gemm import conv2d_forward_gemm_cpu
    from nbcnn.kernels.pool2d import maxpool2d_forward_cpu

    monkeypatch.setattr(pooled, "TILE", mm.tile_index(tile))
    N, C, H, W, K = 2, 1, 9, 11, 5
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    x[0, 0, 4, 4] = x[1, 0, 0, 7] = np.nan
    b = rng.standard_normal(K).astype(dtype)
    for w in (rng.standard_normal((K, C, 3, 3)).astype(dtype), np.zeros((K, C, 3, 3), dtype)):
        # the convolution as the unfused layer computes it (the same sums in the same order)
        y = conv2d_forward_gemm_cpu(np.empty((N, K, H, W), dtype), x if w.any() else np.nan_to_num(x), w, b, 1, 1, 1, 1)
        want, want_at = np.empty((N, K, H // 2, W // 2), dtype), np.empty((N, K, H // 2, W // 2), np.int32)
        maxpool2d_forward_cpu(want, want_at, y, 2, 2)
        ws = SimpleNamespace(**{name: np.full(shape, np.nan, dtype) for name, shape in
                                pooled.conv2d_maxpool_workspace_cpu(x.shape, w.shape, (1, 1), (1, 1), dtype).items()})
        yp, at = np.full(want.shape, -1, dtype), np.full(want.shape, -1, np.int32)
        pooled.conv2d_maxpool_forward_core_cpu(yp, at, x if w.any() else np.nan_to_num(x), w, b, 1, 1, 1, 1, False, ws)
        assert np.isnan(want).any() == bool(w.any())
        np.testing.assert_array_equal(yp, want)
        np.testing.assert_array_equal(at, want_at)


def _pooled_cases(rng, dtype):
    """For every shape of POOLED and the ReLU off and on: the fused first layer's forward run on
    random x and w (scratch full of NaN, as a planned step may leave it: nothing relies on zeros),
    a random pooled gradient, and the reference's gradients of the full-size gradient the
    pooling's backward would write. Yields (x, w, ph, pw, relu, ws, yp, argmax, dyp, (dx, dw, db))."""
    from types import SimpleNamespace

    from nbcnn.kernels.conv2d import pooled

    for N, C, H, W, K, FH, FW, ph, pw in POOLED:
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
        shapes = {**pooled.conv2d_maxpool_workspace_cpu(x.shape, w.shape, (1, 1), (ph, pw), dtype),
                  **pooled.conv2d_maxpool_backward_input_workspace_cpu(x.shape, w.shape, (1, 1), (ph, pw), dtype)}
        ws = SimpleNamespace(**{name: np.full(shape, np.nan, dtype) for name, shape in shapes.items()})
        OH, OW = H + 2 * ph - FH + 1, W + 2 * pw - FW + 1
        yp = np.empty((N, K, OH // 2, OW // 2), dtype)
        argmax = np.empty(yp.shape, np.int32)
        for relu in (False, True):
            pooled.conv2d_maxpool_forward_core_cpu(yp, argmax, x, w, np.zeros(K, dtype), 1, 1, ph, pw, relu, ws)
            dyp = rng.standard_normal(yp.shape).astype(dtype)
            full = np.zeros((N, K, OH * OW), dtype)  # the pooling's backward: dyp at the maxima
            np.put_along_axis(full, argmax.reshape(N, K, -1), (dyp * (yp > 0) if relu else dyp).reshape(N, K, -1), 2)
            want = ref.conv2d_grads(full.reshape(N, K, OH, OW), x, w, pad=(ph, pw))
            yield x, w, ph, pw, relu, ws, yp, argmax, dyp, want


@pytest.mark.parametrize("tile", sorted({mm.TILE_NAMES[mm.TILE], "avx2", "portable"}))  # avx2: 5x5 filters fold
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooled_input_gradient_against_the_reference(rng, tile, dtype, threads):
    """The fused first layer's backward with its input gradient (conv2d.pooled: dx, dw and db in one
    pass) is the convolution's backward of the full-size gradient the pooling's backward would
    write."""
    from nbcnn.kernels.conv2d import pooled

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    if tile == "avx2":  # the shapes take both ways to the input gradient (fold_product and scatter_product)
        assert {pooled.folds(C, K, FH, FW, mm.TILES[tile][0]) for _, C, _, _, K, FH, FW, _, _ in POOLED} == {True, False}
    for x, w, ph, pw, relu, ws, yp, argmax, dyp, (want_dx, want_dw, want_db) in _pooled_cases(rng, dtype):
        dx, dw = np.full(x.shape, np.nan, dtype), np.full(w.shape, np.nan, dtype)
        db = np.full(w.shape[0], np.nan, dtype) if relu else None  # None: a layer without bias
        assert pooled.conv2d_maxpool_backward_input_core_cpu(dx, dw, db, dyp, argmax, yp, x, w, 1, 1, ph, pw,
                                                             relu, ws, mm.tile_index(tile))
        np.testing.assert_allclose(dx, want_dx, **tol)
        np.testing.assert_allclose(dw, want_dw, **tol)
        if db is not None:
            np.testing.assert_allclose(db, want_db, **tol)


@pytest.mark.parametrize("tile", [mm.TILE_NAMES[mm.TILE], "portable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooled_weight_gradient_from_the_maxima(rng, tile, dtype, threads):
    """The fused first layer's weight gradient without the input gradient (``window_gradients``:
    the patches under the maxima alone) is the convolution's weight gradient of the full-size
    gradient the pooling's backward would write, and the same bits as the backward that also
    gives dx; on every shape of POOLED (two filters a call and an odd last one, patches of more
    rows than a call takes, rows wider than the vectors in float64, the last sample read from
    its copy with room past it)."""
    from nbcnn.kernels.conv2d import pooled

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    t = mm.tile_index(tile)
    for x, w, ph, pw, relu, ws, yp, argmax, dyp, (_, want_dw, want_db) in _pooled_cases(rng, dtype):
        K = w.shape[0]
        dw, db = np.full(w.shape, np.nan, dtype), np.full(K, np.nan, dtype)
        pooled.pooled_weight_gradient(dw, db, dyp, argmax, yp, x, w, ph, pw, relu, ws, t)
        np.testing.assert_allclose(dw, want_dw, **tol)
        np.testing.assert_allclose(db, want_db, **tol)
        dx, dw2, db2 = np.empty(x.shape, dtype), np.empty(w.shape, dtype), np.empty(K, dtype)
        assert pooled.conv2d_maxpool_backward_input_core_cpu(dx, dw2, db2, dyp, argmax, yp, x, w, 1, 1, ph, pw,
                                                             relu, ws, t)
        np.testing.assert_array_equal(dw2, dw)
        np.testing.assert_array_equal(db2, db)


# (N, C, H, W, K, FH, FW, ph, pw) for a later convolution's backward from the maxima: the default
# model's second layer (a patch of 25 vectors in one AVX-512 call, split over calls in AVX2 and
# float64), LeNet-5's (rows of 30 values: a vector past each row's end), an odd output and
# padding, rows wider than a call takes, a 1x1 filter, and rows so short that a patch row's last
# vector reaches the next row's first (the scatter one vector at a time), and samples whose rows
# are walked in bands (``maxima.band_rows``): of 3 pooled rows and a last of 1 (float32; float64
# bands of 1), of 1 row each with padding
MAXIMA = [(3, 16, 14, 14, 32, 5, 5, 0, 0), (2, 6, 14, 14, 16, 5, 5, 0, 0), (2, 3, 9, 11, 5, 3, 3, 1, 1),
          (1, 40, 7, 8, 3, 3, 2, 0, 1), (2, 1, 6, 6, 2, 1, 1, 0, 0), (3, 3, 6, 4, 2, 3, 3, 0, 0),
          (2, 24, 16, 20, 3, 3, 3, 0, 0), (1, 48, 13, 26, 2, 3, 3, 1, 0)]


@pytest.mark.parametrize("tile", sorted({mm.TILE_NAMES[mm.TILE], "avx2", "portable"}))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_from_the_maxima_against_the_reference(rng, tile, dtype, threads):
    """A later convolution's backward through the 2x2 max pooling after it (conv2d.maxima: dx, dw
    and db from the pooled gradient and the maxima alone) is the reference's gradients of the
    full-size gradient the pooling's backward would write; with a ReLU between the two (only where
    the maximum was positive) and one before the convolution (dx where x > 0); without dx the same
    dw; the same bits twice. Scratch full of NaN, as a planned step may leave it."""
    from types import SimpleNamespace

    from nbcnn.kernels.conv2d import maxima
    from nbcnn.kernels.pool2d import maxpool2d_forward_core_cpu

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    t = mm.tile_index(tile)
    for N, C, H, W, K, FH, FW, ph, pw in MAXIMA:
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        w = rng.standard_normal((K, C, FH, FW)).astype(dtype)
        y_shape = (N, K, H + 2 * ph - FH + 1, W + 2 * pw - FW + 1)
        shapes = maxima.conv2d_maxima_backward_workspace_cpu(x.shape, w.shape, y_shape, (1, 1), (ph, pw), True, dtype)
        ws = SimpleNamespace(**{name: np.full(shape, np.nan, dtype) for name, shape in shapes.items()})
        for relu in (False, True):
            y = ref.conv2d(x, w, np.zeros(K), pad=(ph, pw)).astype(dtype)
            y = np.maximum(y, 0) if relu else y
            OH, OW = y.shape[2:]
            yp, argmax = np.empty((N, K, OH // 2, OW // 2), dtype), np.empty((N, K, OH // 2, OW // 2), np.int32)
            maxpool2d_forward_core_cpu(yp, argmax, y, *maxima.POOL)
            dyp = rng.standard_normal(yp.shape).astype(dtype)
            full = np.zeros((N, K, OH * OW), dtype)  # the pooling's backward: dyp at the maxima
            np.put_along_axis(full, argmax.reshape(N, K, -1), (dyp * (yp > 0) if relu else dyp).reshape(N, K, -1), 2)
            want_dx, want_dw, want_db = ref.conv2d_grads(full.reshape(N, K, OH, OW), x, w, pad=(ph, pw))
            mask = relu  # a ReLU before the convolution too
            want_dx = want_dx * (x > 0) if mask else want_dx
            dx, dw = np.full(x.shape, np.nan, dtype), np.full(w.shape, np.nan, dtype)
            db = np.full(K, np.nan, dtype) if relu else None  # None: a layer without bias
            maxima.conv2d_maxima_backward_core_cpu(dx, dw, db, dyp, argmax, yp, x, w, 1, 1, ph, pw, relu, mask, ws, t)
            np.testing.assert_allclose(dx, want_dx, **tol)
            np.testing.assert_allclose(dw, want_dw, **tol)
            if db is not None:
                np.testing.assert_allclose(db, want_db, **tol)
            dw2 = np.full(w.shape, np.nan, dtype)
            maxima.conv2d_maxima_backward_core_cpu(None, dw2, db, dyp, argmax, yp, x, w, 1, 1, ph, pw, relu, mask, ws,
                                                   t)
            np.testing.assert_array_equal(dw2, dw)
            dx2 = np.full(x.shape, np.nan, dtype)
            maxima.conv2d_maxima_backward_core_cpu(dx2, dw2, db, dyp, argmax, yp, x, w, 1, 1, ph, pw, relu, mask, ws,
                                                   t)
            np.testing.assert_array_equal(dx2, dx)
            np.testing.assert_array_equal(dw2, dw)
