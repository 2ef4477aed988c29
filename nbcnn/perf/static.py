"""What each CUDA kernel costs on a GPU, found without one: ``nbcnn profile --static``.

For every kernel in ``nbcnn.kernels.catalogue`` (the argument types its launcher passes):

1. Numba compiles it to PTX for the compute capability (``cuda.compile_ptx``, NVVM; no GPU).
2. nvJitLink (``cuda.bindings.nvjitlink``, the linker numba-cuda itself uses) assembles the PTX
   to machine code for that GPU with ``-Xptxas=-v``, whose log gives the registers per thread,
   the bytes spilled to local memory and the static shared memory.
3. The occupancy follows from those and the launch (threads per block, dynamic shared memory),
   as CUDA's occupancy calculator computes it: how many warps of the SM's maximum can be
   resident, limited by registers, shared memory, threads and blocks per SM.
4. nvdisasm (pip ``nvidia-cuda-nvdisasm``) disassembles the machine code (SASS). Loops are the
   backward branches; the hottest loop is taken to be the innermost of the loops that contain
   FFMA (fused float32 multiply-add) instructions, the one with the most if there are several,
   and ``sass_per_ffma`` is its instruction count
   (NOPs excluded, a called function's instructions included) over its FFMAs: 1 would be
   pure arithmetic; a register-blocked product does about 1.5 (one shared-memory load per two
   FMAs); a kernel dominated by index arithmetic, 10 or more.

Nothing here runs a kernel; the figures are properties of the code, the same on every run.
"""

import ast
import functools
import glob
import inspect
import os
import re
import shutil
import subprocess
import tempfile
import textwrap

import numpy as np

from nbcnn.errors import describe

# Per compute capability: registers per SM, the most warps, blocks and shared bytes per SM, the
# shared memory the hardware reserves per block, and the register allocation unit (per warp).
# From the CUDA C++ Programming Guide's table of compute capabilities.
SM_LIMITS = {
    (7, 0): dict(regs=65536, warps=64, blocks=32, shared=96 * 1024, reserved=0),
    (7, 5): dict(regs=65536, warps=32, blocks=16, shared=64 * 1024, reserved=0),
    (8, 0): dict(regs=65536, warps=64, blocks=32, shared=164 * 1024, reserved=1024),
    (8, 6): dict(regs=65536, warps=48, blocks=16, shared=100 * 1024, reserved=1024),
    (8, 9): dict(regs=65536, warps=48, blocks=24, shared=100 * 1024, reserved=1024),
    (9, 0): dict(regs=65536, warps=64, blocks=32, shared=228 * 1024, reserved=1024),
    (10, 0): dict(regs=65536, warps=64, blocks=32, shared=228 * 1024, reserved=1024),
    (12, 0): dict(regs=65536, warps=48, blocks=32, shared=100 * 1024, reserved=1024),
}
REG_UNIT = 256  # registers are allocated to a warp in units of 256
SHARED_UNIT = 128  # and shared memory to a block in units of 128 bytes

FIELDS = ("kernel", "registers", "spills", "shared_bytes", "occupancy", "sass_per_ffma")


class StaticProfileError(RuntimeError):
    """A tool the static profile needs is missing, or a kernel failed to compile or link."""


# ----------------------------------------------------------------------------- the tools


def nvdisasm_path():
    """The nvdisasm executable: on PATH, or from the nvidia-cuda-nvdisasm wheel."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        nvidia = None
    for root in getattr(nvidia, "__path__", []):
        for path in sorted(glob.glob(os.path.join(root, "*", "bin", "nvdisasm"))):
            if os.access(path, os.X_OK):
                return path
    raise StaticProfileError("nvdisasm was not found: pip install nvidia-cuda-nvdisasm (or put the CUDA "
                             "toolkit's bin on PATH)")


def link(ptx, cc):
    """(cubin bytes, ptxas log) for ``ptx`` assembled by nvJitLink for compute capability ``cc``."""
    try:
        from cuda.bindings import nvjitlink
    except ImportError as exc:
        raise StaticProfileError(f"nvJitLink is not available ({exc}): pip install 'nbcnn[cuda13]'") from None
    options = [f"-arch=sm_{cc[0]}{cc[1]}", "-Xptxas=-v"]
    handle = nvjitlink.create(len(options), options)
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        try:
            nvjitlink.complete(handle)
        except Exception:
            size = nvjitlink.get_error_log_size(handle)
            log = bytearray(size)
            nvjitlink.get_error_log(handle, log)
            detail = " ".join(log.decode(errors="replace").split())[:300]
            raise StaticProfileError(f"nvJitLink failed: {detail}") from None
        size = nvjitlink.get_info_log_size(handle)
        log = bytearray(size)
        nvjitlink.get_info_log(handle, log)
        size = nvjitlink.get_linked_cubin_size(handle)
        cubin = bytearray(size)
        nvjitlink.get_linked_cubin(handle, cubin)
    finally:
        nvjitlink.destroy(handle)
    return bytes(cubin), log.decode(errors="replace")


def disassemble(cubin):
    """The SASS of ``cubin``, as nvdisasm prints it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([nvdisasm_path(), "-c", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise StaticProfileError("nvdisasm failed: " + " ".join(done.stderr.split()))
    return done.stdout


# ------------------------------------------------------------------------------ the figures


def parse_ptxas_log(log):
    """registers, spilled bytes (stores + loads) and static shared bytes of the one entry in ``log``."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    shared = re.search(r"(\d+) bytes smem", log)
    if registers is None:
        raise StaticProfileError("ptxas reported no register count: " + " ".join(log.split())[:200])
    return dict(registers=int(registers.group(1)),
                spills=int(spills.group(1)) + int(spills.group(2)) if spills else 0,
                static_shared=int(shared.group(1)) if shared else 0)


def occupancy(cc, threads, registers, shared_bytes):
    """Resident warps per SM over the most the SM holds, as a fraction: CUDA's occupancy calculator."""
    limits = SM_LIMITS.get(tuple(cc), SM_LIMITS[(9, 0)])
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = (limits["regs"] // per_warp) // warps
    block_shared = -(-(shared_bytes + limits["reserved"]) // SHARED_UNIT) * SHARED_UNIT
    by_shared = limits["shared"] // block_shared if shared_bytes else limits["blocks"]
    by_warps = limits["warps"] // warps
    resident = min(by_regs, by_shared, by_warps, limits["blocks"])
    return resident * warps / limits["warps"]


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_CALL = re.compile(r"\bCALL\.\S+\s+`\(([^)]+)\)")


def functions(sass):
    """{function name: [(address, instruction text)], ...} and {label: address}."""
    funcs, labels, current, pending = {}, {}, None, []
    for line in sass.splitlines():
        section = _SECTION.match(line)
        if section:
            current = section.group(1)
            funcs[current] = []
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        ins = _INSTRUCTION.match(line)
        if ins and current is not None:
            address = int(ins.group(1), 16)
            for name in pending:
                labels[name] = (current, address)
            pending = []
            funcs[current].append((address, ins.group(2)))
    return funcs, labels


def _opcode(text):
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def loops_with_ffma(sass, entry):
    """[(start, end, instructions, FFMAs, texts)] of ``entry``'s loops that contain FFMAs."""
    funcs, labels = functions(sass)
    body = funcs.get(entry)
    if body is None:
        raise StaticProfileError(f"{entry} not found in the disassembly")

    def size(name):
        return sum(1 for _, text in funcs.get(name, []) if _opcode(text) != "NOP")

    loops = []
    for address, text in body:
        branch = _BRANCH.search(text)
        if branch and labels.get(branch.group(1), (None,))[0] == entry:
            start = labels[branch.group(1)][1]
            if start <= address:
                loops.append((start, address))
    counted = []
    for start, end in loops:
        count = ffma = 0
        texts = []
        for address, text in body:
            if start <= address <= end:
                op = _opcode(text)
                if op == "NOP":
                    continue
                texts.append(text)
                count += 1
                ffma += op.startswith("FFMA")
                call = _CALL.search(text)
                if call:
                    count += size(call.group(1))
        if ffma:
            counted.append((start, end, count, ffma, texts))
    return counted


def hottest_loop(sass, entry):
    """(instructions, FFMAs) of ``entry``'s hottest loop (see the module's docstring), or None."""
    counted = loops_with_ffma(sass, entry)
    # The innermost of the loops that do FMAs (a loop inside them that does none, such as an
    # index update, is part of their cost), and of those the one with the most FMAs.
    best = None
    for start, end, count, ffma, _ in counted:
        if any((s2, e2) != (start, end) and start <= s2 and e2 <= end for s2, e2, *_ in counted):
            continue
        if best is None or ffma > best[1]:
            best = (count, ffma)
    return best


_SHARED_DECL = re.compile(r"^\s*(?:\.visible\s+)?\.shared\s+\.align\s+\d+\s+\.b8\s+[\w$]+\[(\d+)\];", re.M)


def static_shared_bytes(ptx):
    """Bytes of the fixed-size shared arrays the PTX declares (the dynamic one has no size)."""
    return sum(int(size) for size in _SHARED_DECL.findall(ptx))


def entry_name(ptx):
    match = re.search(r"\.entry\s+([\w$]+)", ptx)
    if match is None:
        raise StaticProfileError("no .entry in the PTX")
    return match.group(1)


@functools.lru_cache(maxsize=None)
def ptx_of(kernel, sig, cc):
    """The PTX of a ``cuda.jit`` kernel for these argument types and compute capability, with the
    kernel's own launch bounds, as a GPU would compile it. Compiled once per process: a kernel takes
    NVVM up to 13 s, and the test suite reads the same kernels' PTX in several places."""
    from numba import cuda

    bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
    return cuda.compile_ptx(kernel.py_func, sig, cc=tuple(cc), launch_bounds=bounds)[0]


def analyse(launch, cc, dtype=np.float32):
    """The row of the static profile for one ``catalogue.Launch``."""
    try:
        ptx = ptx_of(launch.kernel, launch.sig, tuple(cc))
    except Exception as exc:  # NVVM refuses a compute capability it no longer supports, for one
        where = f"sm_{cc[0]}{cc[1]}"
        raise StaticProfileError(f"{launch.name} did not compile for {where} ({describe(exc, 300)})") from None
    cubin, log = link(ptx, cc)
    figures = parse_ptxas_log(log)
    shared = max(figures["static_shared"], static_shared_bytes(ptx)) + launch.shared
    loop = hottest_loop(disassemble(cubin), entry_name(ptx))
    return dict(kernel=launch.name, registers=figures["registers"], spills=figures["spills"], shared_bytes=shared,
                occupancy=round(occupancy(cc, launch.threads, figures["registers"], shared), 4),
                sass_per_ffma=round(loop[0] / loop[1], 2) if loop else None,
                threads=launch.threads, dtype=np.dtype(dtype).name)


def static_profile(cc=(9, 0), dtype=np.float32, names=None):
    """One row per kernel (the first signature of each), in the catalogue's order; ``runs`` says
    which algorithm of the registry launches it (``algorithms_of_kernels``)."""
    from nbcnn.kernels._cuda import SIMULATOR

    if SIMULATOR:
        raise StaticProfileError("the static profile compiles for a real GPU: unset NUMBA_ENABLE_CUDASIM")
    from nbcnn.kernels.catalogue import launches

    catalogue = launches(dtype)
    unknown = sorted(set(names or ()) - {launch.name for launch in catalogue})
    if unknown:
        raise StaticProfileError(f"no CUDA kernel named {', '.join(unknown)}; the kernels: "
                                 + ", ".join(sorted({launch.name for launch in catalogue})))
    rows, seen = [], set()
    runs = algorithms_of_kernels()
    for launch in catalogue:
        if launch.name in seen or (names and launch.name not in names):
            continue
        seen.add(launch.name)
        rows.append({**analyse(launch, cc, dtype), "runs": runs.get(launch.name, "entry point")})
    return rows


# ------------------------------------------------------------------ which algorithm runs them


def _called_names(fn):
    """The global names a Python function (or a jitted one's Python source) uses."""
    fn = getattr(fn, "py_func", fn)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError):
        return set()
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def _kernels_reached(fn, seen):
    """The names of the CUDA kernels ``fn`` launches, directly or through the functions (and the
    tables of kernels) of its module that it uses."""
    from numba.cuda.dispatcher import CUDADispatcher

    found = set()
    module = inspect.getmodule(getattr(fn, "py_func", fn))
    for name in _called_names(fn):
        value = getattr(module, name, None)
        values = list(value.values()) if isinstance(value, dict) else [value]
        for v in values:
            if isinstance(v, CUDADispatcher):
                if not v.targetoptions.get("device"):
                    found.add(v.py_func.__name__)
            elif inspect.isfunction(v) and v not in seen and v.__module__.startswith("nbcnn.kernels"):
                seen.add(v)
                found |= _kernels_reached(v, seen)
    return found


def algorithms_of_kernels():
    """{CUDA kernel name: what runs it}: "default" where the default algorithm of an op in the
    kernel registry (``nbcnn.ops``) launches it, itself or through the functions it calls; the name
    of the other algorithm that does ("tiled": the simpler kernels the register-tiled products
    replaced); "default+tiled" for a tiled kernel the default falls back to (a shape its tiles do
    not fit). A kernel missing here is called only through a public launcher of ``nbcnn.kernels``."""
    from nbcnn import ops

    by_kernel = {}
    for (op, device, algorithm), kernel in ops.REGISTRY.entries.items():
        if device != "cuda":
            continue
        what = "default" if ops.REGISTRY.defaults[(op, device)] == algorithm else algorithm
        for name in _kernels_reached(kernel.run, set()):
            by_kernel.setdefault(name, set()).add(what)
    return {name: "+".join(sorted(whats, key=lambda w: (w != "default", w))) for name, whats in by_kernel.items()}


# Targets for the kernels that do a layer's multiply-adds: few instructions per FMA,
# enough resident warps to hide latency, nothing spilled.
TARGET_SASS_PER_FFMA = 2.0
TARGET_OCCUPANCY = 0.25


def format_rows(rows, cc):
    lines = [f"static profile for sm_{cc[0]}{cc[1]} (float32; no GPU used): registers per thread, bytes spilled, "
             f"shared bytes per block, theoretical occupancy, SASS instructions per FFMA in the hottest loop, "
             f"which algorithm runs it (default; tiled: the simpler alternative; entry point: only a public "
             f"launcher of nbcnn.kernels)",
             f"{'kernel':<44} {'threads':>7} {'regs':>5} {'spills':>6} {'shared':>7} {'occup.':>7} {'SASS/FFMA':>9}  "
             f"runs"]
    for r in rows:
        per = "-" if r["sass_per_ffma"] is None else f"{r['sass_per_ffma']:.2f}"
        lines.append(f"{r['kernel']:<44} {r['threads']:>7} {r['registers']:>5} {r['spills']:>6} {r['shared_bytes']:>7} "
                     f"{r['occupancy']:>6.0%} {per:>9}  {r.get('runs', '?')}")
    return "\n".join(lines)

