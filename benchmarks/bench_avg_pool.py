"""``fastnas.ops.avg_pool.avg_pool2d`` against ``F.avg_pool2d`` on CPU: forward and backward time.

The shapes are the supernets' average pools (NAS-Bench-201's three stages at C=16: [64, 16, 32, 32],
[64, 32, 16, 16], [64, 64, 8, 8]; 3x3, stride 1, padding 1, count_include_pad=False) and a 2x2
stride-2 pool of each, channels_last, float32. ``pytorch`` is ATen's channels_last kernel, ``fastnas``
the compiled kernels of ``csrc/cpu/avg_pool_cpu.cpp``.

Reported per shape: median milliseconds of the forward (under no_grad) and of the backward (the
median of forward + backward less the forward's), in interleaved rounds, and their ratios.

Run:  pytest benchmarks/bench_avg_pool.py --benchmark-only
      python benchmarks/bench_avg_pool.py [--rounds 15]      (prints a table)
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import print_forward_backward_table  # noqa: E402

from fastnas.ops.avg_pool import avg_pool2d  # noqa: E402

# name -> (shape, kernel, stride, padding, count_include_pad)
SHAPES = {
    "3x3 s1 [64,16,32,32]": ((64, 16, 32, 32), 3, 1, 1, False),
    "3x3 s1 [64,32,16,16]": ((64, 32, 16, 16), 3, 1, 1, False),
    "3x3 s1 [64,64,8,8]": ((64, 64, 8, 8), 3, 1, 1, False),
    "2x2 s2 [64,16,32,32]": ((64, 16, 32, 32), 2, 2, 0, True),
    "2x2 s2 [64,32,16,16]": ((64, 32, 16, 16), 2, 2, 0, True),
    "2x2 s2 [64,64,8,8]": ((64, 64, 8, 8), 2, 2, 0, True),
}


def pytorch_pool(x, kernel, stride, padding, count_include_pad):
    return F.avg_pool2d(x, kernel, stride, padding, count_include_pad=count_include_pad)


PROVIDERS = {"pytorch": pytorch_pool, "fastnas": avg_pool2d}


def make_case(name: str, seed: int = 0):
    shape, *geometry = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = pytorch_pool(x, *geometry)
    g = torch.randn(y.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, g, geometry


def forward(fn, x, g, geometry):
    with torch.no_grad():
        return fn(x, *geometry)


def forward_backward(fn, x, g, geometry):
    return torch.autograd.grad(fn(x, *geometry), x, g)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_avg_pool_forward_backward(benchmark, name, provider):
    benchmark.group = f"avg_pool2d fwd+bwd: {name}"
    x, g, geometry = make_case(name)
    benchmark.pedantic(forward_backward, (PROVIDERS[provider], x, g, geometry), rounds=20, warmup_rounds=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    cases = {name: make_case(name) for name in SHAPES}
    print_forward_backward_table(
        "avg_pool2d, channels_last float32", PROVIDERS, cases, forward, forward_backward, args.rounds
    )


if __name__ == "__main__":
    main()
