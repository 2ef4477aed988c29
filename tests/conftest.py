import numpy as np
import pytest
from hypothesis import settings

# Kernels compile on first use: a property test's first example can take seconds.
settings.register_profile("nbcnn", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("nbcnn")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
