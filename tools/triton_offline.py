"""Triton's own launch path on a machine without a GPU: compile for a chosen GPU, launch nothing.

Development tooling, not part of the installed package: the tests and ``benchmarks/`` import it with
``tools/`` on ``sys.path``, and run it as ``python tools/triton_offline.py --compile ...``.

:func:`offline_gpu` makes a :class:`OfflineDriver` Triton's active driver. Through it, a
``@triton.jit`` kernel's usual entry points (``kernel[grid](...)``, ``kernel.warmup(...)``) bind
and specialise their arguments exactly as on a GPU, compile for the chosen target (``GPUTarget
("cuda", 90, 32)``: PTX by Triton, cubin by the ptxas Triton ships), and return the
``CompiledKernel``, whose launcher is a no-op. CPU tensors stand in for CUDA tensors (only their
dtype and the alignment of ``data_ptr()`` matter to the compiler).

Two uses, both without a GPU: the tests compile every kernel variant the launchers of
:mod:`fastnas.kernels.mixed_sum` can pick and inspect its PTX and resources
(``tests/test_triton_compiled.py``), and :func:`host_overhead_probe` times the host side of the op
with the launch stubbed out.

The kernels must have been compiled, not interpreted: import them in a process without
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

__all__ = [
    "OfflineDriver",
    "offline_gpu",
    "compile_launch_variants",
    "ptx_facts",
    "sass_loads_in_flight",
    "in_flight_sample",
    "host_overhead_probe",
    "compile_batch_norm_variants",
    "ptxas_resources",
    "triton_tool",
]


class _NoLaunch:
    """Stands for Triton's C launcher: takes the arguments of a launch and does nothing."""

    def __init__(self, src, metadata) -> None:
        self.src, self.metadata = src, metadata

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args) -> None:
        return None


class _OfflineUtils:
    """What ``CompiledKernel`` asks of the driver's utilities when it loads a binary."""

    def __init__(self, shared_memory: int) -> None:
        self.shared_memory = shared_memory

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def unload_module(self, module) -> None:
        return None

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": self.shared_memory, "multiprocessor_count": 132, "warpSize": 32}


class OfflineDriver:
    """A Triton driver for one CUDA compute capability with no device behind it."""

    def __init__(self, capability: int) -> None:
        self.capability = capability
        self.utils = _OfflineUtils(shared_memory=232448 if capability >= 90 else 166912)
        self.launcher_cls = _NoLaunch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        return None

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return divmod(self.capability, 10)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def offline_gpu(capability: int = 90) -> Iterator[OfflineDriver]:
    """Make an :class:`OfflineDriver` for ``capability`` (80: A100, 90: H100/H200) Triton's active
    driver for the duration of the block, then restore the previous one. Each jitted kernel keeps
    one cache per (device, target), so leaving and re-entering with another capability recompiles."""
    from fastnas.kernels import batch_norm, mixed_sum

    offline = OfflineDriver(capability)
    previous = driver._active
    driver.set_active(offline)
    modules = [m for m in (mixed_sum, batch_norm) if isinstance(m.KERNELS[0], triton.runtime.JITFunction)]
    saved = {k: k.device_caches for m in modules for k in m.KERNELS}
    saved_launches = {m: dict(m._LAUNCHER.compiled) for m in modules}
    # another target behind the same device numbers: its own compiled kernels, in Triton and in fastnas
    for k in saved:
        k.device_caches = type(k.device_caches)(k.create_binder)
    for m in modules:
        m._LAUNCHER.compiled.clear()
    try:
        yield offline
    finally:
        for k, caches in saved.items():
            k.device_caches = caches
        for m in modules:
            m._LAUNCHER.compiled.clear()
            m._LAUNCHER.compiled.update(saved_launches[m])
        driver._active = previous


def triton_tool(name: str) -> Path:
    """A CUDA tool shipped with Triton (``ptxas``, ``cuobjdump``, ``nvdisasm``)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not shipped with this Triton ({path})")
    return path


def ptxas_resources(ptx: str, capability: int, workdir: Path) -> dict[str, int]:
    """Registers, stack frame and spill bytes from ``ptxas -v`` on a kernel's PTX (the ptxas Triton
    compiles with; one kernel per PTX, as Triton emits)."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "kernel.ptx"
    src.write_text(ptx)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    cmd = [str(triton_tool("ptxas")), "-v", f"--gpu-name={arch}", str(src), "-o", str(workdir / "kernel.cubin")]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    found = {
        "registers": re.search(r"Used (\d+) registers", log),
        "stack": re.search(r"(\d+) bytes stack frame", log),
        "spill_stores": re.search(r"(\d+) bytes spill stores", log),
        "spill_loads": re.search(r"(\d+) bytes spill loads", log),
    }
    if not all(found.values()):
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return {name: int(m[1]) for name, m in found.items()}


def cubin_resources(cubin: bytes, workdir: Path) -> dict[str, int]:
    """``cuobjdump -res-usage`` of a kernel's cubin: registers, stack and local memory bytes
    (spilled registers live in local memory, on the stack)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run(
        [str(triton_tool("cuobjdump")), "-res-usage", str(path)], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{out}")
    return dict(zip(("registers", "stack", "shared", "local"), map(int, found.groups())))


_LOAD_128 = re.compile(r"^\s*(@%p\d+\s+)?ld\.global(\.\w+)*\.(v4\.b32|v2\.b64)\s", re.MULTILINE)
_STORE_128 = re.compile(r"^\s*(@%p\d+\s+)?st\.global(\.\w+)*\.(v4\.b32|v2\.b64)\s", re.MULTILINE)


def ptx_facts(ptx: str, block: int) -> dict[str, int | bool]:
    """What the tests assert on a kernel's PTX: 128-bit global loads and stores, barriers, warp
    shuffles, conditional branches, atomics, and whether the tile index is widened to 64 bits before
    it is multiplied by the tile size ``block`` (``mul.wide``: offsets past 2^31 elements)."""
    return {
        "loads_128": len(_LOAD_128.findall(ptx)),
        "stores_128": len(_STORE_128.findall(ptx)),
        "loads": len(re.findall(r"^\s*(?:@%p\d+\s+)?ld\.global", ptx, re.MULTILINE)),
        "barriers": len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)),
        "shuffles": len(re.findall(r"\bshfl\.", ptx)),
        "branches": len(re.findall(r"@!?%p\d+\s+bra\b", ptx)),
        "atomics": len(re.findall(r"\batom\.", ptx)),
        "wide_tile_offset": re.search(rf"\bmul\.wide\.[su]32\s+%rd\d+, %r\d+, {block};", ptx) is not None,
    }


def sass(cubin: bytes, workdir: Path) -> str:
    """The SASS of a cubin (``cuobjdump -sass``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run(
        [str(triton_tool("cuobjdump")), "-sass", str(path)], capture_output=True, text=True, check=True
    ).stdout


_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?P<text>[^;]*);")
_SASS_REGISTER = re.compile(r"\bR(\d+)\b")


def sass_loads_in_flight(sass_text: str) -> int:
    """The most 128-bit global loads (``LDG.E.128``) issued and not yet used at any point of the
    SASS, read in program order: how many loads a thread keeps in flight. A load stops counting at
    the first instruction that reads one of its four destination registers."""
    pending: dict[int, int] = {}  # destination register -> the load's number
    most, count = 0, 0
    for match in _SASS_INSTRUCTION.finditer(sass_text):
        text = match["text"].strip()
        text = re.sub(r"^@!?U?P\w+\s+", "", text)  # predicate
        opcode, _, operands = text.partition(" ")
        registers = [int(r) for r in _SASS_REGISTER.findall(operands)]
        writes_first = not opcode.startswith(("ST", "RED", "BRA", "BAR", "EXIT"))
        sources = registers[1:] if writes_first else registers
        used = {pending.pop(r) for r in sources if r in pending}
        for load in used:  # the other registers of a used load are no longer in flight either
            for r in [r for r, n in pending.items() if n == load]:
                del pending[r]
        if opcode.startswith("LDG.E.128") and registers:
            count += 1
            for r in range(registers[0], registers[0] + 4):
                pending[r] = count
        most = max(most, len(set(pending.values())))
    return most


def compile_launch_variants(capabilities: Sequence[int] = (80, 90), shard: int = 0, shards: int = 1) -> list[dict]:
    """Compile kernel variants through the launchers of :mod:`fastnas.kernels.mixed_sum`, for each
    CUDA capability, and describe each: its :class:`~fastnas.kernels.mixed_sum.Variant`, compile
    seconds, ``cuobjdump -res-usage`` resources, :func:`ptx_facts`, and for the variants
    :func:`in_flight_sample` names, :func:`sass_loads_in_flight` (disassembling takes a while).

    Each variant is reached the way a user reaches it: a call of ``mixed_sum_forward`` or
    ``mixed_sum_backward`` on CPU tensors (16-byte aligned) sized for several full tiles and a partial
    one, whose launch the :class:`OfflineDriver` compiles. ``shard`` of ``shards`` takes every
    ``shards``-th variant, heaviest first, so that processes can share the work."""
    import tempfile

    from fastnas.kernels import mixed_sum as tk

    if tk.interpreted():
        raise RuntimeError("compiling needs the kernels compiled, not interpreted: unset TRITON_INTERPRET")
    variants = sorted(tk.launch_variants(), key=_compile_cost, reverse=True)[shard::shards]
    facts = []
    with tempfile.TemporaryDirectory() as tmp:
        for capability in capabilities:
            with offline_gpu(capability):
                for variant in variants:
                    start = time.perf_counter()
                    compiled, plan = _compile_variant(tk, variant)
                    seconds = time.perf_counter() - start
                    cubin = compiled.asm["cubin"]
                    in_flight = sass_loads_in_flight(sass(cubin, Path(tmp))) if in_flight_sample(variant) else None
                    facts.append(
                        {
                            **variant._asdict(),
                            "dtype": str(variant.dtype).removeprefix("torch."),
                            "out_dtype": str(variant.out_dtype).removeprefix("torch.") if variant.out_dtype else None,
                            "capability": capability,
                            "seconds": round(seconds, 2),
                            "block": plan.block,
                            "rows_per_thread": plan.rows // (32 * plan.num_warps),
                            "num_warps": plan.num_warps,
                            **cubin_resources(cubin, Path(tmp)),
                            **ptx_facts(compiled.asm["ptx"], plan.block),
                            "loads_in_flight": in_flight,
                        }
                    )
    return facts


def in_flight_sample(variant) -> bool:
    """The variants whose SASS :func:`compile_launch_variants` reads for loads in flight: K bucket 8,
    float32 and bfloat16, the forward and the full backward."""
    import torch

    return (
        variant.kb == 8
        and variant.dtype in (torch.float32, torch.bfloat16)
        and (variant.form == "forward" and variant.out_dtype == variant.dtype or variant.has_do and variant.has_dw)
    )


def _compile_cost(variant) -> int:
    """Relative compile time of a variant (the kernels unroll over the K bucket)."""
    return variant.kb * (3 if variant.form == "backward" and variant.has_dw else 1)


def _compile_variant(tk, variant):
    """Call the launcher that picks ``variant``; return its CompiledKernel and the launch plan."""
    import torch

    from fastnas.contract import accumulation_dtype

    dtype, acc = variant.dtype, accumulation_dtype(variant.dtype)
    plan = tk._plan(variant.form, variant.kb, dtype)
    n = 3 * plan.block + 5  # full tiles and a partial one, several programs
    k = variant.kb
    if variant.form == "forward" and variant.out_dtype != dtype:
        k = tk.MAX_BUCKET_FORWARD + 1  # chunks: 32 inputs into the running sum, then 1 into y
    tensors = [torch.zeros(n, dtype=dtype) for _ in range(k + 1)]
    weights = torch.zeros(k, dtype=acc)
    before = set(tk._LAUNCHER.compiled)
    if variant.form == "forward":
        tk.mixed_sum_forward(tensors[:k], weights)
    else:
        outputs = tensors[:k] if variant.has_dw else []
        tk.mixed_sum_backward(tensors[k], outputs, weights, variant.has_do)
    keys = [key for key in tk._LAUNCHER.compiled if key not in before and tk.variant_of(key) == variant]
    if len(keys) != 1:
        raise RuntimeError(f"the launchers did not pick {variant} exactly once: {keys}")
    return tk._LAUNCHER.compiled[keys[0]][3], tk._plan(variant.form, k if k <= variant.kb else variant.kb, dtype)


def compile_batch_norm_variants(capabilities: Sequence[int] = (90,)) -> list[dict]:
    """Compile every variant of :func:`fastnas.kernels.batch_norm.launch_variants` through its
    launchers, for each CUDA capability, and describe each: ``cuobjdump -res-usage`` resources,
    :func:`ptx_facts` and :func:`sass_loads_in_flight`."""
    import tempfile

    from fastnas.kernels import batch_norm as kb

    facts = []
    with tempfile.TemporaryDirectory() as tmp:
        for capability in capabilities:
            with offline_gpu(capability):
                for variant in kb.launch_variants():
                    compiled = kb.compile_variant(variant)
                    cubin = compiled.asm["cubin"]
                    form, dtype, plane, extra = variant
                    facts.append(
                        {
                            "form": form,
                            "dtype": str(dtype).removeprefix("torch."),
                            "plane": plane,
                            "extra": extra,
                            "capability": capability,
                            **cubin_resources(cubin, Path(tmp)),
                            **ptx_facts(compiled.asm["ptx"], kb.block(plane, dtype)),
                            "loads_in_flight": sass_loads_in_flight(sass(cubin, Path(tmp))),
                        }
                    )
    return facts


def _main() -> None:
    """``python tools/triton_offline.py --compile SHARD SHARDS CAPABILITY...`` (the mixed sum) or
    ``--batch-norm CAPABILITY...``: one JSON line."""
    if sys.argv[1:2] == ["--compile"]:
        shard, shards, *capabilities = map(int, sys.argv[2:])
        print(json.dumps(compile_launch_variants(capabilities, shard, shards)))
    elif sys.argv[1:2] == ["--batch-norm"]:
        print(json.dumps(compile_batch_norm_variants([int(c) for c in sys.argv[2:]])))
    else:
        raise SystemExit(
            "usage: python tools/triton_offline.py --compile SHARD SHARDS CAPABILITY... | --batch-norm CAPABILITY..."
        )


# --------------------------------------------------------------------------- host time


def host_overhead_probe(
    k: int = 8, shape: tuple[int, ...] = (16, 16, 16), dtype: str = "float32", calls: int = 500, rounds: int = 9
) -> dict:
    """Host microseconds per call of the ``triton`` backend with the kernel launch stubbed out.

    Runs in a fresh Python process (the kernels must be compiled, not interpreted): the
    :class:`OfflineDriver` compiles the kernels for sm_90 on the first call and replaces the launch
    by a no-op, so every other step is the real one: ``fastnas.mixed_sum`` (checks, layout, the
    autograd node), the triton launchers (allocation of the results, configuration,
    specialisation key, workspace) and the call into the compiled kernel's launcher, on CPU tensors
    standing in for CUDA ones. Not included: the launch itself (Triton's C launcher and
    ``cuLaunchKernelEx``) and the hand-off to autograd's CUDA worker thread.

    Returns medians over ``rounds`` interleaved rounds of ``calls`` calls each, in microseconds of
    the calling thread's CPU time (``time.thread_time``: on a shared machine, time spent waiting
    for a core is not counted; autograd runs CPU tensors' backward on the calling thread):
    ``forward`` (``fastnas.mixed_sum``), ``forward_backward`` (and ``torch.autograd.grad`` of every
    input), ``kernels_forward`` / ``kernels_backward`` (the launchers alone, as the op layer calls
    them: ``fastnas.kernels.mixed_sum.VALIDATED``), ``autograd_floor`` (the same forward and
    backward through a ``torch.autograd.Function`` that only allocates the K + 2 results: what
    PyTorch's autograd and allocator cost any Python backend) and ``fastnas_host`` =
    ``forward_backward`` - ``autograd_floor``; with the inputs."""
    arguments = ", ".join(map(repr, (k, tuple(shape), dtype, calls, rounds)))
    here = str(Path(__file__).resolve().parent)
    code = f"import sys; sys.path.insert(0, {here!r}); from triton_offline import _probe; _probe({arguments})"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"host_overhead_probe failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(k: int, shape: tuple[int, ...], dtype_name: str, calls: int, rounds: int) -> None:
    import torch
    from fastnas.kernels import mixed_sum as tk

    import fastnas

    if tk.interpreted():
        raise RuntimeError("the probe needs compiled kernels: run it without TRITON_INTERPRET=1")
    dtype = getattr(torch, dtype_name)
    outputs = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(k)]
    weights = torch.randn(k, requires_grad=True)
    grad = torch.randn(shape, dtype=dtype)
    inputs = [weights, *outputs]
    detached = [o.detach() for o in outputs]
    w = weights.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)

    def forward():
        fastnas.mixed_sum(outputs, weights)

    def forward_backward():
        torch.autograd.grad(fastnas.mixed_sum(outputs, weights), inputs, grad)

    forward_kernels, backward_kernels = tk.VALIDATED  # what the op layer calls

    def kernels_forward():
        forward_kernels(detached, w)

    def kernels_backward():
        backward_kernels(grad, detached, w, True)

    class AllocateOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, *os):
            ctx.save_for_backward(w, *os)
            return torch.empty_like(os[0])

        @staticmethod
        def backward(ctx, g):
            w, *os = ctx.saved_tensors
            return torch.empty_like(w), *(torch.empty_like(g) for _ in os)

    def autograd_floor():
        torch.autograd.grad(AllocateOnly.apply(weights, *outputs), inputs, grad)

    fns = {f.__name__: f for f in (forward, forward_backward, kernels_forward, kernels_backward, autograd_floor)}
    with offline_gpu(90):
        # fastnas.backend lets the triton backend take CPU tensors only under the interpreter flag;
        # the kernels were imported compiled, and Triton reads the flag only when it decorates one
        os.environ["TRITON_INTERPRET"] = "1"
        fastnas.set_backend("triton")
        try:
            for fn in fns.values():  # compiles (or loads from Triton's cache) on the first call
                fn()
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    start = time.thread_time()  # CPU time of this thread: a busy machine's other work does not count
                    for _ in range(calls):
                        fn()
                    samples[name].append((time.thread_time() - start) / calls * 1e6)
        finally:
            fastnas.set_backend(None)
            del os.environ["TRITON_INTERPRET"]
    result = {name: round(statistics.median(v), 2) for name, v in samples.items()}
    result["fastnas_host"] = round(result["forward_backward"] - result["autograd_floor"], 2)
    result.update(k=k, shape=list(shape), dtype=dtype_name, calls=calls, rounds=rounds)
    result.update(torch=torch.__version__, triton=triton.__version__, threads=torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
