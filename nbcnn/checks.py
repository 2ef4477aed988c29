"""The argument checks every public constructor and command of nbcnn uses.

One mistake, one message, one exception type, wherever it is made: a wrong type is a
``TypeError`` ("Conv2D: stride must be an int or a pair of ints (h, w), got 1.5"), a wrong value
a ``ValueError`` ("SGD: lr must be greater than 0.0, got -0.1"), an unknown name a
``ValueError`` that lists the known ones. The functions are the kernels' own (the kernels check
their entry points with them and import nothing of the framework, so they live there); this
module is where the rest of the package takes them from.
"""

from nbcnn.kernels._checks import check_choice, check_instance, check_int, check_pair, check_real

LARGEST = 2**31 - 1  # sizes and counts: the kernels index with 32-bit integers

__all__ = ["LARGEST", "check_choice", "check_instance", "check_int", "check_pair", "check_real"]
