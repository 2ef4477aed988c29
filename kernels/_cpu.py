"""What the CPU kernels share: when a small call should run on one thread, and the one loop
body compiled both ways.

Each ``@njit(parallel=True)`` call wakes Numba's worker threads, which sleep between calls
(``OMP_WAIT_POLICY=PASSIVE``, see ``nbcnn.kernels``): measured here at 70-130 us a call,
more than the whole work of an Adam step over a bias vector or of a ReLU over 64x128
values. The element-wise kernels are therefore written once, with ``prange``, and compiled
twice by ``@parallel_and_serial``: on Numba's threads, and on one (where ``prange`` is
``range``); a call over fewer than ``SERIAL_BELOW`` elements (about 30 us of work for the
simplest of them) runs the serial one::

    @parallel_and_serial
    def _scale(a, s):
        for i in prange(a.size):
            a[i] *= s

    _scale.for_size(a.size)(a, 2.0)
"""

import types

from numba import njit

SERIAL_BELOW = 1 << 15


def serial(size):
    """Whether a call over ``size`` elements should run on one thread."""
    return size < SERIAL_BELOW


class Twins:
    """One loop body, compiled on Numba's threads (``parallel``) and on one (``serial``)."""

    def __init__(self, fn):
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.parallel = njit(parallel=True, cache=True)(fn)
        # The serial compilation under a name of its own: Numba's disk cache keys compilations by
        # the function's module, name and first line, not by the parallel flag.
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                  fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        self.serial = njit(cache=True)(twin)

    def for_size(self, size):
        """The compilation a call over ``size`` elements runs."""
        return self.serial if serial(size) else self.parallel

    def __repr__(self):
        return f"<parallel and serial {self.__name__}>"


def parallel_and_serial(fn):
    """Decorator: ``fn``, a loop body written with ``prange``, as ``Twins``."""
    return Twins(fn)
