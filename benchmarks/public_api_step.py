"""Time one training step through the README's public-API loop, in this process.

    python benchmarks/public_api_step.py --impl nbcnn --model default --batch 128
    python benchmarks/public_api_step.py --impl torch --model lenet5 --batch 128
    python benchmarks/public_api_step.py --impl nbcnn --noop   # host time alone: kernels replaced by no-ops
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/public_api_step.py --device cuda --noop-launches
                                                               # the host's part of a CUDA step

Models: ``default`` (nbcnn's zoo default: conv 16 5x5 p2, conv 32 5x5, dense 800-128-10, Adam) and
``lenet5`` (the classic: conv 6 and 16 filters 5x5, max pooling, dense 400-120-84-10, SGD momentum
0.9). Prints one JSON line: the median step time over ``--repeats`` blocks of ``--steps`` steps.
A benchmark, not a test: run each implementation in its own process for the separate-process
comparison, or pass ``--import-torch-first`` to import PyTorch before nbcnn. The models and steps
are ``nbcnn.perf.stepbench``'s, which ``nbcnn bench`` runs; this script adds the host-only timings.
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

    def nothing(*args, **kwargs):
        return None

    if hasattr(ops, "KERNELS"):  # the dispatcher before the planned step
        for key in ops.KERNELS:
            ops.KERNELS[key] = nothing
    else:
        ops.REGISTRY.replace_all(nothing)


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


def nbcnn_steps(args, x, y):
    from nbcnn.perf.stepbench import nbcnn_step

    step = nbcnn_step(args.model, x, y, args.device)
    if args.noop_launches:
        make_noop_launches()
    if args.noop:
        if args.device == "cpu":
            step()  # compile and allocate for real once (the simulator would take hours at this size)
        make_noop()  # then time the host's part alone
    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["nbcnn", "torch"], default="nbcnn")
    p.add_argument("--model", choices=["default", "lenet5"], default="default")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--noop", action="store_true")
    p.add_argument("--noop-launches", action="store_true", help="CUDA simulator only: launches return at once")
    p.add_argument("--import-torch-first", action="store_true")
    args = p.parse_args()
    torch = None
    if args.impl == "torch" or args.import_torch_first:
        import torch
    if args.impl == "nbcnn":
        import nbcnn  # noqa: F401  (before numba starts its threads: nbcnn sets how they wait)
    import numba

    threads = numba.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    if args.impl == "torch":
        from nbcnn.perf.stepbench import torch_step

        step = torch_step(torch, args.model, x, y)
    else:
        step = nbcnn_steps(args, x, y)
    for _ in range(3):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - start) / args.steps)
    print(json.dumps(dict(impl=args.impl, model=args.model, batch=args.batch, device=args.device, noop=args.noop,
                          torch_first=args.import_torch_first, threads=threads, noop_launches=args.noop_launches,
                          step_ms=1e3 * statistics.median(times), all_ms=[round(1e3 * t, 3) for t in times],
                          simulator=os.environ.get("NUMBA_ENABLE_CUDASIM") == "1")))


if __name__ == "__main__":
    main()
