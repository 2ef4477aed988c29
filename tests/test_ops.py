"""The kernel registry: one call shape per op on both devices, cost models, and the CPU cores
(the fused ones included) against the NumPy references in float64."""

import inspect

import numpy as np
import pytest

from nbcnn import ops
from nbcnn.ops import REGISTRY
from tests import cores


def test_every_op_has_one_call_shape_on_both_devices():
    ops_ = {op for op, _, _ in REGISTRY.entries}
    assert {op for op, device, _ in REGISTRY.entries if device == "cuda"} == ops_ - set(ops.ONE_DEVICE)
    for op, device in ops.ONE_DEVICE.items():
        assert REGISTRY.algorithms(op, device) and op in ops.COSTS
    for op in ops_ - set(ops.ONE_DEVICE):
        cpu, cuda = REGISTRY.get(op, "cpu"), REGISTRY.get(op, "cuda")
        assert list(inspect.signature(cpu.run).parameters) == list(inspect.signature(cuda.run).parameters), op
        for algorithm in REGISTRY.algorithms(op, "cpu"):
            other = REGISTRY.get(op, "cpu", algorithm)
            assert list(inspect.signature(other.run).parameters) == list(inspect.signature(cpu.run).parameters)
        assert op in ops.COSTS


def test_unknown_algorithm_names_the_choices():
    with pytest.raises(ValueError, match=r"no 'winograd' kernel for conv2d_forward on cpu: choose one of "
                                         r"\['direct', 'gemm'\]"):
        REGISTRY.get("conv2d_forward", "cpu", "winograd")


CASES = cores.cases(np.random.default_rng(0))


@pytest.mark.parametrize("name, op, args, outputs, expected", CASES, ids=[c[0] for c in CASES])
def test_cpu_core_matches_the_reference(name, op, args, outputs, expected):
    got = cores.run(op, args, "cpu")
    for i, want in zip(outputs, expected):
        if want is None:
            assert got[i] is None or args[i] is None
            continue
        np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-10, err_msg=f"{name}: output {i}")


CONV = [c for c in CASES if c[1] in ("conv2d_forward", "conv2d_backward")]


@pytest.mark.parametrize("name, op, args, outputs, expected", CONV, ids=[c[0] for c in CONV])
def test_direct_conv_cores_match_the_reference(name, op, args, outputs, expected):
    kernel = REGISTRY.get(op, "cpu", "direct")
    # the direct loops take no scratch and need nothing from the forward
    got = [a.copy() if isinstance(a, np.ndarray) else (None if isinstance(a, str) else a) for a in args]
    kernel.run(*got)
    for i, want in zip(outputs, expected):
        if want is not None:
            np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-10, err_msg=f"{name}: output {i}")
