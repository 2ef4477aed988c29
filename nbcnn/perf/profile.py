"""Profiling: what each kernel costs (FLOPs, bytes), what the machine can do (a measured peak),
and where one training step spends its time, per layer and per kernel.

FLOPs count a multiply-add as two operations and a comparison as one. Bytes are the
least traffic a kernel needs: every array it reads or writes, once. Both are computed
from the arrays a kernel receives, so they hold for any shape (the cost models live with
the kernels' registry, ``nbcnn.ops``).

The profile runs the training step that ``nbcnn train`` runs (``nbcnn.step.Trainer``), with a
``Recorder`` in place of the kernel registry: it hands out the registry's kernels wrapped in
timers, and labels each layer's forward and backward. Nothing is patched.
"""

import json
import os
import platform
import time

import numpy as np

from nbcnn import ops
from nbcnn.checks import check_choice, check_int
from nbcnn.ops import COSTS, cost  # noqa: F401  (the cost model, re-exported: nbcnn.perf.profile.cost)


# ------------------------------------------------------------------------------ the machine


def measure_cpu_peak(seconds=0.3):
    """Measured float32 FLOP/s with every Numba thread running independent FMA chains in the widest
    vectors the CPU has (``kernels.matmul.fma_chains``, in the matrix product's tile: as many
    chains as its accumulators), and copy bandwidth."""
    import numba

    from nbcnn.kernels import matmul

    threads = numba.get_num_threads()
    out = np.zeros(threads, np.float32)
    matmul.fma_peak_cpu(out, 16)
    per_step = matmul.peak_flops_per_step(matmul.TILE)
    reps, best = 1 << 14, 0.0
    while True:
        t = time.perf_counter()
        matmul.fma_peak_cpu(out, reps)
        dt = time.perf_counter() - t
        best = max(best, per_step * reps * threads / dt)
        if dt > seconds / 3:
            break
        reps *= 2
    for _ in range(2):  # the best of a few more: the machine's other work only ever lowers it
        t = time.perf_counter()
        matmul.fma_peak_cpu(out, reps)
        best = max(best, per_step * reps * threads / (time.perf_counter() - t))
    src = np.ones(2**25, np.float32)  # 128 MiB: far beyond the caches
    dst = np.empty_like(src)
    copies = []
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        copies.append(time.perf_counter() - t)
    tile = matmul.TILE_NAMES[matmul.TILE]
    return dict(flops=best, bandwidth=2 * src.nbytes / min(copies), threads=threads,
                how=f"independent FMA chains in the {tile} tile's vectors on {threads} Numba threads; "
                    f"np.copyto of 128 MiB (read + write)")


FP32_LANES = {(6, 0): 64, (6, 1): 128, (7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128,
              (9, 0): 128, (10, 0): 128, (12, 0): 128}


def measure_gpu_peak():
    """The GPU's float32 peak from SMs x clock x FP32 lanes x 2, and a measured device copy."""
    from numba import cuda

    dev = cuda.get_current_device()
    cc = tuple(dev.compute_capability)
    sms = dev.MULTIPROCESSOR_COUNT
    clock_hz = dev.CLOCK_RATE * 1e3
    lanes = FP32_LANES.get(cc, 128)
    src = cuda.device_array(2**26, np.float32)
    dst = cuda.device_array(2**26, np.float32)
    start, end = cuda.event(), cuda.event()
    times = []
    for _ in range(5):
        start.record()
        dst.copy_to_device(src)
        end.record()
        end.synchronize()
        times.append(cuda.event_elapsed_time(start, end) / 1e3)
    return dict(flops=sms * clock_hz * lanes * 2, bandwidth=2 * src.nbytes / min(times[1:]),
                how=f"{sms} SMs x {clock_hz / 1e9:.2f} GHz x {lanes} FP32 lanes x 2; device copy of 256 MiB")


def machine_info(device):
    import numba

    info = dict(python=platform.python_version(), numpy=np.__version__, numba=numba.__version__,
                machine=platform.machine(), system=platform.system(), cpus=os.cpu_count(),
                numba_threads=numba.get_num_threads(), cpu=_cpu_name())
    try:
        from importlib.metadata import version

        info["numba_cuda"] = version("numba-cuda")
    except Exception:
        pass
    if device == "cuda":
        from numba import cuda

        name = cuda.get_current_device().name
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------- timing


class Recorder:
    """Times every kernel a planned step runs, and labelled spans of code.

    Give it where a plan takes its kernels (``Trainer(..., kernels=rec, spans=rec)``): ``get``
    returns the registry's kernel with its ``run`` wrapped, so every call records its op, the
    current label, its start, its duration and its cost. On a GPU each call is bracketed by
    CUDA events and waited for, so the duration is the kernel's own; on the CPU it is the host
    clock around the call.
    """

    def __init__(self, device, registry=ops.REGISTRY):
        self.device = device
        self.registry = registry
        self.events = []
        self.label = ("", "")
        self.origin = time.perf_counter()
        self._wrapped = {}

    def get(self, op, device, algorithm=None):
        kernel = self.registry.get(op, device, algorithm)
        key = (kernel.op, kernel.device, kernel.algorithm)
        if key not in self._wrapped:
            self._wrapped[key] = ops.Kernel(kernel.op, kernel.device, kernel.algorithm, self._wrap(kernel),
                                            kernel.workspace)
        return self._wrapped[key]

    def _sync(self):
        if self.device == "cuda":
            from numba import cuda

            cuda.synchronize()

    def _wrap(self, kernel):
        run, op = kernel.run, kernel.op

        def timed(*args):
            if self.device == "cuda":
                from numba import cuda

                start_event, end_event = cuda.event(), cuda.event()
                cuda.synchronize()
                start = time.perf_counter()
                start_event.record()
                run(*args)
                end_event.record()
                end_event.synchronize()
                seconds = cuda.event_elapsed_time(start_event, end_event) / 1e3
            else:
                start = time.perf_counter()
                run(*args)
                seconds = time.perf_counter() - start
            flops, nbytes = kernel.cost(args)
            self.events.append(dict(kind="kernel", name=op, layer=self.label[0], phase=self.label[1],
                                    start=start - self.origin, seconds=seconds, flops=flops, bytes=nbytes))

        return timed

    def span(self, layer, phase):
        """A context that labels the kernels run inside it and records its own wall time."""
        rec = self

        class _Span:
            def __enter__(self):
                rec._sync()
                rec.label = (layer, phase)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                rec._sync()
                end = time.perf_counter()
                rec.events.append(dict(kind="span", name=f"{layer} {phase}", layer=layer, phase=phase,
                                       start=self.start - rec.origin, seconds=end - self.start, flops=0, bytes=0))
                rec.label = ("", "")
                return False

        return _Span()

    def take(self):
        events, self.events = self.events, []
        return events


def profile_step(model_name="lenet", device="cpu", batch_size=64, repeats=10, seed=0):
    """Profile one training step: returns a dict of machine, peak, layers, kernels and trace events."""
    from nbcnn import layers as L
    from nbcnn.device import resolve_device, to_device
    from nbcnn.losses import SoftmaxCrossEntropy
    from nbcnn.models import MODELS
    from nbcnn.optim import Adam
    from nbcnn.step import Trainer

    device = resolve_device(device)
    check_choice("profile", "model", model_name, MODELS)
    check_int("profile", "batch_size", batch_size, minimum=1)
    check_int("profile", "repeats", repeats, minimum=1)
    L.set_seed(seed)
    model = MODELS[model_name]().to(device)
    rec = Recorder(device)
    trainer = Trainer(model, SoftmaxCrossEntropy(kernels=rec), Adam(model.parameters(), kernels=rec), kernels=rec,
                      spans=rec)
    rng = np.random.default_rng(seed)
    data_x = to_device(rng.standard_normal((batch_size, 1, 28, 28)).astype(np.float32), device)
    data_y = to_device(rng.integers(0, 10, batch_size).astype(np.int32), device)
    idx = to_device(np.arange(batch_size, dtype=np.int32), device)

    def step():
        trainer.step(*trainer.batch(data_x, data_y, idx))

    step()  # the first step compiles every kernel (or loads it from Numba's cache)
    cold = rec.take()
    step()  # warm-up
    rec.take()
    runs = []
    for _ in range(repeats):
        step()
        runs.append(rec.take())
    peak = measure_gpu_peak() if device == "cuda" else measure_cpu_peak()

    rows = []
    for i, first in enumerate(cold):
        seconds = float(np.median([run[i]["seconds"] for run in runs]))
        row = {k: first[k] for k in ("kind", "name", "layer", "phase", "flops", "bytes")}
        row.update(seconds=seconds, compile_seconds=max(0.0, first["seconds"] - seconds))
        row["gflops"] = row["flops"] / seconds / 1e9 if seconds > 0 else 0.0
        row["gbytes_per_s"] = row["bytes"] / seconds / 1e9 if seconds > 0 else 0.0
        row["peak_flops_share"] = row["flops"] / seconds / peak["flops"] if seconds > 0 else 0.0
        row["peak_bandwidth_share"] = row["bytes"] / seconds / peak["bandwidth"] if seconds > 0 else 0.0
        rows.append(row)
    spans = [r for r in rows if r["kind"] == "span"]
    kernels = [r for r in rows if r["kind"] == "kernel"]
    step_seconds = sum(r["seconds"] for r in spans)
    for r in spans:  # a span's work is that of the kernels it ran
        mine = [k for k in kernels if k["layer"] == r["layer"] and k["phase"] == r["phase"]]
        r["flops"] = sum(k["flops"] for k in mine)
        r["bytes"] = sum(k["bytes"] for k in mine)
        r["gflops"] = r["flops"] / r["seconds"] / 1e9 if r["seconds"] > 0 else 0.0
        r["share_of_step"] = r["seconds"] / step_seconds if step_seconds > 0 else 0.0
    trace = runs[-1]
    return dict(device=str(device), model=model_name, batch_size=batch_size, repeats=repeats,
                machine=machine_info(device), peak=peak, step_seconds=step_seconds,
                compile_seconds=sum(r["compile_seconds"] for r in kernels),
                layers=spans, kernels=kernels, trace=chrome_trace(trace))


def chrome_trace(events):
    """Chrome trace format (chrome://tracing, Perfetto): layers on one row, kernels on another."""
    t0 = min(e["start"] for e in events)
    out = []
    for e in events:
        out.append(dict(name=e["name"], cat=e["kind"], ph="X", pid=1, tid=1 if e["kind"] == "span" else 2,
                        ts=(e["start"] - t0) * 1e6, dur=e["seconds"] * 1e6,
                        args=dict(layer=e["layer"], phase=e["phase"], flops=e["flops"], bytes=e["bytes"])))
    out.append(dict(name="thread_name", ph="M", pid=1, tid=1, args=dict(name="layers")))
    out.append(dict(name="thread_name", ph="M", pid=1, tid=2, args=dict(name="kernels")))
    return dict(traceEvents=out, displayTimeUnit="ms")


def format_profile(report):
    """The profile as a terminal table."""
    peak = report["peak"]
    lines = [
        f"nbcnn profile: one training step of {report['model']}, batch {report['batch_size']}, on "
        f"{report['device']} ({report['machine'].get('gpu') or report['machine']['cpu']}, "
        f"{report['machine']['numba_threads']} Numba threads), median of {report['repeats']} steps",
        f"measured peak: {peak['flops'] / 1e9:.1f} GFLOP/s, {peak['bandwidth'] / 1e9:.1f} GB/s ({peak['how']})",
        f"step: {report['step_seconds'] * 1e3:.2f} ms; compilation on the first step: "
        f"{report['compile_seconds']:.2f} s (not included)",
        "",
        f"{'layer / kernel':<40} {'phase':<9} {'ms':>8} {'step':>6} {'MFLOP':>9} {'GFLOP/s':>8} {'GB/s':>7}"
        f" {'%peak':>6} {'%bw':>5}",
    ]
    for span in report["layers"]:
        lines.append(f"{span['layer']:<40} {span['phase']:<9} {span['seconds'] * 1e3:8.3f} "
                     f"{100 * span['share_of_step']:5.1f}% {span['flops'] / 1e6:9.2f} {span['gflops']:8.2f}")
        for k in report["kernels"]:
            if k["layer"] == span["layer"] and k["phase"] == span["phase"]:
                lines.append(f"  {k['name']:<38} {'':<9} {k['seconds'] * 1e3:8.3f} {'':>6} {k['flops'] / 1e6:9.2f} "
                             f"{k['gflops']:8.2f} {k['gbytes_per_s']:7.2f} {100 * k['peak_flops_share']:5.1f}% "
                             f"{100 * k['peak_bandwidth_share']:4.0f}%")
    return "\n".join(lines)


def write_json(path, obj):
    from nbcnn.model import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))
