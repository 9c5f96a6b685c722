"""Proof without a GPU that the CUDA kernels compile to what they were designed for.

``tests/cuda/instantiate_kernels.cu`` instantiates every kernel of ``csrc/cuda/mixed_sum_kernels.cuh`` (no
ATen), and one nvcc call per test session compiles it for sm_80 and sm_90. Its ptxas report and SASS
(``cuobjdump``) must show:

- no spill and no stack frame in any kernel, and registers for at least 3 resident blocks of 256 threads
  (2 for the kernels that read unaligned inputs with two loads each: the *shifted* ones);
- 128-bit global loads and stores (``LDG.E.128``, ``STG.E.128``) in every kernel;
- the loads of a group of 8 inputs all issued before the first instruction that uses one of them (16 in the
  shifted kernels), which keeps at least 64 KiB in flight per multiprocessor at the kernel's occupancy.

When ``fastnas._C`` was built with its CUDA kernels, ``cuobjdump -res-usage`` of the built library must show
the same kernels without spills, and no other kernel (the backward is one launch).

nvcc comes from ``CUDA_HOME``, ``PATH`` or ``/usr/local/cuda*``; cuobjdump from the same toolkit or the copy
bundled with Triton. Without nvcc the tests are skipped, unless ``FASTNAS_CUDA=1`` (CI), where a missing
tool fails them.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from fastnas import backend

ROOT = Path(__file__).resolve().parents[1]
KERNELS_TU = ROOT / "tests" / "cuda" / "instantiate_kernels.cu"
ARCHS = ("sm_80", "sm_90")
# the element type as it appears in the mangled kernel name (template argument before kShifted)
MANGLED_DTYPES = {
    "kernelIfL": "float32",
    "kernelIdL": "float64",
    "kernelI6__halfL": "float16",
    "kernelI13__nv_bfloat16L": "bfloat16",
}
THREADS = 256
REGISTERS_PER_MULTIPROCESSOR = 65536
THREADS_PER_MULTIPROCESSOR = 2048
CUDA_REQUIRED = os.environ.get("FASTNAS_CUDA", "").lower() in ("1", "true", "yes", "on")

LOAD_128 = re.compile(r"^LDG\.E(\.\w+)*\.128(\.\w+)*$")
STORE_128 = re.compile(r"^STG\.E(\.\w+)*\.128(\.\w+)*$")
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
# opcodes without a destination register: their register operands are all read
NO_DESTINATION = re.compile(r"^(ST|RED|BRA|BAR|EXIT|RET|CALL|BSYNC|BSSY|WARPSYNC|NOP|DEPBAR|MEMBAR|CCTL|YIELD)")


def _toolkit_roots() -> list[Path]:
    roots = [Path(os.environ["CUDA_HOME"])] if os.environ.get("CUDA_HOME") else []
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parents[1])
    roots += [Path(p) for p in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]]
    return roots


def find_tool(name: str) -> Path | None:
    """A CUDA tool from the toolkit (CUDA_HOME, PATH, /usr/local/cuda*), else the copy Triton bundles."""
    for root in _toolkit_roots():
        if (root / "bin" / name).is_file():
            return root / "bin" / name
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return bundled
    return None


def require_tool(name: str) -> Path:
    tool = find_tool(name)
    if tool is None:
        message = f"{name} not found (CUDA_HOME, PATH, /usr/local/cuda*, Triton's bundled tools)"
        if CUDA_REQUIRED:
            pytest.fail(f"FASTNAS_CUDA=1 but {message}")
        pytest.skip(message)
    return tool


class Kernel(NamedTuple):
    arch: str
    name: str  # mangled
    registers: int
    stack_bytes: int
    spill_bytes: int
    instructions: list  # (opcode, operands) in program order

    @property
    def backward(self) -> bool:
        return "backward" in self.name

    @property
    def shifted(self) -> bool:
        return "Lb1E" in self.name  # the kShifted template argument

    def short(self) -> str:
        kind = "backward" if self.backward else "forward"
        dtype = next(d for m, d in MANGLED_DTYPES.items() if m in self.name)
        return f"{self.arch}:{kind}<{dtype}{', shifted' if self.shifted else ''}>"


def parse_ptxas(report: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(arch, function) -> (registers, stack frame bytes, spill bytes) from ``-Xptxas -v``."""
    result, function, arch, stack, spill = {}, None, None, 0, 0
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line):
            function, arch = m.groups()
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        elif (m := re.search(r"Used (\d+) registers", line)) and function is not None:
            result[(arch, function)] = (int(m.group(1)), stack, spill)
            function = None
    return result


def parse_sass(dump: str) -> dict[tuple[str, str], list]:
    """(arch, function) -> [(opcode, operands)] from ``cuobjdump --dump-sass`` of a fat binary."""
    result, arch, function = {}, None, None
    for line in dump.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            function = m.group(1)
            result[(arch, function)] = []
        elif function is not None and (m := INSTRUCTION.match(line)):
            result[(arch, function)].append((m.group(1), m.group(2)))
    return result


def _registers_of(operand: str) -> Iterator[int]:
    for m in re.finditer(r"\bR(\d+)(\.64)?\b", operand):
        yield int(m.group(1))
        if m.group(2):
            yield int(m.group(1)) + 1


def loads_before_first_use(instructions: list) -> int:
    """The most 128-bit global loads issued, in program order, before an instruction reads a register one
    of them writes (where the thread must wait for memory). A register written by another instruction in
    between is no longer pending. Conservative across branches: program order, not control flow."""
    best, pending, issued = 0, set(), 0
    for opcode, operands in instructions:
        parts = [p.strip() for p in operands.split(",")] if operands.strip() else []
        has_destination = bool(parts) and not NO_DESTINATION.match(opcode)
        sources = {r for p in (parts[1:] if has_destination else parts) for r in _registers_of(p)}
        if pending & sources:
            best, pending, issued = max(best, issued), set(), 0
        if LOAD_128.match(opcode):
            first = next(_registers_of(parts[0]))
            pending |= set(range(first, first + 4))
            issued += 1
        elif has_destination:
            pending -= set(_registers_of(parts[0]))
    return max(best, issued)


def resident_blocks(registers: int) -> int:
    """Blocks of 256 threads one multiprocessor holds at this register count (sm_80/sm_90: 64 Ki registers,
    2048 threads, registers allocated per warp in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(REGISTERS_PER_MULTIPROCESSOR // (per_warp * THREADS // 32), THREADS_PER_MULTIPROCESSOR // THREADS)


@pytest.fixture(scope="session")
def compiled_kernels(tmp_path_factory) -> list[Kernel]:
    """Every kernel of the header, compiled for sm_80 and sm_90 by one nvcc call, with its ptxas report and SASS."""
    nvcc = require_tool("nvcc")
    cuobjdump = require_tool("cuobjdump")
    out = tmp_path_factory.mktemp("cuda_kernels") / "kernels.fatbin"
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    command = [str(nvcc), "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-fatbin", "--threads", "2", *gencode]
    command += ["-Xptxas", "-v", "-o", str(out), str(KERNELS_TU)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-4000:]}"
    usage = parse_ptxas(build.stdout + build.stderr)
    dump = subprocess.run([str(cuobjdump), "--dump-sass", str(out)], capture_output=True, text=True, check=True)
    sass = parse_sass(dump.stdout)
    assert usage.keys() == sass.keys(), "ptxas report and SASS list different kernels"
    return [Kernel(arch, name, *usage[(arch, name)], sass[(arch, name)]) for arch, name in sorted(usage)]


def test_every_kernel_is_compiled_for_each_arch(compiled_kernels):
    """2 directions x 4 dtypes x (aligned, shifted) = 16 kernels per architecture."""
    for arch in ARCHS:
        names = [k.name for k in compiled_kernels if k.arch == arch]
        assert len(names) == 16, f"{arch}: {names}"
        assert sum("forward" in n for n in names) == 8 and sum("backward" in n for n in names) == 8


def test_no_spills_and_sane_registers(compiled_kernels):
    for k in compiled_kernels:
        assert k.stack_bytes == 0 and k.spill_bytes == 0, (
            f"{k.short()}: stack {k.stack_bytes} B, spills {k.spill_bytes} B"
        )
        assert resident_blocks(k.registers) >= (2 if k.shifted else 3), f"{k.short()}: {k.registers} registers"


def test_vector_kernels_use_128_bit_loads_and_stores(compiled_kernels):
    for k in compiled_kernels:
        loads = sum(bool(LOAD_128.match(op)) for op, _ in k.instructions)
        stores = sum(bool(STORE_128.match(op)) for op, _ in k.instructions)
        per_input = 2 if k.shifted else 1
        if k.backward:  # g, a group of 8 inputs; 8 input gradients
            assert loads >= per_input * 9 and stores >= 8, f"{k.short()}: {loads} LDG.128, {stores} STG.128"
        else:  # a group of 8 inputs; y
            assert loads >= per_input * 8 and stores >= 1, f"{k.short()}: {loads} LDG.128, {stores} STG.128"


def test_loads_in_flight(compiled_kernels):
    """A group's loads go out before the first use of any of them, enough to cover memory latency."""
    for k in compiled_kernels:
        in_flight = loads_before_first_use(k.instructions)
        needed = 16 if k.shifted else 8
        assert in_flight >= needed, f"{k.short()}: {in_flight} loads in flight before the first use"
        bytes_per_multiprocessor = resident_blocks(k.registers) * THREADS * in_flight * 16
        assert bytes_per_multiprocessor >= 64 * 1024, f"{k.short()}: {bytes_per_multiprocessor // 1024} KiB in flight"


def test_built_extension_kernels_do_not_spill():
    """The CUDA kernels compiled into fastnas._C (CI: FASTNAS_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0) use no local
    memory, and are the forward and backward kernels only: no second kernel per backward."""
    reason = backend.unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(reason)
    import fastnas._C

    library = Path(fastnas._C.__file__)
    if b"__cudaRegisterFatBinary" not in library.read_bytes():
        if CUDA_REQUIRED:
            pytest.fail(f"FASTNAS_CUDA=1 but {library} holds no CUDA code")
        pytest.skip("fastnas._C was built without its CUDA kernels")
    cuobjdump = require_tool("cuobjdump")
    usage = subprocess.run([str(cuobjdump), "-res-usage", str(library)], capture_output=True, text=True, check=True)
    functions = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout)
    assert functions, f"no kernels in cuobjdump -res-usage of {library}:\n{usage.stdout[:2000]}"
    for name, registers, stack, local in functions:
        assert "mixed_sum_forward_kernel" in name or "mixed_sum_backward_kernel" in name, f"unexpected kernel {name}"
        assert int(stack) == 0 and int(local) == 0, f"{name}: stack {stack} B, local {local} B"
        assert int(registers) <= 128, f"{name}: {registers} registers"
    assert len(functions) % 16 == 0, f"{len(functions)} kernels: 16 per architecture expected"
