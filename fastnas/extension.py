"""Loading the compiled extension ``fastnas._C`` and giving its ops their fake kernels.

Importing ``fastnas._C`` registers the native ops (their schemas and their CPU and CUDA kernels:
``csrc/``); :func:`load` then registers, once, the fake kernels that give ``torch.compile`` the
shapes, dtypes and layouts of their results without running them. A missing or broken extension is
not an error here: :func:`load` returns False and :func:`missing_reason` says why.

This module imports nothing of fastnas: every layer above it (:mod:`fastnas.backend`, the ops)
asks it whether the compiled kernels are there.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor


@functools.cache
def _load() -> str | None:
    """Import the extension and register its fakes; None on success, else why it failed."""
    try:
        importlib.import_module("fastnas._C")
    except ImportError as exc:  # not built, or built against another torch
        return f"the compiled extension fastnas._C could not be loaded ({exc})"
    _register_fakes()
    return None


def load() -> bool:
    """Load ``fastnas._C`` (its kernels register with ``torch.library``); False if it is missing."""
    return _load() is None


def missing_reason() -> str | None:
    """Why ``fastnas._C`` could not be loaded, or None when it is loaded."""
    return _load()


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    return load() and torch.ops.fastnas._mixed_sum_forward.default.has_kernel_for_dispatch_key(
        torch._C.DispatchKey.CUDA
    )


# --------------------------------------------------------------------------- fake kernels


def _register_fakes() -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"fastnas::{name}")(fake)


def _mixed_sum_forward(outputs: list[Tensor], weights: Tensor) -> Tensor:
    return torch.empty_like(outputs[0])


def _mixed_sum_backward(grad: Tensor, outputs: list[Tensor], weights: Tensor, compute_outputs_grad: bool):
    outputs_grad = [torch.empty_like(grad) for _ in range(weights.shape[0])] if compute_outputs_grad else []
    return outputs_grad, weights.new_empty(weights.shape if len(outputs) > 0 else (0,))


def _depthwise_weight_grad(grad, input, kernel_size, stride, padding, dilation):
    return grad.new_empty((input.shape[1], 1, *kernel_size))


def _depthwise_input_grad(grad, weight, input_size, stride, padding, dilation):
    return grad.new_empty(input_size).contiguous(memory_format=torch.channels_last)


def _depthwise_backward(grad, input, weight, stride, padding, dilation, output_mask):
    nhwc = input.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if nhwc else torch.contiguous_format
    dx = grad.new_empty(input.shape).contiguous(memory_format=layout) if output_mask[0] else grad.new_empty(0)
    dw = grad.new_empty(weight.shape) if output_mask[1] else grad.new_empty(0)
    return dx, dw


def _batch_norm_blocks(input: Tensor, parts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``fastnas::batch_norm_parts``'s results: CPU blocks channels_last, the Triton kernels' NCHW
    blocks with float32 statistics for 16-bit inputs on CUDA. The plane size is specialised under
    dynamic shapes: inductor cannot order the symbolic strides of the blocks (views of one buffer),
    which fails to compile (pytorch/pytorch#185871)."""
    B, C, H, W = input.shape
    H, W = int(H), int(W)  # a guard on a symbolic size: the graph is traced for this plane size
    if input.device.type == "cuda":
        stats = torch.float64 if input.dtype == torch.float64 else torch.float32
        out = input.new_empty((parts, B, C // parts, H, W))
        return out, input.new_empty((C,), dtype=stats), input.new_empty((C,), dtype=stats)
    out = input.new_empty((parts, B, H, W, C // parts)).permute(0, 1, 4, 2, 3)
    return out, input.new_empty((C,)), input.new_empty((C,))


def _batch_norm_parts(input, parts, running_mean, running_var, momentum, eps):
    return _batch_norm_blocks(input, parts)


def _lean_batch_norm_autograd(input, parts, running_mean, running_var, momentum, eps):
    out, mean, invstd = _batch_norm_blocks(input, parts)
    return [*out.unbind(0), mean, invstd]


def _batch_norm_parts_backward(grads, outputs, invstd):
    B, c, H, W = outputs[0].shape
    dx = outputs[0].new_empty((B, c * len(outputs), H, W))
    return dx if outputs[0].device.type == "cuda" else dx.contiguous(memory_format=torch.channels_last)


def _avg_pooled(input, kernel_size, stride, padding, count_include_pad):
    B, C, H, W = input.shape
    Ho = (H + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    Wo = (W + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    return input.new_empty((B, C, Ho, Wo)).contiguous(memory_format=torch.channels_last)


def _avg_pool_backward(grad, input_size, kernel_size, stride, padding, count_include_pad):
    return grad.new_empty(input_size).contiguous(memory_format=torch.channels_last)


_FAKES = {
    "_mixed_sum_forward": _mixed_sum_forward,
    "_mixed_sum_backward": _mixed_sum_backward,
    "depthwise_conv2d_weight_grad": _depthwise_weight_grad,
    "depthwise_conv2d_input_grad": _depthwise_input_grad,
    "depthwise_conv2d_backward": _depthwise_backward,
    "batch_norm_parts": _batch_norm_parts,
    "_lean_batch_norm_autograd": _lean_batch_norm_autograd,
    "batch_norm_parts_backward": _batch_norm_parts_backward,
    "avg_pool2d_nhwc": _avg_pooled,
    "_avg_pool2d_autograd": _avg_pooled,
    "avg_pool2d_nhwc_backward": _avg_pool_backward,
}
"""The fake kernel of every native op that ``torch.compile`` can meet (the ops' schemas: csrc/)."""
