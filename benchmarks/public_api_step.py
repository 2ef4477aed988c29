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
comparison, or pass ``--import-torch-first`` to import PyTorch before nbcnn.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np


def nbcnn_model(name):
    import nbcnn
    from nbcnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU

    if name == "default":
        layers = [Conv2D(1, 16, 5, padding=2), ReLU(), MaxPool2D(2), Conv2D(16, 32, 5), ReLU(), MaxPool2D(2),
                  Flatten(), Dense(800, 128), ReLU(), Dense(128, 10)]
    else:
        layers = [Conv2D(1, 6, 5, padding=2), ReLU(), MaxPool2D(2), Conv2D(6, 16, 5), ReLU(), MaxPool2D(2),
                  Flatten(), Dense(400, 120), ReLU(), Dense(120, 84), ReLU(), Dense(84, 10)]
    return nbcnn.Sequential(layers)


def torch_model(torch, name):
    nn = torch.nn
    if name == "default":
        return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, 10))


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
    import nbcnn
    from nbcnn.losses import SoftmaxCrossEntropy
    from nbcnn.optim import SGD, Adam

    model = nbcnn_model(args.model).to(args.device)
    loss_fn = SoftmaxCrossEntropy()
    if args.model == "default":
        opt = Adam(model.parameters(), lr=1e-3)
    else:
        opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = nbcnn.to_device(x, args.device), nbcnn.to_device(y, args.device)

    def step():
        loss = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), need_dx=False)
        opt.step()
        return loss

    if args.noop_launches:
        make_noop_launches()
    if args.noop:
        if args.device == "cpu":
            step()  # compile and allocate for real once (the simulator would take hours at this size)
        make_noop()  # then time the host's part alone
    return step


def torch_steps(torch, args, x, y):
    model = torch_model(torch, args.model)
    if args.model == "default":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    F = torch.nn.functional

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()

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
    step = torch_steps(torch, args, x, y) if args.impl == "torch" else nbcnn_steps(args, x, y)
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
