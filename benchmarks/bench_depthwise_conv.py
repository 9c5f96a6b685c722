"""``fastnas.depthwise_conv2d`` against PyTorch's depthwise convolution on CPU: forward + backward time
and how far the gradients are from float64.

The shapes are the depthwise stages of DARTS's ``sep_conv_3x3``, ``sep_conv_5x5``, ``dil_conv_3x3`` and
``dil_conv_5x5`` in the supernet at C=16 (stride 1 at 32x32 with the channels of 4 fused edges, stride 2
as in a reduction cell), channels_last, float32. Both providers run the same forward (``F.conv2d``); the
backward is oneDNN's for ``pytorch`` and the compiled kernels of ``csrc/cpu/depthwise_conv_cpu.cpp``
for ``fastnas``.

Reported per shape: median milliseconds of forward + backward to the input and the weight (interleaved
rounds), their ratio, and the largest relative difference of each provider's float32 gradients from
the float64 gradients (max |g - g64| / max |g64|).

Run:  pytest benchmarks/bench_depthwise_conv.py --benchmark-only
      python benchmarks/bench_depthwise_conv.py [--batch 16] [--rounds 7]      (prints a table)
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_medians  # noqa: E402

from fastnas.ops.depthwise_conv import depthwise_conv2d  # noqa: E402

# name -> (channels, size, kernel, stride, dilation); padding keeps the size (DARTS's convention)
SHAPES = {
    "sep 3x3": (64, 32, 3, 1, 1),
    "sep 5x5": (64, 32, 5, 1, 1),
    "dil 3x3": (64, 32, 3, 1, 2),
    "dil 5x5": (64, 32, 5, 1, 2),
    "sep 5x5 stride 2": (32, 32, 5, 2, 1),
    "dil 5x5 stride 2": (32, 32, 5, 2, 2),
}


def pytorch_conv(x, w, stride, padding, dilation):
    return F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])


PROVIDERS = {"pytorch": pytorch_conv, "fastnas": depthwise_conv2d}


def make_case(name: str, batch: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    C, size, k, stride, dilation = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, size, size, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, generator=gen, dtype=dtype)
    geometry = (stride, dilation * (k - 1) // 2, dilation)
    out_size = (size - 1) // stride + 1
    g = torch.randn(batch, C, out_size, out_size, generator=gen, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    return x.requires_grad_(), w.requires_grad_(), g, geometry


def forward_backward(fn, x, w, g, geometry):
    y = fn(x, w, *geometry)
    return torch.autograd.grad(y, (x, w), g)


def relative_errors(name: str, batch: int) -> dict[str, tuple[float, float]]:
    """Each provider's (input grad, weight grad) error against float64, relative to the largest entry."""
    x, w, g, geometry = make_case(name, batch)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    dx64, dw64 = forward_backward(pytorch_conv, x64, w64, g.double(), geometry)
    errors = {}
    for provider, fn in PROVIDERS.items():
        dx, dw = forward_backward(fn, x, w, g, geometry)
        errors[provider] = tuple(
            ((a.double() - b).abs().max() / b.abs().max()).item() for a, b in ((dx, dx64), (dw, dw64))
        )
    return errors


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_depthwise_forward_backward(benchmark, name, provider):
    benchmark.group = f"depthwise conv fwd+bwd: {name}"
    x, w, g, geometry = make_case(name, batch=16)
    benchmark.extra_info["max_rel_error_vs_float64"] = relative_errors(name, 16)[provider]
    benchmark.pedantic(forward_backward, (PROVIDERS[provider], x, w, g, geometry), rounds=10, warmup_rounds=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"depthwise conv, batch {args.batch}, channels_last float32, {torch.get_num_threads()} threads")
    print("| shape [C, HxW, k, stride, dilation] | pytorch ms | fastnas ms | speed-up | rel. error pytorch (dx, dw) "
          "| rel. error fastnas (dx, dw) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, (C, size, k, stride, dilation) in SHAPES.items():
        case = make_case(name, args.batch)
        fns = {p: (lambda fn=fn, case=case: forward_backward(fn, *case)) for p, fn in PROVIDERS.items()}
        med = interleaved_medians(fns, "cpu", rounds=args.rounds)
        err = relative_errors(name, args.batch)
        fmt = lambda e: f"{e[0]:.1e}, {e[1]:.1e}"  # noqa: E731
        print(f"| {name} [{C}, {size}x{size}, {k}, {stride}, {dilation}] | {med['pytorch'] * 1e3:.2f} "
              f"| {med['fastnas'] * 1e3:.2f} | {med['pytorch'] / med['fastnas']:.1f}x | {fmt(err['pytorch'])} "
              f"| {fmt(err['fastnas'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
