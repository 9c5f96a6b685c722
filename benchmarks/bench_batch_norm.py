"""The supernets' lean BatchNorm on CPU: ``fastnas.ops.batch_norm``'s compiled kernels against its native
path it replaces, forward and backward time.

A NAS-Bench-201 cell runs each ``nor_conv`` of the 3, 2 and 1 edges leaving nodes 0, 1 and 2 as one
convolution, so one BatchNorm normalises 3, 2 or 1 blocks of channels, each block going to its own
mixed sum as a dense tensor. ``native`` is what the supernets did before (and still do off CPU):
``torch.native_batch_norm`` over the concatenated channels, one copy splitting the output into dense
blocks, and in the backward two copies merging the blocks' gradients and outputs for the native
backward (``fastnas.ops.batch_norm``'s native path). ``fastnas`` is the compiled kernels of
``csrc/cpu/batch_norm_cpu.cpp``, which write and read the blocks directly. Both update running
statistics (momentum 0.1). Shapes: the three NAS-Bench-201 stages at C=16, batch 64, channels_last
float32.

Reported per shape: median milliseconds of the forward (under no_grad) and of the backward (the
median of forward + backward less the forward's), in interleaved rounds, and their ratios.

Run:  pytest benchmarks/bench_batch_norm.py --benchmark-only
      python benchmarks/bench_batch_norm.py [--rounds 15]      (prints a table)
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import print_forward_backward_table  # noqa: E402

from fastnas import backend  # noqa: E402
from fastnas.ops.batch_norm import _KernelLeanBatchNorm, _NativeLeanBatchNorm  # noqa: E402

# name -> ([B, C, H, W] of the convolution's output, parts)
SHAPES = {
    "3 parts [64,48,32,32]": ((64, 48, 32, 32), 3),
    "1 part [64,16,32,32]": ((64, 16, 32, 32), 1),
    "3 parts [64,96,16,16]": ((64, 96, 16, 16), 3),
    "3 parts [64,192,8,8]": ((64, 192, 8, 8), 3),
}


def native(x, parts, running_mean, running_var):
    return _NativeLeanBatchNorm.apply(x, parts, running_mean, running_var, 0.1, 1e-5, None)[:parts]


def fastnas_kernels(x, parts, running_mean, running_var):
    return _KernelLeanBatchNorm.apply(x, parts, running_mean, running_var, 0.1, 1e-5, None)[:parts]


PROVIDERS = {"native": native, "fastnas": fastnas_kernels}


def make_case(name: str, seed: int = 0):
    shape, parts = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    block = (shape[0], shape[1] // parts, *shape[2:])
    grads = [torch.randn(block, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(parts)]
    return x, parts, grads, torch.zeros(shape[1]), torch.ones(shape[1])


def forward(fn, x, parts, grads, running_mean, running_var):
    with torch.no_grad():
        return fn(x, parts, running_mean, running_var)


def forward_backward(fn, x, parts, grads, running_mean, running_var):
    return torch.autograd.grad(fn(x, parts, running_mean, running_var), x, grads)


@pytest.mark.skipif(not backend.load_extension(), reason="the compiled extension is not built")
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_batch_norm_forward_backward(benchmark, name, provider):
    benchmark.group = f"lean BatchNorm fwd+bwd: {name}"
    benchmark.pedantic(forward_backward, (PROVIDERS[provider], *make_case(name)), rounds=20, warmup_rounds=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not backend.load_extension():
        raise SystemExit("the compiled extension is not built")
    cases = {name: make_case(name) for name in SHAPES}
    print_forward_backward_table(
        "lean BatchNorm, channels_last float32", PROVIDERS, cases, forward, forward_backward, args.rounds
    )


if __name__ == "__main__":
    main()
