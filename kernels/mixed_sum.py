"""Triton backend of the mixed sum ``y = sum_k w_k * o_k`` (``torch.ops.fastnas.mixed_sum``).

:mod:`fastnas.backend` routes the ``triton`` backend to :func:`mixed_sum_forward` and
:func:`mixed_sum_backward`, which follow the native contract of ``csrc/mixed_sum.h``: K >= 1 inputs
of one dtype (float16, bfloat16, float32, float64), shape and strides, dense, so each is a flat
array of ``numel`` elements in memory order; weights 1-D, contiguous, in the accumulation dtype
(float64 for float64 inputs, float32 otherwise). The autograd lives in ``fastnas/ops/mixed_sum.py``.

How the kernels work
--------------------
* **No stacking copy.** The K inputs reach a kernel as a tuple of tensors padded to a bucket
  ``KB`` in {1, 2, 4, 8, 16, 32} (the padding repeats a real tensor and is never read: the kernel
  tests ``k < K`` at run time). One kernel is compiled per bucket, not per K, and Triton
  specialises every tuple entry on 16-byte alignment, so the loads stay vectorised.
* **K > 32** is cut into chunks of 32 (``MAX_BUCKET``). Forward: each chunk adds its terms to a
  running sum kept in the accumulation dtype (two buffers used in turn, so a chunk never reads
  and writes the same buffer), and the last chunk rounds once into ``y``. Backward: each chunk is
  one independent pass (it reads ``g`` again) over its own columns of the weights' gradient.
* **Forward:** one tile of ``BLOCK`` elements per program; every input read once, accumulated in
  float32 (float64 for float64), stored once in the output dtype.
* **Backward:** one tile per program; the program reads its tile of ``g`` once, then for every k
  reads ``o_k``, writes ``w_k * g`` into ``d o_k`` and reduces ``sum(g * o_k)`` over the tile into
  its row of a ``[programs, K]`` partial-sum buffer (plain stores, no atomics). The rows are summed
  by ``torch.sum(dim=0)`` in a fixed order, so results are bit-identical from run to run.
* **Offsets** are int64 (program ids widened before the multiply): tensors over 2^31 elements.
* **Block sizes** are autotuned on a key of (numel rounded up to a power of two, K bucket, dtypes,
  flags). Under the Triton interpreter (``TRITON_INTERPRET=1``) and in deterministic mode
  (``torch.use_deterministic_algorithms(True)``) one fixed configuration, :data:`FIXED_CONFIG`, is
  used instead, so the summation order does not depend on a timing measurement;
  ``FASTNAS_TRITON_AUTOTUNE=0`` asks for it too (no tuning time, fewer compilations).
* **Autotuning cannot leak partial sums.** Its trials replay a launch with other block sizes, hence
  other grids. Every launch is idempotent: a forward chunk never reads the buffer it writes, and
  the partial-sum buffer is sized per configuration (rows for the smallest tile; each program
  stores its whole row; only the rows of the launch that counted are summed, its BLOCK being
  recorded by the grid function). So no ``reset_to_zero`` is needed: nothing stale is ever read.
* **No atomics.** An atomic ``dL/dw`` path was not added: it could not be shown faster here (no
  GPU), and the deterministic reduction costs one small ``[programs, K]`` sum.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastnas import backend
from fastnas.ops.mixed_sum import SUPPORTED_DTYPES, _layout_key, is_dense
from fastnas.ops.reference import accumulation_dtype

__all__ = [
    "mixed_sum_forward",
    "mixed_sum_backward",
    "interpreted",
    "uses_fixed_config",
    "MAX_BUCKET",
    "CONFIGS",
    "FIXED_CONFIG",
]

# tuples of tensors as kernel arguments need Triton 3.2 compiled, 3.3 interpreted: the minimum
# version is checked in one place, fastnas.backend (which also reports it as unavailable_reason)
_reason = backend._triton_reason()
if _reason:
    raise ImportError(f"the triton backend of fastnas: {_reason}")

MAX_BUCKET = 32
"""Largest K handled by one kernel launch; larger K is processed in chunks of this many inputs."""

CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]
"""Autotuned configurations of both kernels (elements per program, warps per program)."""

FIXED_CONFIG = triton.Config({"BLOCK": 2048}, num_warps=8)
"""The one configuration used under the interpreter and in deterministic mode."""

_MIN_BLOCK = min(c.kwargs["BLOCK"] for c in [*CONFIGS, FIXED_CONFIG])
"""The smallest tile of any configuration: the partial-sum buffer has a row per tile of this size."""


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles larger than the tensor (rounded up to a power of two); keep at least one."""
    limit = max(triton.next_power_of_2(int(named_args["N"])), configs[0].kwargs["BLOCK"])
    return [c for c in configs if c.kwargs["BLOCK"] <= limit] or configs[:1]


# --------------------------------------------------------------------------- kernels
# Each kernel runs one tile per program. Full tiles take an unmasked path and only the last, partial
# tile a masked one: a mask `o_n < N` with N not a multiple of 16 would otherwise make every load and
# store of the tensor scalar instead of 16-byte vectors.


@triton.jit
def _load(p, o_n, N, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(p + o_n, mask=o_n < N, other=0.0)
    else:
        return tl.load(p + o_n)


@triton.jit
def _store(p, o_n, b, N, MASKED: tl.constexpr):
    if MASKED:
        tl.store(p + o_n, b, mask=o_n < N)
    else:
        tl.store(p + o_n, b)


@triton.jit
def _fwd_tile(p_y, p_acc, o_ptrs, p_w, o_n, N, K, ACC_IN: tl.constexpr, KB: tl.constexpr, MASKED: tl.constexpr):
    """y[n] = acc[n] + sum_{k < K} w[k] * o_k[n] for the elements o_n, in the weights' dtype."""
    if ACC_IN:
        b_y = _load(p_acc, o_n, N, MASKED).to(p_w.dtype.element_ty)
    else:
        b_y = tl.zeros(o_n.shape, dtype=p_w.dtype.element_ty)
    for k in tl.static_range(KB):
        if k < K:
            b_y += tl.load(p_w + k) * _load(o_ptrs[k], o_n, N, MASKED).to(p_w.dtype.element_ty)
    _store(p_y, o_n, b_y.to(p_y.dtype.element_ty), N, MASKED)


@triton.autotune(
    configs=CONFIGS, key=["SIZE_KEY", "KB", "ACC_IN"], prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit(do_not_specialize=["SIZE_KEY"])
def _mixed_sum_fwd_kernel(
    p_y,  # out: N elements, the output dtype (or the accumulation dtype for a chunk that is not the last)
    p_acc,  # in: N running sums of the earlier chunks, accumulation dtype (read only when ACC_IN)
    o_ptrs,  # in: tuple of KB pointers to N elements each; entries k >= K are padding, never read
    p_w,  # in: K weights, accumulation dtype
    N,
    K,
    SIZE_KEY,  # autotune key only: N rounded up to a power of two
    ACC_IN: tl.constexpr,
    KB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = acc + sum_{k < K} w[k] * o_k over one tile of BLOCK elements."""
    pid = tl.program_id(0).to(tl.int64)  # widened before the multiply: tensors over 2^31 elements
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    if pid * BLOCK + BLOCK <= N:
        _fwd_tile(p_y, p_acc, o_ptrs, p_w, o_n, N, K, ACC_IN, KB, MASKED=False)
    else:
        _fwd_tile(p_y, p_acc, o_ptrs, p_w, o_n, N, K, ACC_IN, KB, MASKED=True)


@triton.jit
def _bwd_tile(
    p_g,
    o_ptrs,
    do_ptrs,
    p_w,
    o_n,
    N,
    K,
    HAS_DO: tl.constexpr,
    HAS_DW: tl.constexpr,
    KB: tl.constexpr,
    MASKED: tl.constexpr,
):
    """do_k[n] = w[k] * g[n] for the elements o_n; returns [KB] sums of g * o_k over them (0 for k >= K)."""
    b_g = _load(p_g, o_n, N, MASKED).to(p_w.dtype.element_ty)
    o_k = tl.arange(0, KB)
    b_dw = tl.zeros([KB], dtype=p_w.dtype.element_ty)
    for k in tl.static_range(KB):
        if k < K:
            if HAS_DW:
                b_o = _load(o_ptrs[k], o_n, N, MASKED).to(p_w.dtype.element_ty)
            if HAS_DO:
                _store(do_ptrs[k], o_n, (tl.load(p_w + k) * b_g).to(do_ptrs[k].dtype.element_ty), N, MASKED)
            if HAS_DW:
                b_dw = tl.where(o_k == k, tl.sum(b_g * b_o, axis=0), b_dw)
    return b_dw


@triton.autotune(
    configs=CONFIGS,
    key=["SIZE_KEY", "KB", "HAS_DO", "HAS_DW"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit(do_not_specialize=["SIZE_KEY"])
def _mixed_sum_bwd_kernel(
    p_g,  # in: N elements of dL/dy
    o_ptrs,  # in: tuple of KB pointers to the inputs o_k (read only when HAS_DW; padding never read)
    do_ptrs,  # out: tuple of KB pointers to dL/do_k (written only when HAS_DO; padding never written)
    p_w,  # in: K weights, accumulation dtype
    p_part,  # out: [programs, K] partial sums of dL/dw, accumulation dtype (written only when HAS_DW)
    N,
    K,
    SIZE_KEY,  # autotune key only: N rounded up to a power of two
    HAS_DO: tl.constexpr,
    HAS_DW: tl.constexpr,
    KB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One tile: do_k = w[k] * g and part[pid, k] = sum(g * o_k) for every k < K, reading g once."""
    pid = tl.program_id(0).to(tl.int64)  # widened before the multiply: tensors over 2^31 elements
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    if pid * BLOCK + BLOCK <= N:
        b_dw = _bwd_tile(p_g, o_ptrs, do_ptrs, p_w, o_n, N, K, HAS_DO, HAS_DW, KB, MASKED=False)
    else:
        b_dw = _bwd_tile(p_g, o_ptrs, do_ptrs, p_w, o_n, N, K, HAS_DO, HAS_DW, KB, MASKED=True)
    if HAS_DW:
        # every launched program stores its whole row (no atomics): nothing stale is ever summed
        o_k = tl.arange(0, KB)
        tl.store(p_part + pid * K + o_k, b_dw, mask=o_k < K)


# --------------------------------------------------------------------------- launchers


@functools.cache
def interpreted() -> bool:
    """True when Triton runs these kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every Triton 3.x has it
        return False
    return isinstance(_mixed_sum_fwd_kernel.fn, InterpretedFunction)


def uses_fixed_config() -> bool:
    """Whether launches skip autotuning and use :data:`FIXED_CONFIG`: under the interpreter, in
    deterministic mode, or when ``FASTNAS_TRITON_AUTOTUNE=0`` (no tuning time, fewer compilations)."""
    return (
        interpreted()
        or torch.are_deterministic_algorithms_enabled()
        or os.environ.get("FASTNAS_TRITON_AUTOTUNE", "1") == "0"
    )


def _size_key(n: int) -> int:
    """The autotune size bucket: ``n`` rounded up to a power of two, at least 4096."""
    return max(triton.next_power_of_2(n), 4096)


def _bucket(k: int) -> int:
    """The compiled K bucket for a chunk of ``k`` inputs: the next power of two."""
    return triton.next_power_of_2(k)


def _chunks(k: int) -> list[tuple[int, int]]:
    """``(first index, length)`` of each launch: chunks of at most MAX_BUCKET inputs."""
    return [(k0, min(MAX_BUCKET, k - k0)) for k0 in range(0, k, MAX_BUCKET)]


def _padded(tensors: Sequence[Tensor], kb: int, filler: Tensor) -> tuple[Tensor, ...]:
    return tuple(tensors) + (filler,) * (kb - len(tensors))


def _launch(kernel, n: int, args: tuple, meta: dict, config: triton.Config | None) -> int:
    """Launch ``kernel`` over ``cdiv(n, BLOCK)`` programs and return the BLOCK of the launch that
    counted (the last one; autotuning runs the trials first). ``config`` forces a configuration."""
    used: list[int] = []

    def grid(m: dict) -> tuple[int]:
        used.append(m["BLOCK"])
        return (triton.cdiv(n, m["BLOCK"]),)

    if config is None and uses_fixed_config():
        config = FIXED_CONFIG
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config.all_kwargs())
    return used[-1]


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check(grad: Tensor | None, outputs: Sequence[Tensor], weights: Tensor, op: str) -> None:
    """The native contract again: raise (naming the argument) rather than read out of bounds.
    Cheap on the common path (a few attribute reads per tensor): it runs on every call."""
    tensors = [grad, *outputs] if grad is not None else list(outputs)

    def name(i: int) -> str:
        return "grad" if grad is not None and i == 0 else f"outputs[{i - (grad is not None)}]"

    first = tensors[0]
    if not isinstance(first, Tensor) or first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name(0)} must be a float16/bfloat16/float32/float64 tensor")
    if not (first.is_contiguous() or is_dense(first)):
        raise ValueError(f"{op}: {name(0)} must be dense (non-overlapping, no gaps), got strides {first.stride()}")
    device, dtype, shape, stride = first.device, first.dtype, first.shape, first.stride()
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(f"{op}: the triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    for i in range(1, len(tensors)):
        t = tensors[i]
        if not isinstance(t, Tensor) or t.dtype != dtype or t.device != device:
            raise TypeError(f"{op}: {name(i)} must be a {dtype} tensor on {device} like {name(0)}")
        if t.shape != shape or (t.stride() != stride and _layout_key(t) != _layout_key(first)):
            raise ValueError(f"{op}: {name(i)} must have the shape and strides of {name(0)}")
    acc = accumulation_dtype(dtype)
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.dtype != acc or not weights.is_contiguous():
        raise TypeError(f"{op}: weights must be a contiguous 1-D {acc} tensor for {dtype} inputs")
    if weights.device != device:
        raise ValueError(f"{op}: weights is on {weights.device} but {name(0)} is on {device}")
    if outputs and weights.shape[0] != len(outputs):
        raise ValueError(f"{op}: weights has length {weights.shape[0]} but there are K={len(outputs)} outputs")
    if weights.shape[0] == 0:
        raise ValueError(f"{op}: weights must hold K >= 1 values")


def _forward_launch(
    y: Tensor, acc_in: Tensor | None, outputs: Sequence[Tensor], weights: Tensor, config: triton.Config | None = None
) -> int:
    """``y = acc_in + sum_k weights[k] * outputs[k]`` for one chunk (at most MAX_BUCKET inputs)."""
    n, k = y.numel(), len(outputs)
    kb = _bucket(k)
    args = (y, acc_in if acc_in is not None else y, _padded(outputs, kb, outputs[0]), weights, n, k, _size_key(n))
    return _launch(_mixed_sum_fwd_kernel, n, args, {"ACC_IN": acc_in is not None, "KB": kb}, config)


def _backward_launch(
    grad: Tensor,
    outputs: Sequence[Tensor],
    outputs_grad: Sequence[Tensor],
    weights: Tensor,
    config: triton.Config | None = None,
    partials: Tensor | None = None,
) -> Tensor | None:
    """One chunk of the backward: fills ``outputs_grad`` (if any) and returns ``sum(grad * outputs[k])``
    for each k (None when ``outputs`` is empty). ``partials`` (tests only) is the buffer of partial
    sums, at least ``[cdiv(numel, smallest BLOCK), K]``; a fresh one is allocated otherwise."""
    n, k = grad.numel(), weights.numel()
    kb = _bucket(k)
    has_dw = len(outputs) > 0
    if has_dw and partials is None:
        # sized per configuration, not reset: rows for the smallest tile; only the counted launch's rows are summed
        partials = torch.empty((triton.cdiv(n, _MIN_BLOCK), k), dtype=weights.dtype, device=grad.device)
    args = (
        grad,
        _padded(outputs, kb, grad),
        _padded(outputs_grad, kb, grad),
        weights,
        partials if has_dw else grad,
        n,
        k,
        _size_key(n),
    )
    meta = {"HAS_DO": len(outputs_grad) > 0, "HAS_DW": has_dw, "KB": kb}
    block = _launch(_mixed_sum_bwd_kernel, n, args, meta, config)
    if not has_dw:
        return None
    # a fixed-size sum over the rows this launch wrote: same order every run (deterministic)
    return partials[: triton.cdiv(n, block)].sum(dim=0)


def mixed_sum_forward(outputs: list[Tensor], weights: Tensor) -> Tensor:
    """``y = sum_k weights[k] * outputs[k]`` in one pass over memory (per chunk of MAX_BUCKET inputs).

    Args:
        outputs: K >= 1 tensors of one dtype, shape and strides, dense, on a CUDA device (or the
            CPU under ``TRITON_INTERPRET=1``).
        weights: ``[K]``, contiguous, float32 (float64 for float64 outputs).

    Returns:
        A new tensor laid out like ``outputs[0]`` (``torch.empty_like``), in its dtype, accumulated
        in the weights' dtype and rounded once.
    """
    if not isinstance(outputs, (list, tuple)) or len(outputs) == 0:
        raise ValueError("mixed_sum_forward: outputs must be a non-empty list of tensors")
    _check(None, outputs, weights, "mixed_sum_forward")
    y = torch.empty_like(outputs[0])
    if y.numel() == 0:
        return y
    chunks = _chunks(len(outputs))
    with _device_guard(y):
        if len(chunks) == 1:
            _forward_launch(y, None, outputs, weights)
            return y
        # running sums in the accumulation dtype; two buffers in turn, so that no launch reads and
        # writes one buffer (autotuning replays a launch: in place it would add a chunk twice)
        sums = [torch.empty_like(y, dtype=weights.dtype) for _ in range(min(2, len(chunks) - 1))]
        acc_in = None
        for i, (k0, kc) in enumerate(chunks):
            dst = y if i == len(chunks) - 1 else sums[i % 2]
            _forward_launch(dst, acc_in, outputs[k0 : k0 + kc], weights[k0 : k0 + kc])
            acc_in = dst
    return y


def mixed_sum_backward(
    grad: Tensor, outputs: list[Tensor], weights: Tensor, compute_outputs_grad: bool
) -> tuple[list[Tensor], Tensor]:
    """Gradients of the mixed sum in one pass over memory (per chunk of MAX_BUCKET inputs).

    Args:
        grad: ``dL/dy``, dense, in the outputs' dtype, shape and strides.
        outputs: the K inputs ``o_k`` (like ``grad``), or an empty list when ``dL/dw`` is not needed.
        weights: ``[K]``, contiguous, float32 (float64 for float64 inputs).
        compute_outputs_grad: whether to return ``dL/do_k``.

    Returns:
        ``(outputs_grad, weights_grad)``: ``outputs_grad[k] = weights[k] * grad`` as K new tensors laid
        out like ``grad`` (``[]`` when ``compute_outputs_grad`` is False) and ``weights_grad[k] =
        sum(grad * outputs[k])`` in the weights' dtype (an empty tensor when ``outputs`` is empty).
        The sums are reduced in a fixed order: two calls give bit-identical results.
    """
    if not isinstance(outputs, (list, tuple)):
        raise TypeError("mixed_sum_backward: outputs must be a list of tensors (possibly empty)")
    _check(grad, outputs, weights, "mixed_sum_backward")
    k = weights.numel()
    outputs_grad = [torch.empty_like(grad) for _ in range(k)] if compute_outputs_grad else []
    if not outputs and not compute_outputs_grad:
        return outputs_grad, weights.new_empty(0)
    if grad.numel() == 0:
        return outputs_grad, (torch.zeros_like(weights) if outputs else weights.new_empty(0))
    sums = []
    with _device_guard(grad):
        for k0, kc in _chunks(k):
            s = _backward_launch(grad, outputs[k0 : k0 + kc], outputs_grad[k0 : k0 + kc], weights[k0 : k0 + kc])
            sums.append(s)
    if not outputs:
        return outputs_grad, weights.new_empty(0)
    return outputs_grad, (sums[0] if len(sums) == 1 else torch.cat(sums))
