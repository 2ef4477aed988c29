"""The unchecked cores of the kernel registry, case by case: inputs, the expected outputs from the
NumPy references, and a runner that calls a core on either device with the same arguments.

``tests/test_ops.py`` checks the CPU cores against the references; ``tests/cuda/test_cores.py``
checks the CUDA cores against the CPU cores (in the simulator, or on a GPU).
"""

from types import SimpleNamespace

import numpy as np

from nbcnn.device import resolve_device, to_numpy
from nbcnn.kernels.activation import KINDS
from nbcnn.ops import REGISTRY
from tests import reference as ref


def _relu(a):
    return np.maximum(a, 0)


def conv_cases():
    # (N, C, H, W, K, (FH, FW), stride, padding): stride 1 with padding (the unit-stride kernels),
    # stride 2 (the general ones); on a GPU the weight-gradient reduction of the first two is split
    # into batch chunks, that of the third (a batch of one) is a single pass. conv3 and conv4 cross
    # the GPU's matrix-product tiles (64 x 128 outputs, 16 deep) on every axis without filling them:
    # 65 filters, 18 and 130 taps deep (forward, backward to the input), 270 output pixels. The
    # stride-1 cases with at most three input channels (0, 2, 4, 5) take the CPU's direct kernels in
    # a planned step, four filters a task: three filters are a block short of one, conv4 has an odd
    # number of taps (9), conv5 five filters (a full block and one short of three).
    return [(2, 2, 7, 6, 3, (3, 2), (1, 1), (1, 0)), (2, 2, 7, 6, 3, (3, 3), (2, 1), (1, 1)),
            (1, 2, 5, 4, 3, (2, 2), (1, 1), (0, 1)), (2, 9, 6, 7, 65, (1, 2), (1, 1), (0, 1)),
            (3, 1, 9, 10, 3, (3, 3), (1, 1), (1, 1)), (2, 2, 4, 5, 5, (1, 2), (1, 1), (0, 1))]


# The cases the simpler CUDA kernels ("tiled") skip in the simulator's tests: those made to cross the
# GPU matrix products' tiles (minutes each), and conv5, made for the CPU's direct kernels (the tiled
# weight gradient, a block of 256 threads a weight, takes the simulator 9 s a call on it).
NOT_FOR_TILED = ("conv3 ", "conv4 ", "conv5 ", "dense 70x")


def cases(rng, dtype=np.float64):
    """[(name, op, args, outputs, expected)]: ``args`` as the core takes them with host arrays (outputs
    filled with NaN), ``ws`` as the string "ws" to be allocated per device; ``outputs`` the positions
    of the arrays the core writes, ``expected`` their reference values (None: not compared)."""
    out = []

    def arr(*shape):
        return rng.standard_normal(shape).astype(dtype)

    def nan(*shape):
        return np.full(shape, np.nan, dtype)

    for i, (N, C, H, W, K, F, S, P) in enumerate(conv_cases()):
        x, w, b = arr(N, C, H, W), arr(K, C, *F), arr(K)
        y_ref = ref.conv2d(x, w, b, S, P)
        dy = arr(*y_ref.shape)
        dx_ref, dw_ref, db_ref = ref.conv2d_grads(dy, x, w, S, P)
        for relu in (False, True):
            out.append((f"conv{i} forward relu={relu}", "conv2d_forward",
                        [nan(*y_ref.shape), x, w, b, *S, *P, relu, "ws"], [0], [_relu(y_ref) if relu else y_ref]))
        for need_dx, with_bias, mask in ((True, True, False), (True, False, True), (False, True, False)):
            dx = nan(*x.shape) if need_dx else None
            db = nan(K) if with_bias else None
            expect_dx = (dx_ref * (x > 0) if mask else dx_ref) if need_dx else None
            out.append((f"conv{i} backward dx={need_dx} bias={with_bias} mask={mask}", "conv2d_backward",
                        [dx, nan(*w.shape), db, dy, x, w, *S, *P, mask, "ws"], [0, 1, 2],
                        [expect_dx, dw_ref, db_ref if with_bias else None]))
    # A first convolution and the 2x2 max pooling after it, as one op: few input channels (the CPU's
    # own kernels; odd output sides leave a row or a column that no window covers) and four (the two
    # ops in turn). The bias is zero because the backward's runner recomputes the forward with zeros.
    for i, (N, C, H, W, K, F, P) in enumerate(((2, 1, 7, 9, 5, (3, 3), (1, 1)), (2, 2, 6, 6, 3, (2, 3), (0, 1)),
                                               (2, 4, 5, 6, 3, (2, 2), (0, 0)))):
        x, w, b = arr(N, C, H, W), arr(K, C, *F), np.zeros(K, dtype)
        for relu in (False, True):
            conv = ref.conv2d(x, w, b, (1, 1), P)
            r = _relu(conv) if relu else conv
            yp = ref.maxpool2d(r, (2, 2), (2, 2), (0, 0))
            out.append((f"convpool{i} forward relu={relu}", "conv2d_maxpool_forward",
                        [nan(*yp.shape), np.full(yp.shape, -1, np.int32), x, w, b, 1, 1, *P, relu, "ws"], [0, 1],
                        [yp, _pool_argmax(r)]))
            dyp = arr(*yp.shape)
            dense = ref.maxpool2d_grad(dyp, r, (2, 2), (2, 2), (0, 0)) * ((r > 0) if relu else 1)
            _, dw_ref, db_ref = ref.conv2d_grads(dense, x, w, (1, 1), P)
            for with_bias in (True, False):
                out.append((f"convpool{i} backward mask={relu} bias={with_bias}", "conv2d_maxpool_backward",
                            [nan(*w.shape), nan(K) if with_bias else None, dyp, "pooled", "pooled", x, w, 1, 1, *P,
                             relu, "ws"], [0, 1], [dw_ref, db_ref if with_bias else None]))
    x = arr(2, 3, 7, 9)
    x[0, 0, :2, :2] = 1.5  # a tie
    for f, s, p in (((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))):
        y_ref = ref.maxpool2d(x, f, s, p)
        dy = arr(*y_ref.shape)
        out.append((f"maxpool {f}{s}{p} forward", "maxpool2d_forward",
                    [nan(*y_ref.shape), np.zeros(y_ref.shape, np.int32), x, *f, *s, *p], [0], [y_ref]))
        out.append((f"avgpool {f}{s}{p} forward", "avgpool2d_forward",
                    [nan(*y_ref.shape), x, *f, *s, *p], [0], [ref.avgpool2d(x, f, s, p)]))
        for mask in (False, True):
            keep = (x > 0) if mask else 1
            out.append((f"maxpool {f}{s}{p} backward mask={mask}", "maxpool2d_backward",
                        [nan(*x.shape), dy, "argmax", x, *f, *s, *p, mask], [0],
                        [ref.maxpool2d_grad(dy, x, f, s, p) * keep]))
            out.append((f"avgpool {f}{s}{p} backward mask={mask}", "avgpool2d_backward",
                        [nan(*x.shape), dy, x, *f, *s, *p, mask], [0], [ref.avgpool2d_grad(dy, x, f, s, p) * keep]))
    # The second spans two GPU tiles of the simple product (16 x 16) on every axis; the third
    # crosses the register-blocked product's (64 x 128, 16 deep; 32 x 64 in the simulator) on
    # every axis.
    for N, IN, OUT in ((5, 17, 3), (18, 33, 20), (70, 131, 19), (1, 9, 4)):  # and a batch of one
        x, w, b, dy = arr(N, IN), arr(OUT, IN), arr(OUT), arr(N, OUT)
        for relu in (False, True):
            y = x @ w.T + b
            out.append((f"dense {N}x{IN}->{OUT} forward relu={relu}", "dense_forward",
                        [nan(N, OUT), x, w, b, relu, "ws"], [0], [_relu(y) if relu else y]))
        for need_dx, with_bias, mask in ((True, True, False), (True, False, True), (False, True, False)):
            expect_dx = ((dy @ w) * (x > 0) if mask else dy @ w) if need_dx else None
            out.append((f"dense {N}x{IN}->{OUT} backward dx={need_dx} bias={with_bias} mask={mask}",
                        "dense_backward",
                        [nan(N, IN) if need_dx else None, nan(OUT, IN), nan(OUT) if with_bias else None, dy, x, w,
                         mask, "ws"], [0, 1, 2], [expect_dx, dy.T @ x, dy.sum(axis=0) if with_bias else None]))
    x = arr(3, 4, 5)
    out.append(("relu forward", "relu_forward", [nan(*x.shape), x], [0], [_relu(x)]))
    dy = arr(*x.shape)
    out.append(("relu backward", "relu_backward", [nan(*x.shape), dy, _relu(x)], [0], [dy * (x > 0)]))
    for name, kind in KINDS.items():
        y, slope = ref.activation(name, x, 0.2)
        out.append((f"{name} forward", "activation_forward", [nan(*x.shape), x, kind, 0.2], [0], [y]))
        out.append((f"{name} backward", "activation_backward", [nan(*x.shape), dy, x, y.astype(dtype), kind, 0.2],
                    [0], [dy * slope]))
    a, b = arr(*x.shape), arr(*x.shape)
    for relu in (False, True):
        out.append((f"residual add relu={relu}", "residual_add_forward", [nan(*x.shape), a, b, relu], [0],
                    [_relu(a + b) if relu else a + b]))
        out.append((f"residual add backward mask={relu}", "residual_add_backward", [nan(*x.shape), a, b, x, relu],
                    [0], [(a + b) * (x > 0) if relu else a + b]))
    for N, M in ((1, 3), (45, 10), (300, 7)):  # 45 and 300 rows: several GPU blocks, their sums added by the last
        logits = 4 * arr(N, M)
        labels = rng.integers(0, M, N).astype(np.int32)
        loss, probs = ref.softmax_xent(logits, labels)
        correct = float((logits.argmax(axis=1) == labels).sum())
        for accumulate in (False, True):
            sums = np.array([1.5, 2.0]) if accumulate else np.full(2, np.nan)
            want = np.array([loss * N, correct]) + (np.array([1.5, 2.0]) if accumulate else 0)
            out.append((f"softmax xent step {N}x{M} accumulate={accumulate}", "softmax_xent_step",
                        [sums, nan(N, M), nan(N, M), logits, labels, accumulate, 0.0, "ws"], [0, 1, 2],
                        [want, probs, ref.softmax_xent_grad(logits, labels)]))
        smooth_loss, smooth_grad = ref.softmax_xent_smoothed(logits, labels, 0.1)
        out.append((f"softmax xent step {N}x{M} label smoothing 0.1", "softmax_xent_step",
                    [np.full(2, np.nan), nan(N, M), nan(N, M), logits, labels, False, 0.1, "ws"], [0, 1, 2],
                    [np.array([smooth_loss * N, correct]), probs, smooth_grad]))
    data, labels = arr(40, 1, 2, 3), rng.integers(0, 10, 40).astype(np.int32)
    idx = rng.permutation(40)[:9].astype(np.int32)
    out.append(("gather batch", "gather_batch", [nan(9, 1, 2, 3), np.full(9, -7, np.int32), data, labels, idx],
                [0, 1], [data[idx], labels[idx]]))
    p, g = arr(300), arr(300)
    vel = arr(300)
    want_p, want_v = ref.sgd(p, vel, g, 0.1, 0.9, 1e-3)
    out.append(("sgd update", "sgd_update", [p.copy(), vel.copy(), g, 0.1, 0.9, 1e-3], [0, 1], [want_p, want_v]))
    m, v = arr(300), np.abs(arr(300))
    want_p, want_m, want_v = ref.adam(p, m, v, g, 1e-2, 0.9, 0.999, 1e-8, 3)
    out.append(("adam update", "adam_update", [p.copy(), m.copy(), v.copy(), g, 1e-2, 0.9, 0.999, 1e-8,
                                               1 - 0.9**3, 1 - 0.999**3], [0, 1, 2], [want_p, want_m, want_v]))
    want_p, want_m, want_v = ref.adam(p * (1 - 1e-2 * 0.1), m, v, g, 1e-2, 0.9, 0.999, 1e-8, 3)
    out.append(("adamw update", "adamw_update", [p.copy(), m.copy(), v.copy(), g, 1e-2, 0.9, 0.999, 1e-8,
                                                 1 - 0.9**3, 1 - 0.999**3, 0.1], [0, 1, 2], [want_p, want_m, want_v]))
    out.append(("fill", "fill", [nan(3, 5), 2.5], [0], [np.full((3, 5), 2.5)]))
    g = arr(1000)  # several blocks of a simulated GPU's grid-wide sum
    norm = np.sqrt((g.astype(np.float64) ** 2).sum())
    for max_norm in (2 * norm, norm / 4):
        want = g * min(1.0, max_norm / (norm + 1e-6))
        out.append((f"clip grad norm {max_norm / norm:.2f}", "clip_grad_norm", [g.copy(), np.full(1, np.nan), max_norm,
                                                                              "ws"], [0, 1], [want, np.array([norm])]))
    out += _normalisation_cases(arr, nan, rng, dtype)
    return out


def _normalisation_cases(arr, nan, rng, dtype):
    """Batch norm, dropout and global average pooling; 70 channels' worth of values per channel on the
    first shape (more than a simulated GPU block's threads), one value per channel in evaluation."""
    out = []
    for shape in ((3, 2, 5, 7), (1, 3, 1, 1)):
        N, C, H, W = shape
        x = 2 * arr(*shape) + 1
        gamma, beta, dy = arr(C), arr(C), arr(*shape)
        rm, rv = arr(C), np.abs(arr(C)) + 0.5
        for training in ((True, False) if N * H * W > 1 else (False,)):
            mean = x.mean(axis=(0, 2, 3)) if training else rm
            var = x.var(axis=(0, 2, 3)) if training else rv
            invstd = 1 / np.sqrt(var + 1e-5)
            xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
            y = gamma[None, :, None, None] * xhat + beta[None, :, None, None]
            M = N * H * W
            want_rm = 0.9 * rm + 0.1 * mean if training else rm
            want_rv = 0.9 * rv + 0.1 * var * M / (M - 1) if training else rv
            for relu in (False, True):
                out.append((f"batchnorm {shape} forward training={training} relu={relu}", "batchnorm2d_forward",
                            [nan(*shape), nan(C), nan(C), rm.copy(), rv.copy(), x, gamma, beta, 1e-5, 0.1, training,
                             relu], [0, 1, 2, 3, 4], [_relu(y) if relu else y, mean, invstd, want_rm, want_rv]))
            dbeta = dy.sum(axis=(0, 2, 3))
            dgamma = (dy * xhat).sum(axis=(0, 2, 3))
            k = (gamma * invstd)[None, :, None, None]
            dx = k * (dy - dbeta[None, :, None, None] / M - xhat * dgamma[None, :, None, None] / M) if training \
                else k * dy
            out.append((f"batchnorm {shape} backward training={training}", "batchnorm2d_backward",
                        [nan(*shape), nan(C), nan(C), dy, x, mean.astype(dtype), invstd.astype(dtype), gamma,
                         training], [0, 1, 2], [dx, dgamma, dbeta]))
    x = arr(4, 3, 6, 5)
    from nbcnn.kernels._random import hash32
    from nbcnn.kernels.dropout import threshold
    keep = np.array([hash32(77, 5, i) >= threshold(0.3) for i in range(x.size)]).reshape(x.shape)
    out.append(("dropout forward", "dropout_forward", [nan(*x.shape), x, 77, 5, 0.3], [0],
                [np.where(keep, x / (1 - 0.3), 0)]))
    out.append(("dropout backward", "dropout_backward", [nan(*x.shape), x, 77, 5, 0.3], [0],
                [np.where(keep, x / (1 - 0.3), 0)]))
    from nbcnn.kernels.augment import draw
    for flip in (False, True):
        want = np.full_like(x, -0.25)
        for n in range(x.shape[0]):
            dy_, dx_, mirrored = draw(hash32(3, 11, n), 2, flip)
            for i in range(x.shape[2]):
                for j in range(x.shape[3]):
                    sj = (x.shape[3] - 1 - j if mirrored else j) - dx_
                    if 0 <= i - dy_ < x.shape[2] and 0 <= sj < x.shape[3]:
                        want[n, :, i, j] = x[n, :, i - dy_, sj]
        out.append((f"shift flip={flip}", "shift_flip", [nan(*x.shape), x, 3, 11, 2, flip, -0.25], [0], [want]))
    out.append(("global avgpool forward", "global_avgpool2d_forward", [nan(4, 3), x], [0], [x.mean(axis=(2, 3))]))
    dy = arr(4, 3)
    for mask in (False, True):
        spread = np.broadcast_to((dy / 30)[:, :, None, None], x.shape)
        out.append((f"global avgpool backward mask={mask}", "global_avgpool2d_backward", [nan(*x.shape), dy, x, mask],
                    [0], [spread * (x > 0) if mask else spread]))
    return out


def _pool_argmax(r):
    """Where each 2x2 window's first maximum lies, as a flat index into r's planes (N, C, OH, OW)."""
    N, C, OH, OW = r.shape
    PH, PW = OH // 2, OW // 2
    windows = r[:, :, :2 * PH, :2 * PW].reshape(N, C, PH, 2, PW, 2).transpose(0, 1, 2, 4, 3, 5).reshape(N, C, PH, PW, 4)
    t = windows.argmax(axis=-1)  # the first of tied maxima, row-major within the window
    rows = 2 * np.arange(PH)[:, None] + t // 2
    return (rows * OW + 2 * np.arange(PW)[None, :] + t % 2).astype(np.int32)


def _workspace(kernel, op, args, device):
    if op.startswith("conv2d_maxpool"):
        at = 2 if op == "conv2d_maxpool_forward" else 5  # where x is; w, then the stride after the bias (or not)
        x, w = args[at], args[at + 1]
        settings = args[at + 3:at + 7] if op == "conv2d_maxpool_forward" else args[at + 2:at + 6]
        shapes = kernel.workspace(x.shape, w.shape, tuple(settings[:2]), tuple(settings[2:]), x.dtype)
    elif op.startswith("conv2d"):
        y_shape = args[3].shape if op == "conv2d_backward" else args[0].shape
        x, w = (args[4], args[5]) if op == "conv2d_backward" else (args[1], args[2])
        shapes = kernel.workspace(x.shape, w.shape, y_shape, _stride(op, args), _padding(op, args), True, x.dtype)
    elif op.startswith("dense"):
        x, w = (args[1], args[2]) if op == "dense_forward" else (args[4], args[5])
        shapes = kernel.workspace(x.shape, w.shape)
    elif op in ("softmax_xent_step", "clip_grad_norm"):  # their own dtypes, zeroed (grid-wide sums' tickets)
        scratch = kernel.workspace(args[3].shape[0] if op == "softmax_xent_step" else args[0].size).items()
        return SimpleNamespace(**{name: device.zeros(shape, dtype) for name, (shape, dtype) in scratch})
    else:
        shapes = kernel.workspace()
    dtype = next(a.dtype for a in args if isinstance(a, np.ndarray) and a.dtype.kind == "f")
    return SimpleNamespace(**{name: device.empty(shape, dtype) for name, shape in shapes.items()})


def _stride(op, args):
    return (args[4], args[5]) if op == "conv2d_forward" else (args[6], args[7])


def _padding(op, args):
    return (args[6], args[7]) if op == "conv2d_forward" else (args[8], args[9])


def run(op, args, device, algorithm=None):
    """Call ``op``'s core on ``device`` (its ``algorithm``, or the default) with copies of ``args``;
    return every argument back on the host.

    Before a convolution's backward on the CPU the matching forward runs (the core reuses its
    im2col matrix); before max pooling's backward, the forward that gives the argmax."""
    device = resolve_device(device)
    kernel = REGISTRY.get(op, device, algorithm)
    moved = [device.put(a.copy()) if isinstance(a, np.ndarray) else a for a in args]
    marks = [i for i, a in enumerate(args) if isinstance(a, str)]
    for i in marks:
        if args[i] == "ws":
            moved[i] = ws = _workspace(kernel, op, args, device)
    if op == "conv2d_backward" and device.kind == "cpu":  # the CUDA core needs nothing from the forward
        dx, dw, db, dy, x, w, sh, sw, ph, pw = moved[:10]
        forward = REGISTRY.get("conv2d_forward", device)
        y = device.empty(dy.shape, args[4].dtype)
        forward.run(y, x, w, device.zeros(w.shape[0], args[4].dtype), sh, sw, ph, pw, False, ws)
    if op == "conv2d_maxpool_backward":  # the forward (zero bias) gives argmax and yp, and fills the scratch
        _, _, dyp, _, _, x, w, sh, sw, ph, pw, mask, ws = moved
        yp, argmax = device.empty(dyp.shape, args[2].dtype), device.empty(dyp.shape, np.int32)
        zeros = device.zeros(w.shape[0], args[2].dtype)
        REGISTRY.get("conv2d_maxpool_forward", device).run(yp, argmax, x, w, zeros, sh, sw, ph, pw, mask, ws)
        moved[3], moved[4] = argmax, yp
    if any(args[i] == "argmax" for i in marks):
        dx, dy, _, x, fh, fw, sh, sw, ph, pw, _ = moved
        y, argmax = device.empty(dy.shape, dy.dtype), device.empty(dy.shape, np.int32)
        REGISTRY.get("maxpool2d_forward", device).run(y, argmax, x, fh, fw, sh, sw, ph, pw)
        moved[2] = argmax
    kernel.run(*moved)
    return [to_numpy(a) if a is not None and not isinstance(a, (bool, int, float, str, SimpleNamespace)) else a
            for a in moved]
