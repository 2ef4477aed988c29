"""Plain NumPy references for every kernel: slow, obvious, and written independently of them.

They work on float64 and are the expectation each kernel (CPU and CUDA) is checked against.
"""

import numpy as np

from nbcnn.kernels._random import hash32  # the augmentation's draws are the kernels' own random numbers
from nbcnn.kernels.augment import draw


def out_size(size, f, s, p):
    return (size + 2 * p - f) // s + 1


def _taps(xp, fh, fw, sh, sw, OH, OW):
    """The slice of the padded input that filter tap (fh, fw) reads for every output: (N, C, OH, OW)."""
    return xp[:, :, fh : fh + sh * (OH - 1) + 1 : sh, fw : fw + sw * (OW - 1) + 1 : sw]


def conv2d(x, w, b, stride=(1, 1), pad=(0, 0)):
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = out_size(H, FH, sh, ph), out_size(W, FW, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((N, K, OH, OW)) + (0 if b is None else b[None, :, None, None])
    for fh in range(FH):
        for fw in range(FW):
            y += np.einsum("nchw,kc->nkhw", _taps(xp, fh, fw, sh, sw, OH, OW), w[:, :, fh, fw])
    return y


def conv2d_grads(dy, x, w, stride=(1, 1), pad=(0, 0)):
    """(dx, dw, db) of conv2d for upstream gradient dy."""
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = dy.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxp = np.zeros_like(xp, dtype=np.float64)
    dw = np.zeros((K, C, FH, FW))
    for fh in range(FH):
        for fw in range(FW):
            dw[:, :, fh, fw] = np.einsum("nkhw,nchw->kc", dy, _taps(xp, fh, fw, sh, sw, OH, OW))
            _taps(dxp, fh, fw, sh, sw, OH, OW)[...] += np.einsum("nkhw,kc->nchw", dy, w[:, :, fh, fw])
    dx = dxp[:, :, ph : ph + H, pw : pw + W]
    return dx, dw, dy.sum(axis=(0, 2, 3))


def _windows(x, f, s, p, fill):
    """Every pooling window, padded with ``fill``: (N, C, OH, OW, FH*FW)."""
    (fh, fw), (sh, sw), (ph, pw) = f, s, p
    N, C, H, W = x.shape
    OH, OW = out_size(H, fh, sh, ph), out_size(W, fw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    taps = [_taps(xp, i, j, sh, sw, OH, OW) for i in range(fh) for j in range(fw)]
    return np.stack(taps, axis=-1)


def maxpool2d(x, f, s, p):
    return _windows(x, f, s, p, -np.inf).max(axis=-1)


def avgpool2d(x, f, s, p):
    return _windows(x, f, s, p, 0.0).mean(axis=-1)


def maxpool2d_grad(dy, x, f, s, p):
    """dx of max pooling; each output's gradient goes to the first maximum of its window (row-major)."""
    (fh, fw), (sh, sw), (ph, pw) = f, s, p
    N, C, H, W = x.shape
    win = _windows(x, f, s, p, -np.inf)
    first = win.argmax(axis=-1)  # NumPy's argmax returns the first of tied maxima
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    for idx in np.ndindex(*first.shape):
        n, c, oh, ow = idx
        t = first[idx]
        dxp[n, c, oh * sh + t // fw, ow * sw + t % fw] += dy[idx]
    return dxp[:, :, ph : ph + H, pw : pw + W]


def avgpool2d_grad(dy, x, f, s, p):
    (fh, fw), (sh, sw), (ph, pw) = f, s, p
    N, C, H, W = x.shape
    OH, OW = dy.shape[2:]
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    for i in range(fh):
        for j in range(fw):
            _taps(dxp, i, j, sh, sw, OH, OW)[...] += dy / (fh * fw)
    return dxp[:, :, ph : ph + H, pw : pw + W]


def softmax_xent(logits, labels):
    """(mean loss, probs) with a float128-free but direct formula: -log softmax[label]."""
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    return loss, probs


def softmax_xent_grad(logits, labels):
    _, probs = softmax_xent(logits, labels)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1
    return (probs - onehot) / len(labels)


def softmax_xent_smoothed(logits, labels, smoothing):
    """(mean loss, dlogits) of the cross-entropy against the smoothed target: 1 - e on the label
    plus e / M on every class."""
    N, M = logits.shape
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    target = np.full((N, M), smoothing / M)
    target[np.arange(N), labels] += 1 - smoothing
    return -(target * log_probs).sum(axis=1).mean(), (np.exp(log_probs) - target) / N


def activation(name, x, slope=0.01):
    """(y, dy/dx) of the activation ``name`` in float64, from the textbook formulas."""
    from math import erf, pi

    x = np.asarray(x, np.float64)
    if name == "leaky_relu":
        return np.where(x > 0, x, slope * x), np.where(x > 0, 1.0, slope)
    if name == "tanh":
        return np.tanh(x), 1 / np.cosh(x) ** 2
    if name == "sigmoid":
        y = 1 / (1 + np.exp(-x))
        return y, y * (1 - y)
    cdf = 0.5 * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    return x * cdf, cdf + x * np.exp(-x * x / 2) / np.sqrt(2 * pi)


def sgd(param, velocity, grad, lr, momentum, weight_decay):
    g = grad + weight_decay * param
    velocity = momentum * velocity + g
    return param - lr * velocity, velocity


def adam(param, m, v, grad, lr, beta1, beta2, eps, t):
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    mhat = m / (1 - beta1**t)
    vhat = v / (1 - beta2**t)
    return param - lr * mhat / (np.sqrt(vhat) + eps), m, v


def toeplitz(a, n):
    la = len(a)
    t = np.zeros((la + n - 1, n))
    for i in range(n):
        t[i : i + la, i] = a
    return t


def batchnorm(x, gamma, beta, eps):
    """Training-mode batch norm in float64: (y, batch mean, biased variance, unbiased variance)."""
    x = x.astype(np.float64)
    M = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    xhat = (x - mean[None, :, None, None]) / np.sqrt(var + eps)[None, :, None, None]
    return gamma[None, :, None, None] * xhat + beta[None, :, None, None], mean, var, var * M / (M - 1)


def shift_flip(x, seed, step, max_shift, flip, fill):
    """Each image shifted by the kernel's draw for (seed, step, n) (and mirrored first when drawn),
    ``fill`` shifted in."""
    out = np.full_like(x, fill)
    N, C, H, W = x.shape
    for n in range(N):
        dy, dx, mirrored = draw(hash32(seed, step, n), max_shift, flip)
        for i in range(H):
            for j in range(W):
                si, sj = i - dy, (W - 1 - j if mirrored else j) - dx
                if 0 <= si < H and 0 <= sj < W:
                    out[n, :, i, j] = x[n, :, si, sj]
    return out
