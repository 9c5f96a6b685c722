"""Operators of fastnas: the fused mixed sum and its plain PyTorch reference."""

from fastnas.ops.mixed_sum import mixed_sum
from fastnas.ops.reference import mixed_sum_backward_reference, mixed_sum_forward_reference

__all__ = ["mixed_sum", "mixed_sum_forward_reference", "mixed_sum_backward_reference"]
