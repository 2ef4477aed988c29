"""One training step through the public API, the loop a PyTorch user writes, timed against PyTorch's.

``nbcnn bench``'s step rows. Three models from the zoo: ``default`` (``lenet``: conv 16 5x5 p2,
conv 32 5x5, dense 800-128-10), ``lenet5`` (the classic: conv 6 and 16 filters 5x5, max pooling,
dense 400-120-84-10) and ``mnist-example`` (PyTorch's examples/mnist network without dropout:
conv 32 3x3, conv 64 3x3, max pooling, dense 9216-128-10); SGD with momentum 0.9, random 28x28
images, int64 labels, both libraries starting from the same weights.

What else is in the process changes the result (PyTorch brings its own OpenMP runtime, whose
threads compete with Numba's), so ``measure`` runs every measurement in a fresh process, with
PyTorch imported before nbcnn or not imported at all::

    measure("nbcnn", "default", 128)                    # nbcnn alone
    measure("torch", "default", 128)                    # PyTorch alone (always imported first)
    measure("nbcnn", "default", 128, torch_first=True)  # nbcnn in a process that imported PyTorch first
    measure("both", "default", 128, torch_first=True)   # one process, nbcnn's and PyTorch's steps alternating
    measure("trainer", "default", 128)                  # the user's loop and the Trainer's step alternating

Each prints one JSON line: per implementation the median step time over ``repeats`` blocks of
``steps`` steps (with ``both``, each step of one library is followed by one of the other, and
each is timed on its own), and the step's FLOPs from nbcnn's cost model.
``python -m nbcnn.perf.stepbench --impl ...`` runs one by hand, with nbcnn imported first
(``-m`` imports the package before the module).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

STEP_MODELS = {"default": "lenet", "lenet5": "lenet5", "mnist-example": "mnist-example"}  # a step row's name: the zoo's model


def nbcnn_model(name):
    """The zoo's network behind a step row's name, with weights drawn from seed 0."""
    from nbcnn.layers import set_seed
    from nbcnn.models import MODELS

    set_seed(0)
    return MODELS[STEP_MODELS[name]]()


def torch_model(torch, name):
    """The same network in PyTorch, with the same weights (``nbcnn.perf.peer``)."""
    from nbcnn.perf.peer import torch_module

    return torch_module(torch, nbcnn_model(name))[0]


def _optimizer(module, name, params):
    """SGD with momentum 0.9, the same in both libraries (what a user types first)."""
    return module.SGD(params, lr=0.01, momentum=0.9)


def _batches(x, y, batch):
    """The i-th batch, sliced from a data set of several batches (as a user's loop takes them)."""
    count = x.shape[0] // batch
    return lambda i: (x[(i % count) * batch:(i % count + 1) * batch], y[(i % count) * batch:(i % count + 1) * batch])


def nbcnn_step(name, x, y, batch, device="cpu"):
    """The loop a PyTorch user writes: zero_grad, forward, loss, ``model.backward(dlogits)`` with no
    other argument, optimizer step, int64 labels, batches sliced from a larger array. Returns the
    step function."""
    import nbcnn
    from nbcnn.losses import SoftmaxCrossEntropy

    model = nbcnn_model(name).to(device)
    loss_fn = SoftmaxCrossEntropy()
    opt = _optimizer(nbcnn.optim, name, model.parameters())
    batches = _batches(nbcnn.to_device(x, device), nbcnn.to_device(y, device), batch)
    count = [0]

    def step():
        xb, yb = batches(count[0])
        count[0] += 1
        opt.zero_grad()
        loss = loss_fn.forward(model.forward(xb), yb)
        model.backward(loss_fn.backward())
        opt.step()
        return loss

    return step


def trainer_step(name, x, y, batch, device="cpu"):
    """The same training on the Trainer's step (what ``nbcnn train`` runs): no input gradient for the
    first layer, the loss added on the device, int32 labels. Returns the step function."""
    import nbcnn
    from nbcnn.losses import SoftmaxCrossEntropy
    from nbcnn.step import Trainer

    model = nbcnn_model(name).to(device)
    trainer = Trainer(model, SoftmaxCrossEntropy(), _optimizer(nbcnn.optim, name, model.parameters()))
    batches = _batches(nbcnn.to_device(x, device), nbcnn.to_device(y.astype(np.int32), device), batch)
    count = [0]

    def step():
        trainer.step(*batches(count[0]))
        count[0] += 1

    return step


def torch_step(torch, name, x, y, batch):
    model = torch_model(torch, name)
    opt = _optimizer(torch.optim, name, model.parameters())
    batches = _batches(torch.from_numpy(x), torch.from_numpy(y), batch)
    cross_entropy = torch.nn.functional.cross_entropy
    count = [0]

    def step():
        xb, yb = batches(count[0])
        count[0] += 1
        opt.zero_grad()
        loss = cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def step_flops(name, batch):
    """FLOPs of one training step of ``name`` at ``batch``, from the kernels' cost models (one step
    run under the profiler's recorder)."""
    import nbcnn
    from nbcnn.losses import SoftmaxCrossEntropy
    from nbcnn.perf.profile import Recorder
    from nbcnn.step import Trainer

    model = nbcnn_model(name)
    rec = Recorder("cpu")
    opt = _optimizer(nbcnn.optim, name, model.parameters())
    trainer = Trainer(model, SoftmaxCrossEntropy(kernels=rec), opt, kernels=rec, spans=rec)
    trainer.step(np.zeros((batch, 1, 28, 28), np.float32), np.zeros(batch, np.int32))
    return sum(e["flops"] for e in rec.take() if e["kind"] == "kernel")


def time_steps(steps_by_impl, steps, repeats):
    """{impl: median seconds a step}: after 3 warm-up steps each, ``repeats`` blocks of ``steps``
    steps. One implementation is timed a block at a time; several take turns step by step (a step
    of each in order, ``steps`` times), each step timed on its own and summed per implementation,
    so that each runs right after the other has used the cores and the caches."""
    for step in steps_by_impl.values():
        for _ in range(3):
            step()
    times = {impl: [] for impl in steps_by_impl}
    clock = time.perf_counter
    for _ in range(repeats):
        if len(steps_by_impl) == 1:
            (impl, step), = steps_by_impl.items()
            start = clock()
            for _ in range(steps):
                step()
            times[impl].append((clock() - start) / steps)
            continue
        spent = dict.fromkeys(steps_by_impl, 0.0)
        for _ in range(steps):
            for impl, step in steps_by_impl.items():
                start = clock()
                step()
                spent[impl] += clock() - start
        for impl, seconds in spent.items():
            times[impl].append(seconds / steps)
    return {impl: statistics.median(t) for impl, t in times.items()}


def run_in_this_process(impl, model, batch, steps, repeats):
    torch_first = _imported_before_nbcnn()
    torch = None
    if impl in ("torch", "both"):
        import torch
    import numba

    threads = numba.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4 * batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 4 * batch).astype(np.int64)
    steps_by_impl = {}
    if impl in ("nbcnn", "both", "trainer"):
        steps_by_impl["nbcnn"] = nbcnn_step(model, x, y, batch)
    if impl == "trainer":
        steps_by_impl["trainer"] = trainer_step(model, x, y, batch)
    if impl in ("torch", "both"):
        steps_by_impl["torch"] = torch_step(torch, model, x, y, batch)
    medians = time_steps(steps_by_impl, steps, repeats)
    out = dict(model=model, batch=batch, threads=threads, torch_first=torch_first,
               threading_layer=numba.threading_layer() if "nbcnn" in medians else None,
               flops=step_flops(model, batch) if "nbcnn" in medians else None)
    out.update({f"{name}_seconds": seconds for name, seconds in medians.items()})
    return out


def _imported_before_nbcnn():
    """Whether PyTorch was in this process before nbcnn: its OpenMP runtime was then loaded first,
    which ``nbcnn.kernels`` notices."""
    from nbcnn import kernels

    return "torch" in sys.modules and kernels.OPENMP_LOADED_FIRST


def measure(impl, model, batch, steps=20, repeats=7, torch_first=False):
    """``run_in_this_process`` in a fresh Python process, PyTorch imported before nbcnn when
    ``torch_first``, and always for PyTorch alone: nbcnn sets ``OMP_WAIT_POLICY`` for the OpenMP
    runtime that loads after it, which would not be PyTorch as its users run it. Its JSON line as a
    dict."""
    torch_first = torch_first or impl == "torch"
    code = ("import torch\n" if torch_first else "") + "from nbcnn.perf.stepbench import main\nmain()"
    command = [sys.executable, "-c", code, "--impl", impl, "--model", model, "--batch", str(batch),
               "--steps", str(steps), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the step benchmark's process failed ({impl} {model} batch {batch}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nbcnn.perf.stepbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=["nbcnn", "torch", "both", "trainer"], default="nbcnn")
    p.add_argument("--model", choices=STEP_MODELS, default="default")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    print(json.dumps(run_in_this_process(args.impl, args.model, args.batch, args.steps, args.repeats)))


if __name__ == "__main__":
    main()
