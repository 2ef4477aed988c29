"""``nbcnn profile --static``: the machine code of the CUDA kernels, read without a GPU.

The arithmetic of the report (occupancy, loops in a disassembly) on hand-made inputs with
known answers; then the real thing on the kernels that do a layer's multiply-adds, with the
targets of nbcnn.perf.static asserted: they are counts in the compiled code, the same on every run.
"""

import json

import pytest

from nbcnn.perf import static
from nbcnn.cli import main
from nbcnn.kernels._cuda import SIMULATOR

needs_compiler = pytest.mark.skipif(SIMULATOR, reason="compiles for a real GPU, not the simulator")

# The kernels that do a layer's multiply-adds on the default path, and the targets they are held to.
PRODUCTS = ["_conv2d_forward_gemm_kernel", "_conv2d_backward_input_gemm_kernel", "_conv2d_backward_weight_gemm_kernel",
            "_gemm_nt_kernel", "_gemm_nn_kernel", "_gemm_tn_kernel"]


@pytest.mark.parametrize("threads, registers, shared, expected", [
    (256, 32, 0, 1.0),  # 8 blocks of 8 warps: all 64 warps
    (256, 128, 0, 0.25),  # 128 x 32 x 8 = 32768 registers a block: 2 blocks, 16 warps
    (256, 64, 0, 0.5),
    (128, 168, 1360, 0.1875),  # 168 -> 5376 a warp, 12 warps fit: 3 blocks of 4 warps
    (256, 32, 100 * 1024, 0.25),  # shared memory: 2 blocks of 101 KiB in 228 KiB
    (1024, 16, 0, 1.0),
])
def test_occupancy_like_the_calculator(threads, registers, shared, expected):
    assert static.occupancy((9, 0), threads, registers, shared) == pytest.approx(expected)


SASS = """
\t.section\t.text.helper,"ax",@progbits
        /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0010*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0020*/                   RET.REL.NODEC R20 `(kern) ;
\t.section\t.text.kern,"ax",@progbits
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS R2, [R3] ;
.L_x_1:
        /*0020*/                   FFMA R4, R2, R2, R4 ;
        /*0030*/                   FFMA R5, R2, R2, R5 ;
        /*0040*/                   NOP ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
        /*0060*/                   FFMA R6, R2, R2, R6 ;
        /*0070*/                   CALL.ABS.NOINC `(helper) ;
        /*0080*/               @P1 BRA `(.L_x_0) ;
.L_x_2:
        /*0090*/                   IADD3 R7, R7, 0x1, RZ ;
        /*00a0*/               @P2 BRA `(.L_x_2) ;
        /*00b0*/                   EXIT ;
"""


def test_hottest_loop_is_the_innermost_loop_with_fmas():
    # Inner loop 0x20-0x50: 2 FFMA + BRA (the NOP not counted). The outer one contains it; the
    # index loop at 0x90 has no FMA.
    assert static.hottest_loop(SASS, "kern") == (3, 2)
    loops = {(start, end): (count, ffma) for start, end, count, ffma, _ in static.loops_with_ffma(SASS, "kern")}
    # The outer loop: LDS, 2 FFMA, BRA, FFMA, CALL (+ the helper's 3), BRA.
    assert loops == {(0x20, 0x50): (3, 2), (0x10, 0x80): (10, 3)}


def test_a_loop_around_an_index_update_still_counts_the_fmas():
    sass = SASS.replace("/*0050*/               @P0 BRA `(.L_x_1) ;", "/*0050*/               IADD3 R9, R9, 1, RZ ;")
    assert static.hottest_loop(sass, "kern") == (10, 3)  # the outer loop, its call included


def test_ptxas_log_and_ptx_declarations():
    log = ("ptxas info    : Function properties for k\nptxas         .     0 bytes stack frame, 8 bytes spill "
           "stores, 12 bytes spill loads\nptxas info    : Used 71 registers, used 1 barriers, 2048 bytes smem\n")
    assert static.parse_ptxas_log(log) == dict(registers=71, spills=20, static_shared=2048)
    ptx = ".visible .shared .align 4 .b8 _cudapy_smem_1[4096];\n.extern .shared .align 4 .b8 dyn[];\n"
    assert static.static_shared_bytes(ptx) == 4096


@needs_compiler
def test_products_meet_the_targets():
    rows = {row["kernel"]: row for row in static.static_profile((9, 0), names=PRODUCTS)}
    assert sorted(rows) == sorted(PRODUCTS)
    for name, row in rows.items():
        assert row["spills"] == 0, name
        assert row["occupancy"] >= static.TARGET_OCCUPANCY, name
        assert row["sass_per_ffma"] is not None and row["sass_per_ffma"] <= static.TARGET_SASS_PER_FFMA, (name, row)
        assert row["shared_bytes"] >= 2 * 16 * 64 * 4  # the two staged tiles


@needs_compiler
def test_the_simple_kernels_are_what_the_products_replaced():
    """The reference kernels are far from the targets: the report tells them apart."""
    row, = static.static_profile((9, 0), names=["_conv2d_backward_input_kernel"])
    assert row["sass_per_ffma"] > 10


def test_the_report_says_which_algorithm_runs_each_kernel():
    """Found by following the registry's CUDA cores through the functions they call."""
    runs = static.algorithms_of_kernels()
    for name in PRODUCTS + ["_relu_forward_kernel", "_softmax_xent_step_kernel", "_adam_update_kernel"]:
        assert runs[name] == "default", name
    assert runs["_matmul_kernel"] == "tiled" and runs["_conv2d_backward_weight_partial_kernel"] == "tiled"
    assert runs["_conv2d_forward_kernel"] == "default+tiled"  # the default's fallback for large filters
    for name in ("_conv2d_backward_bias_kernel", "_dense_backward_bias_kernel", "_softmax_xent_forward_kernel"):
        assert name not in runs, name  # a public launcher's only: the step sums its biases in the products


@needs_compiler
def test_cli_writes_json_rows(tmp_path, capsys):
    out = tmp_path / "static.json"
    assert main(["profile", "--static", "--cc", "9.0", "--kernel", "_gemm_nt_kernel", "--kernel", "_relu_forward_kernel",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted(r["kernel"] for r in rows) == ["_gemm_nt_kernel", "_relu_forward_kernel"]
    for r in rows:
        assert set(static.FIELDS) <= set(r) and r["runs"] == "default"
        assert 0 < r["occupancy"] <= 1 and r["registers"] > 0
    relu = next(r for r in rows if r["kernel"] == "_relu_forward_kernel")
    assert relu["sass_per_ffma"] is None  # no multiply-add loop
    assert "_gemm_nt_kernel" in capsys.readouterr().out


@needs_compiler
def test_cli_refuses_an_unknown_kernel(capsys):
    assert main(["profile", "--static", "--kernel", "no_such_kernel"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA kernel named no_such_kernel" in err and err.count("\n") == 1


def test_cli_refuses_an_unknown_capability(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--static", "--cc", "sm90"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "compute capability" in err and err.count("\n") == 1


@needs_compiler
def test_a_kernel_that_does_not_compile_is_one_line(monkeypatch, capsys):
    from numba import cuda

    def refuse(*args, **kwargs):
        raise RuntimeError("GPU compute capability 7.0 is not supported\n(requires >=7.5)")

    monkeypatch.setattr(cuda, "compile_ptx", refuse)
    assert main(["profile", "--static", "--cc", "7.0", "--kernel", "_relu_forward_kernel"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "_relu_forward_kernel did not compile for sm_70 (RuntimeError: GPU compute capability 7.0" in err
