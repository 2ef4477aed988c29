#!/usr/bin/env bash
# The whole test suite: the ordinary run (CPU kernels, PTX compilation of every CUDA kernel,
# everything else) and the CUDA kernels in Numba's simulator, which needs NUMBA_ENABLE_CUDASIM=1
# set before Numba is imported and so a pytest run of its own. On a machine with a GPU the first
# run also runs tests/cuda on the GPU itself.
#
# The two runs go side by side: most of either is one thread compiling or interpreting Python,
# so on two cores the pair takes little longer than the simulator's run alone (about 9 minutes
# against 15 one after the other). The simulator's report is printed after the ordinary one's;
# the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
simulator_log=$(mktemp)
NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda "$@" >"$simulator_log" 2>&1 &
simulator=$!
trap 'kill "$simulator" 2>/dev/null; rm -f "$simulator_log"' EXIT
python -m pytest "$@"
ordinary=$?
wait "$simulator"
simulated=$?
echo "---- the CUDA kernels in Numba's simulator (NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda) ----"
cat "$simulator_log"
if [ "$ordinary" -ne 0 ]; then exit "$ordinary"; fi
exit "$simulated"
