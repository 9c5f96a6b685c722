"""Triton backend of the mixed sum ``y = sum_k w_k * o_k`` (``torch.ops.fastnas.mixed_sum``).

The op layer calls :data:`VALIDATED` when the ``triton`` backend runs (it has checked the inputs);
:func:`mixed_sum_forward` and :func:`mixed_sum_backward` are the same with the checks, for direct
calls. Both follow the native contract of ``csrc/mixed_sum.h``: K >= 1 inputs of one
dtype (float16, bfloat16, float32, float64), shape and strides, dense, so each is a flat array of
``numel`` elements in memory order; weights 1-D, contiguous, in the accumulation dtype (float64 for
float64 inputs, float32 otherwise). The autograd lives in ``fastnas/ops/mixed_sum.py``.

How the kernels work
--------------------
* **No stacking copy.** The K inputs reach a kernel as a tuple of pointers padded to a bucket
  ``KB`` (the next power of two; the padding repeats a real tensor and is never touched). One
  kernel is compiled per bucket, not per K, and Triton specialises every tuple entry on 16-byte
  alignment, so each aligned input keeps 16-byte vector loads whatever the others are.
* **Tiles** of full programs are ``ROWS x VEC`` elements in memory order, one 16-byte vector per row
  (``VEC`` = 4 float32, 8 float16/bfloat16, 2 float64), ``ROWS`` = 32 x warps x rows per thread, and
  are not masked. The last, partial tile is walked ``ROWS`` elements at a time with masked scalar
  accesses: few registers, so that the rare tail does not cost every full tile occupancy (in the
  backward, each element lands in the thread that holds its row in full tiles: no layout change).
* **No branch per input.** Inputs ``k <= KB/2`` always exist (``K > KB/2``); the others are loaded
  with the mask ``k < K`` folded into the load and added through a select, so every load of a tile
  is issued before the first use and they are in flight together.
* **Forward:** one tile per program; every input read once, accumulated in float32 (float64 for
  float64), stored once. K > 32 (``MAX_BUCKET_FORWARD``) runs in chunks over a running sum kept in
  the accumulation dtype (in ``y`` itself for float32/float64), the last chunk rounding once.
* **Backward:** a program reads ``g`` and every ``o_k`` of a tile (all loads first: no store can be
  taken for an alias of a later input), then stores ``w_k * g`` for every k. Each thread keeps its
  own running sums of ``g * o_k`` for every k in registers across the tiles it visits (a grid-stride
  loop over at most ``MAX_PROGRAMS`` programs); the program reduces them across its threads once,
  at the end, and stores its row of K partial sums. The last program to finish (an arrival counter,
  reset by that program for the next launch) adds the rows in index order and writes ``dL/dw``:
  one launch, no atomics on data, no partial-sum tensor handed back to PyTorch. K > 16
  (``MAX_BUCKET_BACKWARD``) runs in chunks, each reading ``g`` again.
* **Deterministic across runs and processes.** The launch configuration is a pure function of the
  kernel, the K bucket and the dtype (:func:`launch_config`); the grid, of the element count;
  nothing is timed or tuned. So the order of every sum, hence every bit of ``dL/dw``, depends only
  on (numel, K, dtype) and the inputs' 16-byte alignment, never on what ran before.
* **Offsets** are int64 (the tile index is widened before the multiply): tensors over 2^31 elements.
* **Host path.** After the first call of a specialisation (which goes through Triton's own launch
  path and compiles), launches call the compiled kernel's launcher directly, keyed on what Triton
  specialises on (constexprs, dtypes, the 16-byte alignment of every pointer), skipping its per-call
  argument binding. The partial-sum rows and the counter live in a workspace kept per (device,
  stream). ``host_overhead_probe`` of ``tools/triton_offline.py`` measures the host time of a call.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from fastnas.kernels.launch import Launcher, alignment
from torch import Tensor
from triton.runtime.driver import driver

from fastnas.contract import FLOAT_DTYPES as SUPPORTED_DTYPES
from fastnas.contract import accumulation_dtype, is_dense, layout_key

__all__ = [
    "mixed_sum_forward",
    "mixed_sum_backward",
    "VALIDATED",
    "interpreted",
    "launch_config",
    "launch_variants",
    "variant_of",
    "LaunchConfig",
    "Variant",
    "MAX_BUCKET_FORWARD",
    "MAX_BUCKET_BACKWARD",
    "MAX_PROGRAMS",
]

MAX_BUCKET_FORWARD = 32
"""Most inputs per forward launch; more run in chunks over a running sum."""

MAX_BUCKET_BACKWARD = 16
"""Most inputs per backward launch; more run in chunks, each reading ``g`` again (1/(2K+1) more
traffic per extra chunk). A bucket of 32 needs all 255 registers per thread to keep a tile's loads
in flight, and twice the compile time."""

MAX_PROGRAMS = 1024
"""The backward grid: at most this many programs, each walking tiles with a stride of the grid.
A constant, not the GPU's SM count, so that the reduction order is the same on every GPU."""

SUM_ROWS = 64
"""Partial-sum rows the last backward program adds per step (a [SUM_ROWS, KB] block)."""

_VECTOR_BYTES = 16
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- kernels
# Naming: p_* pointers, b_* blocks of values, o_* offsets, m_* masks. ALWAYS: input k exists
# whatever K is (k <= KB // 2), so its loads and stores need no mask on full tiles.


@triton.jit
def _tile_offsets(ROWS: tl.constexpr, VEC: tl.constexpr):
    """Offsets of a full tile in memory order: ROWS rows of VEC elements, each one 16-byte vector."""
    return tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _load(p, o_t, m_t, m_k, MASKED: tl.constexpr, ALWAYS: tl.constexpr):
    """p[o_t]; m_t masks the elements of a partial tile (MASKED), m_k whether the input exists."""
    if MASKED:
        if ALWAYS:
            return tl.load(p + o_t, mask=m_t, other=0.0)
        else:
            return tl.load(p + o_t, mask=m_t & m_k, other=0.0)
    else:
        if ALWAYS:
            return tl.load(p + o_t)
        else:
            return tl.load(p + o_t, mask=m_k, other=0.0)


@triton.jit
def _store(p, o_t, b, m_t, m_k, MASKED: tl.constexpr, ALWAYS: tl.constexpr):
    if MASKED:
        if ALWAYS:
            tl.store(p + o_t, b, mask=m_t)
        else:
            tl.store(p + o_t, b, mask=m_t & m_k)
    else:
        if ALWAYS:
            tl.store(p + o_t, b)
        else:
            tl.store(p + o_t, b, mask=m_k)


@triton.jit
def _fwd_tile(p_y, p_acc, o_ptrs, p_w, start, o_t, m_t, K, ACC_IN, KB: tl.constexpr, MASKED: tl.constexpr):
    """y = (acc if ACC_IN else 0) + sum_{k < K} w[k] * o_k at start + o_t, in the weights' dtype."""
    acc_ty = p_w.dtype.element_ty
    if ACC_IN != 0:
        b_y = _load(p_acc + start, o_t, m_t, True, MASKED, True).to(acc_ty)
    else:
        b_y = tl.zeros(o_t.shape, dtype=acc_ty)
    for k in tl.static_range(KB):
        m_k = k < K
        if k <= KB // 2:
            b_y += tl.load(p_w + k) * _load(o_ptrs[k] + start, o_t, m_t, m_k, MASKED, True).to(acc_ty)
        else:
            b_w = tl.load(p_w + k, mask=m_k, other=0.0)
            b_o = _load(o_ptrs[k] + start, o_t, m_t, m_k, MASKED, False).to(acc_ty)
            b_y = tl.where(m_k, b_y + b_w * b_o, b_y)  # padding adds nothing, not even the sign of a zero
    _store(p_y + start, o_t, b_y.to(p_y.dtype.element_ty), m_t, True, MASKED, True)


@triton.jit(do_not_specialize=["N_FULL", "TAIL", "K", "ACC_IN"])
def _mixed_sum_fwd_kernel(
    p_y,  # out: the output dtype, or the accumulation dtype for a chunk that is not the last
    p_acc,  # in: running sums of the earlier chunks, accumulation dtype (read only when ACC_IN)
    o_ptrs,  # in: tuple of KB pointers; entries k >= K are padding, never read
    p_w,  # in: K weights, accumulation dtype
    N_FULL,  # full tiles; program N_FULL, if launched, takes the partial tile
    TAIL,  # elements of the partial tile (0 when none)
    K,
    ACC_IN,  # 1: add p_acc (chunks after the first)
    KB: tl.constexpr,
    VEC: tl.constexpr,
    ROWS: tl.constexpr,
):
    """One tile per program: y = acc + sum_{k < K} w[k] * o_k."""
    tile = tl.program_id(0)
    start = tile.to(tl.int64) * (ROWS * VEC)  # widened before the multiply: tensors over 2^31 elements
    if tile < N_FULL:
        o_t = _tile_offsets(ROWS, VEC)
        _fwd_tile(p_y, p_acc, o_ptrs, p_w, start, o_t, o_t < TAIL, K, ACC_IN, KB, MASKED=False)
    else:
        for c in range(0, tl.cdiv(TAIL, ROWS)):  # the partial tile, ROWS elements at a time
            o_t = c * ROWS + tl.arange(0, ROWS)
            _fwd_tile(p_y, p_acc, o_ptrs, p_w, start, o_t, o_t < TAIL, K, ACC_IN, KB, MASKED=True)


@triton.jit
def _stack(sums, LO: tl.constexpr, STEP: tl.constexpr, N: tl.constexpr):
    """[ROWS, N]: column j is sums[LO + j * STEP]. Joins pairs (each thread keeps its own values)."""
    if N == 1:
        return tl.expand_dims(sums[LO], 1)
    else:
        b = tl.join(_stack(sums, LO, STEP * 2, N // 2), _stack(sums, LO + STEP, STEP * 2, N // 2))
        return tl.reshape(b, [b.shape[0], N])


@triton.jit
def _bwd_tile(
    p_g,
    o_ptrs,
    do_ptrs,
    ws,
    start,
    o_t,
    m_t,
    K,
    HAS_DO: tl.constexpr,
    HAS_DW: tl.constexpr,
    KB: tl.constexpr,
    MASKED: tl.constexpr,
):
    """do_k = w_k * g at start + o_t; returns [ROWS, KB]: per row of o_t, the sum of g * o_k (0 for
    k >= K). o_t is a full tile [ROWS, VEC], or ROWS elements of the partial one (MASKED)."""
    acc_ty = ws[0].dtype
    b_g = _load(p_g + start, o_t, m_t, True, MASKED, True).to(acc_ty)
    if HAS_DW:
        # all loads of the tile before any store: a store cannot be taken for an alias of a later load
        b_os = ()
        for k in tl.static_range(KB):
            b_os = b_os + (_load(o_ptrs[k] + start, o_t, m_t, k < K, MASKED, k <= KB // 2),)
        sums = ()
        for k in tl.static_range(KB):
            if MASKED:
                sums = sums + (b_g * b_os[k].to(acc_ty),)
            else:
                sums = sums + (tl.sum(b_g * b_os[k].to(acc_ty), axis=1),)  # within the thread: one row each
    if HAS_DO:
        for k in tl.static_range(KB):
            b_do = (ws[k] * b_g).to(do_ptrs[k].dtype.element_ty)
            _store(do_ptrs[k] + start, o_t, b_do, m_t, k < K, MASKED, k <= KB // 2)
    if HAS_DW:
        return _stack(sums, 0, 1, KB)
    else:
        return tl.zeros([o_t.shape[0], KB], dtype=acc_ty)


@triton.jit(do_not_specialize=["N_FULL", "TAIL", "K"])
def _mixed_sum_bwd_kernel(
    p_g,  # in: dL/dy
    o_ptrs,  # in: tuple of KB pointers to the inputs o_k (read only when HAS_DW; padding never read)
    do_ptrs,  # out: tuple of KB pointers to dL/do_k (written only when HAS_DO; padding never written)
    p_w,  # in: K weights, accumulation dtype
    p_dw,  # out: K sums of g * o_k, accumulation dtype (HAS_DW)
    p_part,  # scratch: [programs, KB] partial sums, accumulation dtype (HAS_DW, more than one program)
    p_count,  # scratch: int32 arrival counter, 0 before the launch and after it (idem)
    N_FULL,
    TAIL,
    K,
    HAS_DO: tl.constexpr,
    HAS_DW: tl.constexpr,
    KB: tl.constexpr,
    VEC: tl.constexpr,
    ROWS: tl.constexpr,
    SUM_ROWS: tl.constexpr,
):
    """do_k = w[k] * g and dw[k] = sum(g * o_k) for every k < K, reading g and each o_k once."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    ws = ()
    for k in tl.static_range(KB):
        if k <= KB // 2:
            ws = ws + (tl.load(p_w + k),)
        else:
            ws = ws + (tl.load(p_w + k, mask=k < K, other=0.0),)
    # per-thread sums of g * o_k for every k, carried across the program's tiles
    b_part = tl.zeros([ROWS, KB], dtype=p_w.dtype.element_ty)
    for i in range(0, tl.cdiv(N_FULL + (TAIL > 0).to(tl.int32) - pid, programs)):
        tile = pid + i * programs  # tiles pid, pid + programs, ...: neighbours run at the same time
        start = tile.to(tl.int64) * (ROWS * VEC)  # widened before the multiply: tensors over 2^31 elements
        if tile < N_FULL:
            o_t = _tile_offsets(ROWS, VEC)
            b_part += _bwd_tile(p_g, o_ptrs, do_ptrs, ws, start, o_t, o_t < TAIL, K, HAS_DO, HAS_DW, KB, False)
        else:
            one = (TAIL > 0).to(tl.int32)  # 1 here; unknown to the compiler, see below
            for c in range(0, tl.cdiv(TAIL, ROWS)):  # the partial tile, ROWS elements at a time
                # element r to thread r % threads, as the rows of full tiles (b_part's layout): with
                # offsets it cannot prove contiguous, Triton gives each thread one element per run
                # of `threads` rather than pairs, which would need a layout conversion per input
                o_t = (c * ROWS + tl.arange(0, ROWS)) * one
                b_part += _bwd_tile(p_g, o_ptrs, do_ptrs, ws, start, o_t, o_t < TAIL, K, HAS_DO, HAS_DW, KB, True)
    if HAS_DW:
        b_dw = tl.sum(b_part, axis=0)  # the program's one reduction across its threads
        o_k = tl.arange(0, KB)
        if programs == 1:
            tl.store(p_dw + o_k, b_dw, mask=o_k < K)
        else:
            tl.store(p_part + pid * KB + o_k, b_dw)
            tl.debug_barrier()  # the whole row stored before this program is counted as arrived
            arrived = tl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu")
            if arrived == programs - 1:  # the last program: add the rows in index order
                o_r = tl.arange(0, SUM_ROWS)
                b_sum = tl.zeros([SUM_ROWS, KB], dtype=p_w.dtype.element_ty)
                for r0 in range(0, programs, SUM_ROWS):
                    p_rows = p_part + (r0 + o_r)[:, None] * KB + o_k[None, :]
                    b_sum += tl.load(p_rows, mask=(r0 + o_r)[:, None] < programs, other=0.0, cache_modifier=".cg")
                tl.store(p_dw + o_k, tl.sum(b_sum, axis=0), mask=o_k < K)
                tl.store(p_count, 0)  # ready for the next launch on this stream


KERNELS = (_mixed_sum_fwd_kernel, _mixed_sum_bwd_kernel)
_FORWARD, _BACKWARD = 0, 1  # indices into KERNELS


# --------------------------------------------------------------------------- configurations


class LaunchConfig(NamedTuple):
    """Tile shape and warps of one kernel variant."""

    rows_per_thread: int  # 16-byte vectors per thread per input in a full tile
    num_warps: int

    def rows(self) -> int:
        return 32 * self.num_warps * self.rows_per_thread


def launch_config(form: str, kb: int, dtype: torch.dtype) -> LaunchConfig:
    """The configuration of a launch: a function of the kernel form (``"forward"`` or
    ``"backward"``), the K bucket and the inputs' dtype only. Nothing is timed, so results are the
    same in every process.

    Four warps; a tile gives each thread two 16-byte vectors of every input up to K bucket 8 (one
    beyond, where the K inputs' vectors alone take 64-128 registers), except the 16-bit backward
    at bucket 8, where ptxas spilled with two. Compiled for sm_80 and sm_90, every variant keeps 4
    to 17 of a tile's loads in flight, below 256 registers, without spilling
    (``tests/test_triton_compiled.py``)."""
    if form == "forward":
        return LaunchConfig(rows_per_thread=2 if kb <= 8 else 1, num_warps=4)
    if form == "backward":
        two = kb <= 4 or (kb == 8 and dtype.itemsize >= 4)
        return LaunchConfig(rows_per_thread=2 if two else 1, num_warps=4)
    raise ValueError(f"unknown kernel form {form!r}")


def _bucket(k: int) -> int:
    """The compiled K bucket for a chunk of ``k`` inputs: the next power of two."""
    return 1 << (k - 1).bit_length()


def _chunks(k: int, max_bucket: int) -> list[tuple[int, int]]:
    """``(first index, length)`` of each launch: chunks of at most ``max_bucket`` inputs."""
    return [(k0, min(max_bucket, k - k0)) for k0 in range(0, k, max_bucket)]


class _Plan(NamedTuple):
    """What a launch derives from (form, chunk length, dtype)."""

    kb: int
    vec: int  # elements per 16-byte vector
    rows: int
    block: int  # elements per tile
    num_warps: int


@functools.cache
def _plan(form: str, k: int, dtype: torch.dtype) -> _Plan:
    kb = _bucket(k)
    config = launch_config(form, kb, dtype)
    vec = _VECTOR_BYTES // dtype.itemsize
    return _Plan(kb, vec, config.rows(), config.rows() * vec, config.num_warps)


class Variant(NamedTuple):
    """One compiled kernel the launchers can pick (besides the 16-byte alignment of each pointer)."""

    form: str  # "forward" or "backward"
    dtype: torch.dtype  # the inputs'
    kb: int  # K bucket
    out_dtype: torch.dtype | None = None  # forward: y's (the inputs', or the accumulation dtype)
    has_do: bool = False  # backward: writes dL/do_k
    has_dw: bool = False  # backward: computes dL/dw


def launch_variants() -> list[Variant]:
    """Every kernel variant :func:`mixed_sum_forward` and :func:`mixed_sum_backward` can launch."""
    variants = []
    for dtype in SUPPORTED_DTYPES:
        acc = accumulation_dtype(dtype)
        variants += [Variant("forward", dtype, 1 << i, dtype) for i in range(MAX_BUCKET_FORWARD.bit_length())]
        if acc != dtype:  # a chunk before the last writes the running sum in the accumulation dtype
            variants.append(Variant("forward", dtype, MAX_BUCKET_FORWARD, acc))
        for has_do, has_dw in ((True, True), (False, True), (True, False)):
            for i in range(MAX_BUCKET_BACKWARD.bit_length()):
                variants.append(Variant("backward", dtype, 1 << i, has_do=has_do, has_dw=has_dw))
    return variants


# --------------------------------------------------------------------------- launching


def interpreted() -> bool:
    """True when Triton runs these kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_mixed_sum_fwd_kernel, triton.runtime.JITFunction)


_LAUNCHER = Launcher(KERNELS)


def _launch(which: int, grid: int, args: tuple, key: tuple, num_warps: int, device: int) -> None:
    """Launch ``KERNELS[which]`` through :class:`fastnas.kernels.launch.Launcher`. ``key`` holds the
    constexprs, the dtypes and the 16-byte alignment of every pointer (the integer arguments are
    never specialised and always int32)."""
    _LAUNCHER(which, grid, args, key, num_warps, device)


def variant_of(key: tuple) -> Variant:
    """The :class:`Variant` of a key of ``_LAUNCHER.compiled`` (made by :func:`_forward_launch` and
    :func:`_backward_launch`)."""
    which, _, k, *rest = key
    if which == _FORWARD:
        out_dtype, dtype = rest[0], rest[1]
        return Variant("forward", dtype, _bucket(k), out_dtype)
    dtype, has_do, has_dw = rest[0], rest[1], rest[2]
    return Variant("backward", dtype, _bucket(k), has_do=has_do, has_dw=has_dw)


class _Workspace(NamedTuple):
    partials: Tensor  # rows of KB partial sums, accumulation dtype
    counter: Tensor  # int32 arrival counter, zero between launches


_workspaces: dict[tuple, _Workspace] = {}
"""(device index, stream, dtype) -> scratch of the backward. Launches on one stream run in order,
so they can share it; the counter is reset by the kernel that used it."""


def _workspace(device: int, dtype: torch.dtype, numel: int) -> _Workspace:
    """The backward's scratch on CUDA device ``device`` (-1: CPU) for the current stream."""
    key = (device, driver.active.get_current_stream(device) if device >= 0 else 0, dtype)
    ws = _workspaces.get(key)
    if ws is None or ws.partials.numel() < numel:
        where = torch.device("cuda", device) if device >= 0 else torch.device("cpu")
        counter = ws.counter if ws is not None else torch.zeros(1, dtype=torch.int32, device=where)
        ws = _workspaces[key] = _Workspace(torch.empty(max(numel, 1024), dtype=dtype, device=where), counter)
    return ws


def _forward_launch(y: Tensor, acc_in: Tensor | None, outputs: Sequence[Tensor], weights: Tensor, device: int) -> None:
    """``y = acc_in + sum_k weights[k] * outputs[k]`` for one chunk (at most MAX_BUCKET_FORWARD inputs)."""
    k, dtype = len(outputs), outputs[0].dtype
    plan = _plan("forward", k, dtype)
    n_full, tail = divmod(y.numel(), plan.block)
    padded = (*outputs, *(outputs[0],) * (plan.kb - k))
    # without acc_in, p_acc is the weights (never read); y and acc_in are fresh allocations: aligned
    args = (y, weights if acc_in is None else acc_in, padded, weights, n_full, tail, k, int(acc_in is not None))
    key = (k, y.dtype, dtype, acc_in is None, alignment((weights, *outputs)))
    meta = (plan.kb, plan.vec, plan.rows)
    _launch(_FORWARD, n_full + (tail > 0), (*args, *meta), key, plan.num_warps, device)


def _backward_launch(
    grad: Tensor,
    outputs: Sequence[Tensor],
    outputs_grad: Sequence[Tensor],
    weights: Tensor,
    weights_grad: Tensor,
    device: int,
) -> None:
    """One chunk of the backward (at most MAX_BUCKET_BACKWARD inputs): fills ``outputs_grad`` (if
    any) and ``weights_grad`` with ``sum(grad * outputs[k])`` (if ``outputs`` is not empty)."""
    k, dtype = weights.shape[0], grad.dtype
    plan = _plan("backward", k, dtype)
    n_full, tail = divmod(grad.numel(), plan.block)
    programs = min(n_full + (tail > 0), MAX_PROGRAMS)
    has_dw, has_do = len(outputs) > 0, len(outputs_grad) > 0
    partials = counter = weights  # never touched by a single program, or without dL/dw
    if has_dw and programs > 1:
        partials, counter = _workspace(device, weights.dtype, programs * plan.kb)
    padded_o = (*outputs, *(grad,) * (plan.kb - len(outputs)))
    padded_do = (*outputs_grad, *(grad,) * (plan.kb - len(outputs_grad)))
    args = (grad, padded_o, padded_do, weights, weights_grad, partials, counter, n_full, tail, k)
    # outputs_grad, weights_grad (or a slice of it at a multiple of 16 elements) and the workspace
    # are fresh allocations: aligned
    key = (k, dtype, has_do, has_dw, programs > 1, alignment((grad, weights, *outputs)))
    meta = (has_do, has_dw, plan.kb, plan.vec, plan.rows, SUM_ROWS)
    _launch(_BACKWARD, programs, (*args, *meta), key, plan.num_warps, device)


# --------------------------------------------------------------------------- entry points


def _on_device(index: int, fn: Callable, *args):
    """``fn(*args)`` with CUDA device ``index`` current: Triton launches on the current device."""
    with torch.cuda.device(index):
        return fn(*args)


def _forward(outputs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """:func:`mixed_sum_forward` for inputs the op layer validated: no checks."""
    y = torch.empty_like(outputs[0])
    if y.numel() == 0:
        return y
    device = y.get_device()
    if device >= 0 and device != torch.cuda.current_device():
        return _on_device(device, _forward, outputs, weights)
    k = len(outputs)
    if k <= MAX_BUCKET_FORWARD:
        _forward_launch(y, None, outputs, weights, device)
        return y
    # running sums in the accumulation dtype: in y itself when it has that dtype
    acc = y if y.dtype == weights.dtype else torch.empty_like(y, dtype=weights.dtype)
    chunks = _chunks(k, MAX_BUCKET_FORWARD)
    for i, (k0, kc) in enumerate(chunks):
        dst = y if i == len(chunks) - 1 else acc
        _forward_launch(dst, acc if i > 0 else None, outputs[k0 : k0 + kc], weights[k0 : k0 + kc], device)
    return y


def _backward(
    grad: Tensor, outputs: Sequence[Tensor], weights: Tensor, compute_outputs_grad: bool
) -> tuple[list[Tensor], Tensor]:
    """:func:`mixed_sum_backward` for inputs the op layer validated. Only ``grad`` is checked (its
    device and dtype), which a direct call of the backward op can get wrong."""
    if grad.device != weights.device or grad.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"grad must be a floating-point tensor on {weights.device}, got {grad.dtype} on {grad.device}")
    k = weights.shape[0]
    outputs_grad = [torch.empty_like(grad) for _ in range(k)] if compute_outputs_grad else []
    if not outputs and not compute_outputs_grad:
        return outputs_grad, weights.new_empty(0)
    if grad.numel() == 0:
        return outputs_grad, (torch.zeros_like(weights) if outputs else weights.new_empty(0))
    weights_grad = torch.empty_like(weights) if outputs else weights.new_empty(0)
    device = grad.get_device()
    if device >= 0 and device != torch.cuda.current_device():
        return _on_device(device, _backward_launches, grad, outputs, outputs_grad, weights, weights_grad, device)
    return _backward_launches(grad, outputs, outputs_grad, weights, weights_grad, device)


def _backward_launches(grad, outputs, outputs_grad, weights, weights_grad, device: int):
    k = weights.shape[0]
    if k <= MAX_BUCKET_BACKWARD:
        _backward_launch(grad, outputs, outputs_grad, weights, weights_grad, device)
        return outputs_grad, weights_grad
    for k0, kc in _chunks(k, MAX_BUCKET_BACKWARD):
        chunk = slice(k0, k0 + kc)
        dw = weights_grad[chunk] if outputs else weights_grad
        _backward_launch(grad, outputs[chunk], outputs_grad[chunk], weights[chunk], dw, device)
    return outputs_grad, weights_grad


VALIDATED = (_forward, _backward)
"""The (forward, backward) the op layer calls (``fastnas.ops.mixed_sum.kernels_for``), having already
checked the inputs and brought them to one layout: :func:`mixed_sum_forward` and :func:`mixed_sum_backward`
without their checks (a call's host time matters; see
``host_overhead_probe`` of ``tools/triton_offline.py``)."""


def _cpu_tensors_allowed() -> bool:
    """CPU tensors run in the interpreter, or compile-only under the offline driver of tools/triton_offline.py."""
    return _LAUNCHER.interpreted or type(driver.active).__name__ == "OfflineDriver"


def _check(grad: Tensor | None, outputs: Sequence[Tensor], weights: Tensor, op: str) -> None:
    """The native contract: raise (naming the argument) rather than read out of bounds."""
    tensors = [grad, *outputs] if grad is not None else list(outputs)

    def name(i: int) -> str:
        return "grad" if grad is not None and i == 0 else f"outputs[{i - (grad is not None)}]"

    first = tensors[0]
    if not isinstance(first, Tensor) or first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name(0)} must be a float16/bfloat16/float32/float64 tensor")
    if not (first.is_contiguous() or is_dense(first)):
        raise ValueError(f"{op}: {name(0)} must be dense (non-overlapping, no gaps), got strides {first.stride()}")
    device, dtype, shape, stride = first.device, first.dtype, first.shape, first.stride()
    if device.type != "cuda" and not _cpu_tensors_allowed():
        raise RuntimeError(f"{op}: the triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    for i in range(1, len(tensors)):
        t = tensors[i]
        if not isinstance(t, Tensor) or t.dtype != dtype or t.device != device:
            raise TypeError(f"{op}: {name(i)} must be a {dtype} tensor on {device} like {name(0)}")
        if t.shape != shape or (t.stride() != stride and layout_key(t) != layout_key(first)):
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
    if first.numel() > _INT32_MAX * 256:  # tiles are counted in int32 (a tile holds 256 elements or more)
        raise ValueError(f"{op}: {first.numel()} elements are more than the kernels index")


def mixed_sum_forward(outputs: list[Tensor], weights: Tensor) -> Tensor:
    """``y = sum_k weights[k] * outputs[k]`` in one pass over memory (per chunk of MAX_BUCKET_FORWARD inputs).

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
    return _forward(outputs, weights)


def mixed_sum_backward(
    grad: Tensor, outputs: list[Tensor], weights: Tensor, compute_outputs_grad: bool
) -> tuple[list[Tensor], Tensor]:
    """Gradients of the mixed sum in one pass over memory (per chunk of MAX_BUCKET_BACKWARD inputs).

    Args:
        grad: ``dL/dy``, dense, in the outputs' dtype, shape and strides.
        outputs: the K inputs ``o_k`` (like ``grad``), or an empty list when ``dL/dw`` is not needed.
        weights: ``[K]``, contiguous, float32 (float64 for float64 inputs).
        compute_outputs_grad: whether to return ``dL/do_k``.

    Returns:
        ``(outputs_grad, weights_grad)``: ``outputs_grad[k] = weights[k] * grad`` as K new tensors laid
        out like ``grad`` (``[]`` when ``compute_outputs_grad`` is False) and ``weights_grad[k] =
        sum(grad * outputs[k])`` in the weights' dtype (an empty tensor when ``outputs`` is empty).
        The sums are reduced in an order fixed by (numel, K, dtype): every call, in every process,
        gives the same bits.
    """
    if not isinstance(outputs, (list, tuple)):
        raise TypeError("mixed_sum_backward: outputs must be a list of tensors (possibly empty)")
    _check(grad, outputs, weights, "mixed_sum_backward")
    return _backward(grad, outputs, weights, compute_outputs_grad)
