"""``fastnas.ops.max_pool.max_pool2d`` under ``torch.compile`` on CPU: compile time and step time of a
graph that pools, against inductor's own pooling and eager ``F.max_pool2d``.

The shapes are the DARTS supernet's max pools at batch 16 (C=16, 8 layers: 3x3 stride 1 in the three
stages, 3x3 stride 2 into the two reduction cells) and PC-DARTS's 2x2 stride-2 bypass, channels_last,
float32. Providers:

* ``eager``: ``F.max_pool2d`` (ATen's channels_last kernels), not compiled;
* ``inductor``: ``torch.compile`` of ``F.max_pool2d``: inductor generates the pooling and its
  backward as C++;
* ``fastnas``: ``torch.compile`` of ``max_pool2d``: the graph calls ATen's kernels
  (``fastnas::max_pool2d``, ``fastnas::max_pool2d_backward``).

Reported per shape: seconds of the first forward + backward of each compiled function (compilation
included, inductor's caches disabled) and median milliseconds of forward + backward, in interleaved
rounds.

Run:  pytest benchmarks/bench_max_pool.py --benchmark-only
      python benchmarks/bench_max_pool.py [--rounds 15]      (prints a table)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_medians  # noqa: E402

from fastnas.ops.max_pool import max_pool2d  # noqa: E402

# name -> (shape, kernel, stride, padding)
SHAPES = {
    "3x3 s1 [16,16,32,32]": ((16, 16, 32, 32), 3, 1, 1),
    "3x3 s1 [16,32,16,16]": ((16, 32, 16, 16), 3, 1, 1),
    "3x3 s1 [16,64,8,8]": ((16, 64, 8, 8), 3, 1, 1),
    "3x3 s2 [16,32,16,16]": ((16, 32, 16, 16), 3, 2, 1),
    "2x2 s2 [16,48,32,32]": ((16, 48, 32, 32), 2, 2, 0),
}


def make_case(name: str, seed: int = 0):
    shape, *geometry = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(F.max_pool2d(x, *geometry).shape, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, g, geometry


def providers(geometry) -> dict:
    def eager(x):
        return F.max_pool2d(x, *geometry)

    def fastnas(x):
        return max_pool2d(x, *geometry)

    compile = dict(fullgraph=True, dynamic=False)
    return {"eager": eager, "inductor": torch.compile(eager, **compile), "fastnas": torch.compile(fastnas, **compile)}


def forward_backward(fn, x, g):
    return torch.autograd.grad(fn(x), x, g)


def first_call_seconds(fn, x, g) -> float:
    with torch._inductor.config.patch(force_disable_caches=True):
        start = time.perf_counter()
        forward_backward(fn, x, g)
        return time.perf_counter() - start


@pytest.mark.parametrize("provider", ["eager", "inductor", "fastnas"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_max_pool_forward_backward(benchmark, name, provider):
    benchmark.group = f"max_pool2d fwd+bwd: {name}"
    x, g, geometry = make_case(name)
    fn = providers(geometry)[provider]
    benchmark.extra_info["first_call_s"] = round(first_call_seconds(fn, x, g), 2)
    benchmark.pedantic(forward_backward, (fn, x, g), rounds=20, warmup_rounds=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"max_pool2d forward + backward, channels_last float32, {torch.get_num_threads()} threads")
    print("| case | first call inductor (s) | first call fastnas (s) | eager ms | inductor ms | fastnas ms |")
    print("|---|---|---|---|---|---|")
    for name in SHAPES:
        x, g, geometry = make_case(name)
        fns = providers(geometry)
        first = {p: first_call_seconds(fns[p], x, g) for p in ("inductor", "fastnas")}
        calls = {p: (lambda fn=fn, x=x, g=g: forward_backward(fn, x, g)) for p, fn in fns.items()}
        medians = interleaved_medians(calls, "cpu", rounds=args.rounds)
        cells = [f"{first['inductor']:.1f}", f"{first['fastnas']:.1f}"]
        cells += [f"{medians[p] * 1e3:.3f}" for p in ("eager", "inductor", "fastnas")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
