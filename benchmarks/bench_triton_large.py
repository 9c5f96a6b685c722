"""Bandwidth of the Triton mixed-sum kernels on large tensors, against a device-to-device copy.

Run (GPU only; skipped without one):  pytest benchmarks/bench_triton_large.py --benchmark-only

Each case times the forward and the backward kernel separately (``fastnas.kernels.mixed_sum``,
called directly: no autograd, no dispatch) on K inputs of 64 MB or more, and in the same test a
``copy_`` of K·N elements, all with ``triton.testing.do_bench`` (CUDA events, L2 flushed between
calls, medians). Bytes moved: forward (K+1)·N, backward (2K+1)·N (reads g and every o_k, writes
every d o_k), copy 2·K·N, times the element size. ``benchmark.extra_info`` holds the medians, GB/s
and ``fraction_of_copy``: the target is >= 0.9 for both passes on an H100 or H200.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="measures GPU bandwidth: needs a CUDA GPU")

MB = 1 << 20
# (bytes per input, K): 64 MB inputs as in the target, and one 256 MB case
CASES = [(64 * MB, 2), (64 * MB, 8), (256 * MB, 4)]
DTYPES = [torch.float32, torch.bfloat16]


def _kernels():
    from fastnas.kernels import mixed_sum as tk

    if tk.interpreted():
        pytest.skip("the Triton interpreter is on (TRITON_INTERPRET=1): nothing to measure")
    return tk


def _median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _copy_median_ms(outputs: list[torch.Tensor]) -> float:
    """Median ms of copying K·N elements into an existing tensor (the bandwidth reference)."""
    source = torch.cat(outputs)
    destination = torch.empty_like(source)
    return _median_ms(lambda: destination.copy_(source))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("size,k", CASES, ids=[f"{s // MB}MB-K{k}" for s, k in CASES])
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_triton_bandwidth(benchmark, which, size, k, dtype):
    tk = _kernels()
    element_size = torch.empty(0, dtype=dtype).element_size()
    n = size // element_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    outputs = [torch.randn(n, generator=gen, device="cuda").to(dtype) for _ in range(k)]
    weights = torch.softmax(torch.randn(k, generator=gen, device="cuda"), 0)
    grad = torch.randn(n, generator=gen, device="cuda").to(dtype)
    if which == "fwd":
        fn, moved = (lambda: tk.mixed_sum_forward(outputs, weights)), (k + 1) * n * element_size
    else:
        fn, moved = (lambda: tk.mixed_sum_backward(grad, outputs, weights, True)), (2 * k + 1) * n * element_size
    fn()  # compile and autotune outside the timing
    torch.cuda.synchronize()
    kernel_ms = _median_ms(fn)
    copy_ms = _copy_median_ms(outputs)
    kernel_gbps = moved / kernel_ms / 1e6
    copy_gbps = 2 * k * n * element_size / copy_ms / 1e6
    benchmark.extra_info.update(
        provider="fastnas-triton",
        device=torch.cuda.get_device_name(),
        dtype=str(dtype).removeprefix("torch."),
        K=k,
        numel=n,
        MB_per_input=size // MB,
        **{"pass": which},
        bytes=moved,
        kernel_median_ms=round(kernel_ms, 4),
        copy_median_ms=round(copy_ms, 4),
        GBps=round(kernel_gbps, 1),
        copy_GBps=round(copy_gbps, 1),
        fraction_of_copy=round(kernel_gbps / copy_gbps, 3),
    )

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
