"""``fastnas.depthwise_conv2d``: a depthwise convolution whose CPU backward runs fast for every kernel.

The forward is PyTorch's own (``F.conv2d`` with ``groups = channels``). The backward, on CPU float32
and float64 tensors, is computed by the compiled kernels ``fastnas::depthwise_conv2d_input_grad`` and
``fastnas::depthwise_conv2d_weight_grad`` (``csrc/cpu/depthwise_conv_cpu.cpp``) in channels_last, both
called by one op, ``fastnas::depthwise_conv2d_backward`` (one dispatch per backward, as PyTorch's
``convolution_backward``): oneDNN, which PyTorch uses there, has fast depthwise backward kernels
only for some shapes, and its weight gradient of a 5x5 or dilated kernel is an order of magnitude
slower than the forward (``benchmarks/RESULTS.md``), when DARTS's separable and dilated convolutions
are made of nothing else. The kernels run where :mod:`fastnas.backend` chose them
(``depthwise_conv``: ``cpu``); elsewhere (CUDA, 16-bit dtypes, no compiled extension, torch.func
transforms, forward-mode AD, double backward) it is ``F.conv2d`` itself.

The kernels' reductions run in a fixed order (deterministic, independent of the thread count) but
not in oneDNN's: float32 gradients differ from PyTorch's by rounding (measured in
``benchmarks/bench_depthwise_conv.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnas import backend
from fastnas.ops._nhwc import KERNEL_DTYPES, pair, plain_autograd


def uses_kernels(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`depthwise_conv2d` computes the backward of ``x``, ``weight`` with the compiled CPU
    kernels: :mod:`fastnas.backend` chose them (``depthwise_conv``: ``cpu``) and the tensors are what
    they take."""
    return (
        x.device.type == "cpu"
        and x.dtype in KERNEL_DTYPES
        and weight.dtype == x.dtype
        and backend.get_kernels("depthwise_conv", "cpu") == "cpu"
        and plain_autograd()
    )


class _DepthwiseConv2d(torch.autograd.Function):
    """Native forward; backward by the compiled kernels on channels_last copies of the saved tensors
    (none made when they are channels_last already, the supernets' CPU layout)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, as autograd records them
            groups = x.shape[1]
            dx = torch.nn.grad.conv2d_input(x.shape, weight, grad, stride, padding, dilation, groups)
            dw = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding, dilation, groups)
            return (dx if needs_input else None), (dw if needs_weight else None), None, None, None
        dx, dw = torch.ops.fastnas.depthwise_conv2d_backward(
            grad, x, weight, stride, padding, dilation, [needs_input, needs_weight]
        )
        return (dx if needs_input else None), (dw if needs_weight else None), None, None, None


def depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups=C)``: ``x`` ``[B, C, H, W]``,
    ``weight`` ``[C, 1, KH, KW]``. Same result and gradients (differentiable in both); on CPU float32
    and float64 the backward runs the compiled kernels (see the module docstring)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"weight must be [C, 1, KH, KW] with C = {x.shape[1]} (the input's channels), "
            f"got {tuple(getattr(weight, 'shape', ()))}"
        )
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if not uses_kernels(x, weight):
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])
    return _DepthwiseConv2d.apply(x, weight, stride, padding, dilation)
