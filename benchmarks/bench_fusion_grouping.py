"""Which grouping of the DARTS depthwise convolutions wins: one convolution per op kind, or kinds
sharing zero-padded superkernels.

The first depthwise stage of the four conv ops (``sep_conv_3x3``, ``sep_conv_5x5``, ``dil_conv_3x3``,
``dil_conv_5x5``) on the ``n`` edges leaving one state, forward and backward to the input and to every
op's own weights, three ways:

* ``per-kind`` (what :mod:`fastnas.spaces.darts` runs): the input repeated ``n`` times, one depthwise
  convolution per kind over the kind's ``n`` concatenated weights: 4 convolutions;
* ``super-5x5``: 3x3 kernels as 5x5 kernels with a zero border and the dilation-2 3x3 kernel as a 5x5
  kernel with zero holes, so that three kinds share one 5x5 convolution over the input repeated ``3n``
  times; ``dil_conv_5x5`` (9x9 receptive field) on its own: 2 convolutions, plus the packing;
* ``super-9x9``: every kind in one 9x9 convolution (``dil_conv_5x5`` as 9x9 with holes): 1 convolution
  with 81 taps per channel instead of 9 to 25, plus the packing.

Reported: median milliseconds (interleaved), kernels (non-view operators) and the largest difference of
the outputs from ``per-kind`` (float32).

Run:  python benchmarks/bench_fusion_grouping.py [--batch 16] [--channels 16] [--size 32] [--edges 4]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_count import count_kernels  # noqa: E402
from timing import interleaved_medians  # noqa: E402

from fastnas.spaces.ops import repeat_channels  # noqa: E402

KINDS = {"sep_conv_3x3": (3, 1), "sep_conv_5x5": (5, 1), "dil_conv_3x3": (3, 2), "dil_conv_5x5": (5, 2)}


def embed(weight: torch.Tensor, dilation: int, size: int) -> torch.Tensor:
    """A ``[C, 1, k, k]`` kernel of the given dilation as an undilated ``size`` x ``size`` kernel
    (zero border and holes): the same convolution with padding ``size // 2``."""
    k = weight.shape[-1]
    span = dilation * (k - 1) + 1
    start = (size - span) // 2
    out = weight.new_zeros(weight.shape[0], 1, size, size)
    out[:, :, start : start + span : dilation, start : start + span : dilation] = weight
    return out


def per_kind(r: torch.Tensor, weights: dict[str, list[torch.Tensor]], n: int) -> list[torch.Tensor]:
    rep = repeat_channels(r, n)
    outs = []
    for kind, (k, d) in KINDS.items():
        outs.append(F.conv2d(rep, torch.cat(weights[kind]), None, 1, d * (k - 1) // 2, d, groups=rep.shape[1]))
    return outs


def super_5x5(r: torch.Tensor, weights: dict[str, list[torch.Tensor]], n: int) -> list[torch.Tensor]:
    shared = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3"]
    packed = torch.cat([embed(torch.cat(weights[kind]), KINDS[kind][1], 5) for kind in shared])
    rep = repeat_channels(r, 3 * n)
    y = F.conv2d(rep, packed, None, 1, 2, 1, groups=rep.shape[1])
    rep_n = repeat_channels(r, n)
    last = F.conv2d(rep_n, torch.cat(weights["dil_conv_5x5"]), None, 1, 4, 2, groups=rep_n.shape[1])
    return [*y.chunk(3, dim=1), last]


def super_9x9(r: torch.Tensor, weights: dict[str, list[torch.Tensor]], n: int) -> list[torch.Tensor]:
    packed = torch.cat([embed(torch.cat(weights[kind]), d, 9) for kind, (_, d) in KINDS.items()])
    rep = repeat_channels(r, 4 * n)
    return list(F.conv2d(rep, packed, None, 1, 4, 1, groups=rep.shape[1]).chunk(4, dim=1))


GROUPINGS = {"per-kind": per_kind, "super-5x5": super_5x5, "super-9x9": super_9x9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    C, n = args.channels, args.edges
    x = torch.randn(args.batch, C, args.size, args.size).contiguous(memory_format=torch.channels_last)
    r = torch.relu(x).requires_grad_()
    weights = {kind: [torch.randn(C, 1, k, k, requires_grad=True) for _ in range(n)] for kind, (k, _) in KINDS.items()}
    params = [r] + [w for ws in weights.values() for w in ws]

    def step(fn):
        outs = fn(r, weights, n)
        grads = torch.autograd.grad(outs, params, [torch.ones_like(o) for o in outs])
        return outs, grads

    reference, _ = step(per_kind)
    rows = {}
    for name, fn in GROUPINGS.items():
        outs, _ = step(fn)
        diff = max((a - b).abs().max().item() for a, b in zip(outs, reference))
        rows[name] = (count_kernels(lambda fn=fn: step(fn)).total, diff)
    medians = interleaved_medians({name: lambda fn=fn: step(fn) for name, fn in GROUPINGS.items()}, "cpu", args.rounds)
    print(f"first depthwise stage of the 4 conv ops on {n} edges, [{args.batch}, {C}, {args.size}, {args.size}], "
          f"channels_last, {torch.get_num_threads()} threads")  # fmt: skip
    print("| grouping | ms (fwd+bwd) | kernels | max diff from per-kind |")
    print("|---|---|---|---|")
    for name, (kernels, diff) in rows.items():
        print(f"| {name} | {medians[name] * 1e3:.2f} | {kernels} | {diff:.1e} |")


if __name__ == "__main__":
    main()
