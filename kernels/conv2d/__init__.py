"""2-D convolution (cross-correlation, as CNN layers compute it), forward and backward.

Direct CPU kernels in ``cpu.py`` (the loops of the definition, the tested reference),
the same convolution as matrix products in nbcnn's own register tiles in ``gemm.py`` (fast
on the CPU: Winograd's F(2x2, 3x3) of ``winograd.py`` for 3x3 filters at stride 1, the
implicit product of ``implicit.py`` for other stride-1 filters, im2col otherwise, direct
kernels for a few input channels; the first layer fused with its pooling in ``pooled.py``, a
later layer's backward through the 2x2 max pooling after it from the maxima in ``maxima.py``),
CUDA kernels and their launchers in ``cuda.py``, the shape checks all of them use in
``checks.py``. Import the public entry points from here::

    from nbcnn.kernels.conv2d import conv2d_forward_cpu
"""

from .cpu import (
    conv2d_backward_bias_cpu,
    conv2d_backward_input_cpu,
    conv2d_backward_weight_cpu,
    conv2d_forward_cpu,
)
from .gemm import (
    conv2d_backward_gemm_cpu,
    conv2d_backward_input_gemm_cpu,
    conv2d_backward_weight_gemm_cpu,
    conv2d_forward_gemm_cpu,
)
from .cuda import (
    conv2d_backward_bias_cuda,
    conv2d_backward_input_cuda,
    conv2d_backward_weight_cuda,
    conv2d_forward_cuda,
)

__all__ = [
    "conv2d_forward_cpu",
    "conv2d_backward_input_cpu",
    "conv2d_backward_weight_cpu",
    "conv2d_backward_bias_cpu",
    "conv2d_forward_gemm_cpu",
    "conv2d_backward_input_gemm_cpu",
    "conv2d_backward_weight_gemm_cpu",
    "conv2d_backward_gemm_cpu",
    "conv2d_forward_cuda",
    "conv2d_backward_input_cuda",
    "conv2d_backward_weight_cuda",
    "conv2d_backward_bias_cuda",
]
