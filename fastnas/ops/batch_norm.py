"""``batch_norm_parts``: the supernets' lean BatchNorm on CPU, one dense output per block of channels.

A supernet runs the same op of several edges leaving one node as one convolution, so one BatchNorm
(training mode, batch statistics, no affine parameters) normalises the concatenated channels of
``parts`` ops, and each op's block then goes to a different mixed sum. With PyTorch's kernel that
takes a copy to split the output into dense per-op tensors and, in the backward, two copies to
concatenate the per-op gradients and outputs again, and the native channels_last backward itself
runs at five times the cost of its forward on CPU. The compiled kernels
``fastnas::batch_norm_parts`` and ``fastnas::batch_norm_parts_backward`` (``csrc/cpu/batch_norm_cpu.cpp``)
write and read the blocks directly, and keep only the output for the backward:
``dx = invstd * (g - mean(g) - y * mean(g * y))`` per channel.

Used on CPU float32/float64 channels_last tensors when the extension is built, outside torch.func
transforms and forward-mode AD (:func:`uses_kernels`); the callers
(:func:`fastnas.spaces.ops.batch_norm`) use the native kernel otherwise. Statistics are summed in
fixed chunks in double (deterministic, independent of the thread count), not in PyTorch's order:
float32 results differ from PyTorch's by rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastnas.ops._nhwc import KERNEL_DTYPES, plain_autograd

_kernels_built = False
"""Set once the compiled extension has loaded (:func:`register_native_fakes`)."""


def _nhwc(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def uses_kernels(x: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None) -> bool:
    """Whether :func:`batch_norm_parts` of ``x`` (with these running statistics) runs the compiled kernels."""
    stats_ok = all(
        t is None or (t.dtype == x.dtype and t.device == x.device and t.dim() == 1 and t.is_contiguous())
        for t in (running_mean, running_var)
    )
    return (
        _kernels_built
        and plain_autograd()  # first: under vmap, is_contiguous(memory_format=...) raises
        and x.device.type == "cpu"
        and x.dtype in KERNEL_DTYPES
        and _nhwc(x)
        and stats_ok
    )


def _backward_formula(grads: Sequence[Tensor | None], ys: Sequence[Tensor], invstd: Tensor) -> Tensor:
    """``dx`` by differentiable tensor operations (for ``create_graph=True``): the same formula."""
    g = torch.cat([torch.zeros_like(y) if gr is None else gr for gr, y in zip(grads, ys)], dim=1)
    y = torch.cat(list(ys), dim=1)
    dims = (0, 2, 3)
    shape = (1, -1, 1, 1)
    mean_g = g.mean(dims).view(shape)
    mean_gy = (g * y).mean(dims).view(shape)
    return invstd.view(shape) * (g - mean_g - y * mean_gy)


class _BatchNormParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parts, running_mean, running_var, momentum, eps):
        out, mean, invstd = torch.ops.fastnas.batch_norm_parts(x, parts, running_mean, running_var, momentum, eps)
        ys = out.unbind(0)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(invstd, *ys)
        # invstd stays differentiable: the double backward's formula (below) depends on x through it
        ctx.mark_non_differentiable(mean)
        return (*ys, mean, invstd)

    @staticmethod
    def backward(ctx, *grads):
        invstd, *ys = ctx.saved_tensors
        grad_invstd = grads[-1]
        grads = list(grads[: len(ys)])
        if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, as autograd records them
            dx = _backward_formula(grads, ys, invstd)
        else:
            dx = torch.ops.fastnas.batch_norm_parts_backward(grads, ys, invstd)
        if grad_invstd is not None:  # d invstd_c / d x = -invstd_c^2 * y_c / N
            y = torch.cat(list(ys), dim=1)
            count = y.numel() // y.shape[1]
            dx = dx - (grad_invstd * invstd * invstd / count).view(1, -1, 1, 1) * y
        return dx, None, None, None, None, None


def batch_norm_parts(
    x: Tensor,
    parts: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """``(outputs, mean, invstd)``: training-mode BatchNorm of ``x`` ``[B, C, H, W]`` (channels_last,
    see :func:`uses_kernels`) without affine parameters, as ``parts`` dense channels_last tensors
    ``[B, C / parts, H, W]``, with the batch ``mean`` (not differentiable) and
    ``invstd = 1/sqrt(var + eps)`` ``[C]`` (differentiable, as the double backward needs).
    ``running_mean``/``running_var`` (both or neither) are updated in place with ``momentum`` as
    ``F.batch_norm`` does (unbiased variance)."""
    if not uses_kernels(x, running_mean, running_var):
        raise ValueError(
            "x: batch_norm_parts needs a channels_last float32/float64 CPU tensor (and running statistics of its "
            f"dtype) with the compiled extension; got {x.dtype} on {x.device}"
        )
    *ys, mean, invstd = _BatchNormParts.apply(x, parts, running_mean, running_var, momentum, eps)
    return ys, mean, invstd


def register_native_fakes() -> None:
    """Fake kernels of the compiled ops (called once the extension is loaded)."""
    global _kernels_built
    _kernels_built = True

    @torch.library.register_fake("fastnas::batch_norm_parts")
    def _(input, parts, running_mean, running_var, momentum, eps):
        B, C, H, W = input.shape
        out = input.new_empty((parts, B, H, W, C // parts)).permute(0, 1, 4, 2, 3)
        return out, input.new_empty((C,)), input.new_empty((C,))

    @torch.library.register_fake("fastnas::batch_norm_parts_backward")
    def _(grads, outputs, invstd):
        B, c, H, W = outputs[0].shape
        return outputs[0].new_empty((B, c * len(outputs), H, W)).contiguous(memory_format=torch.channels_last)
