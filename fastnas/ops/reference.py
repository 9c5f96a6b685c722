"""Plain PyTorch reference of the mixed sum: the oracle of every test and the fallback backend.

The mixed sum of a supernet edge (or node) weighs K candidate-op outputs ``o_k`` of one shape:

    y = sum_k w_k * o_k

With ``g = dL/dy`` its gradients are

    dL/do_k = w_k * g                 (one tensor per candidate, the shape of y)
    dL/dw_k = sum_i g[i] * o_k[i]     (a scalar per candidate: the inner product <g, o_k>)

16-bit inputs are accumulated in float32 and float64 inputs in float64 ("the accumulation dtype");
results are rounded once, at the end, to the outputs' dtype (y, dL/do_k) or the weights' dtype (dL/dw).
This file is deliberately naive: K multiplies and K-1 adds forward, as every NAS library does it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnas.contract import accumulation_dtype

__all__ = ["accumulation_dtype", "mixed_sum_forward_reference", "mixed_sum_backward_reference"]


def mixed_sum_forward_reference(outputs: list[Tensor], weights: Tensor) -> Tensor:
    """``y = sum_k weights[k] * outputs[k]``, accumulated in the accumulation dtype."""
    acc = accumulation_dtype(outputs[0].dtype)
    w = weights.to(acc)
    y = torch.zeros_like(outputs[0], dtype=acc)
    for k, o in enumerate(outputs):
        y = y + w[k] * o.to(acc)
    return y.to(outputs[0].dtype)


def mixed_sum_backward_reference(
    grad: Tensor, outputs: list[Tensor], weights: Tensor, compute_outputs_grad: bool
) -> tuple[list[Tensor], Tensor]:
    """Gradients of the mixed sum.

    Returns ``(outputs_grad, weights_grad)``: ``outputs_grad[k] = weights[k] * grad`` (empty list when
    ``compute_outputs_grad`` is False) and ``weights_grad[k] = sum(grad * outputs[k])`` in the
    weights' dtype (an empty tensor when ``outputs`` is empty: the caller did not keep them).
    """
    acc = accumulation_dtype(grad.dtype)
    w = weights.to(acc)
    g = grad.to(acc)
    outputs_grad = []
    if compute_outputs_grad:
        outputs_grad = [(w[k] * g).to(grad.dtype) for k in range(weights.numel())]
    if len(outputs) == 0:
        return outputs_grad, weights.new_empty(0)
    weights_grad = torch.stack([(g * o.to(acc)).sum() for o in outputs]).to(weights.dtype)
    return outputs_grad, weights_grad
