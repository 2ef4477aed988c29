"""What the CPU kernels share: when a small call should run on one thread.

Each ``@njit(parallel=True)`` call wakes Numba's worker threads, which sleep between calls
(``OMP_WAIT_POLICY=PASSIVE``, see ``nbcnn.kernels``): measured here at 70-130 us a call,
more than the whole work of an Adam step over a bias vector or of a ReLU over 64x128
values. The element-wise kernels therefore come in two compilations of one loop body, a
parallel one and a serial one, and run the serial one below ``SERIAL_BELOW`` elements
(about 30 us of work for the simplest of them).
"""

SERIAL_BELOW = 1 << 15


def serial(size):
    """Whether a call over ``size`` elements should run on one thread."""
    return size < SERIAL_BELOW
