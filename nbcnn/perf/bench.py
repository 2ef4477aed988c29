"""``nbcnn bench``: a fixed suite of kernels and training epochs, timed, optionally against PyTorch.

Every row is checked before it is timed: against PyTorch's result with ``--vs torch``,
else against nbcnn's reference kernels (the direct loops on the CPU, the CPU twins for
CUDA) on the same shape with a batch of 2. With PyTorch, both libraries run the same
work in one process, on the same device and thread count, interleaved run by run, so
that a slow moment of the machine hits both. Times are medians.

The report starts with the machine's peak, measured on the spot before and after the rows, the
higher kept (``nbcnn.perf.profile``: on the CPU, independent FMA chains in the matrix product's
vectors on every Numba thread), and every row with FLOPs gives its share of it.

On the CPU the suite ends with one training step through the public API (the loop a PyTorch
user writes: ``nbcnn.perf.stepbench``) of three models at two batch sizes, every measurement in
a fresh process: each library alone, nbcnn with PyTorch imported first, and the two interleaved
step by step in one process. Both libraries start from the same weights.
"""

import time

import numpy as np

from nbcnn import ops
from nbcnn.device import resolve_device, to_device, to_numpy
from nbcnn.perf.peer import torch_module
from nbcnn.perf.profile import cost, machine_info, measure_cpu_peak, measure_gpu_peak

# The public entry point each kernel row times, per device: what a user calling the kernels gets.
PUBLIC = {
    ("conv2d_forward", "cpu"): "conv2d_forward_gemm_cpu", ("conv2d_forward", "cuda"): "conv2d_forward_cuda",
    ("conv2d_backward_input", "cpu"): "conv2d_backward_input_gemm_cpu",
    ("conv2d_backward_input", "cuda"): "conv2d_backward_input_cuda",
    ("conv2d_backward_weight", "cpu"): "conv2d_backward_weight_gemm_cpu",
    ("conv2d_backward_weight", "cuda"): "conv2d_backward_weight_cuda",
    ("maxpool2d_forward", "cpu"): "maxpool2d_forward_cpu", ("maxpool2d_forward", "cuda"): "maxpool2d_forward_cuda",
    ("maxpool2d_backward", "cpu"): "maxpool2d_backward_cpu", ("maxpool2d_backward", "cuda"): "maxpool2d_backward_cuda",
}


def _kernel(op, device):
    return ops.public_kernel(PUBLIC[(op, getattr(device, "kind", device))])

# (name, N, C, H, W, K, F, P): two layers of MNIST-sized networks and a large 3x3 layer of a
# CIFAR-sized one.
CONV_SHAPES = [
    ("N64 1->32 28x28 3x3", 64, 1, 28, 28, 32, 3, 0),
    ("N64 32->64 13x13 3x3", 64, 32, 13, 13, 64, 3, 0),
    ("N128 64->64 32x32 3x3 p1", 128, 64, 32, 32, 64, 3, 1),
]
EPOCH_MODELS = ["lenet", "mnist-example", "bn"]
# (model, batch) of the public-API step rows (``nbcnn.perf.stepbench``), on the CPU, and steps per timed block.
STEP_CASES = [("default", 128), ("default", 64), ("lenet5", 128), ("lenet5", 64), ("mnist-example", 128),
              ("mnist-example", 64)]
STEP_STEPS = 20


class TorchMissing(ValueError):
    """--vs torch without PyTorch installed."""


def _torch():
    try:
        import torch
    except ImportError:
        raise TorchMissing("--vs torch needs PyTorch, which is not installed here: pip install torch "
                           "(a CPU build is enough on the CPU), or run nbcnn bench without --vs torch") from None
    return torch


def _timer(device):
    """A function that runs ``fn`` once and returns its seconds, waiting for the GPU when there is one."""
    if device == "cuda":
        from numba import cuda

        def run(fn):
            start, end = cuda.event(), cuda.event()
            cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return cuda.event_elapsed_time(start, end) / 1e3
    else:
        def run(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return run


def _torch_timer(torch, device):
    def run(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max()) / scale
    if not err < 1e-3:
        raise AssertionError(f"bench: {what}: results disagree (max error {err:.2e} of the largest value)")
    return err


# ------------------------------------------------------------------------- kernel rows


def _conv_arrays(rng, N, C, H, W, K, F, P):
    OH = H + 2 * P - F + 1
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = (rng.standard_normal((K, C, F, F)) / np.sqrt(C * F * F)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    dy = rng.standard_normal((N, K, OH, OH)).astype(np.float32)
    return x, w, b, dy, OH


def _nbcnn_conv_calls(device, x, w, b, dy, P):
    """(name, call, output array, kernel args) for the conv rows, on ``device``, with outputs allocated."""
    N, C, H, W = x.shape
    K = w.shape[0]
    OH = dy.shape[2]
    d = {k: to_device(v, device) for k, v in dict(x=x, w=w, b=b, dy=dy).items()}
    y = device.empty((N, K, OH, OH), np.float32)
    dx = device.empty(x.shape, np.float32)
    dw = device.empty(w.shape, np.float32)
    pool_y = device.empty((N, K, OH // 2, OH // 2), np.float32)
    argmax = device.empty((N, K, OH // 2, OH // 2), np.int32)
    pool_dx = device.empty((N, K, OH, OH), np.float32)
    pool_dy = to_device(np.ones((N, K, OH // 2, OH // 2), np.float32), device)
    rows = [
        ("conv2d forward", "conv2d_forward", (y, d["x"], d["w"], d["b"], 1, 1, P, P)),
        ("conv2d backward-input", "conv2d_backward_input", (dx, d["dy"], d["w"], 1, 1, P, P)),
        ("conv2d backward-weight", "conv2d_backward_weight", (dw, d["dy"], d["x"], 1, 1, P, P)),
        ("maxpool2d 2x2 forward", "maxpool2d_forward", (pool_y, argmax, d["dy"], 2, 2, 2, 2, 0, 0)),
        ("maxpool2d 2x2 backward", "maxpool2d_backward", (pool_dx, pool_dy, argmax, 2, 2, 2, 2, 0, 0)),
    ]
    return [(name, op, args) for name, op, args in rows]


def _torch_conv_calls(torch, device, x, w, b, dy, P):
    F = torch.nn.functional
    dev = "cuda" if device == "cuda" else "cpu"
    xt, wt, bt, dyt = (torch.from_numpy(a).to(dev) for a in (x, w, b, dy))
    _, idx = F.max_pool2d(dyt, 2, return_indices=True)
    pool_dy = torch.ones_like(_)
    calls = {
        "conv2d forward": lambda: F.conv2d(xt, wt, bt, padding=P),
        "conv2d backward-input": lambda: torch.nn.grad.conv2d_input(xt.shape, wt, dyt, padding=P),
        "conv2d backward-weight": lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, dyt, padding=P),
        "maxpool2d 2x2 forward": lambda: F.max_pool2d(dyt, 2, return_indices=True)[0],
        "maxpool2d 2x2 backward": lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            pool_dy, dyt, [2, 2], [2, 2], [0, 0], [1, 1], False, idx),
    }
    return calls


def _layer_pass(device, x, w, b, dy, P):
    """(call, dw, flops): one convolution layer's forward and backward as a training step runs them
    (its plan: on the CPU the forward's im2col matrix reused, one call for dx, dw and db)."""
    from nbcnn import layers as L

    layer = L.Conv2D(w.shape[1], w.shape[0], w.shape[2], padding=P).to(device)
    layer.weight.data, layer.bias.data = to_device(w, device), to_device(b, device)
    d = {k: to_device(v, device) for k, v in dict(x=x, dy=dy).items()}

    def call():
        layer.forward(d["x"])
        layer.backward(d["dy"])

    # the cost model's two calls (x stands in for dx and dy for y: only their shapes count)
    flops = (cost("conv2d_forward", (d["dy"], d["x"], layer.weight.data, layer.bias.data))[0]
             + cost("conv2d_backward", (d["x"], layer.weight.grad, layer.bias.grad, d["dy"], d["x"],
                                        layer.weight.data))[0])
    return call, layer.weight.grad, flops


def _torch_layer_pass(torch, device, x, w, b, dy, P):
    """The same in PyTorch: conv2d, then autograd's backward to x, w and b; returns (call, w)."""
    dev = "cuda" if device == "cuda" else "cpu"
    xt, wt, bt = (torch.from_numpy(a).to(dev).requires_grad_() for a in (x, w, b))
    dyt = torch.from_numpy(dy).to(dev)

    def call():
        xt.grad = wt.grad = bt.grad = None
        torch.nn.functional.conv2d(xt, wt, bt, padding=P).backward(dyt)

    return call, wt


def _reference_check(device, shape, rng):
    """Check the kernels the dispatcher uses against the reference ones on this shape, batch 2."""
    from nbcnn.kernels import conv2d, pool2d

    name, N, C, H, W, K, F, P = shape
    x, w, b, dy, OH = _conv_arrays(rng, 2, C, H, W, K, F, P)
    fast = _nbcnn_conv_calls(device, x, w, b, dy, P)
    ref = {
        "conv2d_forward": lambda y, x_, w_, b_, *a: conv2d.conv2d_forward_cpu(y, x_, w_, b_, *a),
        "conv2d_backward_input": conv2d.conv2d_backward_input_cpu,
        "conv2d_backward_weight": conv2d.conv2d_backward_weight_cpu,
        "maxpool2d_forward": pool2d.maxpool2d_forward_cpu,
        "maxpool2d_backward": pool2d.maxpool2d_backward_cpu,
    }
    for row, op, args in fast:
        _kernel(op, device)(*args)
        host = [to_numpy(a) if hasattr(a, "shape") else a for a in args]
        want = [np.empty_like(a) if i == 0 and hasattr(a, "shape") else a for i, a in enumerate(host)]
        ref[op](*want)
        _close(host[0], want[0], f"{name} {row} against the reference kernel")


def kernel_rows(device, vs, repeats, rng):
    timer = _timer(device)
    rows = []
    torch = _torch() if vs == "torch" else None
    for shape in CONV_SHAPES:
        name, N, C, H, W, K, F, P = shape
        x, w, b, dy, OH = _conv_arrays(rng, N, C, H, W, K, F, P)
        calls = _nbcnn_conv_calls(device, x, w, b, dy, P)
        peers = _torch_conv_calls(torch, device, x, w, b, dy, P) if torch else {}
        if not torch:
            _reference_check(device, shape, rng)
        for row, op, args in calls:
            fn = _kernel(op, device)
            run = (lambda fn=fn, args=args: fn(*args))
            run()  # compiles
            flops, nbytes = cost(op, args)
            entry = dict(name=f"{row}", shape=name, flops=flops, bytes=nbytes)
            ours = []
            if torch:
                peer = peers[row]
                result = peer()
                entry["check_error"] = _close(to_numpy(args[0]), result.cpu().numpy(), f"{name} {row}")
                theirs, ttimer = [], _torch_timer(torch, device)
                for _ in range(repeats):
                    ours.append(timer(run))
                    theirs.append(ttimer(peer))
                entry["torch_seconds"] = float(np.median(theirs))
            else:
                ours = [timer(run) for _ in range(repeats)]
            entry["nbcnn_seconds"] = float(np.median(ours))
            rows.append(entry)
        rows.append(_layer_row(device, torch, repeats, name, x, w, b, dy, P))
    return rows


def _layer_row(device, torch, repeats, name, x, w, b, dy, P):
    """A whole convolution layer through the layer API, forward then backward (dx, dw, db)."""
    timer = _timer(device)
    run, dw, flops = _layer_pass(device, x, w, b, dy, P)
    run()  # compiles
    entry = dict(name="conv2d forward + backward", shape=name, flops=flops, bytes=0)
    if torch:
        peer, wt = _torch_layer_pass(torch, device, x, w, b, dy, P)
        peer()
        entry["check_error"] = _close(to_numpy(dw), wt.grad.cpu().numpy(), f"{name} forward + backward, dw")
        ours, theirs, ttimer = [], [], _torch_timer(torch, device)
        for _ in range(repeats):
            ours.append(timer(run))
            theirs.append(ttimer(peer))
        entry["torch_seconds"] = float(np.median(theirs))
    else:
        from nbcnn.kernels import conv2d

        want = conv2d.conv2d_backward_weight_cpu(np.empty(w.shape, np.float32), dy, x, 1, 1, P, P)
        _close(to_numpy(dw), want, f"{name} forward + backward, dw against the reference kernel")
        ours = [timer(run) for _ in range(repeats)]
    entry["nbcnn_seconds"] = float(np.median(ours))
    return entry


# -------------------------------------------------------------------------- epoch rows


def epoch_rows(device, vs, images, rng):
    from nbcnn import layers as L
    from nbcnn.data import load_dataset, normalization, prepare
    from nbcnn.losses import SoftmaxCrossEntropy
    from nbcnn.models import MODELS
    from nbcnn.optim import Adam
    from nbcnn.step import Trainer

    torch = _torch() if vs == "torch" else None
    data = load_dataset()
    mean, std = normalization(data["train_images"])
    x_host = prepare(data["train_images"][:images], mean, std)
    y_host = data["train_labels"][:images].astype(np.int32)
    x, y = to_device(x_host, device), to_device(y_host, device)
    order_host = rng.permutation(images).astype(np.int32)
    order = to_device(order_host, device)
    rows = []
    for name in EPOCH_MODELS:
        L.set_seed(0)
        model = MODELS[name]().to(device)
        entry = dict(name=f"training epoch, {name}", shape=f"{images} images, batch 64, Adam", flops=0, bytes=0)
        if torch:
            dev = "cuda" if device == "cuda" else "cpu"
            tmodel = torch_module(torch, model)[0].to(dev)
            probe = x_host[:64]
            model.train(False)  # evaluation mode for the check: no dropout, the running statistics
            tmodel.train(False)
            with torch.no_grad():
                want = tmodel(torch.from_numpy(probe).to(dev)).cpu().numpy()
            entry["check_error"] = _close(to_numpy(model.forward(to_device(probe, device))), want,
                                          f"{name} forward pass")
            model.train(True)
            tmodel.train(True)
        # Warm up (compilation) on a few batches, then time one epoch.
        trainer = Trainer(model, SoftmaxCrossEntropy(), Adam(model.parameters(), lr=1e-3))
        trainer.run_epoch(x, y, order[:256], 64)
        start = time.perf_counter()
        trainer.run_epoch(x, y, order, 64)
        entry["nbcnn_seconds"] = time.perf_counter() - start
        if torch:
            entry["torch_seconds"] = _torch_epoch(torch, tmodel, x_host, y_host, order_host, device)
        rows.append(entry)
    return rows


def _torch_epoch(torch, model, x_host, y_host, order, device):
    dev = "cuda" if device == "cuda" else "cpu"
    X, Y = torch.from_numpy(x_host).to(dev), torch.from_numpy(y_host).long().to(dev)
    idx = torch.from_numpy(order).long().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    F = torch.nn.functional

    def steps(index):
        for start in range(0, index.shape[0], 64):
            b = index[start:start + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(X[b]), Y[b])
            loss.backward()
            opt.step()
            loss.item()  # nbcnn reads every step's loss too

    steps(idx[:256])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    steps(idx)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_rows(vs, repeats):
    """One training step through the public API, each measurement in a process of its own
    (``nbcnn.perf.stepbench``). Without PyTorch: nbcnn alone. With it, three rows a case, each a
    ratio to PyTorch: nbcnn alone against PyTorch alone ("own processes"); nbcnn in a process that
    imported PyTorch first (its OpenMP runtime loaded before Numba's threads start) against
    PyTorch alone ("PyTorch first"); both in one process that imported PyTorch first, their steps
    alternating one by one ("interleaved", a notebook comparing the two). CPU only."""
    from nbcnn.perf.stepbench import measure

    rows = []
    for model, batch in STEP_CASES:
        alone = measure("nbcnn", model, batch, STEP_STEPS, repeats)
        shape = f"batch {batch}, {alone['threads']} threads"

        def row(kind, got, torch_seconds=None):
            entry = dict(name=f"step, {model}, {kind}", shape=shape, flops=got["flops"], bytes=0,
                         nbcnn_seconds=got["nbcnn_seconds"], threading_layer=got["threading_layer"])
            if torch_seconds is not None:
                entry["torch_seconds"] = torch_seconds
            rows.append(entry)

        if vs != "torch":
            row("own processes", alone)
            continue
        torch_alone = measure("torch", model, batch, STEP_STEPS, repeats)["torch_seconds"]
        row("own processes", alone, torch_alone)
        row("PyTorch first", measure("nbcnn", model, batch, STEP_STEPS, repeats, torch_first=True), torch_alone)
        both = measure("both", model, batch, STEP_STEPS, repeats, torch_first=True)
        row("interleaved", both, both["torch_seconds"])
    return rows


# ------------------------------------------------------------------------------- report


def run_bench(device="auto", vs=None, repeats=7, epoch_images=60000, seed=0):
    import numba

    device = resolve_device(device)
    torch = _torch() if vs == "torch" else None
    threads = numba.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise TorchMissing("--vs torch on cuda needs a PyTorch build with CUDA; this one has none")
    if not 1 <= epoch_images <= 60000:
        raise ValueError(f"epoch images must be in [1, 60000], got {epoch_images}")
    measure_peak = measure_gpu_peak if device == "cuda" else measure_cpu_peak
    peak = measure_peak()
    rng = np.random.default_rng(seed)
    rows = kernel_rows(device, vs, repeats, rng) + epoch_rows(device, vs, epoch_images, rng)
    if device == "cpu":
        rows += step_rows(vs, repeats)
    # measured again at the end, the higher kept: a slow moment of the machine only ever lowers it
    peak = max(peak, measure_peak(), key=lambda p: p["flops"])
    for r in rows:
        for impl in ("nbcnn", "torch"):
            if f"{impl}_seconds" in r:
                rate = r["flops"] / r[f"{impl}_seconds"] if r["flops"] else None
                r[f"{impl}_gflops"] = rate / 1e9 if rate else None
                r[f"{impl}_peak_share"] = rate / peak["flops"] if rate else None
        if "torch_seconds" in r:
            r["time_ratio"] = r["nbcnn_seconds"] / r["torch_seconds"]
    info = machine_info(device)
    if torch is not None:
        info["torch"] = torch.__version__
    return dict(device=device, threads=threads, vs=vs, repeats=repeats, date=time.strftime("%Y-%m-%d"),
                machine=info, peak=peak, rows=rows)


def format_bench(report):
    m, peak = report["machine"], report["peak"]
    where = m.get("gpu") or f"{m['cpu']}, {report['threads']} threads"
    lines = [f"nbcnn bench on {report['device']} ({where}), {report['date']}; numba {m['numba']}"
             + (f", torch {m['torch']}" if "torch" in m else "") + f"; median of {report['repeats']} runs",
             f"measured peak: {peak['flops'] / 1e9:.1f} GFLOP/s ({peak['how']}); %peak = GFLOP/s over it",
             "ratio = nbcnn time / PyTorch time (below 1: nbcnn is faster)", ""]

    def rate(r, impl):
        if not r.get(f"{impl}_gflops"):
            return f"{'':>8} {'':>5}"
        return f"{r[f'{impl}_gflops']:8.1f} {100 * r[f'{impl}_peak_share']:4.0f}%"

    head = f"{'row':<34} {'shape':<28} {'nbcnn':>10} {'GFLOP/s':>8} {'%peak':>5}"
    if report["vs"]:
        head += f" {'torch':>10} {'GFLOP/s':>8} {'%peak':>5} {'ratio':>6}"
    lines.append(head)
    for r in report["rows"]:
        t = r["nbcnn_seconds"]
        unit = (lambda s: f"{s * 1e3:8.2f}ms") if t < 1 else (lambda s: f"{s:8.2f} s")
        line = f"{r['name']:<34} {r['shape']:<28} {unit(t):>10} {rate(r, 'nbcnn')}"
        if "torch_seconds" in r:
            line += f" {unit(r['torch_seconds']):>10} {rate(r, 'torch')} {r['time_ratio']:6.2f}"
        lines.append(line)
    return "\n".join(lines)
