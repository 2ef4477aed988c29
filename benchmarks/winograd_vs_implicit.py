"""A Conv2D layer's forward and backward (dx, dw, db) on the CPU with Winograd's F(2x2, 3x3) and
with the implicit product it replaces for 3x3 filters, and PyTorch's when it is installed: the
three timed in turn, call by call, in one process.

    python benchmarks/winograd_vs_implicit.py                 # the layers of the bench and the zoo
    python benchmarks/winograd_vs_implicit.py --batch 8 --repeats 2 --shapes 1

Each layer is planned with ``gemm.winograd_applies`` answering yes or no, whatever the rule
says on this CPU: the only difference between the two. GFLOP/s counts a direct convolution's multiply-adds for all
three (Winograd's own products are 16/36 of them). Prints a line a shape, then one JSON line.
"""

import argparse
import json
import time

import numpy as np

# (name, batch, C, H (= W), K, padding): the bench's two layers, examples/mnist's second, the bn model's
SHAPES = [("32->64 13x13", 64, 32, 13, 64, 0), ("64->64 32x32 p1", 128, 64, 32, 64, 1),
          ("32->64 26x26", 64, 32, 26, 64, 0), ("32->64 14x14 p1", 64, 32, 14, 64, 1),
          ("64->128 7x7 p1", 64, 64, 7, 128, 1)]


def layer_pass(x, w, b, dy, P, winograd):
    """(call, dw, flops) of the layer pass as ``nbcnn bench`` times it, planned with or without Winograd."""
    from nbcnn.kernels.conv2d import gemm
    from nbcnn.perf import bench

    real = gemm.winograd_applies
    gemm.winograd_applies = lambda *args: winograd  # whatever the rule would choose on this CPU
    try:
        call, dw, flops = bench._layer_pass("cpu", x, w, b, dy, P)
        call()  # plans the layer (its workspace decides the algorithm) and compiles
    finally:
        gemm.winograd_applies = real
    return call, dw, flops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="batch size for every shape (default: each shape's)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls of each (median)")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first this many shapes")
    args = parser.parse_args(argv)
    from nbcnn.perf import bench

    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    results = []
    for name, N, C, H, K, P in SHAPES[:args.shapes]:
        N = args.batch or N
        x, w, b, dy, _ = bench._conv_arrays(rng, N, C, H, H, K, 3, P)
        calls = {}
        calls["winograd"], dw_winograd, flops = layer_pass(x, w, b, dy, P, True)
        calls["implicit"], dw_implicit, _ = layer_pass(x, w, b, dy, P, False)
        scale = np.abs(dw_implicit).max()
        assert np.abs(dw_winograd - dw_implicit).max() <= 1e-4 * scale, f"{name}: the two weight gradients differ"
        if torch is not None:
            calls["torch"], _ = bench._torch_layer_pass(torch, "cpu", x, w, b, dy, P)
            calls["torch"]()
        seconds = {key: [] for key in calls}
        for _ in range(args.repeats):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                seconds[key].append(time.perf_counter() - start)
        ms = {key: float(np.median(v)) * 1e3 for key, v in seconds.items()}
        row = dict(shape=f"{name} batch {N}", ms=ms, gflops={k: flops / v / 1e6 for k, v in ms.items()})
        results.append(row)
        line = "  ".join(f"{k} {v:8.2f} ms ({row['gflops'][k]:4.0f} GFLOP/s)" for k, v in ms.items())
        ratios = f"winograd/implicit {ms['winograd'] / ms['implicit']:.2f}"
        if "torch" in ms:
            ratios += f"  winograd/torch {ms['winograd'] / ms['torch']:.2f}  implicit/torch {ms['implicit'] / ms['torch']:.2f}"
        print(f"{row['shape']:26s} {line}  {ratios}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
