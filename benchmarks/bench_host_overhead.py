"""Host time of the ``triton`` backend per call, with the kernel launch stubbed out (no GPU needed).

Run:  pytest benchmarks/bench_host_overhead.py --benchmark-only

``host_overhead_probe`` of ``tools/triton_offline.py`` runs the op in a fresh process whose Triton
driver compiles the kernels for sm_90 and launches nothing, on CPU tensors standing in for CUDA
ones (see its docstring for what is and is not included). Its medians, in microseconds per call,
go to ``extra_info`` and to the terminal summary; the benchmark's own time is the probe's
(process start and compile included) and means nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton backend needs the triton package")

from fastnas import backend  # noqa: E402

if backend.unavailable_reason("triton"):
    pytest.skip(f"the triton backend is unavailable: {backend.unavailable_reason('triton')}", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from triton_offline import host_overhead_probe  # noqa: E402

CASES = [(8, "float32"), (8, "bfloat16"), (40, "float32")]


@pytest.mark.parametrize("k,dtype", CASES, ids=[f"K{k}-{d}" for k, d in CASES])
def test_triton_host_overhead(benchmark, k, dtype):
    result = benchmark.pedantic(lambda: host_overhead_probe(k=k, dtype=dtype), rounds=1, iterations=1)
    benchmark.extra_info.update(provider="fastnas-triton", pass_="host", **result)
    keys = ("forward", "forward_backward", "kernels_forward", "kernels_backward", "autograd_floor", "fastnas_host")
    print(f"\ntriton host us per call, K={k} {dtype}: " + ", ".join(f"{name} {result[name]}" for name in keys))
