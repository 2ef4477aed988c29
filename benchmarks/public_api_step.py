"""The host's part of one training step through the public API: the loop a PyTorch user writes
(``nbcnn.perf.stepbench``'s), with every kernel replaced by one that does nothing.

    python benchmarks/public_api_step.py --model default --batch 64          # the CPU path
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/public_api_step.py --device cuda --batch 64
                                            # the CUDA path in Numba's simulator: launches return at once

What is left is what the framework itself costs a step: argument checks, plans, dispatch,
launch configuration. On the CPU the step runs once for real first (compilation, allocation),
then with no-op kernels; in the simulator only the launches are skipped (a real step there
would take hours). Prints one JSON line: the median step time over ``--repeats`` blocks of
``--steps`` steps. For the whole step against PyTorch's, run ``nbcnn bench --vs torch`` or
``python -m nbcnn.perf.stepbench``.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np


def make_noop():
    """Replace every kernel the framework calls by a function that does nothing."""
    from nbcnn import ops

    ops.REGISTRY.replace_all(lambda *args, **kwargs: None)


def make_noop_launches():
    """In Numba's CUDA simulator: every kernel launch returns at once, everything around it runs
    (argument checks, allocations, launch configuration): the host's part of a CUDA step."""
    from numba.cuda.simulator import kernel as simulated

    real_call = simulated.FakeCUDAKernel.__call__

    def launch(self, *args):
        if self._device or simulated._kernel_context:
            return real_call(self, *args)
        return None

    simulated.FakeCUDAKernel.__call__ = launch


def main(argv=None):
    from nbcnn.perf.stepbench import STEP_MODELS, nbcnn_step

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(STEP_MODELS), default="default")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args(argv)
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if args.device == "cuda" and not simulator:
        p.error("--device cuda times the host's part in Numba's simulator: set NUMBA_ENABLE_CUDASIM=1")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4 * args.batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 4 * args.batch).astype(np.int64)
    step = nbcnn_step(args.model, x, y, args.batch, args.device)
    if args.device == "cuda":
        make_noop_launches()
    else:
        step()  # compile and allocate for real once
        make_noop()
    for _ in range(3):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - start) / args.steps)
    print(json.dumps(dict(model=args.model, batch=args.batch, device=args.device, simulator=simulator,
                          step_ms=1e3 * statistics.median(times), all_ms=[round(1e3 * t, 4) for t in times])))


if __name__ == "__main__":
    main()
