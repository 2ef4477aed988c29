"""Profiling and benchmarking: cost model against hand counts, report schemas. No test asserts a time."""

import json
import sys

import numpy as np
import pytest

from nbcnn import cli
from nbcnn.perf import bench
from nbcnn.perf.profile import chrome_trace, cost, profile_step


def arr(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def test_conv_cost_of_the_lecture_example():
    # 32x32x3 input, 10 filters 5x5, P=0, S=1 -> 28x28x10: 28*28*10 outputs of 5*5*3 = 75
    # multiply-adds each, 2 FLOPs per multiply-add.
    y, x, w, b = arr(1, 10, 28, 28), arr(1, 3, 32, 32), arr(10, 3, 5, 5), arr(10)
    flops, nbytes = cost("conv2d_forward", (y, x, w, b, 1, 1, 0, 0))
    assert flops == 2 * 28 * 28 * 10 * 75 == 1_176_000
    assert nbytes == 4 * (7840 + 3072 + 750 + 10) == 46_688
    assert cost("conv2d_backward_input", (x, y, w, 1, 1, 0, 0)) == (1_176_000, 4 * (3072 + 7840 + 750))
    assert cost("conv2d_backward_weight", (w, y, x, 1, 1, 0, 0)) == (1_176_000, 4 * (750 + 7840 + 3072))
    assert cost("conv2d_backward_bias", (b, y)) == (7840, 4 * (10 + 7840))


def test_other_costs_by_hand():
    # Dense 800 -> 128 on 64 samples: 64*800*128 multiply-adds.
    assert cost("dense_forward", (arr(64, 128), arr(64, 800), arr(128, 800), arr(128))) == (
        2 * 64 * 800 * 128, 4 * (64 * 128 + 64 * 800 + 128 * 800 + 128))
    # 2x2 max pooling of 1x1x4x4 into 2x2: 4 outputs, 4 comparisons each; argmax int32.
    assert cost("maxpool2d_forward", (arr(1, 1, 2, 2), arr(1, 1, 2, 2, dtype=np.int32), arr(1, 1, 4, 4),
                                      2, 2, 2, 2, 0, 0)) == (16, 4 * 4 + 4 * 4 + 16 * 4)
    assert cost("relu_forward", (arr(10), arr(10))) == (10, 80)
    # Adam on 100 float64 values: reads 4 arrays, writes 3.
    assert cost("adam_update", (arr(100, dtype=np.float64),) * 4 + (1e-3, 0.9, 0.999, 1e-8, 1)) == (1300, 7 * 800)


def test_profile_report_schema(tmp_path):
    report = profile_step("tiny", "cpu", batch_size=4, repeats=2)
    assert report["device"] == "cpu" and report["step_seconds"] > 0
    assert report["peak"]["flops"] > 0 and report["peak"]["bandwidth"] > 0
    names = {k["name"] for k in report["kernels"]}
    # the loss's forward and backward are one fused kernel, softmax_xent_step; so are the first
    # convolution and the max pooling after it, conv2d_maxpool_*
    assert {"conv2d_maxpool_forward", "conv2d_maxpool_backward", "dense_forward", "adam_update",
            "softmax_xent_step"} <= names
    assert not {"conv2d_forward", "maxpool2d_forward", "maxpool2d_backward"} & names
    conv = next(k for k in report["kernels"] if k["name"] == "conv2d_maxpool_forward")
    # batch 4, 4 filters 3x3 over one 28x28 channel, then 4 comparisons per pooled value (13 x 13)
    assert conv["flops"] == 2 * 4 * 4 * 26 * 26 * 9 + 4 * 4 * 4 * 13 * 13
    # One call computes the weight and bias gradients (the bias's: a sum over the pooled gradient);
    # the first layer needs no input gradient.
    back = next(k for k in report["kernels"] if k["name"] == "conv2d_maxpool_backward")
    assert back["flops"] == 2 * 4 * 4 * 26 * 26 * 9 + 4 * 4 * 13 * 13
    for k in report["kernels"]:
        assert {"layer", "phase", "seconds", "compile_seconds", "flops", "bytes", "gflops", "gbytes_per_s",
                "peak_flops_share", "peak_bandwidth_share"} <= set(k)
    layers = {(r["layer"], r["phase"]) for r in report["layers"]}
    assert ("0 Conv2D", "forward") in layers and ("optimizer", "step") in layers
    assert abs(sum(r["share_of_step"] for r in report["layers"]) - 1) < 1e-9
    trace = report["trace"]
    json.dumps(trace)
    assert all(e["ph"] in ("X", "M") for e in trace["traceEvents"])


def test_profile_cli_writes_json_and_trace(tmp_path, capsys):
    out, trace = tmp_path / "p.json", tmp_path / "t.json"
    assert cli.main(["profile", "--device", "cpu", "--model", "tiny", "--batch-size", "4", "--repeats", "2",
                     "--json", str(out), "--trace", str(trace)]) == 0
    text = capsys.readouterr().out
    assert "measured peak" in text and "conv2d_maxpool_forward" in text
    assert json.loads(out.read_text())["model"] == "tiny"
    assert "traceEvents" in json.loads(trace.read_text())


def test_chrome_trace_puts_layers_and_kernels_on_two_rows():
    events = [dict(kind="span", name="0 Conv2D forward", layer="0 Conv2D", phase="forward", start=1.0,
                   seconds=0.002, flops=0, bytes=0),
              dict(kind="kernel", name="conv2d_forward", layer="0 Conv2D", phase="forward", start=1.0005,
                   seconds=0.001, flops=10, bytes=20)]
    t = chrome_trace(events)["traceEvents"]
    assert t[0]["tid"] == 1 and t[1]["tid"] == 2 and t[1]["ts"] == pytest.approx(500.0)
    assert t[1]["dur"] == pytest.approx(1000.0) and t[1]["args"]["flops"] == 10


@pytest.fixture
def small_suite(monkeypatch):
    monkeypatch.setattr(bench, "CONV_SHAPES", [("tiny", 2, 2, 8, 8, 3, 3, 1)])
    monkeypatch.setattr(bench, "EPOCH_MODELS", ["tiny"])
    monkeypatch.setattr(bench, "STEP_CASES", [("lenet5", 8)])
    monkeypatch.setattr(bench, "STEP_STEPS", 2)


def test_bench_report_schema(small_suite, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--device", "cpu", "--repeats", "2", "--epoch-images", "256", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["threads"] >= 1 and report["machine"]["numba"]
    names = [r["name"] for r in report["rows"]]
    assert names == ["conv2d forward", "conv2d backward-input", "conv2d backward-weight", "maxpool2d 2x2 forward",
                     "maxpool2d 2x2 backward", "conv2d forward + backward", "training epoch, tiny",
                     "step, lenet5, own processes"]
    assert report["peak"]["flops"] > 1e9
    for r in report["rows"]:
        assert r["nbcnn_seconds"] > 0 and "torch_seconds" not in r
        if r["flops"]:
            assert r["nbcnn_peak_share"] == pytest.approx(r["flops"] / r["nbcnn_seconds"] / report["peak"]["flops"])
        else:
            assert r["nbcnn_peak_share"] is None
    assert report["rows"][0]["flops"] == 2 * 2 * 3 * 8 * 8 * 2 * 9
    assert report["rows"][5]["flops"] == 3 * 2 * 2 * 3 * 8 * 8 * 2 * 9 + 2 * 3 * 8 * 8  # + the bias gradient
    step = report["rows"][-1]
    assert step["shape"].startswith("batch 8,") and step["threading_layer"] in ("omp", "tbb", "workqueue")
    # LeNet-5's step at batch 8: conv1 forward alone is 2 * 8 * 6 * 25 * 28 * 28 FLOPs
    assert step["flops"] > 2 * 8 * 6 * 25 * 28 * 28
    assert "conv2d forward" in capsys.readouterr().out


def test_bench_vs_torch_without_torch_says_so(small_suite, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    assert cli.main(["bench", "--device", "cpu", "--vs", "torch"]) == 2
    err = capsys.readouterr().err
    assert "--vs torch needs PyTorch, which is not installed" in err and "Traceback" not in err


def test_bench_vs_torch(small_suite, capsys):
    pytest.importorskip("torch")
    report = bench.run_bench("cpu", vs="torch", repeats=2, epoch_images=128)
    for r in report["rows"]:
        assert r["torch_seconds"] > 0 and r["time_ratio"] > 0
        assert r["name"].startswith("step, ") or r["check_error"] < 1e-3
    steps = {r["name"]: r for r in report["rows"] if r["name"].startswith("step, ")}
    assert list(steps) == ["step, lenet5, own processes", "step, lenet5, PyTorch first", "step, lenet5, interleaved"]
    assert steps["step, lenet5, PyTorch first"]["threading_layer"] in ("omp", "tbb")
    assert steps["step, lenet5, interleaved"]["threading_layer"] in ("omp", "tbb")
    # the first two are measured against the same PyTorch-alone process; interleaved against its own
    assert steps["step, lenet5, own processes"]["torch_seconds"] == steps["step, lenet5, PyTorch first"]["torch_seconds"]
    for r in steps.values():
        assert r["torch_peak_share"] == pytest.approx(r["flops"] / r["torch_seconds"] / report["peak"]["flops"])


def test_step_timing_interleaves_step_by_step():
    from nbcnn.perf.stepbench import time_steps

    order = []
    steps = {"nbcnn": lambda: order.append("n"), "torch": lambda: order.append("t")}
    medians = time_steps(steps, steps=4, repeats=2)
    assert set(medians) == {"nbcnn", "torch"} and all(s >= 0 for s in medians.values())
    # 3 warm-up steps each, one library after the other; then a step of each in turn
    assert "".join(order) == "nnnttt" + "nt" * 8
    alone = []
    time_steps({"nbcnn": lambda: alone.append(1)}, steps=5, repeats=3)
    assert len(alone) == 3 + 15


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_host_step_script_runs(device):
    """benchmarks/public_api_step.py: the host's part of a step, on the CPU path and the CUDA path
    in the simulator (a process of its own: it patches the simulator's launches)."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "public_api_step.py"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if device == "cuda" else "0")
    done = subprocess.run([sys.executable, str(script), "--device", device, "--batch", "8", "--steps", "2",
                           "--repeats", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["device"] == device and out["simulator"] == (device == "cuda") and out["step_ms"] > 0


def test_user_loop_against_the_trainer_in_one_process():
    """``stepbench --impl trainer``: the user's loop and the Trainer's step on the same model,
    alternating in one fresh process, each timed."""
    from nbcnn.perf.stepbench import measure

    out = measure("trainer", "lenet5", 8, steps=2, repeats=2)
    assert out["nbcnn_seconds"] > 0 and out["trainer_seconds"] > 0 and not out["torch_first"]
    assert "torch_seconds" not in out


def test_winograd_against_implicit_script():
    """benchmarks/winograd_vs_implicit.py: both algorithms on a layer, their weight gradients
    checked against each other, each timed (a process of its own: it re-plans the layer)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "winograd_vs_implicit.py"
    done = subprocess.run([sys.executable, str(script), "--batch", "2", "--repeats", "1", "--shapes", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["shape"] == "32->64 13x13 batch 2" and row["ms"]["winograd"] > 0 and row["ms"]["implicit"] > 0
