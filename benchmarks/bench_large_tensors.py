"""Bandwidth of the fused mixed-sum kernels of every GPU backend on large tensors, against a copy.

Run (GPU only; skipped without one):  pytest benchmarks/bench_large_tensors.py --benchmark-only

For each GPU backend available here (``cuda``, ``triton``), the forward and the backward kernel are
called through ``fastnas.ops.mixed_sum.kernels_for`` (the native contract: no autograd, no Python op) on K
inputs of 64 MB or more, and in the same test a ``copy_`` of K·N elements, all timed with
``triton.testing.do_bench`` (CUDA events, L2 flushed, medians). Bytes moved: forward (K+1)·N,
backward (2K+1)·N, copy 2·K·N, times the element size. ``extra_info`` holds what
``benchmarks/report.py`` reads (provider, shape, dtype, K, pass, bytes, ``kernel_median_ms``, the
copy's median and GB/s) and ``fraction_of_copy``: the target is >= 0.9 on an H100 or H200.
"""

from __future__ import annotations

import pytest
import torch

from fastnas import backend
from fastnas.ops.mixed_sum import kernels_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="measures GPU bandwidth: needs a CUDA GPU")

MB = 1 << 20
CASES = [(64 * MB, 2), (64 * MB, 8), (256 * MB, 4)]  # (bytes per input, K)
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = [name for name in ("cuda", "triton") if backend.unavailable_reason(name, "cuda") is None]


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_median_ms(outputs: list[torch.Tensor]) -> float:
    """Median ms of copying K·N elements into an existing tensor (the bandwidth reference)."""
    source = torch.cat(outputs)
    destination = torch.empty_like(source)
    return median_ms(lambda: destination.copy_(source))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("size,k", CASES, ids=[f"{s // MB}MB-K{k}" for s, k in CASES])
@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("name", BACKENDS or ["none"])
def test_kernel_bandwidth(benchmark, name, which, size, k, dtype):
    if name == "none":
        pytest.skip("no GPU backend is available (build with FASTNAS_CUDA=1 or install triton)")
    pytest.importorskip("triton", reason="timed with triton.testing.do_bench")
    forward, backward_ = kernels_for(name)
    element_size = torch.empty(0, dtype=dtype).element_size()
    n = size // element_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    outputs = [torch.randn(n, generator=gen, device="cuda").to(dtype) for _ in range(k)]
    weights = torch.softmax(torch.randn(k, generator=gen, device="cuda"), 0)
    grad = torch.randn(n, generator=gen, device="cuda").to(dtype)
    if which == "fwd":
        fn, moved = (lambda: forward(outputs, weights)), (k + 1) * n * element_size
    else:
        fn, moved = (lambda: backward_(grad, outputs, weights, True)), (2 * k + 1) * n * element_size
    fn()  # compile (and autotune) outside the timing
    torch.cuda.synchronize()
    kernel_ms = median_ms(fn)
    copy_ms = copy_median_ms(outputs)
    kernel_gbps = moved / kernel_ms / 1e6
    copy_gbps = 2 * k * n * element_size / copy_ms / 1e6
    benchmark.extra_info.update(
        provider=f"fastnas-{name}",
        device=torch.cuda.get_device_name(),
        shape=[n],
        dtype=str(dtype).removeprefix("torch."),
        K=k,
        **{"pass": which},
        bytes=moved,
        kernel_median_ms=round(kernel_ms, 5),
        copy_median_ms=round(copy_ms, 5),
        GBps=round(kernel_gbps, 1),
        copy_GBps=round(copy_gbps, 1),
        fraction_of_copy=round(kernel_gbps / copy_gbps, 3),
    )

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
