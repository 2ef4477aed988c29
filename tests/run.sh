#!/usr/bin/env bash
# The whole test suite: the ordinary run (CPU kernels, PTX compilation of every CUDA
# kernel, everything else), then the CUDA kernels in Numba's simulator, which needs
# NUMBA_ENABLE_CUDASIM=1 set before Numba is imported and so a pytest run of its own.
# On a machine with a GPU the first run also runs tests/cuda on the GPU itself.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest "$@"
NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda "$@"
