"""What the ops of fastnas and every backend of them agree on: dtypes, accumulation, dense layouts.

Imported by the op layer (``fastnas/ops``) and the Triton kernels (``kernels/``) alike; it imports
nothing of fastnas. The compiled kernels state the same contract in ``csrc/mixed_sum.h`` and
``csrc/cpu/nhwc.h``.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes of the mixed sum on every backend and of the Triton BatchNorm."""

CPU_KERNEL_DTYPES = (torch.float32, torch.float64)
"""The dtypes of the channels_last CPU kernels (BatchNorm, average pooling, depthwise convolution)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout_key(t: Tensor) -> tuple[tuple[int, int], ...]:
    """Strides that matter (size-1 dimensions ignored), to compare layouts."""
    return tuple((size, stride) for size, stride in zip(t.shape, t.stride()) if size != 1)


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True
