"""Speed of fastnas.mixed_sum against eager ``sum(w * o)`` and ``torch.compile`` of the same function.

Run:  pytest benchmarks/bench_mixed_sum.py --benchmark-only

Three kinds of benchmark:

* ``test_provider``: one provider (a fastnas backend, eager, compile, or a plain copy) at one shape,
  dtype and pass, timed by pytest-benchmark. ``extra_info`` holds provider, shape, dtype, K, pass and
  bytes moved ((K+1)·N forward, (2K+1)·N backward, 2·K·N for the copy), for ``benchmarks/report.py``.
* ``test_side_by_side``: every provider in interleaved rounds (medians), forward+backward, with the
  copy of K·N elements into an existing tensor timed in the same rounds. Its ``extra_info`` holds each
  provider's median, the speed-ups of fastnas over eager and compile, and fastnas's bandwidth as a
  fraction of the copy's; the terminal summary prints them as a table.
* ``test_cpu_kernel_levels`` (CPU): the CPU kernels alone, forward and backward, at each
  instruction-set level the CPU has, also printed as a table.

Every timed call starts with the caches flushed (``timing.CacheFlush``, untimed). Without it a call
finds part of its inputs in the last-level cache when the call before it read them (at
[64, 16, 32, 32], K = 8, the 32 MiB of inputs are the size of the 2-core EPYC's L3), and the order of
the providers would leak into their ratios.
"""

from __future__ import annotations

import pytest
import torch
from timing import SUMMARY_ROWS, CacheFlush, interleaved_medians

import fastnas
from fastnas import backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
# supernet shapes: DARTS/NB201 cells at C=16 and C=64 (8x8 after two reductions), plus a large one
SHAPES = [
    ((64, 16, 32, 32), 4),
    ((64, 16, 32, 32), 5),
    ((64, 16, 32, 32), 8),
    ((64, 64, 8, 8), 8),
    ((64, 64, 32, 32), 8),
]
if DEVICE == "cuda":
    SHAPES.append(((256, 64, 32, 32), 8))  # 64 MB per fp32 input: bandwidth-bound on a GPU
ROUNDS = 30 if DEVICE == "cuda" else 15


def eager_mixed_sum(outputs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """What NAS libraries do today: sum(w * op(x) for ...)."""
    return sum(w * o for w, o in zip(weights, outputs))


_compiled = {}


def compiled_mixed_sum(outputs, weights):
    key = (len(outputs), tuple(outputs[0].shape), outputs[0].dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(eager_mixed_sum, dynamic=False)
    return _compiled[key](outputs, weights)


def fastnas_providers() -> list[str]:
    return [f"fastnas-{name}" for name in backend.available_backends(DEVICE) if name != "reference"]


def make_inputs(shape, K, dtype):
    outputs = [torch.randn(shape, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(K)]
    weights = torch.softmax(torch.randn(K, device=DEVICE), 0).requires_grad_()
    grad = torch.randn(shape, dtype=dtype, device=DEVICE)
    return outputs, weights, grad


def forward_fn(provider: str):
    if provider == "eager":
        return eager_mixed_sum
    if provider == "compile":
        return compiled_mixed_sum
    name = provider.removeprefix("fastnas-")

    def run(outputs, weights):
        if backend.requested_backend() != name:  # a switch when the provider changes (eager/compile need none)
            fastnas.set_backend(name)
        return fastnas.mixed_sum(outputs, weights)

    return run


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    fastnas.set_backend(None)


def step_fn(provider: str, which: str, outputs, weights, grad):
    """A no-argument callable running one pass of `which` ("fwd", "bwd", "fwd+bwd") for provider.

    The backward is ``torch.autograd.grad`` (the gradients are returned, as they would flow on into a
    supernet's op backward), not ``.backward()``, which would add each step's gradients into ``.grad``
    and time that accumulation too."""
    forward = forward_fn(provider)
    inputs = [weights, *outputs]
    if which == "fwd":
        return lambda: forward(outputs, weights)
    if which == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(outputs, weights), inputs, grad)
    y = forward(outputs, weights)
    return lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True)


def bytes_moved(which: str, K: int, numel: int, element_size: int) -> int:
    per_pass = {"fwd": K + 1, "bwd": 2 * K + 1, "fwd+bwd": 3 * K + 2, "copy": 2 * K}[which]
    return per_pass * numel * element_size


def shape_id(shape, K):
    return "x".join(map(str, shape)) + f"-K{K}"


PROVIDERS = fastnas_providers() + ["eager", "compile"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape,K", SHAPES, ids=[shape_id(s, k) for s, k in SHAPES])
@pytest.mark.parametrize("which", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS + ["copy"])
def test_provider(benchmark, provider, which, shape, K, dtype):
    if provider == "copy" and which != "fwd+bwd":
        pytest.skip("the copy baseline is timed once per shape")
    if which != "fwd+bwd" and shape != (64, 64, 32, 32) and DEVICE == "cpu":
        pytest.skip("separate passes are timed at the large shape only on CPU")
    outputs, weights, grad = make_inputs(shape, K, dtype)
    numel = grad.numel()
    if provider == "copy":
        source = torch.randn(K * numel, dtype=dtype, device=DEVICE)
        destination = torch.empty_like(source)
        fn, moved = (lambda: destination.copy_(source)), bytes_moved("copy", K, numel, grad.element_size())
    else:
        fn, moved = step_fn(provider, which, outputs, weights, grad), bytes_moved(which, K, numel, grad.element_size())
    benchmark.extra_info.update(
        provider=provider,
        shape=list(shape),
        K=K,
        dtype=str(dtype).removeprefix("torch."),
        device=DEVICE,
        **{"pass": which if provider != "copy" else "copy"},
        bytes=moved,
    )
    for _ in range(3):
        fn()

    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, setup=CacheFlush(DEVICE), rounds=ROUNDS, iterations=1, warmup_rounds=2)


# pytest-benchmark's own table times what these run per round: every provider once, back to back.
# Its group headings say so; the per-provider medians are in the summary tables printed after it.
ROUNDS_GROUP = "whole interleaved rounds, every provider once (per-provider medians: tables below)"


@pytest.mark.benchmark(group=f"side_by_side: {ROUNDS_GROUP}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape,K", SHAPES, ids=[shape_id(s, k) for s, k in SHAPES])
def test_side_by_side(benchmark, shape, K, dtype):
    """Forward+backward of every provider and the copy, in interleaved rounds; one benchmark round
    is one call of each."""
    outputs, weights, grad = make_inputs(shape, K, dtype)
    numel = grad.numel()
    source = torch.randn(K * numel, dtype=dtype, device=DEVICE)
    destination = torch.empty_like(source)
    fns = {p: step_fn(p, "fwd+bwd", outputs, weights, grad) for p in PROVIDERS}
    fns["copy"] = lambda: destination.copy_(source)
    medians = interleaved_medians(fns, DEVICE, rounds=ROUNDS, flush_cache=True)
    element_size = grad.element_size()
    copy_bandwidth = bytes_moved("copy", K, numel, element_size) / medians["copy"]
    info = {
        "shape": list(shape),
        "K": K,
        "dtype": str(dtype).removeprefix("torch."),
        "device": DEVICE,
        "pass": "side-by-side fwd+bwd",
        "median_ms": {p: round(t * 1e3, 4) for p, t in medians.items()},
        "copy_GBps": round(copy_bandwidth / 1e9, 2),
    }
    for p in fastnas_providers():
        bandwidth = bytes_moved("fwd+bwd", K, numel, element_size) / medians[p]
        info[p] = {
            "speedup_vs_eager": round(medians["eager"] / medians[p], 3),
            "speedup_vs_compile": round(medians["compile"] / medians[p], 3),
            "GBps": round(bandwidth / 1e9, 2),
            "fraction_of_copy": round(bandwidth / copy_bandwidth, 3),
        }
    benchmark.extra_info.update(info)
    SUMMARY_ROWS.append(info)
    benchmark.pedantic(lambda: [fn() for fn in fns.values()], rounds=3, iterations=1)


@pytest.mark.benchmark(group=f"cpu_kernel_levels: {ROUNDS_GROUP}")
@pytest.mark.skipif(DEVICE != "cpu" or "fastnas-cpu" not in PROVIDERS, reason="the CPU kernels' levels, on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_cpu_kernel_levels(benchmark, dtype):
    """The CPU kernels alone (no autograd) at [64,16,32,32], K=8, at every instruction-set level
    this CPU has: the register-blocked AVX-512/AVX2 kernels against the portable ones."""
    shape, K = (64, 16, 32, 32), 8
    outputs = [torch.randn(shape, dtype=dtype) for _ in range(K)]
    weights = torch.softmax(torch.randn(K), 0)
    grad = torch.randn(shape, dtype=dtype)
    levels = backend.cpu_isa_levels()
    fns = {}
    for level in levels:

        def forward(level=level):
            torch.ops.fastnas._cpu_settings(level)
            torch.ops.fastnas._mixed_sum_forward(outputs, weights)

        def backward(level=level):
            torch.ops.fastnas._cpu_settings(level)
            torch.ops.fastnas._mixed_sum_backward(grad, outputs, weights, True)

        fns[(level, "fwd")], fns[(level, "bwd")] = forward, backward
    try:
        medians = interleaved_medians(fns, DEVICE, rounds=ROUNDS, flush_cache=True)
        benchmark.pedantic(lambda: [fn() for fn in fns.values()], rounds=1, iterations=1)
    finally:
        torch.ops.fastnas._cpu_settings(levels[0])
    info = {
        "shape": list(shape), "K": K, "dtype": str(dtype).removeprefix("torch."), "device": DEVICE,
        "pass": "cpu kernel levels",
        "level_ms": {level: {p: round(medians[(level, p)] * 1e3, 4) for p in ("fwd", "bwd")} for level in levels},
    }  # fmt: skip
    benchmark.extra_info.update(info)
    SUMMARY_ROWS.append(info)
