"""Building blocks shared by the slim supernets of :mod:`fastnas.spaces.darts` and :mod:`fastnas.spaces.nb201`.

Two kinds of things live here:

* candidate-op modules whose parameters and state_dict keys are those of the reference code
  (``Zero``, ``Identity``) — the space-specific ones (``SepConv``, ``ReLUConvBN``, ...) live in
  their space's module because DARTS and NAS-Bench-201 name them differently;
* functional pieces the slim forward uses instead of calling those modules one by one:

  - :func:`batch_norm` — BatchNorm without affine parameters that keeps only its *output* for the
    backward (the output is kept alive anyway by the mixed sum, which needs it for dL/dw), so the
    pre-normalisation tensor (the conv output) is freed as soon as the forward moves on;
  - :func:`batch_norm_split` — the same over the channels of several candidate ops computed by one
    convolution, returning one dense tensor per op;
  - :func:`avg_pool_3x3` — ``avg_pool2d(3, 1, 1, count_include_pad=False)`` as a box filter
    (a depthwise convolution with a ones kernel) times the reciprocal window sizes; on CPU the
    native NCHW average-pool backward is about five times slower than this;
  - :func:`run_tail` — applies a reference ``nn.Sequential`` from a given index on, with every
    ``affine=False`` BatchNorm replaced by :func:`batch_norm`.

All of them compute the same mathematics as the modules they stand for, including the running
statistics updates of BatchNorm (momentum, cumulative average when ``momentum is None``,
``num_batches_tracked``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Zero(nn.Module):
    """The ``none`` candidate: a zero tensor of the output's shape (``x[:, :, ::stride, ::stride] * 0``).

    The slim supernets never call it; it exists so that module lists and state_dicts look like the
    reference code's.
    """

    def __init__(self, stride: int, C_out: int | None = None) -> None:
        super().__init__()
        self.stride = stride
        self.C_out = C_out

    def forward(self, x: Tensor) -> Tensor:
        y = x[:, :, :: self.stride, :: self.stride]
        if self.C_out is not None and self.C_out != x.shape[1]:
            shape = list(y.shape)
            shape[1] = self.C_out
            return x.new_zeros(shape)
        return y.mul(0.0)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class Identity(nn.Module):
    """``skip_connect`` at stride 1: returns its input itself (no copy)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


@functools.lru_cache(maxsize=4096)
def index_tensor(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A cached int64 tensor of ``values`` on ``device``: after its first use no host-to-device copy
    (on CUDA a blocking one, which would stall the CPU at every node) is made. Never modify it."""
    return torch.tensor(values, dtype=torch.long, device=device)


def preferred_memory_format(x: Tensor) -> torch.memory_format:
    """The layout the supernets run ``x`` in: channels_last for float32/16-bit CPU tensors (oneDNN's
    convolutions, pooling and the box filter are markedly faster in NHWC there), the usual contiguous
    NCHW otherwise (float64 has no oneDNN path: NHWC would be slower)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------- BatchNorm that keeps its output


def lean_bn_eligible(bn: nn.BatchNorm2d) -> bool:
    """True when ``bn`` normalises with batch statistics and has no affine parameters: then its
    output alone is enough for the backward (see :func:`batch_norm`)."""
    return not bn.affine and (bn.training or not bn.track_running_stats)


def _bn_backward_from_output(grad: Tensor, y: Tensor, invstd: Tensor, eps: float) -> Tensor:
    """dL/dx of ``y = (x - mean) * invstd`` with batch statistics, from the output ``y``.

    ``dx = invstd * (g - mean(g) - y * mean(g * y))`` per channel: the native training-mode
    BatchNorm backward given ``input = y``, ``save_mean = 0``, ``save_invstd = 1`` and the real
    ``invstd`` as its affine weight — one fused kernel, no extra tensor kept.
    """
    if grad.stride() != y.stride():  # the native kernel is fast only when both share one layout
        grad = torch.empty_like(y).copy_(grad)
    zeros = torch.zeros_like(invstd)
    ones = torch.ones_like(invstd)
    dx, _, _ = torch.ops.aten.native_batch_norm_backward(
        grad, y, invstd, None, None, zeros, ones, True, eps, [True, False, False]
    )
    return dx


class _LeanBatchNorm(torch.autograd.Function):
    """``y = (x - mean_c) * invstd_c`` with batch statistics; saves ``y`` and ``invstd`` only. Running
    statistics, when given, are updated in place by the native kernel (as ``F.batch_norm`` does)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, running_mean: Tensor | None, running_var: Tensor | None, factor: float):
        y, mean, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, factor, eps)
        ctx.eps = eps
        ctx.save_for_backward(y, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, grad: Tensor, _gm, _gi):
        y, invstd = ctx.saved_tensors
        return _bn_backward_from_output(grad, y, invstd, ctx.eps), None, None, None, None


def _claim_running_stats(bn: nn.BatchNorm2d | None) -> tuple[Tensor | None, Tensor | None, float]:
    """``(running_mean, running_var, factor)`` for the native kernel to update in place as ``bn``'s own
    forward would (``num_batches_tracked`` is counted here); ``(None, None, 0.0)`` when there is nothing
    to update."""
    if bn is None or not (bn.training and bn.track_running_stats) or bn.running_mean is None:
        return None, None, 0.0
    factor = bn.momentum if bn.momentum is not None else 0.0
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return bn.running_mean, bn.running_var, factor


class _LeanBatchNormSplit(torch.autograd.Function):
    """:class:`_LeanBatchNorm` over ``x`` whose channels are ``parts`` consecutive blocks; returns
    one dense tensor per block (so that each can enter a mixed sum without a copy)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, parts: int):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # biased variance, one pass
        invstd = torch.rsqrt(var + eps)
        shift, scale = (-mean * invstd).to(x.dtype), invstd.to(x.dtype)  # 16-bit inputs: stats in float32
        ys = [
            torch.addcmul(s[None, :, None, None], xc, i[None, :, None, None])
            for xc, s, i in zip(x.chunk(parts, dim=1), shift.chunk(parts), scale.chunk(parts))
        ]
        ctx.eps = eps
        ctx.save_for_backward(invstd, *ys)
        ctx.mark_non_differentiable(mean, invstd)
        return (*ys, mean, invstd)

    @staticmethod
    def backward(ctx, *grads):
        invstd, *ys = ctx.saved_tensors
        parts = len(ys)
        dxs = []
        for g, y, i in zip(grads[:parts], ys, invstd.chunk(parts)):
            dxs.append(_bn_backward_from_output(torch.zeros_like(y) if g is None else g, y, i, ctx.eps))
        return torch.cat(dxs, dim=1), None, None


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, invstd: Tensor, count: int) -> None:
    """Update ``bn``'s running statistics as its own training-mode forward would, from the batch
    ``mean`` and ``invstd = 1/sqrt(var + eps)`` of ``count`` values per channel."""
    running_mean, running_var, factor = _claim_running_stats(bn)
    if running_mean is None:
        return
    var = invstd.to(torch.float64).pow(-2).sub_(bn.eps)
    unbiased = var * (count / max(count - 1, 1))
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def batch_norm_stats(x: Tensor, bn: nn.BatchNorm2d | float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, invstd)`` of an ``affine=False`` batch-statistics BatchNorm of ``x`` ``[B, C, H, W]``;
    only ``y`` is differentiable and only ``y`` (with ``invstd``) is kept for the backward. ``bn``: the
    module, whose running statistics are updated, or just an ``eps``."""
    if isinstance(bn, nn.BatchNorm2d):
        return _LeanBatchNorm.apply(x, bn.eps, *_claim_running_stats(bn))
    return _LeanBatchNorm.apply(x, float(bn), None, None, 0.0)


def batch_norm(x: Tensor, bn: nn.BatchNorm2d | Sequence[nn.BatchNorm2d]) -> Tensor:
    """``bn(x)`` for a ``[B, C, H, W]`` tensor, keeping only the output for the backward.

    ``bn`` may be a list of BatchNorm modules that all see the same input (the same parameterless
    op on the same tensor on several edges): then the output is computed once and every module's
    running statistics are updated. Modules that use running statistics or have affine parameters
    are simply called (each one), as the reference does.
    """
    bns = list(bn) if isinstance(bn, (list, tuple)) else [bn]
    if not all(lean_bn_eligible(b) for b in bns):
        if len(bns) == 1:
            return bns[0](x)
        raise ValueError("bn: a shared BatchNorm needs batch statistics and affine=False on every module")
    y, mean, invstd = batch_norm_stats(x, bns[0])
    count = x.numel() // max(x.shape[1], 1)
    for b in bns[1:]:
        update_running_stats(b, mean, invstd, count)
    return y


def batch_norm_split(x: Tensor, bns: Sequence[nn.BatchNorm2d]) -> list[Tensor]:
    """``[bns[e](x[:, e*C:(e+1)*C]) for e]`` as dense tensors, keeping only those outputs alive.

    ``x`` is ``[B, len(bns) * C, H, W]``, e.g. the output of one convolution whose weight is the
    concatenation of ``len(bns)`` candidate ops' weights. Every module must be
    :func:`lean_bn_eligible` and share one ``eps``.
    """
    if len(bns) == 1:
        return [batch_norm(x, bns[0])]
    if not all(lean_bn_eligible(b) and b.eps == bns[0].eps for b in bns):
        raise ValueError("bns: batch_norm_split needs batch statistics, affine=False and one eps on every module")
    *ys, mean, invstd = _LeanBatchNormSplit.apply(x, bns[0].eps, len(bns))
    count = x.numel() // x.shape[1]
    for b, m, i in zip(bns, mean.chunk(len(bns)), invstd.chunk(len(bns))):
        update_running_stats(b, m, i, count)
    return list(ys)


# --------------------------------------------------------------------------- average pooling


@functools.lru_cache(maxsize=64)
def _inverse_window_sizes(H: int, W: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``1 / (number of in-image taps of the 3x3 window)`` at every output position, ``[H, W]``."""
    rows = torch.full((H,), 3.0, dtype=torch.float64)
    cols = torch.full((W,), 3.0, dtype=torch.float64)
    rows[0] -= 1
    rows[-1] -= 1
    cols[0] -= 1
    cols[-1] -= 1
    if H == 1:
        rows[0] = 1
    if W == 1:
        cols[0] = 1
    return (1.0 / torch.outer(rows, cols)).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _ones_kernel(C: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.ones(C, 1, 3, 3, dtype=dtype, device=device)


def _box3x3(x: Tensor) -> Tensor:
    return F.conv2d(x, _ones_kernel(x.shape[1], x.dtype, x.device), padding=1, groups=x.shape[1])


class _AvgPool3x3(torch.autograd.Function):
    """3x3, stride 1, padding 1, ``count_include_pad=False`` average pooling; keeps nothing alive
    (its adjoint is the same box filter applied to ``grad / window_size``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        inv = _inverse_window_sizes(x.shape[2], x.shape[3], x.dtype, x.device)
        ctx.inv = inv
        return _box3x3(x).mul_(inv)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _box3x3(grad * ctx.inv)


def avg_pool_3x3(x: Tensor, stride: int = 1) -> Tensor:
    """``F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)`` of a ``[B, C, H, W]`` tensor.

    At stride 1 on CPU it runs as a depthwise box filter (much faster forward and backward than the
    native NCHW kernel there); elsewhere it is the native average pooling.
    """
    if stride == 1 and x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64):
        return _AvgPool3x3.apply(x)
    return F.avg_pool2d(x, 3, stride=stride, padding=1, count_include_pad=False)


# --------------------------------------------------------------------------- reference Sequentials, slimmer


def run_tail(seq: nn.Sequential, x: Tensor, start: int = 0) -> Tensor:
    """``seq[start:](x)`` with every BatchNorm run through :func:`batch_norm` (output-only saving).

    Used to apply the reference modules' ``op`` Sequentials after a ReLU shared by several ops.
    """
    for m in list(seq)[start:]:
        if isinstance(m, nn.BatchNorm2d):
            x = batch_norm(x, m)
        elif isinstance(m, nn.ReLU):
            x = torch.relu(x)
        else:
            x = m(x)
    return x
