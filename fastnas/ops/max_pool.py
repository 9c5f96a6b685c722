"""``fastnas.ops.max_pool.max_pool2d``: 2-D max pooling that ``torch.compile`` leaves to ATen on CPU.

Eager, it is ``F.max_pool2d``. Traced by dynamo for a CPU tensor, it is the op ``fastnas::max_pool2d``
(its gradient ``fastnas::max_pool2d_backward``), which inductor calls as it calls an extern kernel:
ATen's own pooling, so the compiled results and gradients are eager's to the bit. Inductor would
otherwise generate the pooling and its backward as C++ (about 400 lines for one 3x3 pool's forward),
compiled again for every cell shape, which lengthens a supernet's first compiled step and does not
speed up the later ones (``benchmarks/RESULTS.md``, ``benchmarks/bench_max_pool.py``).

That is :mod:`fastnas.backend`'s choice on CPU (``max_pool``: ``aten``); elsewhere (CUDA, where
inductor's Triton pooling fuses with its neighbours; forward-mode AD; ``max_pool``: ``torch``) it is
``F.max_pool2d`` under ``torch.compile`` too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnas import backend
from fastnas.ops._nhwc import pair, plain_autograd


def _aten_pool(x, kernel_size, stride, padding) -> tuple[Tensor, Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding)


@torch.library.custom_op("fastnas::max_pool2d", mutates_args=())
def _max_pool2d(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> tuple[Tensor, Tensor]:
    """ATen's max pooling: the output, and the flat index of each window's maximum in its plane."""
    return _aten_pool(x, kernel_size, stride, padding)


_max_pool2d.register_fake(_aten_pool)


def _aten_backward(grad, x, indices, kernel_size, stride, padding) -> Tensor:
    dilation, ceil_mode = [1, 1], False
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad, x, kernel_size, stride, padding, dilation, ceil_mode, indices
    )


@torch.library.custom_op("fastnas::max_pool2d_backward", mutates_args=())
def _max_pool2d_backward(
    grad: Tensor, x: Tensor, indices: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]
) -> Tensor:
    """The input gradient: each output's gradient added at its maximum (ATen's kernel)."""
    return _aten_backward(grad, x, indices, kernel_size, stride, padding)


_max_pool2d_backward.register_fake(_aten_backward)


def _save_input_and_indices(ctx, inputs, output) -> None:
    x, kernel_size, stride, padding = inputs
    ctx.save_for_backward(x, output[1])
    ctx.geometry = (kernel_size, stride, padding)


def _pool_backward(ctx, grad: Tensor, _indices_grad):
    x, indices = ctx.saved_tensors
    return _max_pool2d_backward(grad, x, indices, *ctx.geometry), None, None, None


_max_pool2d.register_autograd(_pool_backward, setup_context=_save_input_and_indices)


def _save_indices(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2])


def _pool_backward_backward(ctx, grad_grad: Tensor):
    # the input gradient is linear in the output gradient: its own gradient gathers at the maxima
    (indices,) = ctx.saved_tensors
    gathered = grad_grad.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)
    return gathered, None, None, None, None, None


_max_pool2d_backward.register_autograd(_pool_backward_backward, setup_context=_save_indices)


def max_pool2d(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (``stride`` ``None`` meaning ``kernel_size``;
    no dilation, floor mode): the same result and gradient, differentiable to any order. Under
    ``torch.compile`` on CPU, ATen's kernels rather than inductor's generated pooling (see the module
    docstring)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else pair(stride, "stride")
    padding = pair(padding, "padding")
    if (
        torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and backend.get_kernels("max_pool", "cpu") == "aten"
        and plain_autograd()
    ):
        return _max_pool2d(x, list(kernel_size), list(stride), list(padding))[0]
    return F.max_pool2d(x, kernel_size, stride, padding)
