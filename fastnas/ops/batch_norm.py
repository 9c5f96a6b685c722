"""``lean_batch_norm``: the supernets' BatchNorm that keeps only its output, one dense output per block
of channels.

A supernet runs the same op of several edges leaving one node as one convolution, so one BatchNorm
(training mode, batch statistics, no affine parameters) normalises the concatenated channels of
``parts`` ops, and each op's block then goes to a different mixed sum as a dense tensor. Only the
outputs are kept for the backward (the mixed sums keep them alive anyway):
``dx = invstd * (g - mean(g) - y * mean(g * y))`` per channel.

Two paths compute it:

* the registered ops ``fastnas::batch_norm_parts`` and ``fastnas::batch_norm_parts_backward``, which
  write and read the blocks where they are, where :mod:`fastnas.backend` chose them (``batch_norm``:
  ``cpu`` or ``triton``), outside torch.func transforms and forward-mode AD (:func:`uses_kernels`);
  in eager mode their autograd is C++ (``fastnas::_lean_batch_norm_autograd``,
  ``csrc/batch_norm_autograd.cpp``: a Python autograd.Function's host time is more than the kernel's
  at supernet sizes), while tracing the autograd.Function below:

  - CPU float32/float64 channels_last tensors, with the extension built: compiled kernels
    (``csrc/cpu/batch_norm_cpu.cpp``). Statistics are summed in fixed chunks in double
    (deterministic, independent of the thread count);
  - CUDA contiguous (NCHW) float32/float16/bfloat16/float64 tensors, with the extension built and
    Triton >= 3.3 installed: Triton kernels (``kernels/batch_norm.py``), one launch each way where
    the native path below dispatches four or five operators. Sums per channel in a fixed order,
    float32 (float64 for float64); the statistics are float32 for 16-bit inputs, as PyTorch's are.

  Either way the sums are not in PyTorch's order: float32 results differ from PyTorch's by rounding;
* elsewhere (NCHW on CPU, 16-bit on CPU, no extension): PyTorch's kernels, with a copy splitting the
  output into dense blocks and, in the backward, two merging the blocks' gradients and outputs again
  (on CPU the native channels_last backward is also several times slower than its forward at the
  grouped shapes, ``benchmarks/RESULTS.md``: why the CPU kernels exist).

Both paths return ``invstd`` as a differentiable output: the backward's formula depends on ``x``
through it, so the double backward (``create_graph=True``) needs its gradient.

Under torch.func transforms and forward-mode AD neither path's autograd.Function can run:
differentiable torch operations compute the same outputs and statistics there
(:func:`_functional_lean_batch_norm`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastnas import backend, extension
from fastnas.contract import FLOAT_DTYPES as TRITON_DTYPES
from fastnas.ops._nhwc import KERNEL_DTYPES, plain_autograd, strictly_channels_last


def uses_kernels(x: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None) -> bool:
    """Whether :func:`lean_batch_norm` of ``x`` (with these running statistics) runs the registered ops
    (compiled CPU kernels, Triton on CUDA) rather than PyTorch's kernels: :mod:`fastnas.backend` chose
    them (``batch_norm``: ``cpu`` or ``triton``) and the tensors are what they take."""
    if not (plain_autograd() and x.dim() == 4):  # plain_autograd first: under vmap,
        return False  # is_contiguous(memory_format=...) raises
    stats = [t for t in (running_mean, running_var) if t is not None]
    if x.device.type == "cpu":
        return (
            x.dtype in KERNEL_DTYPES
            and x.is_contiguous(memory_format=torch.channels_last)
            and all(t.dtype == x.dtype and t.is_contiguous() for t in stats)
            and backend.get_kernels("batch_norm", "cpu") == "cpu"
        )
    if x.device.type == "cuda":
        return (
            x.dtype in TRITON_DTYPES
            and x.is_contiguous()
            and all(t.is_floating_point() and t.is_contiguous() and t.device == x.device for t in stats)
            and backend.get_kernels("batch_norm", "cuda") == "triton"
        )
    return False


# --------------------------------------------------------------------------- dense blocks of channels


def split_channels(y: Tensor, parts: int) -> list[Tensor]:
    """``y.chunk(parts, dim=1)`` as dense tensors in ``y``'s layout, copied with ONE kernel into one
    buffer whose leading dimension is the part (a channel slice of a dense tensor is not dense)."""
    if parts == 1:
        return [y]
    B, C, H, W = y.shape
    c = C // parts
    if strictly_channels_last(y):
        src = y.permute(0, 2, 3, 1).reshape(B, H, W, parts, c).permute(3, 0, 1, 2, 4)
        buf = torch.empty((parts, B, H, W, c), dtype=y.dtype, device=y.device)
        buf.copy_(src)
        return [b.permute(0, 3, 1, 2) for b in buf.unbind(0)]
    buf = torch.empty((parts, B, c, H, W), dtype=y.dtype, device=y.device)
    buf.copy_(y.reshape(B, parts, c, H, W).transpose(0, 1))
    return list(buf.unbind(0))


def merge_channels(parts: Sequence[Tensor]) -> Tensor:
    """``torch.cat(parts, dim=1)`` in the layout of ``parts[0]`` (one kernel): the inverse of
    :func:`split_channels`."""
    if len(parts) == 1:
        return parts[0]
    B, c, H, W = parts[0].shape
    if strictly_channels_last(parts[0]):
        stacked = torch.stack([p.permute(0, 2, 3, 1) for p in parts], dim=3)
        return stacked.view(B, H, W, len(parts) * c).permute(0, 3, 1, 2)
    return torch.stack(list(parts), dim=1).view(B, len(parts) * c, H, W)


# --------------------------------------------------------------------------- the backward, shared by both paths


def bn_constants(channels: int) -> Tensor:
    """``[2, channels]``: a row of zeros and a row of ones, the constants of the native path's backward
    for up to ``channels`` channels (a module buffer, so that no backward creates them)."""
    return torch.stack([torch.zeros(channels), torch.ones(channels)])


def _native_backward(grads: Sequence[Tensor | None], ys: Sequence[Tensor], invstd: Tensor, eps: float, unit):
    """``dx`` from the blocks' gradients (None: zero) and outputs by PyTorch's kernels: the native
    training-mode BatchNorm backward given ``input = y``, ``save_mean = 0``, ``save_invstd = 1`` and
    the real ``invstd`` as its affine weight (one fused kernel, differentiable to any order).
    ``unit``: an optional :func:`bn_constants` tensor whose rows give those constants without a kernel."""
    g = merge_channels([torch.zeros_like(y) if gr is None else gr for gr, y in zip(grads, ys)])
    y = merge_channels(ys)
    if g.stride() != y.stride():  # the native kernel is fast only when both share one layout
        g = torch.empty_like(y).copy_(g)
    C = invstd.shape[0]
    if unit is not None and unit.dtype == invstd.dtype and unit.device == invstd.device and unit.shape[1] >= C:
        zeros, ones = unit[0, :C], unit[1, :C]  # contiguous: the channels_last kernel reads them densely
    else:
        zeros, ones = torch.zeros_like(invstd), torch.ones_like(invstd)
    dx, _, _ = torch.ops.aten.native_batch_norm_backward(
        g, y, invstd, None, None, zeros, ones, True, eps, [True, False, False]
    )
    return dx


def _add_invstd_grad(dx: Tensor, grad_invstd: Tensor | None, ys: Sequence[Tensor], invstd: Tensor) -> Tensor:
    """``dx`` plus the gradient through ``invstd`` (only a double backward gives one):
    ``d invstd_c / d x = -invstd_c^2 * y_c / N``."""
    if grad_invstd is None:
        return dx
    y = merge_channels(ys)
    count = y.numel() // y.shape[1]
    return dx - (grad_invstd * invstd * invstd / count).view(1, -1, 1, 1) * y


class _NativeLeanBatchNorm(torch.autograd.Function):
    """The path by PyTorch's kernels (see the module docstring); running statistics, when given, are
    updated in place by the native kernel."""

    @staticmethod
    def forward(ctx, x, parts, running_mean, running_var, momentum, eps, unit):
        y, mean, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
        ys = split_channels(y, parts)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(invstd, unit, *ys)
        ctx.mark_non_differentiable(mean)
        return (*ys, mean, invstd)

    @staticmethod
    def backward(ctx, *grads):
        invstd, unit, *ys = ctx.saved_tensors
        dx = _native_backward(grads[: len(ys)], ys, invstd, ctx.eps, unit)
        return _add_invstd_grad(dx, grads[-1], ys, invstd), None, None, None, None, None, None


class _KernelLeanBatchNorm(torch.autograd.Function):
    """The path by the registered ops while tracing (see the module docstring). The backward is the
    kernel's, plus, with ``invstd_differentiable``, the gradient through ``invstd`` (one pointwise
    term the compiler fuses): a traced backward cannot tell an unused ``invstd`` from a used one
    (dynamo gives every output a gradient), so it always adds the term then, zero when unused. A
    double backward (``create_graph``) takes PyTorch's composite backward."""

    @staticmethod
    def forward(ctx, x, parts, running_mean, running_var, momentum, eps, invstd_differentiable):
        out, mean, invstd = torch.ops.fastnas.batch_norm_parts(x, parts, running_mean, running_var, momentum, eps)
        ys = out.unbind(0)
        ctx.eps, ctx.invstd_differentiable = eps, invstd_differentiable
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(invstd, *ys)
        ctx.mark_non_differentiable(*((mean,) if invstd_differentiable else (mean, invstd)))
        return (*ys, mean, invstd)

    @staticmethod
    def backward(ctx, *grads):
        invstd, *ys = ctx.saved_tensors
        grads_of_ys = list(grads[: len(ys)])
        if ctx.invstd_differentiable and torch.is_grad_enabled():  # create_graph: differentiable
            dx = _composite_backward(grads_of_ys, ys, invstd, grads[-1], ctx.eps)
        else:
            dx = torch.ops.fastnas.batch_norm_parts_backward(grads_of_ys, ys, invstd)
            if ctx.invstd_differentiable:
                dx = _add_invstd_grad(dx, grads[-1], ys, invstd)
        return dx, None, None, None, None, None, None


def lean_batch_norm(
    x: Tensor,
    parts: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    unit: Tensor | None = None,
    invstd_differentiable: bool = True,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """``(outputs, mean, invstd)``: training-mode BatchNorm of ``x`` ``[B, C, H, W]`` without affine
    parameters, as ``parts`` dense tensors ``[B, C / parts, H, W]`` in ``x``'s layout, with the batch
    ``mean`` (not differentiable) and ``invstd = 1/sqrt(var + eps)`` ``[C]`` (differentiable).
    ``running_mean``/``running_var`` (both or neither) are updated in place with ``momentum`` as
    ``F.batch_norm`` does (unbiased variance). ``unit``: see :func:`bn_constants` (native path only).
    ``invstd_differentiable=False``: ``invstd`` is returned detached, which lets a compiled graph run
    the kernels' backward (see :class:`_KernelLeanBatchNorm`); the supernets use it only for their
    running statistics."""
    if not plain_autograd():  # torch.func transforms, forward-mode AD: the autograd.Functions cannot run
        ys, mean, invstd = _functional_lean_batch_norm(x, parts, running_mean, running_var, momentum, eps)
    elif uses_kernels(x, running_mean, running_var):
        if not torch.compiler.is_compiling():  # the same autograd in C++ (csrc/batch_norm_autograd.cpp)
            *ys, mean, invstd = torch.ops.fastnas._lean_batch_norm_autograd(
                x, parts, running_mean, running_var, momentum, eps
            )
        else:
            *ys, mean, invstd = _KernelLeanBatchNorm.apply(
                x, parts, running_mean, running_var, momentum, eps, invstd_differentiable
            )
    else:
        *ys, mean, invstd = _NativeLeanBatchNorm.apply(x, parts, running_mean, running_var, momentum, eps, unit)
    return ys, mean, (invstd.detach() if invstd.requires_grad and not invstd_differentiable else invstd)


def _functional_lean_batch_norm(x, parts, running_mean, running_var, momentum, eps):
    """:func:`lean_batch_norm` by differentiable torch operations (under torch.func transforms and
    forward-mode AD): ``F.batch_norm`` for the output and the running statistics, exactly as
    PyTorch's BatchNorm behaves there; the batch statistics again for ``mean`` and ``invstd``."""
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, None, None, True, momentum, eps)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return list(y.chunk(parts, dim=1)), mean.detach(), torch.rsqrt(var + eps)


def _composite_backward(grads, outputs, invstd, invstd_grad, eps):
    """``fastnas::_lean_batch_norm_backward_composite``: the backward where it must be differentiable
    (``create_graph=True``) or ``invstd`` has a gradient, by PyTorch's operators (both autograds use
    it)."""
    dx = _native_backward(grads, outputs, invstd, eps, None)
    return _add_invstd_grad(dx, invstd_grad, outputs, invstd)


_triton_registered = False


def register_triton_kernels() -> None:
    """Make the Triton kernels of ``kernels/batch_norm.py`` the CUDA kernels of
    ``fastnas::batch_norm_parts`` and ``fastnas::batch_norm_parts_backward`` (defined by the compiled
    extension, which must be loaded). Triton and the kernels are imported at the first CUDA call, not
    here: start-up does not pay for them. Idempotent."""
    global _triton_registered
    if not _triton_registered:
        torch.library.impl("fastnas::batch_norm_parts", "CUDA")(_triton_forward)
        torch.library.impl("fastnas::batch_norm_parts_backward", "CUDA")(_triton_backward)
        _triton_registered = True


def _triton_forward(input, parts, running_mean, running_var, momentum, eps):
    from fastnas.kernels.batch_norm import batch_norm_parts

    return batch_norm_parts(input, parts, running_mean, running_var, momentum, eps)


def _triton_backward(grads, outputs, invstd):
    from fastnas.kernels.batch_norm import batch_norm_parts_backward

    return batch_norm_parts_backward(grads, outputs, invstd)


if extension.load():  # the ops are the extension's; what registers them from Python is here
    torch.library.impl("fastnas::_lean_batch_norm_backward_composite", "CompositeImplicitAutograd")(_composite_backward)
    if backend.triton_installed():  # Triton itself is imported at the first CUDA call
        register_triton_kernels()
