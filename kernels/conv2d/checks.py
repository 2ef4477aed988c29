"""Shape checks for conv2d, shared by the CPU kernels and the CUDA launchers."""

from .._checks import check_arrays, check_int, check_ndim, check_shape, output_size


def check_conv2d(fn, on_device, x, w, y, b=None, stride=(1, 1), padding=(0, 0)):
    """Check one conv2d call; return ``(N, C, H, W, K, FH, FW, OH, OW)``.

    ``x``, ``w``, ``y`` and ``b`` are ``(name, array)`` pairs in the roles of the input
    (N, C, H, W), the filters (K, C, FH, FW), the output (N, K, OH, OW) and the bias (K,),
    whatever the call names them (``dx``, ``dw``, ``dy``, ``db`` in backward passes).
    ``OH = (H + 2*P - FH) // S + 1`` and likewise OW.
    """
    pairs = [x, w, y] + ([b] if b is not None else [])
    check_arrays(fn, on_device, dict(pairs))
    (xn, xa), (wn, wa), (yn, ya) = x, w, y
    check_ndim(fn, xn, xa, ("N", "C", "H", "W"))
    check_ndim(fn, wn, wa, ("K", "C", "FH", "FW"))
    check_ndim(fn, yn, ya, ("N", "K", "OH", "OW"))
    N, C, H, W = xa.shape
    K, Cw, FH, FW = wa.shape
    if Cw != C:
        raise ValueError(
            f"{fn}: {wn} has {Cw} input channels (shape {tuple(wa.shape)}) but {xn} has {C} "
            f"(shape {tuple(xa.shape)})"
        )
    if N < 1 or C < 1 or K < 1:
        raise ValueError(f"{fn}: empty batch or channel axis: {xn} {tuple(xa.shape)}, {wn} {tuple(wa.shape)}")
    sh, sw = stride
    ph, pw = padding
    OH = output_size(fn, H, FH, sh, ph, "height")
    OW = output_size(fn, W, FW, sw, pw, "width")
    check_shape(fn, yn, ya, (N, K, OH, OW), ("N", "K", "OH", "OW"))
    if b is not None:
        check_shape(fn, b[0], b[1], (K,), ("K",))
    return N, C, H, W, K, FH, FW, OH, OW


def check_conv2d_bias(fn, on_device, db, dy):
    """Check a bias-gradient call: ``db`` (K,) and ``dy`` (N, K, OH, OW)."""
    check_arrays(fn, on_device, {"db": db, "dy": dy})
    check_ndim(fn, "dy", dy, ("N", "K", "OH", "OW"))
    check_shape(fn, "db", db, (dy.shape[1],), ("K",))


def check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w):
    """Integers, stride >= 1, padding >= 0; return ``((sh, sw), (ph, pw))``."""
    sh = check_int(fn, "stride_h", stride_h, minimum=1)
    sw = check_int(fn, "stride_w", stride_w, minimum=1)
    ph = check_int(fn, "pad_h", pad_h, minimum=0)
    pw = check_int(fn, "pad_w", pad_w, minimum=0)
    return (sh, sw), (ph, pw)
