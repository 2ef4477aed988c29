"""What one training step of the default model should take on an H100, from the static figures alone.

No GPU is used: ``nbcnn profile --static`` gives each kernel's SASS instructions per FFMA in its
hottest loop and its occupancy; the shapes give the work. The method, per kernel:

- a matrix-product kernel (the implicit-GEMM convolutions, the dense products) issues, per warp
  and per 16-deep step, 512 FFMA (a thread's 4 x 8 outputs times 16) and ``sass_per_ffma`` times
  as many instructions in all. An SM issues at most 4 warp-instructions a clock, and the
  busiest SM gets ceil(blocks / SMs) blocks of 8 warps: it needs
  ceil(blocks / SMs) * 8 * steps * 512 * sass_per_ffma / 4 clocks. This counts the padding of
  partial tiles (the grid is whole tiles) and assumes the issue slots, not memory latency, are
  the limit (optimistic where an SM has one block of 8 warps to hide latency with);
- every kernel also moves its bytes (each array once) at the HBM bandwidth;
- a kernel takes the larger of the two, and at least LAUNCH_FLOOR (launch and drain of an
  almost empty grid).

The host launches the kernels asynchronously; a step takes the larger of the GPU's sum and the
host's launch cost (launches x HOST_LAUNCH, an assumption: Numba's launch path in Python, not
measured here). Run: python benchmarks/h100_estimate.py [--batch 64]
"""

import argparse
import math

from nbcnn.kernels._tiles import GEMM_THREADS, TILE_K, TILE_M, TILE_N
from nbcnn.kernels.conv2d.cuda import gemm_chunks
from nbcnn.perf.static import static_profile

# NVIDIA H100 SXM5: 132 SMs, 1.98 GHz boost, 128 FP32 lanes an SM (67 TFLOP/s), HBM3 3.35 TB/s.
SMS, CLOCK, BANDWIDTH = 132, 1.98e9, 3.35e12
LAUNCH_FLOOR = 2.5e-6  # s: the shortest a kernel launch takes end to end
HOST_LAUNCH = 10e-6  # s: the host's cost of one Numba kernel launch (assumed)
WARPS = GEMM_THREADS // 32
FFMA_PER_STEP = 4 * 8 * TILE_K  # per thread (and per warp, as warp instructions)


def gemm_time(row, M, P, Q, chunks=1, steps=None):
    """Seconds for a product of M x P outputs, Q deep, split in ``chunks`` along Q."""
    blocks = math.ceil(P / TILE_N) * math.ceil(M / TILE_M) * chunks
    steps = steps if steps is not None else math.ceil(Q / TILE_K)
    clocks = math.ceil(blocks / SMS) * WARPS * steps * FFMA_PER_STEP * row["sass_per_ffma"] / 4
    return clocks / CLOCK, blocks


def step_kernels(N):
    """(kernel, what, M, P, Q, chunks, steps, bytes) for every launch of one step of the default model
    at batch N (lenet: conv 1->16 5x5 p2, pool, conv 16->32 5x5, pool, dense 800->128->10; Adam)."""
    f = 4  # float32
    x1, y1, p1 = N * 784, N * 16 * 784, N * 16 * 196
    y2, p2 = N * 32 * 100, N * 800
    g1, g2 = gemm_chunks(N, 16, 25), gemm_chunks(N, 32, 400)
    params = 16 * 26 + 32 * 401 + 128 * 801 + 10 * 129
    return [
        ("_gather_batch_kernel", "minibatch gather", None, None, None, 1, None, 2 * (x1 + N) * f),
        ("_conv2d_forward_gemm_kernel", "conv1 forward + ReLU", 16, N * 784, 25, 1, None, (x1 + y1 + 400) * f),
        ("_maxpool2d_forward_kernel", "pool1 forward", None, None, None, 1, None, (y1 + 2 * p1) * f),
        ("_conv2d_forward_gemm_kernel", "conv2 forward + ReLU", 32, N * 100, 400, 1, None, (p1 + y2 + 12800) * f),
        ("_maxpool2d_forward_kernel", "pool2 forward", None, None, None, 1, None, (y2 + 2 * p2) * f),
        ("_gemm_nt_kernel", "dense1 forward + ReLU", N, 128, 800, 1, None, (p2 + N * 128 + 102400) * f),
        ("_gemm_nt_kernel", "dense2 forward", N, 10, 128, 1, None, (N * 138 + 1280) * f),
        ("_softmax_xent_step_kernel", "loss, its gradient, accuracy", None, None, None, 1, None, 3 * N * 10 * f),
        ("_gemm_nn_kernel", "dense2 backward, input (+ ReLU mask)", N, 128, 10, 1, None, (N * 266 + 1280) * f),
        ("_gemm_tn_kernel", "dense2 backward, weight + bias", 10, 129, N, 1, None, (N * 138 + 1290) * f),
        ("_gemm_nn_kernel", "dense1 backward, input (+ ReLU mask)", N, 800, 128, 1, None,
         (N * 1728 + 102400) * f),
        ("_gemm_tn_kernel", "dense1 backward, weight + bias", 128, 801, N, 1, None, (N * 928 + 102528) * f),
        ("_maxpool2d_backward_kernel", "pool2 backward (+ ReLU mask)", None, None, None, 1, None,
         (2 * p2 + 2 * y2) * f),
        ("_conv2d_backward_input_gemm_kernel", "conv2 backward, input (+ ReLU mask)", 16, N * 196, 800, 1, None,
         (y2 + 2 * p1 + 12800) * f),
        ("_conv2d_backward_weight_gemm_kernel", f"conv2 backward, weight + bias ({g2} chunks)", 32, 400, N * 100, g2,
         math.ceil(N / g2) * math.ceil(100 / TILE_K), (y2 + p1 + g2 * 32 * 401) * f),
        ("_conv2d_backward_weight_reduce_kernel", "conv2 chunks added", None, None, None, 1, None,
         (g2 + 1) * 32 * 401 * f),
        ("_maxpool2d_backward_kernel", "pool1 backward (+ ReLU mask)", None, None, None, 1, None,
         (2 * p1 + 2 * y1) * f),
        ("_conv2d_backward_weight_gemm_kernel", f"conv1 backward, weight + bias ({g1} chunks)", 16, 25, N * 784, g1,
         math.ceil(N / g1) * math.ceil(784 / TILE_K), (y1 + x1 + g1 * 16 * 26) * f),
        ("_conv2d_backward_weight_reduce_kernel", "conv1 chunks added", None, None, None, 1, None,
         (g1 + 1) * 16 * 26 * f),
        ("_adam_update_kernel", f"Adam, all {params:,} parameters", None, None, None, 1, None, 7 * params * f),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    N = args.batch
    kernels = step_kernels(N)
    rows = {r["kernel"]: r for r in static_profile((9, 0), names=sorted({k[0] for k in kernels}))}
    print(f"default model, one training step at batch {N}, H100 SXM estimate from the static profile (sm_90)")
    print(f"{'kernel':<40} {'GFLOP':>7} {'MB':>7} {'blocks':>7} {'SASS/FFMA':>9} {'compute':>9} {'memory':>9} "
          f"{'estimate':>9}")
    total = 0.0
    for name, what, M, P, Q, chunks, steps, nbytes in kernels:
        memory = nbytes / BANDWIDTH
        row = rows[name]
        if M is not None:
            compute, blocks = gemm_time(row, M, P, Q, chunks, steps)
            flops = 2 * M * P * Q
            per = f"{row['sass_per_ffma']:.2f}"
        else:
            compute, blocks, flops, per = 0.0, None, 0, "-"
        estimate = max(compute, memory, LAUNCH_FLOOR)
        total += estimate
        print(f"{what:<40} {flops / 1e9:>7.3f} {nbytes / 1e6:>7.2f} {blocks if blocks else '':>7} {per:>9} "
              f"{compute * 1e6:>7.1f}us {memory * 1e6:>7.1f}us {estimate * 1e6:>7.1f}us")
    host = len(kernels) * HOST_LAUNCH
    step = max(total, host)
    steps = math.ceil(60000 / N)
    print(f"\nGPU time a step: {total * 1e6:.0f} us over {len(kernels)} launches; the host's launches: "
          f"{host * 1e6:.0f} us ({HOST_LAUNCH * 1e6:.0f} us each, assumed)")
    print(f"a step: {step * 1e6:.0f} us ({'host' if host > total else 'GPU'}-bound); an epoch of {steps} steps: "
          f"{steps * step:.2f} s, plus the test set's forward passes")


if __name__ == "__main__":
    main()
