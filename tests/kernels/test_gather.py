import numpy as np
import pytest

from nbcnn.kernels.gather import gather_rows_cpu
from nbcnn.kernels.softmax_xent import count_correct_cpu


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_gather_rows_matches_fancy_indexing(rng, dtype):
    x = rng.integers(0, 100, (20, 1, 3, 4)).astype(dtype)
    idx = rng.permutation(20)[:7].astype(np.int64)
    out = np.full((7, 1, 3, 4), -1, dtype)
    np.testing.assert_array_equal(gather_rows_cpu(out, x, idx), x[idx])
    labels = np.arange(20, dtype=np.int32)
    np.testing.assert_array_equal(gather_rows_cpu(np.empty(7, np.int32), labels, idx.astype(np.int32)), idx)


def test_gather_rejects_bad_arguments():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 5\), got values in \[0, 5\]"):
        gather_rows_cpu(np.zeros((2, 3), np.float32), x, np.array([0, 5]))
    with pytest.raises(ValueError, match="must share their trailing shape"):
        gather_rows_cpu(np.zeros((2, 4), np.float32), x, np.array([0, 1]))
    with pytest.raises(TypeError, match="out is float64 but x is float32"):
        gather_rows_cpu(np.zeros((2, 3)), x, np.array([0, 1]))


def test_count_correct(rng):
    logits = rng.standard_normal((50, 10)).astype(np.float32)
    logits[0] = 1.0  # all tied: argmax is the first class
    labels = rng.integers(0, 10, 50)
    labels[0] = 0
    count = np.zeros(1, np.int64)
    assert count_correct_cpu(count, logits, labels) == int((logits.argmax(axis=1) == labels).sum())
