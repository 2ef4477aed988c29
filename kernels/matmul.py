"""The CPU matrix product every fast CPU kernel is built on: C = A B in a register tile.

It is the CPU twin of ``_tiles.py``'s CUDA tile, the same idea at a different scale. There, a
thread keeps a SUB_M x SUB_N = 4 x 8 piece of C in registers and, for each step of k, reads 4
values of A and 8 of B from shared memory to do 32 multiply-adds. Here a core keeps an
MR x NR piece of C in its vector registers (8 x 32 floats with AVX-512: 16 registers of 16
lanes) and, for each step of k, reads one vector row of B (NR values, 2 loads) and broadcasts
MR values of A (8 loads) to do MR x NR / 16 = 16 vector FMAs:

    for p in range(kc):                          acc[i][j]: NR/V vectors of V lanes per row i
        b_j = B[p, j*V:(j+1)*V]          (NR/V vector loads)
        for i in range(MR):
            a = broadcast(A[i, p])       (one load, copied to every lane)
            for j in range(NR // V):
                acc[i][j] = fma(a, b_j, acc[i][j])

The multiply-adds of one step do not depend on each other, and an FMA's result is needed
again only MR x NR/V instructions later: enough to keep both FMA pipes of a core busy through
their 4-cycle latency (8 independent FMAs in flight; the tile has 16).

Where shared memory holds the CUDA tile's operands, packed panels hold the CPU's: before the
products, the part of A that a block of work reads is copied into slivers of MR rows stored
k-major (``a_pack[p*MR + i]``) and B into slivers of NR columns (``b_pack[p*NR + j]``), so
that the micro-kernel reads both with unit stride, whatever A's and B's layouts were
(transposed, or gathered from a convolution's input). Slivers are padded with zeros to full
MR and NR: the micro-kernel always computes a whole tile, and only what lands inside C is
kept. Blocking from the cache sizes (BLIS's loop order): a KC x NR sliver of B (32 KB for
KC = 256, NR = 32) stays in the 48 KB L1 while the micro-kernel runs down a column of A's
slivers, which come from L2.

Where an operand already lies in memory as rows of unit stride, the micro-kernel reads it in
place instead: A's rows at arbitrary offsets (``microkernel_rows``: Winograd's weight gradient),
B's rows at offsets from a table (``microkernel_gather``: a convolution's patches, tap by tap,
in the padded input), A's values through a table of rows and a table of steps
(``microkernel_indirect``: the same patches with the output pixels as the tile's rows), or C's
rows at offsets, added into (``microkernel_scatter``, ``microkernel_fold``: the same patches'
gradient, added back along the taps). One code generator serves them all (``_tile_codegen``,
given where A's values and B's and C's rows are). Beside the tile, the same vectors walk a max
pooling's maxima (``window_gradients``, ``maxima_gradients``, ``maxima_scatter``): a
convolution's gradients from the pooled gradient alone, where the dense one is three quarters
zeros.

Plain Numba loops with an accumulator array do not get there (5-7 GFLOP/s measured: the
accumulators go through memory), so the micro-kernel is written in LLVM IR through
``numba.extending.intrinsic``, with LLVM's generic vector type ``<V x float>`` and the
``llvm.fma`` intrinsic: every target has them (a vector wider than the hardware's is split
into several registers). The tile is chosen from the CPU's features (``host_tile``):

    avx512     8 x 32, 16 lanes   16 accumulators of 32 zmm registers
    avx2       6 x 16,  8 lanes   12 accumulators of 16 ymm registers
    neon       8 x 12,  4 lanes   24 accumulators of 32 q registers (ARM)
    portable   4 x  8,  4 lanes    8 accumulators: fits any 16-register vector unit

Every function here takes the tile as its first argument, an integer that Numba compiles as a
constant (``numba.literally``), so each tile gets code of its own and any of them can run on
this machine (the tests force each one). float64 arrays use the same tiles with half the lanes
per register (twice the registers: correct everywhere, fast only in float32).
"""

import os
from types import SimpleNamespace

import llvmlite
import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

# (MR, NR, V): rows and columns of the register tile, float32 lanes of the vectors its columns use
TILES = {"avx512": (8, 32, 16), "avx2": (6, 16, 8), "neon": (8, 12, 4), "portable": (4, 8, 4)}
TILE_NAMES = tuple(TILES)
_MR = np.array([TILES[t][0] for t in TILE_NAMES], np.int64)
_NR = np.array([TILES[t][1] for t in TILE_NAMES], np.int64)
_V = np.array([TILES[t][2] for t in TILE_NAMES], np.int64)
MAX_MR, MAX_NR, MAX_V = int(_MR.max()), int(_NR.max()), int(_V.max())
# the width of a half tile (``microkernel_gather``'s ``half``): NR/2 where that is whole vectors, NR otherwise
HALF_NR = np.array([nr // 2 if (nr // 2) % v == 0 else nr for _, nr, v in TILES.values()], np.int64)
assert MAX_MR == 8  # multiply_rows passes eight row offsets to the micro-kernel
KC = 256  # depth of the packed slivers: a KC x NR sliver of B stays in L1 (32 KB at NR = 32)


def host_tile():
    """Name of the tile for this CPU: from the features LLVM reports for the host (``NBCNN_TILE``
    in the environment overrides it)."""
    forced = os.environ.get("NBCNN_TILE")
    if forced:
        if forced not in TILES:
            raise ValueError(f"NBCNN_TILE must be one of {', '.join(TILES)}, got {forced!r}")
        return forced
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    has = lambda name: features.get(name, False)  # noqa: E731
    if has("avx512f"):
        return "avx512"
    if has("avx2") and has("fma"):
        return "avx2"
    if has("neon") or llvm.get_process_triple().startswith(("aarch64", "arm64")):
        return "neon"
    return "portable"


TILE = TILE_NAMES.index(host_tile())  # the tile the kernels use: an index into TILE_NAMES


def tile_index(tile):
    """The integer for a tile name (or None: this CPU's)."""
    if tile is None:
        return TILE
    if tile not in TILES:
        raise ValueError(f"tile must be one of {', '.join(TILES)}, got {tile!r}")
    return TILE_NAMES.index(tile)


# ----------------------------------------------------------------------------- LLVM pieces


def _literal_tile(tile):
    if not isinstance(tile, types.IntegerLiteral):
        raise errors.RequireLiteralValue("the tile must be a compile-time constant")
    return TILES[TILE_NAMES[tile.literal_value]]


def _element_pointer(context, builder, ty, array, index):
    """Pointer to element ``index`` (a flat offset) of the array ``array`` of Numba type ``ty``."""
    data = context.make_array(ty)(context, builder, array).data
    return builder.gep(data, [index])


def _vector(ty, lanes32):
    """LLVM scalar and vector types for the array's dtype: V float32 lanes, V/2 float64 lanes."""
    if ty.dtype == types.float32:
        return ir.FloatType(), lanes32
    return ir.DoubleType(), max(1, lanes32 // 2)


def _fma(builder, vec):
    name = f"llvm.fma.v{vec.count}{'f32' if isinstance(vec.element, ir.FloatType) else 'f64'}"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), name)


def _splat(builder, vec, scalar):
    """A vector with ``scalar`` in every lane (a broadcast)."""
    undef = ir.Constant(vec, ir.Undefined)
    first = builder.insert_element(undef, scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(ir.IntType(32), vec.count), [0] * vec.count))


_OPAQUE = llvm.llvm_version_info[0] >= 15 and getattr(llvmlite, "opaque_pointers_enabled", True)


def _masked(builder, what, vec):
    """LLVM's ``llvm.masked.load`` or ``llvm.masked.store`` for vectors of type ``vec`` (floats or integers)."""
    mask = ir.VectorType(ir.IntType(1), vec.count)
    ptr = vec.as_pointer()
    element = {ir.FloatType: "f32", ir.DoubleType: "f64"}.get(type(vec.element)) or f"i{vec.element.width}"
    name = f"llvm.masked.{what}.v{vec.count}{element}.p0" + ("" if _OPAQUE else f"v{vec.count}{element}")
    if what == "load":
        fn_type = ir.FunctionType(vec, [ptr, ir.IntType(32), mask, vec])
    else:
        fn_type = ir.FunctionType(ir.VoidType(), [vec, ptr, ir.IntType(32), mask])
    return cgutils.get_or_insert_function(builder.module, fn_type, name)


def _store_lanes(builder, value, to, count):
    """Store the lanes l < count (an int64) of ``value`` at ``to``: a plain vector store where
    count covers every lane, ``llvm.masked.store`` only for a short run (AVX2's masked store,
    vmaskmovps, is microcoded on AMD's Zen 1 to 3: a dozen cycles, where a store takes one)."""
    _store_all(builder, [(value, to)], count)


def _store_all(builder, stores, count):
    """``_store_lanes`` for several (value, pointer) pairs of one vector type and the same count,
    behind one branch."""
    vtype = stores[0][0].type
    full = builder.icmp_signed(">=", count, ir.Constant(count.type, vtype.count))
    with builder.if_else(full, likely=True) as (whole, part):
        with whole:
            for value, to in stores:
                builder.store(value, to, align=4)
        with part:
            masked, lanes = _masked(builder, "store", vtype), _lanes_below(builder, count, vtype.count)
            for value, to in stores:
                builder.call(masked, [value, to, ir.Constant(ir.IntType(32), 4), lanes])


def _load_lanes(builder, where, count):
    """The lanes l < count (an int64) of the vector at ``where`` (a pointer to a vector type),
    zeros past them: a plain load where count covers every lane, ``llvm.masked.load`` (which reads
    nothing past count) only for a short run."""
    vtype = where.type.pointee
    lanes = vtype.count
    zeros = ir.Constant(vtype, [0] * lanes if isinstance(vtype.element, ir.IntType) else [0.0] * lanes)
    full = builder.icmp_signed(">=", count, ir.Constant(count.type, lanes))
    with builder.if_else(full, likely=True) as (whole, part):
        with whole:
            plain = builder.load(where, align=4)
            came_whole = builder.block
        with part:
            masked = builder.call(_masked(builder, "load", vtype),
                                  [where, ir.Constant(ir.IntType(32), 4), _lanes_below(builder, count, lanes), zeros])
            came_part = builder.block
    value = builder.phi(vtype)
    value.add_incoming(plain, came_whole)
    value.add_incoming(masked, came_part)
    return value


def _lanes_below(builder, count, lanes):
    """The mask of the lanes l < count (an int64)."""
    i64 = ir.IntType(64)
    index = ir.Constant(ir.VectorType(i64, lanes), list(range(lanes)))
    return builder.icmp_signed("<", index, _splat(builder, ir.VectorType(i64, lanes), count))


def _pick(builder, vec, first):
    """The even (``first`` 0) or odd (1) lanes of ``vec``."""
    lanes = vec.type.count // 2
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                                                        [2 * i + first for i in range(lanes)]))


def _tile_codegen(MR, NR, V32, a_type, a_pointer, b_pointer, c_pointer):
    """The micro-kernel's code for any way of finding its operands: ``a_pointer(builder, i, p)``
    gives the address of A[i, p] (row i of the tile, step p), ``b_pointer(builder, p)`` that of
    B's row p (NR adjacent values), ``c_pointer(builder, i)`` that of C's row i of the tile."""

    def emit(builder, kc_, accumulate_):
        i64 = ir.IntType(64)
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        scalar, V = _vector(a_type, V32)
        vec, vptr = ir.VectorType(scalar, V), ir.VectorType(scalar, V).as_pointer()
        NJ = NR // V
        fma = _fma(builder, vec)
        zero = ir.Constant(vec, [0.0] * V)
        # C's rows asked for now, so that storing the tile at the end finds them in L1 rather
        # than holding up the next tile's steps while they come from memory
        c_rows = [c_pointer(builder, i) for i in range(MR)]
        _prefetch_rows(builder, c_rows, NR, 4 if isinstance(scalar, ir.FloatType) else 8)
        entry = builder.block
        loop = builder.append_basic_block("tile.k")
        done = builder.append_basic_block("tile.store")
        builder.cbranch(builder.icmp_signed(">", kc_, const(0)), loop, done)

        # the loop over k: MR x NJ accumulators carried as phi nodes, so they live in registers
        builder.position_at_end(loop)
        p = builder.phi(i64)
        p.add_incoming(const(0), entry)
        acc = [builder.phi(vec) for _ in range(MR * NJ)]
        for v in acc:
            v.add_incoming(zero, entry)
        b_row = b_pointer(builder, p)
        b_vec = [builder.load(builder.bitcast(builder.gep(b_row, [const(j * V)]), vptr), align=4) for j in range(NJ)]
        new = []
        for i in range(MR):
            a_i = _splat(builder, vec, builder.load(a_pointer(builder, i, p)))
            new.extend(builder.call(fma, [a_i, b_vec[j], acc[i * NJ + j]]) for j in range(NJ))
        p_next = builder.add(p, const(1))
        p.add_incoming(p_next, loop)
        for v, n in zip(acc, new):
            v.add_incoming(n, loop)
        builder.cbranch(builder.icmp_signed("<", p_next, kc_), loop, done)

        # store the tile, added to what C held with accumulate
        builder.position_at_end(done)
        totals = [builder.phi(vec) for _ in range(MR * NJ)]  # phi nodes first in their block
        for total, n in zip(totals, new):
            total.add_incoming(zero, entry)
            total.add_incoming(n, loop)
        where = [builder.bitcast(builder.gep(c_rows[i], [const(j * V)]), vptr) for i in range(MR) for j in range(NJ)]
        with builder.if_else(accumulate_) as (add, overwrite):  # C read only when added to
            with add:
                for to, total in zip(where, totals):
                    builder.store(builder.fadd(builder.load(to, align=4), total), to, align=4)
            with overwrite:
                for to, total in zip(where, totals):
                    builder.store(total, to, align=4)

    return emit


def _prefetch_rows(builder, rows, NR, itemsize):
    """``llvm.prefetch`` (for writing, into L1) of the NR values from each pointer in ``rows``: a
    value every 64 bytes and the last, so every cache line the row touches, however it lies."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    name = "llvm.prefetch.p0" if _OPAQUE else "llvm.prefetch.p0i8"
    prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                              name)
    for row in rows:
        for at in sorted(set(range(0, NR, 64 // itemsize)) | {NR - 1}):
            where = builder.bitcast(builder.gep(row, [ir.Constant(ir.IntType(64), at)]), i8p)
            builder.call(prefetch, [where, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _packed_a(context, builder, a_type, a_, ai_, MR):
    """A's packed sliver from flat offset ai: A[i, p] at p*MR + i."""
    i64 = ir.IntType(64)
    ap = _element_pointer(context, builder, a_type, a_, ai_)
    return lambda builder, i, p: builder.gep(ap, [builder.add(builder.mul(p, ir.Constant(i64, MR)),
                                                              ir.Constant(i64, i))])


def _strided(context, builder, ty, array, index, stride):
    """Row r (a Python int or an int64 value) of a matrix whose rows are ``stride`` values apart,
    from flat offset ``index``."""
    base = _element_pointer(context, builder, ty, array, index)

    def row(builder, r):
        if isinstance(r, int):
            r = ir.Constant(ir.IntType(64), r)
        return builder.gep(base, [builder.mul(r, stride)])

    return row


@intrinsic(prefer_literal=True)
def microkernel(typingctx, tile, kc, a, ai, b, bi, c, ci, ldc, accumulate):
    """C[i, j] (+)= sum over p < kc of A[p*MR + i] B[p*NR + j] for the whole MR x NR tile.

    ``a`` from flat offset ``ai`` holds the packed sliver of A, ``b`` from ``bi`` that of B; C's
    tile starts at flat offset ``ci`` of ``c`` with rows ``ldc`` elements apart. With
    ``accumulate`` the tile is added to C, otherwise it overwrites it. All three arrays have one
    dtype (float32 or float64); nothing is bounds-checked: the caller's packing makes it right.
    """
    MR, NR, V32 = _literal_tile(tile)
    sig = types.void(tile, kc, a, ai, b, bi, c, ci, ldc, accumulate)

    def codegen(context, builder, signature, args):
        _, kc_, a_, ai_, b_, bi_, c_, ci_, ldc_, accumulate_ = args
        ty = signature.args
        emit = _tile_codegen(MR, NR, V32, ty[2], _packed_a(context, builder, ty[2], a_, ai_, MR),
                             _strided(context, builder, ty[4], b_, bi_, ir.Constant(ir.IntType(64), NR)),
                             _strided(context, builder, ty[6], c_, ci_, ldc_))
        emit(builder, kc_, accumulate_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def microkernel_rows(typingctx, tile, kc, a, ai, starts, b, bi, c, ci, ldc, accumulate):
    """The micro-kernel with A read in place: row i of the tile is the run ``a[ai + starts[i]:]``
    (``starts`` a tuple of at least MR offsets), no packing. For products whose A is a set of
    rows of one array at arbitrary offsets, such as a convolution's patches taken tap by tap,
    where a packed sliver would have to be gathered one value at a time. Each row is read with
    unit stride, so MR streams run from L1 side by side."""
    MR, NR, V32 = _literal_tile(tile)
    sig = types.void(tile, kc, a, ai, starts, b, bi, c, ci, ldc, accumulate)

    def codegen(context, builder, signature, args):
        _, kc_, a_, ai_, starts_, b_, bi_, c_, ci_, ldc_, accumulate_ = args
        ty = signature.args
        rows = [_element_pointer(context, builder, ty[2], a_, builder.add(ai_, builder.extract_value(starts_, i)))
                for i in range(MR)]
        emit = _tile_codegen(MR, NR, V32, ty[2], lambda builder, i, p: builder.gep(rows[i], [p]),
                             _strided(context, builder, ty[5], b_, bi_, ir.Constant(ir.IntType(64), NR)),
                             _strided(context, builder, ty[7], c_, ci_, ldc_))
        emit(builder, kc_, accumulate_)
        return context.get_dummy_value()

    return sig, codegen


def _literal_width(tile, half):
    """The tile's MR, NR, V with NR halved where ``half`` (a literal bool) says so and NR/2 is
    still whole vectors (``HALF_NR``)."""
    MR, NR, V32 = _literal_tile(tile)
    if not isinstance(half, types.BooleanLiteral):
        raise errors.RequireLiteralValue("half must be a compile-time constant")
    return MR, (HALF_NR[tile.literal_value] if half.literal_value else NR), V32


@intrinsic(prefer_literal=True)
def microkernel_gather(typingctx, tile, half, kc, a, ai, b, bi, offsets, oi, c, ci, ldc, accumulate):
    """The micro-kernel with B read in place: B's row p is the run ``b[bi + offsets[oi + p]:]``
    (``offsets`` int64), so nothing is packed. A convolution's patches for NR adjacent output
    columns are, tap by tap, NR adjacent values of the padded input: B's rows are the input at
    the taps' offsets. ``half`` (a literal): the tile's left half only (``HALF_NR`` columns), for
    a last sliver that would be mostly beyond the plane. A packed and C as in ``microkernel``."""
    MR, NR, V32 = _literal_width(tile, half)
    sig = types.void(tile, half, kc, a, ai, b, bi, offsets, oi, c, ci, ldc, accumulate)

    def codegen(context, builder, signature, args):
        _, _, kc_, a_, ai_, b_, bi_, offsets_, oi_, c_, ci_, ldc_, accumulate_ = args
        ty = signature.args
        base = _element_pointer(context, builder, ty[5], b_, bi_)
        offs = _element_pointer(context, builder, ty[7], offsets_, oi_)

        def b_pointer(builder, p):
            return builder.gep(base, [builder.load(builder.gep(offs, [p]))])

        emit = _tile_codegen(MR, NR, V32, ty[3], _packed_a(context, builder, ty[3], a_, ai_, MR), b_pointer,
                             _strided(context, builder, ty[9], c_, ci_, ldc_))
        emit(builder, kc_, accumulate_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def microkernel_scatter(typingctx, tile, half, kc, a, ai, b, bi, ldb, c, ci, starts):
    """The micro-kernel adding its tile into C's rows in place: row i of the tile is added to the
    run ``c[ci + starts[i]:]`` (``starts`` a tuple of at least MR offsets). B's row p is
    ``b[bi + p*ldb:]`` (a matrix read in place, rows ``ldb`` apart); A packed as in
    ``microkernel``; ``half`` as in ``microkernel_gather``. The transpose of the gather: a sliver of
    w^T @ dy added back along the taps into the padded input gradient, with no matrix of it stored
    in between. Rows may overlap: each is read, added and stored in turn."""
    MR, NR, V32 = _literal_width(tile, half)
    sig = types.void(tile, half, kc, a, ai, b, bi, ldb, c, ci, starts)

    def codegen(context, builder, signature, args):
        _, _, kc_, a_, ai_, b_, bi_, ldb_, c_, ci_, starts_ = args
        ty = signature.args
        rows = [_element_pointer(context, builder, ty[8], c_, builder.add(ci_, builder.extract_value(starts_, i)))
                for i in range(MR)]
        emit = _tile_codegen(MR, NR, V32, ty[3], _packed_a(context, builder, ty[3], a_, ai_, MR),
                             _strided(context, builder, ty[5], b_, bi_, ldb_), lambda builder, i: rows[i])
        emit(builder, kc_, ir.Constant(ir.IntType(1), 1))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def microkernel_fold(typingctx, tile, half, kc, a, ai, b, bi, offsets, oi, c, ci, starts):
    """The micro-kernel with B read in place as ``microkernel_gather`` reads it (row p at
    ``b[bi + offsets[oi + p]:]``) and its tile added into C's rows in place as
    ``microkernel_scatter`` adds it (row i at ``c[ci + starts[i]:]``). An input gradient with the
    filter's columns in the depth: B's rows are the gradient planes shifted by each column, the
    tile's rows the filter's rows, each added a padded row further down."""
    MR, NR, V32 = _literal_width(tile, half)
    sig = types.void(tile, half, kc, a, ai, b, bi, offsets, oi, c, ci, starts)

    def codegen(context, builder, signature, args):
        _, _, kc_, a_, ai_, b_, bi_, offsets_, oi_, c_, ci_, starts_ = args
        ty = signature.args
        base = _element_pointer(context, builder, ty[5], b_, bi_)
        offs = _element_pointer(context, builder, ty[7], offsets_, oi_)
        rows = [_element_pointer(context, builder, ty[9], c_, builder.add(ci_, builder.extract_value(starts_, i)))
                for i in range(MR)]
        emit = _tile_codegen(MR, NR, V32, ty[3], _packed_a(context, builder, ty[3], a_, ai_, MR),
                             lambda builder, p: builder.gep(base, [builder.load(builder.gep(offs, [p]))]),
                             lambda builder, i: rows[i])
        emit(builder, kc_, ir.Constant(ir.IntType(1), 1))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def microkernel_indirect(typingctx, tile, half, kc, a, starts, offsets, oi, b, bi, c, ci, ldc, accumulate):
    """The micro-kernel with A read in place through two tables: A[i, p] is
    ``a[starts[i] + offsets[oi + p]]`` (``starts`` a tuple of at least MR offsets, ``offsets``
    int64), so neither A nor a copy of it is packed. A convolution's patches with the output
    pixels as the tile's rows: row i starts at pixel i's window in the padded input and step p
    moves to tap p of every window at once (the same offset for all rows), so any MR pixels make
    a tile, however the rows of the image break them up; or, the other way round, the taps as the
    rows and the pixels as the depth (a weight gradient). B packed as in ``microkernel``, C as
    there; ``half`` as in ``microkernel_gather``."""
    MR, NR, V32 = _literal_width(tile, half)
    sig = types.void(tile, half, kc, a, starts, offsets, oi, b, bi, c, ci, ldc, accumulate)

    def codegen(context, builder, signature, args):
        _, _, kc_, a_, starts_, offsets_, oi_, b_, bi_, c_, ci_, ldc_, accumulate_ = args
        ty = signature.args
        rows = [_element_pointer(context, builder, ty[3], a_, builder.extract_value(starts_, i)) for i in range(MR)]
        offs = _element_pointer(context, builder, ty[5], offsets_, oi_)
        NR_full = _literal_tile(tile)[1]

        def a_pointer(builder, i, p):
            return builder.gep(rows[i], [builder.load(builder.gep(offs, [p]))])

        emit = _tile_codegen(MR, NR, V32, ty[3], a_pointer,
                             _strided(context, builder, ty[7], b_, bi_, ir.Constant(ir.IntType(64), NR_full)),
                             _strided(context, builder, ty[9], c_, ci_, ldc_))
        emit(builder, kc_, accumulate_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def store_run(typingctx, tile, dst, di, src, si, count, bias, relu, keep, masked):
    """dst[di + l] = src[si + l] + bias for l < count (at most the tile's V lanes), max(., 0) with
    ``relu``, zero where keep[di + l] is not > 0 with ``masked`` (``keep`` laid out as ``dst``; read
    only then). One vector load and store a run (masked where the run is short), so a short row
    (an output row of a small image) is one vector, not a scalar loop."""
    V32 = _literal_tile(tile)[2]
    sig = types.void(tile, dst, di, src, si, count, bias, relu, keep, masked)

    def codegen(context, builder, signature, args):
        _, dst_, di_, src_, si_, count_, bias_, relu_, keep_, masked_ = args
        scalar, V = _vector(signature.args[1], V32)
        vec = ir.VectorType(scalar, V)
        zeros = ir.Constant(vec, [0.0] * V)
        frm = _element_pointer(context, builder, signature.args[3], src_, si_)
        to = _element_pointer(context, builder, signature.args[1], dst_, di_)
        gate = _element_pointer(context, builder, signature.args[8], keep_, di_)
        value = builder.fadd(_load_lanes(builder, builder.bitcast(frm, vec.as_pointer()), count_),
                             _splat(builder, vec, bias_))
        value = builder.select(relu_, builder.select(builder.fcmp_ordered("<", value, zeros), zeros, value), value)
        gated = builder.select(masked_, count_, ir.Constant(count_.type, 0))  # keep is read only with masked
        kept = _load_lanes(builder, builder.bitcast(gate, vec.as_pointer()), gated)
        value = builder.select(masked_, builder.select(builder.fcmp_ordered(">", kept, zeros), value, zeros), value)
        _store_lanes(builder, value, builder.bitcast(to, vec.as_pointer()), count_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def unpool_rows(typingctx, tile, g, gi, WP, dy, di, argmax, first, OW, keep, masked, keep_full, pooled, count):
    """The gradient of a 2x2, stride-2 max pooling, two rows of it at once, dense: for the chunk of
    ``pooled`` (at most V/2) adjacent pooled outputs from dy[di] whose windows start at conv
    column j0 of conv rows 2i and 2i + 1, g[gi + j] (row 2i) and g[gi + WP + j] (row 2i + 1) for
    j < ``count`` (at most V) get dy's value where argmax[di + j // 2] (flat in rows of OW)
    is that position, zero elsewhere; ``first`` is the flat position of (2i, j0). With ``masked``,
    zero too where keep[di + j // 2] (the pooled output, laid out as dy) is not > 0, or with
    ``keep_full`` (a literal) where keep[gi + j] and keep[gi + WP + j] (the pooling's input, laid
    out as g) are not. Each window's value is read once and spread over two lanes by a shuffle:
    no scatter, no zeroing pass."""
    V32 = _literal_tile(tile)[2]
    if not isinstance(keep_full, types.BooleanLiteral):
        raise errors.RequireLiteralValue("keep_full must be a compile-time constant")
    sig = types.void(tile, g, gi, WP, dy, di, argmax, first, OW, keep, masked, keep_full, pooled, count)

    def codegen(context, builder, signature, args):
        _, g_, gi_, WP_, dy_, di_, argmax_, first_, OW_, keep_, masked_, _, pooled_, count_ = args
        ty = signature.args
        scalar, V = _vector(ty[1], V32)
        H = V // 2
        vec, half = ir.VectorType(scalar, V), ir.VectorType(scalar, H)
        ity = context.get_value_type(ty[6].dtype)
        ivec = ir.VectorType(ity, H)

        def load(ty_, array, index, vtype, count):
            where = builder.bitcast(_element_pointer(context, builder, ty_, array, index), vtype.as_pointer())
            return _load_lanes(builder, where, count)

        spread = ir.Constant(ir.VectorType(ir.IntType(32), V), [j // 2 for j in range(V)])
        twice = lambda v: builder.shuffle_vector(v, v, spread)  # noqa: E731
        values = twice(load(ty[4], dy_, di_, half, pooled_))
        where = twice(load(ty[6], argmax_, di_, ivec, pooled_))  # positions compared in argmax's own integers
        zeros = ir.Constant(vec, [0.0] * V)
        unmasked = _splat(builder, ir.VectorType(ir.IntType(1), V), builder.not_(masked_))
        if keep_full.literal_value:  # the input's own values, lane by lane
            gated = builder.select(masked_, count_, ir.Constant(count_.type, 0))  # keep is read only with masked
            kept = [builder.or_(builder.fcmp_ordered(">", load(ty[9], keep_, at, vec, gated), zeros), unmasked)
                    for at in (gi_, builder.add(gi_, WP_))]
        else:  # the pooled output, one value for both lanes of a window and both rows
            gated = builder.select(masked_, pooled_, ir.Constant(pooled_.type, 0))
            kept = builder.fcmp_ordered(">", twice(load(ty[9], keep_, di_, half, gated)), zeros)
            kept = [builder.or_(kept, unmasked)] * 2
        iota = ir.Constant(ir.VectorType(ity, V), list(range(V)))
        narrow = (lambda v: builder.trunc(v, ity)) if ity.width < 64 else (lambda v: v)  # noqa: E731
        top = builder.add(_splat(builder, ir.VectorType(ity, V), narrow(first_)), iota)
        bottom = builder.add(top, _splat(builder, ir.VectorType(ity, V), narrow(OW_)))
        stores = []
        for position, offset, keep_row in ((top, gi_, kept[0]), (bottom, builder.add(gi_, WP_), kept[1])):
            hit = builder.and_(builder.icmp_signed("==", where, position), keep_row)
            to = builder.bitcast(_element_pointer(context, builder, ty[1], g_, offset), vec.as_pointer())
            stores.append((builder.select(hit, values, zeros), to))
        _store_all(builder, stores, count_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def pool_rows(typingctx, tile, y, yi, argmax, x, xi, W, first, OW, count):
    """A 2x2, stride-2 max pooling of two rows at once: for the ``count`` (at most V/2) adjacent
    windows whose top-left values are x[xi + 2l] (row below: W values on), y[yi + l] = the window's
    maximum and argmax[yi + l] = where it is, flat in rows of OW from ``first`` (the top-left of
    window 0). The rule of ``pool2d._maxpool2d_forward_cpu`` lane by lane: the first of equal values wins,
    and a NaN wins, the first NaN. The even and odd columns are taken apart by shuffles."""
    V32 = _literal_tile(tile)[2]
    sig = types.void(tile, y, yi, argmax, x, xi, W, first, OW, count)

    def codegen(context, builder, signature, args):
        _, y_, yi_, argmax_, x_, xi_, W_, first_, OW_, count_ = args
        ty = signature.args
        i64 = ir.IntType(64)
        scalar, V = _vector(ty[1], V32)
        H = V // 2
        vec = ir.VectorType(scalar, V)
        ity = context.get_value_type(ty[3].dtype)
        both = builder.mul(count_, ir.Constant(i64, 2))

        def row(offset):
            return _load_lanes(builder, builder.bitcast(_element_pointer(context, builder, ty[4], x_, offset),
                                                        vec.as_pointer()), both)

        top, bottom = row(xi_), row(builder.add(xi_, W_))
        wide = ir.VectorType(ity, H)  # positions in argmax's own integers
        narrow = (lambda v: builder.trunc(v, ity)) if ity.width < 64 else (lambda v: v)  # noqa: E731
        left = builder.add(_splat(builder, wide, narrow(first_)), ir.Constant(wide, [2 * l for l in range(H)]))
        below = builder.add(left, _splat(builder, wide, narrow(OW_)))
        one = ir.Constant(wide, [1] * H)
        best, where = _pick(builder, top, 0), left
        for value, position in ((_pick(builder, top, 1), builder.add(left, one)), (_pick(builder, bottom, 0), below),
                                (_pick(builder, bottom, 1), builder.add(below, one))):
            larger = builder.fcmp_ordered(">", value, best)
            nan_over_number = builder.and_(builder.fcmp_unordered("uno", value, value),
                                           builder.fcmp_ordered("ord", best, best))
            take = builder.or_(larger, nan_over_number)
            best = builder.select(take, value, best)
            where = builder.select(take, position, where)
        for array, index, value in ((y_, 1, best), (argmax_, 3, where)):
            to = builder.bitcast(_element_pointer(context, builder, ty[index], array, yi_), value.type.as_pointer())
            _store_lanes(builder, value, to, count_)
        return context.get_dummy_value()

    return sig, codegen


def _passed(builder, g, keep, masked):
    """The gradient g a pooled output passed back: 0 where, with ``masked`` (an i1), keep (the
    pooled output, the ReLU before the pooling) is not > 0."""
    zero = ir.Constant(g.type, 0.0)
    return builder.select(builder.or_(builder.not_(masked), builder.fcmp_ordered(">", keep, zero)), g, zero)


def _walk_maxima(builder, total, PW, OW, XW, CS, carried, body, name, start=None):
    """Emit, from the builder's block, the loop over the pooled outputs p < ``total`` (rows of PW)
    of a 2x2, stride-2 max pooling whose windows lie in conv rows of OW, the first window's corner
    at flat conv position ``start`` (an i64; None: 0, the plane's first row), with the values
    ``carried`` (vectors in registers) through it. ``body(p, pixel, values)`` emits one output's
    work and returns the new values; ``pixel(a)``, for a maximum's position a (an i64 flat in the
    conv's rows of OW), gives the flat offset of its pixel in an input of rows XW values long, CS
    values a pixel (the window's corner, 0 or 1 column right, then a row below). Returns the
    values after the loop, the builder at its end."""
    i64 = ir.IntType(64)
    const = lambda v: ir.Constant(i64, v)  # noqa: E731
    row_skip = builder.sub(OW, PW)  # conv columns from past a pooled row's last window to the next row's first
    x_skip = builder.sub(XW, builder.mul(PW, CS))  # the same in the input
    entry = builder.block
    loop = builder.append_basic_block(f"{name}.p")
    after = builder.append_basic_block(f"{name}.end")
    builder.cbranch(builder.icmp_signed(">", total, const(0)), loop, after)

    builder.position_at_end(loop)
    p, j = builder.phi(i64), builder.phi(i64)  # pooled output p, its column j
    corner, x_corner = builder.phi(i64), builder.phi(i64)  # its window's top-left: flat conv, in the input
    for phi in (p, j, x_corner):
        phi.add_incoming(const(0), entry)
    corner.add_incoming(const(0) if start is None else start, entry)
    values = [builder.phi(v.type) for v in carried]
    for phi, v in zip(values, carried):
        phi.add_incoming(v, entry)

    def pixel(a):
        off = builder.sub(a, corner)  # 0, 1, OW or OW + 1
        lower = builder.icmp_signed(">=", off, OW)
        column = builder.mul(builder.select(lower, builder.sub(off, OW), off), CS)
        return builder.add(x_corner, builder.add(column, builder.select(lower, XW, const(0))))

    new = body(p, pixel, values)
    latch = builder.block
    p_next, j_next = builder.add(p, const(1)), builder.add(j, const(1))
    wrap = builder.icmp_signed(">=", j_next, PW)
    step = lambda one, skip: builder.add(builder.add(one, one), builder.select(  # noqa: E731
        wrap, builder.add(skip, skip), const(0)))
    corner.add_incoming(builder.add(corner, step(const(1), row_skip)), latch)
    x_corner.add_incoming(builder.add(x_corner, step(CS, x_skip)), latch)
    j.add_incoming(builder.select(wrap, const(0), j_next), latch)
    p.add_incoming(p_next, latch)
    for phi, v in zip(values, new):
        phi.add_incoming(v, latch)
    builder.cbranch(builder.icmp_signed("<", p_next, total), loop, after)

    builder.position_at_end(after)
    finals = [builder.phi(v.type) for v in carried]
    for final, v, n in zip(finals, carried, new):
        final.add_incoming(v, entry)
        final.add_incoming(n, latch)
    return finals


MAX_WINDOW_ROWS = 6  # rows of a window one ``window_gradients`` call takes: 12 accumulators for its two filters


@intrinsic(prefer_literal=True)
def window_gradients(typingctx, tile, PH, PW, dy, di, dstep, argmax, keep, masked, x, xi, OW, WP, rows, ri, count,
                     acc, ai, astep):
    """The weight gradient of a convolution followed by a 2x2, stride-2 max pooling, straight from
    the pooled gradient: only a window's maximum passed a gradient back, so filter k's gradient
    is the sum over the pooled outputs p of dy[p] times the input patch under that maximum,

        acc[r] += dy[p] * x[xi + corner(p) + rows[ri + r] : + V]       for each row r of the patch

    a quarter of the multiply-adds of dot products with the dense gradient plane, three quarters
    of whose values are zeros. Two filters a call, their PH x PW pooled gradients at dy[di] and
    dy[di + dstep] (argmax, flat in conv rows of OW, and ``keep``, the pooled output, laid out
    the same; with ``masked`` a gradient counts only where keep > 0), their sums at acc[ai] and
    acc[ai + astep]: ``count`` (1 to MAX_WINDOW_ROWS) rows of V lanes each, held in registers
    through the loop over p (2 x count accumulators: enough independent FMAs for both pipes). Row
    r of the patch starts rows[ri + r] values after the window's corner in x (padded planes of
    row length WP, the sample's from xi). A row reads V values whatever the filter's width: the
    lanes past it add up values nobody reads, and x must have V - 1 values of room past the last
    row (AVX2's masked loads, which would not need it, are microcoded on AMD: a third of the
    speed). With dstep and astep 0 the one filter is computed twice, the same sums stored twice."""
    V32 = _literal_tile(tile)[2]
    sig = types.void(tile, PH, PW, dy, di, dstep, argmax, keep, masked, x, xi, OW, WP, rows, ri, count, acc, ai, astep)

    def codegen(context, builder, signature, args):
        (_, PH_, PW_, dy_, di_, dstep_, argmax_, keep_, masked_, x_, xi_, OW_, WP_, rows_, ri_, count_, acc_, ai_,
         astep_) = args
        ty = signature.args
        i64 = ir.IntType(64)
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        scalar, V = _vector(ty[3], V32)
        vec = ir.VectorType(scalar, V)
        fma = _fma(builder, vec)
        element = lambda t, array, index: _element_pointer(context, builder, ty[t], array, index)  # noqa: E731
        widen = lambda v: builder.sext(v, i64) if v.type.width < 64 else v  # noqa: E731
        firsts = (di_, builder.add(di_, dstep_))
        to = [element(16, acc_, builder.add(ai_, a)) for a in (const(0), astep_)]
        row_of = lambda f, r: builder.bitcast(builder.gep(to[f], [const(r * V)]), vec.as_pointer())  # noqa: E731
        total = builder.mul(PH_, PW_)
        done = builder.append_basic_block("window.done")
        switch = builder.switch(count_, done)
        for n_rows in range(1, MAX_WINDOW_ROWS + 1):
            block = builder.append_basic_block(f"window.rows{n_rows}")
            switch.add_case(ir.Constant(count_.type, n_rows), block)
            builder.position_at_end(block)
            offsets = [builder.load(element(13, rows_, builder.add(ri_, const(r)))) for r in range(n_rows)]
            initial = [builder.load(row_of(f, r), align=4) for f in range(2) for r in range(n_rows)]

            def body(p, pixel, sums, n_rows=n_rows, offsets=offsets):
                new = []
                for f in range(2):
                    at = builder.add(firsts[f], p)
                    g = _passed(builder, builder.load(element(3, dy_, at)), builder.load(element(7, keep_, at)),
                                masked_)
                    g = _splat(builder, vec, g)
                    base = builder.add(xi_, pixel(widen(builder.load(element(6, argmax_, at)))))
                    for r in range(n_rows):
                        where = builder.bitcast(element(9, x_, builder.add(base, offsets[r])), vec.as_pointer())
                        new.append(builder.call(fma, [g, builder.load(where, align=4), sums[f * n_rows + r]]))
                return new

            finals = _walk_maxima(builder, total, PW_, OW_, WP_, const(1), initial, body, f"window{n_rows}")
            for f in range(2):
                for r in range(n_rows):
                    builder.store(finals[f * n_rows + r], row_of(f, r), align=4)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


# vectors of a patch one ``maxima_gradients`` or ``maxima_scatter`` call holds in registers, by
# tile: its accumulators (or the filter's vectors) and the broadcast gradient fit the registers
PATCH_VECTORS = np.array([{"avx512": 28, "avx2": 12, "neon": 28, "portable": 12}[t] for t in TILE_NAMES], np.int64)


def _maxima_codegen(scatter):
    """The loop of ``maxima_gradients`` (``scatter`` False) and ``maxima_scatter`` (True): for
    each of ``filters`` filters, both walk its pooled outputs, find each window's maximum in a
    channels-last sample and take ``count`` vectors of the patch there. The patch's addresses
    are set up once for all the filters."""

    def codegen(context, builder, signature, args):
        (tile, PH_, PW_, dy_, di_, argmax_, keep_, masked_, x_, xi_, OW_, XW_, CS_, offsets_, oi_, count_, v_,
         vi_, start_, filters_, dstep_, vstep_) = args
        ty = signature.args
        V32 = TILES[TILE_NAMES[ty[0].literal_value]][2]
        i64 = ir.IntType(64)
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        scalar, V = _vector(ty[3], V32)
        vec = ir.VectorType(scalar, V)
        fma = _fma(builder, vec)
        element = lambda t, array, index: _element_pointer(context, builder, ty[t], array, index)  # noqa: E731
        widen = lambda v: builder.sext(v, i64) if v.type.width < 64 else v  # noqa: E731
        vector_at = lambda t, array, index: builder.bitcast(element(t, array, index), vec.as_pointer())  # noqa
        total = builder.mul(PH_, PW_)
        filters, dstep, vstep = widen(filters_), widen(dstep_), widen(vstep_)
        done = builder.append_basic_block("maxima.done")
        switch = builder.switch(count_, done)
        for n_vec in range(1, PATCH_VECTORS[ty[0].literal_value] + 1):
            block = builder.append_basic_block(f"maxima.vectors{n_vec}")
            switch.add_case(ir.Constant(count_.type, n_vec), block)
            builder.position_at_end(block)
            offsets = [builder.load(element(13, offsets_, builder.add(oi_, const(r)))) for r in range(n_vec)]
            entry = builder.block
            k_loop = builder.append_basic_block(f"maxima{n_vec}.k")
            builder.cbranch(builder.icmp_signed(">", filters, const(0)), k_loop, done)
            builder.position_at_end(k_loop)
            k = builder.phi(i64)
            k.add_incoming(const(0), entry)
            d0 = builder.add(di_, builder.mul(k, dstep))
            v0 = builder.add(vi_, builder.mul(k, vstep))
            held = [vector_at(16, v_, builder.add(v0, const(r * V))) for r in range(n_vec)]
            initial = [builder.load(at, align=4) for at in held]

            def body(p, pixel, sums, initial=initial, offsets=offsets, d0=d0):
                at = builder.add(d0, p)
                g = _passed(builder, builder.load(element(3, dy_, at)), builder.load(element(6, keep_, at)), masked_)
                g = _splat(builder, vec, g)
                base = builder.add(xi_, pixel(widen(builder.load(element(5, argmax_, at)))))
                new = []
                for r, offset in enumerate(offsets):
                    where = vector_at(8, x_, builder.add(base, offset))
                    if scatter:  # one vector at a time: a patch row's last vector may reach the next row's first
                        builder.store(builder.call(fma, [g, initial[r], builder.load(where, align=4)]), where,
                                      align=4)
                    else:
                        new.append(builder.call(fma, [g, builder.load(where, align=4), sums[r]]))
                return new

            finals = _walk_maxima(builder, total, PW_, OW_, XW_, CS_, [] if scatter else initial, body,
                                  f"maxima{n_vec}", widen(start_))
            for final, at_ in zip(finals, held):
                builder.store(final, at_, align=4)
            k_next = builder.add(k, const(1))
            k.add_incoming(k_next, builder.block)
            builder.cbranch(builder.icmp_signed("<", k_next, filters), k_loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return codegen


@intrinsic(prefer_literal=True)
def maxima_gradients(typingctx, tile, PH, PW, dy, di, argmax, keep, masked, x, xi, OW, XW, CS, offsets, oi, count,
                     acc, ai, start, filters, dstep, astep):
    """The weight gradients of ``filters`` filters of a convolution followed by a 2x2, stride-2 max
    pooling, from the pooled gradient: a window passed its gradient to its maximum alone, so filter
    f's gradient is the sum over the pooled outputs p of dy[p] times the input patch under the
    maximum (d = di + f*dstep, a = ai + f*astep),

        acc[a + r*V : + V] += dy[d + p] * x[xi + pixel(p) + offsets[oi + r] : + V]     r < count

    over the PH x PW pooled outputs from dy[d] (a band of rows of the plane: ``start`` is the
    flat conv position of its first window's corner, whose pixel is x[xi]), x a sample stored
    channels last (rows of XW values, CS values a pixel: a patch row's values are contiguous,
    FW*CS of them, read as vectors), pixel(p) the flat offset of the maximum's pixel from xi,
    ``count`` (1 to PATCH_VECTORS) vectors of the patch from the table ``offsets``, held in
    registers through the loop over p (the patch's addresses set up once for all the filters).
    argmax: the maximum's position, flat in the convolution's rows of OW; ``keep`` (laid out as
    dy): with ``masked`` a gradient counts only where keep > 0.
    The dense gradient plane it replaces is three quarters zeros: this does a quarter of its
    multiply-adds. A vector past a patch row's end adds up values of the next pixels, which the
    caller does not read; x must have V - 1 values of room past its last pixel."""
    sig = types.void(tile, PH, PW, dy, di, argmax, keep, masked, x, xi, OW, XW, CS, offsets, oi, count, acc, ai,
                     start, filters, dstep, astep)
    _literal_tile(tile)
    return sig, _maxima_codegen(scatter=False)


@intrinsic(prefer_literal=True)
def maxima_scatter(typingctx, tile, PH, PW, dy, di, argmax, keep, masked, dx, xi, OW, XW, CS, offsets, oi, count,
                   w, wi, start, filters, dstep, wstep):
    """The input gradient's share of ``filters`` filters, by the same walk as ``maxima_gradients``:
    filter f's vectors (w[wi + f*wstep + r*V : + V], r < count, in registers) times each of its
    pooled gradients (from dy[di + f*dstep]), added into the patch under the window's maximum,

        dx[xi + pixel(p) + offsets[oi + r] : + V] += dy[di + f*dstep + p] * w[wi + f*wstep + r*V : + V]

    one vector after the other (a vector past a patch row's end reaches into the next pixels,
    possibly the next row's first vector: w's lanes there must be zeros). dx as ``maxima_gradients``
    reads x, with V - 1 values of room past its last pixel."""
    sig = types.void(tile, PH, PW, dy, di, argmax, keep, masked, dx, xi, OW, XW, CS, offsets, oi, count, w, wi,
                     start, filters, dstep, wstep)
    _literal_tile(tile)
    return sig, _maxima_codegen(scatter=True)


@intrinsic(prefer_literal=True)
def fma_chains(typingctx, tile, reps, out, oi):
    """The FMA peak's loop: MR x NR/V independent chains acc = fma(acc, x, y) over ``reps``
    steps, in the tile's vectors (as many as the tile's accumulators: at least the 8 that two
    pipes of 4-cycle latency need). Stores the sum of the chains' lanes at ``out[oi]`` (float32)."""
    MR, NR, V = _literal_tile(tile)
    sig = types.void(tile, reps, out, oi)

    def codegen(context, builder, signature, args):
        _, reps_, out_, oi_ = args
        i64 = ir.IntType(64)
        vec = ir.VectorType(ir.FloatType(), V)
        fma = _fma(builder, vec)
        chains = MR * NR // V
        x = ir.Constant(vec, [0.999] * V)
        y = ir.Constant(vec, [1e-3] * V)
        entry = builder.block
        loop = builder.append_basic_block("peak.loop")
        done = builder.append_basic_block("peak.done")
        builder.cbranch(builder.icmp_signed(">", reps_, ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        r = builder.phi(i64)
        r.add_incoming(ir.Constant(i64, 0), entry)
        acc = [builder.phi(vec) for _ in range(chains)]
        for k, v in enumerate(acc):
            v.add_incoming(ir.Constant(vec, [float(k)] * V), entry)
        new = [builder.call(fma, [v, x, y]) for v in acc]
        r_next = builder.add(r, ir.Constant(i64, 1))
        r.add_incoming(r_next, loop)
        for v, n in zip(acc, new):
            v.add_incoming(n, loop)
        builder.cbranch(builder.icmp_signed("<", r_next, reps_), loop, done)
        builder.position_at_end(done)
        lasts = [builder.phi(vec) for _ in range(chains)]
        for k, last in enumerate(lasts):
            last.add_incoming(ir.Constant(vec, [float(k)] * V), entry)
            last.add_incoming(new[k], loop)
        total = ir.Constant(vec, [0.0] * V)
        for last in lasts:
            total = builder.fadd(total, last)
        s = ir.Constant(ir.FloatType(), 0.0)
        for lane in range(V):
            s = builder.fadd(s, builder.extract_element(total, ir.Constant(ir.IntType(32), lane)))
        builder.store(s, _element_pointer(context, builder, signature.args[2], out_, oi_))
        return context.get_dummy_value()

    return sig, codegen


def peak_flops_per_step(tile):
    """Floating-point operations of one step of ``fma_chains``: 2 per lane of each chain."""
    MR, NR, V = TILES[TILE_NAMES[tile]]
    return 2 * MR * NR


def _fma_peak_for(tile):
    @njit(parallel=True, cache=True)
    def fma_peak(out, reps):
        for t in prange(out.shape[0]):
            fma_chains(tile, reps, out, t)

    return fma_peak


_FMA_PEAK = tuple(_fma_peak_for(tile) for tile in range(len(TILE_NAMES)))


def fma_peak_cpu(out, reps, tile=None):
    """Run ``fma_chains`` for ``reps`` steps on each of ``out.shape[0]`` tasks (one a thread)."""
    _FMA_PEAK[TILE if tile is None else tile](out, reps)


# ------------------------------------------------------------------------------ packing


@njit(inline="always", cache=True)
def lanes(tile, a):
    """Lanes of the tile's vectors for a's dtype (``matmul._vector``'s count): V in float32, V/2 in
    float64: the values one call of a vector intrinsic (``store_run``, Winograd's transforms) takes."""
    return _V[tile] if a.itemsize == 4 else max(1, _V[tile] // 2)


@njit(inline="always", cache=True)
def pack_sliver(dst, d0, src, r0, rows, p0, kc, width, transposed):
    """dst[d0 + p*width + i] = S[r0 + i, p0 + p] for i < width, p < kc, where S is ``src`` (2-D)
    or its transpose with ``transposed``; rows from ``rows`` on are zero (a sliver's padding).
    A whole sliver's runs are ``width`` long, a constant where the caller's width is one
    (``pack_a``, ``pack_b``): a few vector moves rather than a loop that checks its count."""
    n = min(width, rows - r0)
    out = dst[d0:d0 + kc * width]
    if transposed:  # S's row r0 + i is src's column: each p copies a run of src's row p0 + p
        for p in range(kc):
            row = src[p0 + p]
            if n == width:  # a whole sliver: a run of constant length where the width is one
                for i in range(width):
                    out[p * width + i] = row[r0 + i]
            else:
                for i in range(n):
                    out[p * width + i] = row[r0 + i]
    else:  # S = src: each of the sliver's rows is a run of src's row, stored width apart
        for i in range(n):
            row = src[r0 + i, p0:p0 + kc]
            for p in range(kc):
                out[p * width + i] = row[p]
    if n < width:
        for p in range(kc):
            for i in range(n, width):
                out[p * width + i] = 0


# The width of a sliver comes from the tile inside these calls. Numba runs a parallel loop's body
# as a function of its own, and a value computed before the loop (MR = _MR[tile]) reaches it as an
# argument, no longer a constant: the copy loops above then check their count at run time, and a
# dense layer's input gradient (B packed 16 values a step) ran at a third of its speed. Offsets
# and strides may come from outside the loop; a loop's count should not.


@njit(inline="always", cache=True)
def pack_a(tile, dst, d0, src, r0, rows, p0, kc, transposed):
    """``pack_sliver`` of A: MR rows of op(A) = ``src`` (its transpose with ``transposed``)."""
    pack_sliver(dst, d0, src, r0, rows, p0, kc, _MR[tile], transposed)


@njit(inline="always", cache=True)
def pack_b(tile, dst, d0, src, r0, rows, p0, kc, transposed):
    """``pack_sliver`` of B: NR columns of op(B), which ``src`` holds as its rows (``transposed``
    False: src is op(B) transposed) or as its columns (``transposed``: src is op(B))."""
    pack_sliver(dst, d0, src, r0, rows, p0, kc, _NR[tile], transposed)


@njit(inline="always", cache=True)
def slivers(n, width):
    return (n + width - 1) // width


# ------------------------------------------------------------------------ the product


@njit(inline="always", cache=True)
def keep_edge(c, i, j, edge, accumulate, MR, NR):
    """The part inside C of a tile computed into ``edge`` (MR x NR) for C's rows i.. and columns j..."""
    M, N = c.shape
    for r in range(min(MR, M - i)):
        for s in range(min(NR, N - j)):
            if accumulate:
                c[i + r, j + s] += edge[r * NR + s]
            else:
                c[i + r, j + s] = edge[r * NR + s]


@njit(inline="always", cache=True)
def multiply_sliver(tile, a_pack, b_sliver, c, j, kc, accumulate, edge):
    """C[:, j:j + NR] (+)= A B for one packed sliver of B: the micro-kernel down every sliver of
    A, B's sliver staying in L1. Tiles that cross C's edge go through ``edge`` (MR x NR scratch),
    and only their part inside C is kept."""
    MR, NR = _MR[tile], _NR[tile]
    M, N = c.shape
    ldc = c.shape[1]
    for i in range(0, M, MR):
        ai = (i // MR) * kc * MR
        if i + MR <= M and j + NR <= N:
            microkernel(tile, kc, a_pack, ai, b_sliver, 0, c, i * ldc + j, ldc, accumulate)
        else:
            microkernel(tile, kc, a_pack, ai, b_sliver, 0, edge, 0, NR, False)
            keep_edge(c, i, j, edge, accumulate, MR, NR)


@njit(inline="always", cache=True)
def multiply_rows(tile, a, ai, starts, b_sliver, c, j, kc, accumulate, edge):
    """``multiply_sliver`` with A read in place (``microkernel_rows``): row r of A is the run
    a[ai + starts[r]:], ``starts`` an int64 array of at least M + MAX_MR offsets."""
    MR, NR = _MR[tile], _NR[tile]
    M, N = c.shape
    ldc = c.shape[1]
    for i in range(0, M, MR):
        rows = (starts[i], starts[i + 1], starts[i + 2], starts[i + 3],
                starts[i + 4], starts[i + 5], starts[i + 6], starts[i + 7])  # MAX_MR of them
        if i + MR <= M and j + NR <= N:
            microkernel_rows(tile, kc, a, ai, rows, b_sliver, 0, c, i * ldc + j, ldc, accumulate)
        else:
            microkernel_rows(tile, kc, a, ai, rows, b_sliver, 0, edge, 0, NR, False)
            keep_edge(c, i, j, edge, accumulate, MR, NR)


@njit(inline="always", cache=True)
def split_depth(tile, c, a, b, trans_a, trans_b, accumulate, a_packs, b_slivers, edges, parts, threads):
    """c (+)= op(a) op(b) with the depth cut into ``threads`` runs of whole KC blocks: each thread
    multiplies its run into its own ``parts[t]`` (packing its own A in ``a_packs[t]``), then the
    parts are added in thread order (the same bits for the same number of threads)."""
    MR, NR = _MR[tile], _NR[tile]
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    run = slivers(slivers(K, KC), threads) * KC
    for t in prange(threads):
        part = parts[t, :M * N].reshape(M, N)
        a_pack, sliver, edge = a_packs[t], b_slivers[t], edges[t]
        for pc in range(t * run, min(K, (t + 1) * run), KC):
            kc = min(KC, K - pc)
            for s in range(slivers(M, MR)):
                pack_a(tile, a_pack, s * kc * MR, a, s * MR, M, pc, kc, trans_a)
            for col in range(slivers(N, NR)):
                pack_b(tile, sliver, 0, b, col * NR, N, pc, kc, not trans_b)
                multiply_sliver(tile, a_pack, sliver, part, col * NR, kc, pc > t * run, edge)
        if t * run >= K:
            part[:, :] = 0
    for i in prange(M):
        for j in range(N):
            total = parts[0, i * N + j]
            for t in range(1, threads):
                total += parts[t, i * N + j]
            c[i, j] = c[i, j] + total if accumulate else total


A_WHOLE_BELOW = 1 << 17  # elements of A (512 KB of float32, half of an L2): packed whole, not by depth block
DEEP = 8  # a product whose depth is this many times its width is split along the depth when A is large


@njit(inline="always", cache=True)
def deep(M, N, K):
    """Whether a product with a large A (packed depth block by depth block, two parallel loops a
    block) is deep enough against its width N to be split along the depth instead: the threads'
    parts of C (M x N each) are then cheap to add, and the pool wakes twice in all (a dense
    layer's forward, 9216 inputs to 128: 72 wake-ups before)."""
    return M * K >= A_WHOLE_BELOW and DEEP * N <= K


@njit(inline="always", cache=True)
def matmul_body(tile, c, a, b, trans_a, trans_b, accumulate, a_pack, b_slivers, edges, a_packs, parts, threads):
    """c (M, N) (+)= op(a) op(b), op a transpose with ``trans_a`` / ``trans_b``; scratch from
    ``matmul_workspace``; ``tile`` a compile-time constant (one compiled product per tile).

    A's rows are packed into slivers of MR, depth block (KC steps) by depth block. Each task
    takes one NR-wide sliver of B's columns, packs it into its thread's buffer for one depth
    block and runs the micro-kernel down all of A with it (Numba's static schedule gives each
    thread one run of adjacent slivers). B is read once and never stored whole: its slivers are
    packed where they are used, in L1. A small A (under ``A_WHOLE_BELOW`` elements, it stays in
    L2) is packed whole first, and each task then walks all depth blocks for its sliver: two
    parallel loops in all, where a depth block at a time (BLIS's order, for a large A) takes two
    a block, and each wakes the thread pool (tens of microseconds). Each element of C is written
    by one task, adding the depth blocks in order: the result does not depend on the number of
    threads.

    A product with fewer column slivers than threads and a long depth (a weight gradient: few
    filters times few taps, summed over every position of the batch), or a large A and a depth
    many times the width (``deep``), is split along its depth instead (``split_depth``), given the
    scratch for it (``a_packs``, ``parts``) and ``threads``, the number of Numba's threads.
    """
    MR, NR = _MR[tile], _NR[tile]
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if K == 0:
        if not accumulate:
            c[:, :] = 0
        return
    Mpad = slivers(M, MR) * MR
    threads = min(threads, parts.shape[0])
    if threads > 1 and K >= threads * KC and parts.shape[1] >= M * N and (slivers(N, NR) < threads or deep(M, N, K)):
        split_depth(tile, c, a, b, trans_a, trans_b, accumulate, a_packs, b_slivers, edges, parts, threads)
        return
    if M * K < A_WHOLE_BELOW:
        for s in prange(slivers(M, MR)):
            for pc in range(0, K, KC):
                kc = min(KC, K - pc)
                pack_a(tile, a_pack, pc * Mpad + s * kc * MR, a, s * MR, M, pc, kc, trans_a)
        for col in prange(slivers(N, NR)):
            t = numba.get_thread_id()
            for pc in range(0, K, KC):
                kc = min(KC, K - pc)
                pack_b(tile, b_slivers[t], 0, b, col * NR, N, pc, kc, not trans_b)
                multiply_sliver(tile, a_pack[pc * Mpad:], b_slivers[t], c, col * NR, kc, accumulate or pc > 0,
                                edges[t])
        return
    for pc in range(0, K, KC):
        kc = min(KC, K - pc)
        for s in prange(slivers(M, MR)):
            pack_a(tile, a_pack, s * kc * MR, a, s * MR, M, pc, kc, trans_a)
        for col in prange(slivers(N, NR)):
            t = numba.get_thread_id()
            pack_b(tile, b_slivers[t], 0, b, col * NR, N, pc, kc, not trans_b)
            multiply_sliver(tile, a_pack, b_slivers[t], c, col * NR, kc, accumulate or pc > 0, edges[t])


SERIAL_PRODUCT_BELOW = 1 << 22  # multiply-adds (about 30 us on one core): fewer run on one thread


def _matmul_for(tile):
    @njit(parallel=True, cache=True)
    def matmul(c, a, b, trans_a, trans_b, accumulate, a_pack, b_slivers, edges, a_packs, parts, threads):
        matmul_body(tile, c, a, b, trans_a, trans_b, accumulate, a_pack, b_slivers, edges, a_packs, parts, threads)

    # The same body on one thread, under a name of its own (Numba's disk cache tells compilations
    # apart by name and closure, not by the parallel flag).
    @njit(cache=True)
    def matmul_serial(c, a, b, trans_a, trans_b, accumulate, a_pack, b_slivers, edges, a_packs, parts, threads):
        matmul_body(tile, c, a, b, trans_a, trans_b, accumulate, a_pack, b_slivers, edges, a_packs, parts, threads)

    return matmul, matmul_serial


# One compiled product per tile: ``tile`` is a constant in each (a closure's cell, which Numba
# compiles as a constant and keeps apart in its cache), so the micro-kernel gets the tile's code.
# Each twice: on Numba's threads, and on one (a small product, where waking the threads costs
# more than they save; see kernels/_cpu.py).
_MATMUL, _MATMUL_SERIAL = zip(*(_matmul_for(tile) for tile in range(len(TILE_NAMES))))


def matmul_core_cpu(c, a, b, trans_a, trans_b, accumulate, ws, tile=None):
    """Unchecked ``matmul_cpu`` with the scratch arrays ``ws.mm_*`` (see ``matmul_workspace``) from
    the caller: what the planned step calls. Small products run on one thread."""
    K = a.shape[0] if trans_a else a.shape[1]
    small = c.shape[0] * c.shape[1] * K < SERIAL_PRODUCT_BELOW
    kernels = _MATMUL_SERIAL if small else _MATMUL
    kernels[TILE if tile is None else tile](c, a, b, trans_a, trans_b, accumulate, ws.mm_a_pack, ws.mm_b_slivers,
                                            ws.mm_edges, ws.mm_a_packs, ws.mm_parts, numba.get_num_threads())


def matmul_workspace(*products):
    """{name: shape} of ``matmul_core_cpu``'s scratch for products of the given (M, N, K) (C is
    M x N, the depth K), any tile: A's packed slivers (all of A when it is small, else one depth
    block), a sliver of B and an edge tile for each of Numba's threads, and for a product split
    along its depth (see ``matmul_body``) each thread's packed A and its part of C."""
    threads = numba.config.NUMBA_NUM_THREADS
    a_pack = max((M + MAX_MR) * (K if M * K < A_WHOLE_BELOW else min(K, KC)) for M, N, K in products)
    split = [(M, N) for M, N, K in products
             if threads > 1 and K >= threads * KC and (N < threads * MAX_NR or deep(M, N, K))]
    return {"mm_a_pack": (max(1, a_pack),),
            "mm_b_slivers": (threads, KC * MAX_NR),
            "mm_edges": (threads, MAX_MR * MAX_NR),
            "mm_a_packs": (threads, max([(M + MAX_MR) * KC for M, N in split], default=1)),
            "mm_parts": (threads, max([M * N for M, N in split], default=1))}


def matmul_cpu(c, a, b, trans_a=False, trans_b=False, accumulate=False, tile=None):
    """c = op(a) @ op(b) (``accumulate``: c += ...), op a transpose with ``trans_a`` / ``trans_b``.

    a, b, c: C-contiguous 2-D host arrays of one float dtype. ``tile``: a name from TILES, or
    None for this CPU's. Returns c.
    """
    from ._checks import check_arrays, on_host

    fn = "matmul_cpu"
    check_arrays(fn, on_host, {"c": c, "a": a, "b": b})
    for name, arr in (("c", c), ("a", a), ("b", b)):
        if arr.ndim != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {arr.shape}")
    M, K = a.shape[::-1] if trans_a else a.shape
    K2, N = b.shape[::-1] if trans_b else b.shape
    if K != K2 or c.shape != (M, N):
        raise ValueError(f"{fn}: shapes do not multiply: op(a) {(M, K)} @ op(b) {(K2, N)} into c {c.shape}")
    ws = SimpleNamespace(**{name: np.empty(shape, c.dtype) for name, shape in matmul_workspace((M, N, K)).items()})
    matmul_core_cpu(c, a, b, bool(trans_a), bool(trans_b), bool(accumulate), ws, tile_index(tile))
    return c
