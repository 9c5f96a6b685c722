"""What the ops backed by the channels_last CPU kernels share (``depthwise_conv``, ``avg_pool``, ``batch_norm``): the
dtypes the kernels take, argument pairs, layouts, and whether autograd is the plain one the kernels serve."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from fastnas.contract import CPU_KERNEL_DTYPES as KERNEL_DTYPES

__all__ = ["KERNEL_DTYPES", "pair", "strictly_channels_last", "plain_autograd"]


def pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``value`` as a pair of ints (an int is repeated); ValueError naming ``name`` otherwise."""
    if isinstance(value, int):
        values = (value, value)
    else:
        values = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values


def strictly_channels_last(x: Tensor) -> bool:
    """True when ``x`` (4-D) is laid out channels_last and not (also) contiguous NCHW: the layout a
    copy of it should keep (a tensor that is both, e.g. one channel, counts as NCHW)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def plain_autograd() -> bool:
    """True outside torch.func transforms and forward-mode AD, where the kernels' autograd.Functions
    (backward-mode only) run; under them the ops use PyTorch's own differentiable functions. While
    dynamo traces, its own functorch interpreter is on the stack: a traced call takes the kernels (their
    registered ops and fake kernels), so compiled graphs run them too."""
    if forward_ad._current_level >= 0:
        return False
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None
