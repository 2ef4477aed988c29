"""The shared index helpers against brute-force enumeration, and the checked output size."""

import itertools

import pytest

from nbcnn.kernels import _index
from nbcnn.kernels._checks import output_size

GRID = list(itertools.product(range(1, 8), range(1, 5), range(1, 4), range(0, 3)))  # size, f, s, p


@pytest.mark.parametrize("size, f, s, p", [g for g in GRID if g[1] <= g[0] + 2 * g[3]])
def test_helpers_match_brute_force(size, f, s, p):
    osize = _index.out_size(size, f, s, p)
    # Output o exists when its window (starting at o*s - p) fits inside the padded input.
    assert osize == sum(1 for o in range(size + 2 * p) if o * s - p + f <= size + p)
    for tap in range(f):
        inside = [o for o in range(osize) if 0 <= _index.in_coord(o, tap, s, p) < size]
        for i in range(size):
            hits = [o for o in inside if _index.in_coord(o, tap, s, p) == i]
            assert _index.out_coord(i, tap, s, p, osize) == (hits[0] if hits else -1)
        lo, hi = _index.valid_out_range(size, osize, tap, s, p)
        assert list(range(lo, hi)) == inside
    for o in range(osize):
        lo, hi = _index.window(o, f, s, p, size)
        assert list(range(lo, hi)) == [i for i in (o * s - p + t for t in range(f)) if 0 <= i < size]
    for i in range(size):
        lo, hi = _index.covering_outputs(i, f, s, p, osize)
        assert list(range(lo, hi)) == [o for o in range(osize) if o * s - p <= i < o * s - p + f]


@pytest.mark.parametrize(
    "size, f, s, p, want",
    [(32, 5, 1, 0, 28), (28, 3, 1, 1, 28), (28, 5, 1, 2, 28), (32, 5, 2, 0, 14), (7, 3, 2, 1, 4), (5, 5, 1, 0, 1)],
)
def test_lecture_output_sizes(size, f, s, p, want):
    # W2 = (W1 - F + 2P)/S + 1, rounded down when the stride does not divide evenly.
    assert output_size("t", size, f, s, p, "width") == want


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((3, 5, 1, 0), ValueError, r"window width 5 is larger than the padded input width 3 \+ 2\*0 = 3"),
        ((3, 3, 0, 0), ValueError, "stride along the width must be at least 1, got 0"),
        ((3, 3, 1, -1), ValueError, "padding along the width must be at least 0, got -1"),
        ((3, 0, 1, 0), ValueError, "width of the window must be at least 1, got 0"),
        ((3, 2.0, 1, 0), TypeError, "width of the window must be an integer"),
    ],
)
def test_impossible_settings_are_rejected(args, error, match):
    with pytest.raises(error, match=match):
        output_size("f", *args, "width")
