"""Triton kernels of the supernets' lean BatchNorm on CUDA (``fastnas.ops.batch_norm``): training-mode
BatchNorm without affine parameters of ``x`` ``[B, C, H, W]`` (NCHW, contiguous: the layout the
supernets run CUDA tensors in), whose ``C = parts * c`` channels are ``parts`` blocks of ``c``, each
written as its own dense ``[B, c, H, W]`` tensor (a block goes to its own mixed sum).

What PyTorch's kernels need for the same result: the BatchNorm kernel(s), a copy splitting the output
into blocks, the running-statistics update, and in the backward two copies merging the blocks'
gradients and outputs back and the BatchNorm backward kernel. Here:

* **Forward: one launch.** One program per channel: a pass summing ``x - shift`` and its square
  (``shift``: the channel's first element, so that the variance does not cancel), then the running
  statistics (``F.batch_norm``'s update: unbiased variance, ``momentum``), then a pass writing
  ``(x - mean) * invstd`` into the channel's block.
* **Backward: one launch.** One program per channel: a pass summing ``g`` and ``g * y`` (``y`` the
  forward's output: ``dx = invstd * (g - mean(g) - y * mean(g * y))``), a pass writing ``dx``. The
  blocks' gradients and outputs arrive as tuples of pointers (padded to a bucket ``PB``, the next
  power of two, up to :data:`MAX_PARTS`; more parts run in chunks), from which each program selects
  its own block's: no merging copy.
* **Tiles** are ``[BB, BHW]``: ``BHW`` consecutive elements of one image's channel plane (a power of
  two up to the tile, so small planes do not leave most lanes masked) by ``BB`` images; 4096
  elements per tile (:data:`TILE_ELEMENTS`; 2048 for float64, 1024 on planes that are not a multiple
  of 16), so that each thread keeps 8 16-byte loads per tensor in flight (4 for 16-bit types): a
  program streams its channel alone.
* **Deterministic.** Each channel's sums are accumulated per lane in a fixed order, in float32
  (float64 for float64 inputs), and reduced by one tree: the bits depend only on the shape. No
  atomics.
* **Offsets** are int64: tensors over 2^31 elements.
* **Host path.** After a specialisation's first call, launches call the compiled kernel's launcher
  directly (``kernels/launch.py``, shared with the mixed sum), keyed on what Triton specialises on
  (dtypes, 16-byte alignment of every pointer, the plane size's divisibility by 16, constexprs).

One program per channel leaves SMs idle when ``C`` is small, and each program streams its channel
twice: a trade for launches, expected to bound a GPU step at the supernets' sizes (``B * H * W`` =
4K-64K elements per channel), where one launch each way replaces the native path's four or five operators
(BatchNorm, split copy, two merging stacks, BatchNorm backward, its constants). Stats are returned
in float32 for 16-bit inputs (float64 for float64), as PyTorch's CUDA BatchNorm does.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from typing import Sequence

import torch
import triton
import triton.language as tl
from fastnas.kernels.launch import Launcher, alignment
from torch import Tensor

from fastnas.contract import FLOAT_DTYPES as SUPPORTED_DTYPES
from fastnas.contract import accumulation_dtype

__all__ = [
    "batch_norm_parts",
    "batch_norm_parts_backward",
    "launch_variants",
    "compile_variant",
    "MAX_PARTS",
    "TILE_ELEMENTS",
    "SCALAR_TILE_ELEMENTS",
    "NUM_WARPS",
    "block",
    "SUPPORTED_DTYPES",
    "KERNELS",
]

MAX_PARTS = 16
"""Most blocks per backward launch (the tuple bucket); more run in chunks of blocks."""
TILE_ELEMENTS = 4096
"""Elements per tile when the plane size is a multiple of 16 (16-byte accesses; half as many for
float64): 32 per thread at :data:`NUM_WARPS` warps, so that each thread keeps 8 (float32, float64)
or 4 (16-bit) 16-byte loads of a tensor in flight, all issued before the first is used. A program
streams its channel alone, so these are all it has in flight: 1024-element tiles would keep 4 KB in
flight per SM, a few GB/s at DRAM latency by Little's law."""
SCALAR_TILE_ELEMENTS = 1024
"""Elements per tile on other planes (scalar accesses: larger tiles spill)."""
NUM_WARPS = 4


@triton.jit
def _channel_tile(b0, hw0, B, HW, BB: tl.constexpr, BHW: tl.constexpr):
    """Image and in-plane offsets ``[BB, BHW]`` of a tile, and its mask."""
    b = b0 + tl.arange(0, BB)[:, None]
    hw = hw0 + tl.arange(0, BHW)[None, :]
    return b.to(tl.int64), hw, (b < B) & (hw < HW)


@triton.jit
def _channel_sums(p_a, p_b, image_stride, shift, B, HW, ACC: tl.constexpr, SQUARES: tl.constexpr, BB: tl.constexpr,
                  BHW: tl.constexpr):  # fmt: skip
    """Over one channel's ``B x HW`` values (image ``i`` at ``p_a + i * image_stride``), in ``ACC``,
    per lane in a fixed order, then one tree: the forward's ``sum(a - shift)`` and ``sum((a - shift)^2)``
    (``SQUARES``), or the backward's ``sum(a)`` and ``sum(a * b)``."""
    s1 = tl.zeros([BB, BHW], dtype=ACC)
    s2 = tl.zeros([BB, BHW], dtype=ACC)
    for b0 in range(0, B, BB):
        for hw0 in range(0, HW, BHW):
            b, hw, m = _channel_tile(b0, hw0, B, HW, BB, BHW)
            a = tl.load(p_a + b * image_stride + hw, mask=m, other=0.0).to(ACC)
            if SQUARES:
                d = tl.where(m, a - shift, 0.0)
                s1 += d
                s2 += d * d
            else:
                s1 += a
                s2 += a * tl.load(p_b + b * image_stride + hw, mask=m, other=0.0).to(ACC)
    return tl.sum(tl.sum(s1, 1), 0), tl.sum(tl.sum(s2, 1), 0)


@triton.jit(
    do_not_specialize=["B", "C", "c", "momentum_hi", "momentum_lo", "eps_hi", "eps_lo"]
)  # HW: 16-divisible planes get vector accesses
def _bn_parts_fwd_kernel(
    p_x,  # in: [B, C, HW]
    p_out,  # out: [C // c, B, c, HW], block-major
    p_mean,  # out: [C], stats dtype
    p_invstd,  # out: [C], stats dtype
    p_rm,  # in/out: running mean [C] (read only when HAS_RUNNING)
    p_rv,  # in/out: running variance [C]
    B,
    C,
    HW,
    c,  # channels per block
    momentum_hi,  # float scalars reach a compiled kernel as float32: each as two float32 halves,
    momentum_lo,  # whose sum in float64 is the float64 value (float64 inputs keep all of it)
    eps_hi,
    eps_lo,
    HAS_RUNNING: tl.constexpr,
    BB: tl.constexpr,
    BHW: tl.constexpr,
):
    ch = tl.program_id(0)
    acc_ty = p_mean.dtype.element_ty
    momentum = tl.cast(momentum_hi, acc_ty) + tl.cast(momentum_lo, acc_ty)
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)
    plane = C.to(tl.int64) * HW  # elements of one image
    p_xc = p_x + ch.to(tl.int64) * HW
    shift = tl.load(p_xc).to(acc_ty)
    s, q = _channel_sums(p_xc, p_xc, plane, shift, B, HW, acc_ty, True, BB, BHW)
    n = B * HW
    mean_shifted = s / n
    var = tl.maximum(q / n - mean_shifted * mean_shifted, 0.0)
    mean = shift + mean_shifted
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(p_mean + ch, mean)
    tl.store(p_invstd + ch, invstd)
    if HAS_RUNNING:
        run_ty = p_rm.dtype.element_ty
        rm = tl.load(p_rm + ch).to(acc_ty)
        rv = tl.load(p_rv + ch).to(acc_ty)
        tl.store(p_rm + ch, ((1.0 - momentum) * rm + momentum * mean).to(run_ty))
        tl.store(p_rv + ch, ((1.0 - momentum) * rv + momentum * var * n / (n - 1)).to(run_ty))
    part = ch // c
    p_yc = p_out + (part.to(tl.int64) * B * c + (ch - part * c)) * HW  # the channel in its block
    block_plane = c.to(tl.int64) * HW
    for b0 in range(0, B, BB):
        for hw0 in range(0, HW, BHW):
            b, hw, m = _channel_tile(b0, hw0, B, HW, BB, BHW)
            v = tl.load(p_xc + b * plane + hw, mask=m, other=0.0).to(acc_ty)
            tl.store(p_yc + b * block_plane + hw, ((v - mean) * invstd).to(p_out.dtype.element_ty), mask=m)


@triton.jit
def _select(ptrs, j, PB: tl.constexpr):
    """``ptrs[j]`` for a runtime ``j < PB`` (a chain of selects, no branch)."""
    p = ptrs[0]
    for i in tl.static_range(1, PB):
        p = tl.where(j == i, ptrs[i], p)
    return p


@triton.jit(do_not_specialize=["B", "C", "c", "first"])
def _bn_parts_bwd_kernel(
    g_ptrs,  # in: tuple of PB pointers, block i's gradient [B, c, HW] (entries past the chunk: padding)
    y_ptrs,  # in: tuple of PB pointers, block i's output [B, c, HW]
    p_invstd,  # in: [C], stats dtype
    p_dx,  # out: [B, C, HW]
    B,
    C,
    HW,
    c,
    first,  # the chunk's first block
    PB: tl.constexpr,
    BB: tl.constexpr,
    BHW: tl.constexpr,
):
    local = tl.program_id(0)  # channel within the chunk
    acc_ty = p_invstd.dtype.element_ty
    part = local // c
    offset = (local - part * c).to(tl.int64) * HW  # the channel within its block
    p_g = _select(g_ptrs, part, PB) + offset
    p_y = _select(y_ptrs, part, PB) + offset
    block_plane = c.to(tl.int64) * HW
    sg, sgy = _channel_sums(p_g, p_y, block_plane, 0.0, B, HW, acc_ty, False, BB, BHW)
    n = B * HW
    mean_g = sg / n
    mean_gy = sgy / n
    ch = first * c + local
    invstd = tl.load(p_invstd + ch)
    plane = C.to(tl.int64) * HW
    p_dxc = p_dx + ch.to(tl.int64) * HW
    for b0 in range(0, B, BB):
        for hw0 in range(0, HW, BHW):
            b, hw, m = _channel_tile(b0, hw0, B, HW, BB, BHW)
            g = tl.load(p_g + b * block_plane + hw, mask=m, other=0.0).to(acc_ty)
            y = tl.load(p_y + b * block_plane + hw, mask=m, other=0.0).to(acc_ty)
            dx = invstd * (g - mean_g - y * mean_gy)
            tl.store(p_dxc + b * plane + hw, dx.to(p_dx.dtype.element_ty), mask=m)


KERNELS = (_bn_parts_fwd_kernel, _bn_parts_bwd_kernel)
_FORWARD, _BACKWARD = 0, 1  # indices into KERNELS
_LAUNCHER = Launcher(KERNELS)
"""After a specialisation's first call, launches call the compiled kernel's launcher directly
(``kernels/launch.py``)."""


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def block(hw: int, dtype: torch.dtype) -> int:
    """Elements per tile on planes of ``hw`` elements of ``dtype``."""
    if hw % 16:
        return SCALAR_TILE_ELEMENTS
    return TILE_ELEMENTS // 2 if dtype == torch.float64 else TILE_ELEMENTS


@functools.lru_cache(maxsize=256)
def tile_shape(hw: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BB, BHW)``: a tile of :func:`block` elements, ``BHW`` the channel plane's size rounded up to a
    power of two (at most the tile)."""
    elements = block(hw, dtype)
    bhw = min(elements, _next_power_of_2(hw))
    return elements // bhw, bhw


def bucket(parts: int) -> int:
    """The tuple bucket of a backward launch over ``parts`` blocks (at most :data:`MAX_PARTS`)."""
    return _next_power_of_2(min(parts, MAX_PARTS))


def _device_guard(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device); nothing for CPU tensors (the
    interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_input(x: Tensor, parts: int, running_mean: Tensor | None, running_var: Tensor | None) -> None:
    """Named errors for what the kernels cannot take (the op layer routes everything else elsewhere)."""
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (NCHW) 4-D tensor, got shape {tuple(x.shape)}, strides {x.stride()}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    B, C, H, W = x.shape
    if not isinstance(parts, int) or parts < 1 or C % parts:
        raise ValueError(f"parts must be a positive divisor of x's {C} channels, got {parts!r}")
    if B * H * W >= 2**31:  # the kernels count a channel's values in int32
        raise ValueError(f"x has {B * H * W} values per channel; at most 2^31 - 1 are supported")
    if B * H * W < 2:
        raise ValueError(
            f"BatchNorm in training mode needs more than 1 value per channel, got x of shape {tuple(x.shape)}"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (
            t.shape != (C,) or not t.is_contiguous() or t.device != x.device or not t.is_floating_point()
        ):
            raise ValueError(
                f"{name} must be a contiguous floating-point [{C}] tensor on {x.device}, got {t.dtype} "
                f"{tuple(t.shape)} on {t.device}"
            )


@functools.lru_cache(maxsize=64)  # a network has a handful of momentum and eps values
def _float32_halves(value: float) -> tuple[float, float]:
    """``(hi, lo)``, both float32 values, ``hi + lo == value`` to float64 precision."""
    hi = _to_float32(value)
    return hi, _to_float32(float(value) - hi)


def _to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _plane_key(hw: int) -> tuple[bool, bool]:
    """How Triton specialises the plane size ``HW`` (the one integer argument it specialises)."""
    return hw % 16 == 0, hw == 1


def _device_index(t: Tensor) -> int:
    return t.device.index if t.is_cuda else -1


def _launch(which: int, grid: int, args: tuple, key: tuple, num_warps: int, device: int):
    """Launch ``KERNELS[which]`` through :data:`_LAUNCHER` (its own name, so that
    ``tests/triton_launch_keys.py`` can record the launches instead)."""
    return _LAUNCHER(which, grid, args, key, num_warps, device)


def _launch_forward(x, out, mean, invstd, running_mean, running_var, momentum, eps):
    """One forward launch; returns the compiled kernel (None when interpreted)."""
    B, C, H, W = x.shape
    hw = H * W
    has_running = running_mean is not None
    rm = running_mean if has_running else mean  # never read
    rv = running_var if has_running else invstd
    bb, bhw = tile_shape(hw, x.dtype)
    pointers = (x, out, mean, invstd, rm, rv)
    args = (*pointers, B, C, hw, C // out.shape[0], *_float32_halves(momentum), *_float32_halves(eps))
    key = (*(t.dtype for t in pointers), has_running, *_plane_key(hw), alignment(pointers), bb, bhw)
    return _launch(_FORWARD, C, (*args, has_running, bb, bhw), key, NUM_WARPS, _device_index(x))


def _launch_backward(grads, outputs, invstd, dx, first: int):
    """The backward launch of the chunk of blocks starting at ``first``; returns the compiled kernel
    (None when interpreted)."""
    B, c, H, W = outputs[0].shape
    hw = H * W
    chunk = min(MAX_PARTS, len(outputs) - first)
    pb = bucket(chunk)
    pad = pb - chunk  # padding repeats the chunk's first block, never read
    g = tuple(grads[first : first + chunk]) + (grads[first],) * pad
    y = tuple(outputs[first : first + chunk]) + (outputs[first],) * pad
    bb, bhw = tile_shape(hw, dx.dtype)
    args = (g, y, invstd, dx, B, dx.shape[1], hw, c, first, pb, bb, bhw)
    key = (dx.dtype, invstd.dtype, *_plane_key(hw), alignment((*g, *y, invstd, dx)), pb, bb, bhw)
    return _launch(_BACKWARD, chunk * c, args, key, NUM_WARPS, _device_index(dx))


def batch_norm_parts(
    x: Tensor, parts: int, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, mean, invstd)``: ``out`` ``[parts, B, C / parts, H, W]``, block ``p`` the normalised
    channels ``p * c ... (p + 1) * c - 1``; running statistics updated in place when given."""
    check_input(x, parts, running_mean, running_var)
    B, C, H, W = x.shape
    c = C // parts
    out = torch.empty((parts, B, c, H, W), dtype=x.dtype, device=x.device)
    mean = torch.empty(C, dtype=accumulation_dtype(x.dtype), device=x.device)
    invstd = torch.empty_like(mean)
    with _device_guard(x):
        _launch_forward(x, out, mean, invstd, running_mean, running_var, momentum, eps)
    return out, mean, invstd


def batch_norm_parts_backward(grads: Sequence[Tensor | None], outputs: Sequence[Tensor], invstd: Tensor) -> Tensor:
    """``dx`` ``[B, C, H, W]`` (contiguous) from the blocks' gradients (None: a block nobody used, zero;
    any layout, made dense) and outputs (each ``[B, c, H, W]``, contiguous) and the forward's
    ``invstd``: the op's contract (``Tensor?[] grads``)."""
    parts = len(outputs)
    if parts == 0 or len(grads) != parts:
        raise ValueError(f"grads and outputs must be non-empty and of one length, got {len(grads)} and {parts}")
    grads = [torch.zeros_like(y) if g is None else g.contiguous() for g, y in zip(grads, outputs)]
    B, c, H, W = outputs[0].shape
    C = c * parts
    for name, ts in (("grads", grads), ("outputs", outputs)):
        for i, t in enumerate(ts):
            if t.shape != outputs[0].shape or not t.is_contiguous() or t.dtype != outputs[0].dtype:
                raise ValueError(
                    f"{name}[{i}] must be a contiguous {outputs[0].dtype} tensor of shape {tuple(outputs[0].shape)}, "
                    f"got {t.dtype} {tuple(t.shape)} with strides {t.stride()}"
                )
            if t.device != outputs[0].device:
                raise ValueError(f"{name}[{i}] is on {t.device}, outputs[0] on {outputs[0].device}")
    if invstd.shape != (C,) or invstd.dtype != accumulation_dtype(outputs[0].dtype) or not invstd.is_contiguous():
        raise ValueError(
            f"invstd must be a contiguous {accumulation_dtype(outputs[0].dtype)} [{C}] tensor, "
            f"got {invstd.dtype} {tuple(invstd.shape)}"
        )
    dx = torch.empty((B, C, H, W), dtype=outputs[0].dtype, device=outputs[0].device)
    with _device_guard(dx):
        for first in range(0, parts, MAX_PARTS):
            _launch_backward(grads, outputs, invstd, dx, first)
    return dx


# --------------------------------------------------------------------------- compiled without a GPU


def launch_variants() -> list[tuple]:
    """What the launchers compile, one entry per kernel variant worth proving
    (``tools/triton_offline.py``): ``("forward", dtype, plane, has_running)`` and ``("backward", dtype,
    plane, blocks)``; a plane of 1024 elements (16-divisible: vector accesses) for every dtype and
    bucket, one of 49 (7x7: scalar accesses) for float32."""
    variants = []
    for dtype in SUPPORTED_DTYPES:
        variants += [("forward", dtype, 1024, True), ("forward", dtype, 1024, False)]
        variants += [("backward", dtype, 1024, blocks) for blocks in (1, 3, MAX_PARTS)]
    variants += [("forward", torch.float32, 49, True), ("backward", torch.float32, 49, 2)]
    return variants


def compile_variant(variant: tuple):
    """Launch ``variant`` on CPU tensors the way :func:`batch_norm_parts` and
    :func:`batch_norm_parts_backward` do, under an offline driver (``tools/triton_offline.py``), and
    return the compiled kernel."""
    form, dtype, plane, extra = variant
    B, c = 2, 4
    parts = extra if form == "backward" else 2
    x = torch.zeros(B, c * parts, plane, 1, dtype=dtype)
    stats = torch.zeros(c * parts, dtype=accumulation_dtype(dtype))
    if form == "forward":
        out = torch.zeros(parts, B, c, plane, 1, dtype=dtype)
        running = (stats.clone(), stats.clone()) if extra else (None, None)
        return _launch_forward(x, out, stats, stats.clone(), *running, 0.1, 1e-5)
    blocks = [torch.zeros(B, c, plane, 1, dtype=dtype) for _ in range(parts)]
    return _launch_backward(blocks, blocks, stats, x, 0)
