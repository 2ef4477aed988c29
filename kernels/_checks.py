"""Argument checks, one module for the whole of nbcnn, run on the host before any launch.

A jitted kernel given a wrong shape reads out of bounds or returns garbage; these checks turn
every such mistake into a one-line ``ValueError`` (a wrong value or shape) or ``TypeError`` (a
wrong type) that names the function, the argument, what it got and what it expected. The
scalar checks (``check_int``, ``check_real``, ``check_pair``, ``check_choice``,
``check_instance``) are also the framework's: layers, optimizers, schedules, the Trainer and the
CLI call them through ``nbcnn.checks``, so one mistake reads the same wherever it is made.
"""

import math
import numbers

import numpy as np

from ._index import out_size

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def output_size(fn, size, f, s, p, dim, what="window"):
    """Checked ``(size + 2*p - f) // s + 1``; ``dim`` names the axis ("height", "width"),
    ``what`` the sliding thing ("window", "kernel")."""
    check_int(fn, f"{dim} of the {what}", f, minimum=1)
    check_int(fn, f"stride along the {dim}", s, minimum=1)
    check_int(fn, f"padding along the {dim}", p, minimum=0)
    if f > size + 2 * p:
        raise ValueError(
            f"{fn}: {what} {dim} {f} is larger than the padded input {dim} "
            f"{size} + 2*{p} = {size + 2 * p}"
        )
    return out_size(size, f, s, p)


def _subject(fn, name):
    """The start of a message: "fn: name", either left out when None ("value" when both are: the
    CLI's option types, whose messages argparse starts with the option's name)."""
    return ": ".join(part for part in (fn, name) if part) or "value"


def check_int(fn, name, value, minimum=None, maximum=None):
    """``value`` must be an integer (not a bool) in [``minimum``, ``maximum``]; returned as an int.

    A wrong type is a ``TypeError``, a wrong value a ``ValueError``; the wording is the same for every
    caller in nbcnn (kernels, layers, optimizers, schedules, the Trainer, the CLI)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_subject(fn, name)} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{_subject(fn, name)} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{_subject(fn, name)} must be at most {maximum:,}, got {value}")
    return int(value)


def check_real(fn, name, value, minimum=None, maximum=None, open_min=False, open_max=False):
    """``value`` must be a finite real number (not a bool) in the range given, each bound open or
    closed; returned as a float. Errors as ``check_int``'s."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_subject(fn, name)} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_subject(fn, name)} must be finite, got {value}")
    if minimum is not None and (value < minimum or (open_min and value == minimum)):
        bound = f"greater than {minimum}" if open_min else f"at least {minimum}"
        raise ValueError(f"{_subject(fn, name)} must be {bound}, got {value}")
    if maximum is not None and (value > maximum or (open_max and value == maximum)):
        bound = f"less than {maximum}" if open_max else f"at most {maximum}"
        raise ValueError(f"{_subject(fn, name)} must be {bound}, got {value}")
    return value


def check_pair(fn, name, value, minimum=None, maximum=None):
    """An int, or a pair (h, w) of ints, each in [``minimum``, ``maximum``]; returned as two ints."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in pair):
        raise TypeError(f"{_subject(fn, name)} must be an int or a pair of ints (h, w), got {value!r}")
    if minimum is not None and min(pair) < minimum:
        raise ValueError(f"{_subject(fn, name)} must be at least {minimum}, got {value!r}")
    if maximum is not None and max(pair) > maximum:
        raise ValueError(f"{_subject(fn, name)} must be at most {maximum:,}, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_choice(fn, name, value, choices):
    """``value`` must be one of ``choices`` (strings); a string that is none of them is a
    ``ValueError`` listing them, anything else a ``TypeError``."""
    if not isinstance(value, str):
        raise TypeError(f"{_subject(fn, name)} must be a string, one of {', '.join(choices)}; got {value!r}")
    if value not in choices:
        raise ValueError(f"{_subject(fn, 'unknown ' + name)} {value!r}: choose one of {', '.join(choices)}")
    return value


def check_instance(fn, name, value, kind, what):
    """``value`` must be an instance of ``kind`` (a class or a tuple of them), which ``what`` names."""
    if not isinstance(value, kind):
        raise TypeError(f"{_subject(fn, name)} must be {what}, got {type(value).__name__}")
    return value


def is_c_contiguous(a):
    """True when ``a`` (a NumPy array or any ``__cuda_array_interface__`` object) is C-contiguous."""
    if isinstance(a, np.ndarray):
        return a.flags.c_contiguous
    if hasattr(a, "is_c_contiguous"):  # Numba device arrays, real or simulated
        return a.is_c_contiguous()
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is None:
        return False
    strides = iface.get("strides")
    if strides is None:
        return True
    shape = iface["shape"]
    expected = np.dtype(iface["typestr"]).itemsize
    # Walk from the last axis; an axis of extent 1 may carry any stride.
    for extent, stride in zip(reversed(shape), reversed(strides)):
        if extent != 1 and stride != expected:
            return False
        expected *= extent
    return True


def check_arrays(fn, on_device, floats, ints=None):
    """Check the arrays given to one kernel call; return their common float dtype.

    ``floats`` and ``ints`` map argument names to arrays. ``on_device(a)`` says whether
    ``a`` lives where this kernel runs (NumPy for CPU kernels, GPU arrays for CUDA
    kernels); its ``__doc__`` names that place in the message. Float arrays must share
    one dtype, float32 or float64; integer arrays (labels, argmax) must be int32 or int64.
    Every array must be C-contiguous.
    """
    ints = ints or {}
    dtype = None
    for name, a in list(floats.items()) + list(ints.items()):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{fn}: {name} must be an array, got {type(a).__name__}")
        if not on_device(a):
            raise TypeError(f"{fn}: {name} is a {type(a).__module__}.{type(a).__name__}; {on_device.__doc__}")
        if not is_c_contiguous(a):
            raise ValueError(
                f"{fn}: {name} must be C-contiguous (np.ascontiguousarray makes a contiguous copy)"
            )
    for name, a in floats.items():
        if np.dtype(a.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32 or float64, got {np.dtype(a.dtype)}")
        if dtype is None:
            dtype = np.dtype(a.dtype)
        elif np.dtype(a.dtype) != dtype:
            first = next(iter(floats))
            raise TypeError(
                f"{fn}: {name} is {np.dtype(a.dtype)} but {first} is {dtype}; all float arrays "
                f"of one call must share a dtype"
            )
    for name, a in ints.items():
        if np.dtype(a.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise TypeError(f"{fn}: {name} must be int32 or int64, got {np.dtype(a.dtype)}")
    return dtype


def check_ndim(fn, name, a, letters):
    """``a`` must have one axis per letter, e.g. ``("N", "C", "H", "W")``."""
    if len(a.shape) != len(letters):
        raise ValueError(
            f"{fn}: {name} must have {len(letters)} dimensions ({', '.join(letters)}), "
            f"got shape {tuple(a.shape)}"
        )


def check_shape(fn, name, a, expected, letters=None):
    """``a`` must have exactly the shape ``expected``, whose axes ``letters`` may name."""
    if tuple(a.shape) != tuple(expected):
        named = ""
        if letters:
            named = " (" + ", ".join(f"{l}={e}" for l, e in zip(letters, expected)) + ")"
        raise ValueError(f"{fn}: {name} has shape {tuple(a.shape)}, expected {tuple(expected)}{named}")


def on_host(a):
    """CPU kernels take NumPy arrays (nbcnn.to_numpy copies a GPU array to the host)."""
    return isinstance(a, np.ndarray)
