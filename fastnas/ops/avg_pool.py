"""``fastnas.ops.avg_pool.avg_pool2d``: 2-D average pooling whose CPU forward and backward run fast in
channels_last.

On CPU float32 and float64 tensors laid out channels_last (the supernets' CPU layout), the forward
and the backward are the compiled kernels ``fastnas::avg_pool2d_nhwc`` and
``fastnas::avg_pool2d_nhwc_backward`` (``csrc/cpu/avg_pool_cpu.cpp``), which sum each window in
registers, vectorised along the channels, where ATen's channels_last kernels accumulate through
memory (their times against these: ``benchmarks/RESULTS.md``). They run where :mod:`fastnas.backend`
chose them (``avg_pool``: ``cpu``); elsewhere (other layouts, CUDA, 16-bit dtypes, no compiled
extension, torch.func transforms, forward-mode AD) it is ``F.avg_pool2d`` itself.

The forward sums every window in PyTorch's order (same results). The backward is a gather, each input
pixel summing its windows in a fixed order (deterministic, independent of the thread count), equal to
PyTorch's up to rounding. Pooling is linear, so the backward of the backward is the forward: double
backward (``create_graph=True``) runs the kernels too.

In eager mode the autograd is C++ (``fastnas::_avg_pool2d_autograd``, ``csrc/avg_pool_autograd.cpp``:
a Python autograd.Function's host time is more than a small pooling's kernels); ``torch.compile``
traces the autograd.Functions below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnas import backend
from fastnas.ops._nhwc import KERNEL_DTYPES, pair, plain_autograd

Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int], bool]  # kernel, stride, padding, count_pad


def uses_kernels(x: Tensor) -> bool:
    """Whether :func:`avg_pool2d` pools ``x`` (and computes its gradient) with the compiled CPU kernels:
    :mod:`fastnas.backend` chose them (``avg_pool``: ``cpu``) and ``x`` is what they take."""
    return (
        x.device.type == "cpu"
        and x.dtype in KERNEL_DTYPES
        and backend.get_kernels("avg_pool", "cpu") == "cpu"
        and x.dim() == 4
        and plain_autograd()  # first: under vmap, is_contiguous(memory_format=...) raises
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _input_grad(grad: Tensor, input_size: list[int], geometry: Geometry) -> Tensor:
    grad = grad.contiguous(memory_format=torch.channels_last)
    return torch.ops.fastnas.avg_pool2d_nhwc_backward(grad, input_size, *geometry)


class _AvgPool2d(torch.autograd.Function):
    """The pooling by the compiled kernels; nothing saved for the backward but the input's shape."""

    @staticmethod
    def forward(ctx, x: Tensor, geometry: Geometry) -> Tensor:
        ctx.input_size, ctx.geometry = list(x.shape), geometry
        return torch.ops.fastnas.avg_pool2d_nhwc(x, *geometry)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the input gradient as a differentiable function
            return _AvgPool2dInputGrad.apply(grad, ctx.input_size, ctx.geometry), None
        return _input_grad(grad, ctx.input_size, ctx.geometry), None


class _AvgPool2dInputGrad(torch.autograd.Function):
    """The input gradient as a function of the output gradient: the transpose of the pooling, whose
    own gradient is the pooling."""

    @staticmethod
    def forward(ctx, grad: Tensor, input_size: list[int], geometry: Geometry) -> Tensor:
        ctx.geometry = geometry
        return _input_grad(grad, input_size, geometry)

    @staticmethod
    def backward(ctx, grad_grad: Tensor):
        grad_grad = grad_grad.contiguous(memory_format=torch.channels_last)
        return _AvgPool2d.apply(grad_grad, ctx.geometry), None, None


def avg_pool2d(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    count_include_pad: bool = True,
) -> Tensor:
    """``F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode=False, count_include_pad)``: ``x``
    ``[B, C, H, W]`` (or whatever ``F.avg_pool2d`` takes, where it is that function), ``stride``
    ``None`` meaning ``kernel_size``. Same result and gradient, differentiable in ``x`` to any order;
    on CPU float32 and float64 channels_last tensors both run the compiled kernels (see the module
    docstring), whose output is channels_last too."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else pair(stride, "stride")
    padding = pair(padding, "padding")
    if not uses_kernels(x):
        return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=count_include_pad)
    if not torch.compiler.is_compiling():  # the same autograd in C++ (csrc/avg_pool_autograd.cpp)
        return torch.ops.fastnas._avg_pool2d_autograd(x, kernel_size, stride, padding, bool(count_include_pad))
    return _AvgPool2d.apply(x, (kernel_size, stride, padding, bool(count_include_pad)))
