"""Tests of the native kernels of the mixed sum, above all the CUDA backend (``csrc/cuda/mixed_sum_cuda.cu``).

Every test is parametrized by device. ``cuda`` runs the CUDA kernels and needs a GPU and an extension
built with them (``FASTNAS_CUDA=1``, see the README); without either it is skipped with the reason.
``cpu`` runs the same checks on the CPU kernels (``csrc/cpu``), which share the native contract, so
the checks themselves are exercised on every machine. One test needs no GPU at all: when the CUDA
sources were compiled into ``fastnas._C``, both native ops must have a CUDA kernel and ``auto`` must
pick ``cuda`` for CUDA tensors, so a CPU-only CI run proves the CUDA build.

Results are checked against the float64 reference (``fastnas.ops.reference``) within a bound derived
from one rounding to the output dtype plus the accumulation dtype's summation error; ``d o_k = w_k g``
is one multiplication and must match the reference exactly. On CUDA the rounding order is a function of
the element index alone, so results must also be bit-identical across alignments, grid sizes, streams
and CUDA-graph replays.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, float64_oracle

import fastnas
from fastnas import backend
from fastnas.ops import reference

EXTENSION_REASON = backend.unavailable_reason("cpu")  # None when fastnas._C loads
if EXTENSION_REASON is None and not HAS_CUDA:
    CUDA_REASON = "no CUDA GPU is available"
elif EXTENSION_REASON is None:
    CUDA_REASON = backend.unavailable_reason("cuda", "cuda")
else:
    CUDA_REASON = EXTENSION_REASON

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(EXTENSION_REASON is not None, reason=str(EXTENSION_REASON))),
    pytest.param("cuda", marks=pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA backend: {CUDA_REASON}")),
]
CUDA_ONLY = [DEVICES[1]]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# 1, within one group of 8 inputs loaded together, several groups (DARTS nodes: up to 40), 112, and beyond
# the 128 inputs of one CUDA launch (129: two launches)
KS = [1, 3, 8, 9, 32, 33, 40, 70, 112, 129]
SHAPES = [(1023,), (3, 7, 33), (1,)]


def forward(outputs, weights):
    return torch.ops.fastnas._mixed_sum_forward(outputs, weights)


def backward(grad, outputs, weights, compute_outputs_grad: bool = True):
    return torch.ops.fastnas._mixed_sum_backward(grad, outputs, weights, compute_outputs_grad)


@pytest.fixture
def native_backend():
    """Route fastnas.mixed_sum to the native backend of the test's device."""

    def use(device: str) -> None:
        fastnas.set_backend(device)

    yield use
    fastnas.set_backend(None)


def make_inputs(shape, k: int, dtype: torch.dtype, device: str, seed: int, memory_format=torch.contiguous_format):
    """K random inputs, the weights (accumulation dtype, signed) and an upstream gradient, on device."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, dtype=dtype):
        return torch.randn(*size, generator=gen, dtype=torch.float32).to(dtype).to(device)

    outputs = [randn(*shape).contiguous(memory_format=memory_format) for _ in range(k)]
    weights = randn(k, dtype=reference.accumulation_dtype(dtype))
    grad = randn(*shape).contiguous(memory_format=memory_format)
    return outputs, weights, grad


def misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t whose data starts `offset` elements into its storage (so not 16-byte aligned)."""
    base = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = base[offset:].view(t.shape)
    view.copy_(t)
    return view


def stacked_slices(outputs: list, offset: int = 0) -> list:
    """The inputs as slices of one stacked tensor, `offset` elements into its storage: slice k starts
    k * numel + offset elements in, off the 16-byte grid whenever that is not a multiple of 16 bytes."""
    numel = outputs[0].numel()
    base = torch.empty(offset + len(outputs) * numel, dtype=outputs[0].dtype, device=outputs[0].device)
    stacked = base[offset:].view(len(outputs), *outputs[0].shape)
    for k, o in enumerate(outputs):
        stacked[k].copy_(o)
    return list(stacked.unbind(0))


@contextmanager
def cuda_grid_cap(blocks: int):
    """Cap the grid of every CUDA launch (0: no cap), then lift the cap."""
    torch.ops.fastnas._cuda_settings(blocks)
    try:
        yield
    finally:
        torch.ops.fastnas._cuda_settings(0)


def assert_same_bits(a: tuple, b: tuple, what: str) -> None:
    """(y, outputs_grad, weights_grad) of two calls agree bit for bit."""
    (y0, do0, dw0), (y1, do1, dw1) = a, b
    assert torch.equal(y0, y1), f"{what}: y differs"
    assert all(torch.equal(x, z) for x, z in zip(do0, do1)), f"{what}: outputs_grad differs"
    assert torch.equal(dw0, dw1), f"{what}: weights_grad differs: {dw0} vs {dw1}"


def native_call(outputs, weights, grad) -> tuple:
    y = forward(outputs, weights)
    outputs_grad, weights_grad = backward(grad, outputs, weights, True)
    return y, outputs_grad, weights_grad


def poison(device: str, like: torch.Tensor, count: int) -> None:
    """Leave `count` NaN-filled blocks of like's size in the CUDA caching allocator, so that results the
    kernels allocate next start as NaN and an unwritten element fails the comparison."""
    if device == "cuda":
        blocks = [torch.full_like(like, float("nan")) for _ in range(count)]
        del blocks


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|actual - expected| <= bound elementwise (NaN fails); the message names the worst element."""
    err = (actual.double() - expected.double()).abs().flatten()
    bound = bound.double().expand_as(expected).flatten() if torch.is_tensor(bound) else torch.full_like(err, bound)
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off; first at flat index {i}: "
            f"got {actual.flatten()[i].item():.6g}, expected {expected.flatten()[i].item():.6g}, "
            f"error {err[i].item():.3e} > bound {bound[i].item():.3e}"
        )


def tiny(dtype: torch.dtype) -> float:
    """Absolute rounding step near zero (flush-to-zero and subnormals)."""
    return torch.finfo(dtype).smallest_normal


def check_forward(y: torch.Tensor, outputs, y_exact, y_scale) -> None:
    dtype, k = outputs[0].dtype, len(outputs)
    eps_out = torch.finfo(dtype).eps
    eps_acc = torch.finfo(reference.accumulation_dtype(dtype)).eps
    assert y.dtype == dtype and y.shape == outputs[0].shape and y.stride() == outputs[0].stride()
    bound = eps_out * y_exact.abs() + (k + 1) * eps_acc * y_scale + tiny(dtype)
    assert_within(y, y_exact, bound, "y")


def check_weights_grad(weights_grad: torch.Tensor, grad: torch.Tensor, dw_exact, dw_scale) -> None:
    acc = reference.accumulation_dtype(grad.dtype)
    numel = grad.numel()
    assert weights_grad.dtype == acc and weights_grad.shape == dw_exact.shape
    assert weights_grad.device == grad.device
    # per-thread sums of a few elements, then trees over threads, warps and blocks
    c = 2 * math.ceil(math.log2(numel + 1)) + 8
    assert_within(weights_grad, dw_exact, c * torch.finfo(acc).eps * dw_scale + 1e-300, "weights_grad")


def check_outputs_grad(outputs_grad, grad: torch.Tensor, weights: torch.Tensor) -> None:
    """d o_k = w_k g: one product in the accumulation dtype, rounded once, so exactly the reference's."""
    expected, _ = reference.mixed_sum_backward_reference(grad, [], weights, True)
    assert len(outputs_grad) == weights.numel()
    for k, (d, e) in enumerate(zip(outputs_grad, expected)):
        assert d.dtype == grad.dtype and d.shape == grad.shape and d.stride() == grad.stride(), f"outputs_grad[{k}]"
        assert torch.equal(d, e), f"outputs_grad[{k}] differs from weights[{k}] * grad"


def check_native_call(outputs, weights, grad, call_outputs=None, call_grad=None, poisoned: bool = False):
    """Run the native forward and backward (with outputs grad) and check y, d o_k and d w against the
    float64 oracle of (outputs, weights, grad). The ops are called on call_outputs and call_grad when
    given: the same values at other addresses (misaligned copies). poisoned: NaN-fill the CUDA caching
    allocator before each op, so an unwritten result element fails. Returns y."""
    call_outputs = outputs if call_outputs is None else call_outputs
    call_grad = grad if call_grad is None else call_grad
    y_exact, _, dw_exact, y_scale, dw_scale = float64_oracle(outputs, weights, grad)
    if poisoned:
        poison(grad.device.type, grad, 1)
    y = forward(call_outputs, weights)
    check_forward(y, outputs, y_exact, y_scale)
    if poisoned:
        poison(grad.device.type, grad, len(outputs))
    outputs_grad, weights_grad = backward(call_grad, call_outputs, weights, True)
    check_outputs_grad(outputs_grad, grad, weights)
    check_weights_grad(weights_grad, grad, dw_exact, dw_scale)
    return y


# --------------------------------------------------------------------------- the CUDA build (no GPU needed)


def test_cuda_build_registers_cuda_kernels(monkeypatch):
    """If the CUDA sources were compiled into fastnas._C, both native ops have CUDA kernels and auto picks
    them for CUDA tensors. FASTNAS_CUDA=1 in the environment (as for the build) makes a missing CUDA build
    a failure instead of a skip."""
    if EXTENSION_REASON is not None:
        pytest.skip(EXTENSION_REASON)
    import fastnas._C

    compiled_cuda = b"__cudaRegisterFatBinary" in Path(fastnas._C.__file__).read_bytes()
    if not compiled_cuda:
        if os.environ.get("FASTNAS_CUDA", "").lower() in ("1", "true", "yes", "on"):
            pytest.fail(f"FASTNAS_CUDA is set but {fastnas._C.__file__} holds no CUDA code")
        pytest.skip("fastnas._C was built without the CUDA sources (build with FASTNAS_CUDA=1 to add them)")
    for op in (torch.ops.fastnas._mixed_sum_forward.default, torch.ops.fastnas._mixed_sum_backward.default):
        assert op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CUDA), f"{op} has no CUDA kernel"
    assert backend.extension_has_cuda()
    monkeypatch.delenv("FASTNAS_BACKEND", raising=False)
    fastnas.set_backend(None)
    assert fastnas.get_backend("cuda") == "cuda"
    assert "cuda" in fastnas.available_backends("cuda")


# --------------------------------------------------------------------------- kernels against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k", KS)
def test_forward_backward_match_reference(device, k, shape, dtype):
    outputs, weights, grad = make_inputs(shape, k, dtype, device, seed=1000 * k + len(shape))
    check_native_call(outputs, weights, grad, poisoned=True)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("k", [5, 40])
def test_several_grid_sweeps(device, k, dtype):
    """More elements than one sweep of the resident grid: the grid-stride loops and the partials."""
    outputs, weights, grad = make_inputs((2, 3, 515, 517), k, dtype, device, seed=k)
    check_native_call(outputs, weights, grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [3, 9, 33, 112])
def test_misaligned_inputs(device, k, dtype):
    """Inputs and grad an odd number of elements into their storage (the CUDA kernels read them with
    aligned 16-byte loads and shift the bytes into place). The per-element arithmetic does not depend on
    the alignment: on CUDA the results are bit-identical to those of aligned copies."""
    n = 1023
    outputs, weights, grad = make_inputs((n,), k, dtype, device, seed=k)
    shifted = [misaligned(o, 1 + 2 * (j % 3)) for j, o in enumerate(outputs)]  # odd offsets
    grad_shifted = misaligned(grad, 1)
    assert all(o.data_ptr() % 16 for o in shifted) and grad_shifted.data_ptr() % 16
    y = check_native_call(outputs, weights, grad, call_outputs=shifted, call_grad=grad_shifted)
    if device == "cuda":
        assert_same_bits(native_call(shifted, weights, grad_shifted), native_call(outputs, weights, grad), "misaligned")
    else:
        y_aligned = forward(outputs, weights)
        bound = 2 * torch.finfo(dtype).eps * y_aligned.abs().double() + tiny(dtype)
        assert_within(y, y_aligned, bound, "y against aligned inputs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_partly_aligned_inputs(device, dtype):
    """One misaligned input among aligned ones: the others keep one 16-byte load per vector on CUDA."""
    outputs, weights, grad = make_inputs((4099,), 6, dtype, device, seed=7)
    mixed = outputs[:3] + [misaligned(outputs[3], 1)] + outputs[4:]
    check_native_call(outputs, weights, grad, call_outputs=mixed)
    if device == "cuda":
        assert_same_bits(native_call(mixed, weights, grad), native_call(outputs, weights, grad), "one misaligned")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, offset", [((3, 7, 33), 0), ((3, 7, 33), 3), ((515,), 1), ((64, 16), 0)])
def test_slices_of_a_stacked_tensor(device, dtype, shape, offset):
    """``mixed_sum(stacked)`` reads stacked[k] where it lies: each slice starts k * numel elements in, so
    every alignment occurs when numel x element size is not a multiple of 16 bytes; grad misaligned too."""
    k = 9
    outputs, weights, grad = make_inputs(shape, k, dtype, device, seed=len(shape) + offset)
    slices = stacked_slices(outputs, offset)
    grad_shifted = misaligned(grad, offset) if offset else grad
    check_native_call(outputs, weights, grad, call_outputs=slices, call_grad=grad_shifted, poisoned=True)
    if device == "cuda":
        assert_same_bits(native_call(slices, weights, grad_shifted), native_call(outputs, weights, grad), "stacked")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [2, 33])
def test_channels_last(device, k, dtype):
    """Dense non-contiguous inputs are flat arrays in memory order; results keep their strides."""
    outputs, weights, grad = make_inputs((2, 6, 5, 7), k, dtype, device, seed=k, memory_format=torch.channels_last)
    assert not outputs[0].is_contiguous()
    y = check_native_call(outputs, weights, grad)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_variants(device, dtype):
    """Weights grad only; outputs grad only (inputs not kept); neither."""
    k = 4
    outputs, weights, grad = make_inputs((3, 7, 33), k, dtype, device, seed=3)
    _, _, dw_exact, _, dw_scale = float64_oracle(outputs, weights, grad)
    outputs_grad, weights_grad = backward(grad, outputs, weights, False)
    assert outputs_grad == []
    check_weights_grad(weights_grad, grad, dw_exact, dw_scale)
    outputs_grad, weights_grad = backward(grad, [], weights, True)
    check_outputs_grad(outputs_grad, grad, weights)
    assert weights_grad.numel() == 0 and weights_grad.device == grad.device
    outputs_grad, weights_grad = backward(grad, [], weights, False)
    assert outputs_grad == [] and weights_grad.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 40, 129])
def test_empty_tensors(device, k):
    outputs, weights, grad = make_inputs((0, 5), k, torch.float32, device, seed=0)
    y = forward(outputs, weights)
    assert y.shape == (0, 5) and y.device == outputs[0].device
    outputs_grad, weights_grad = backward(grad, outputs, weights, True)
    assert len(outputs_grad) == k and all(d.shape == (0, 5) for d in outputs_grad)
    assert torch.equal(weights_grad, torch.zeros_like(weights))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("k", [8, 40])
def test_deterministic(device, k, dtype):
    """Two runs on the same inputs give bit-identical results, d w included (fixed-order reduction)."""
    outputs, weights, grad = make_inputs((37, 4099), k, dtype, device, seed=11)
    assert_same_bits(native_call(outputs, weights, grad), native_call(outputs, weights, grad), "second run")


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("k", [5, 40, 129])
def test_results_do_not_depend_on_the_grid(device, k, dtype):
    """The rounding order is a function of the element index alone: grids of 1, 3 and 37 blocks and the
    full grid (every multiprocessor count, MIG slices included) give the same bits, misaligned or not."""
    outputs, weights, grad = make_inputs((5, 3, 515, 17), k, dtype, device, seed=k)
    expected = native_call(outputs, weights, grad)
    check_native_call(outputs, weights, grad)
    for blocks in (1, 3, 37):
        with cuda_grid_cap(blocks):
            assert_same_bits(native_call(outputs, weights, grad), expected, f"grid of {blocks} blocks")
            shifted = [misaligned(o, 1) for o in outputs]
            assert_same_bits(native_call(shifted, weights, grad), expected, f"misaligned, grid of {blocks}")


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_concurrent_streams(device):
    """Backwards on two streams at once (each stream has its own arrival counter for the last-block sum)."""
    calls = [make_inputs((64, 16, 32, 32), 8, torch.float32, device, seed=s) for s in (1, 2)]
    expected = [backward(g, o, w, True) for o, w, g in calls]
    streams = [torch.cuda.Stream() for _ in calls]
    torch.cuda.synchronize()
    results = [[None, None] for _ in calls]
    for _ in range(20):
        for i, ((o, w, g), stream) in enumerate(zip(calls, streams)):
            with torch.cuda.stream(stream):
                results[i] = backward(g, o, w, True)
    torch.cuda.synchronize()
    for (do, dw), (do_expected, dw_expected) in zip(results, expected):
        assert torch.equal(dw, dw_expected)
        assert all(torch.equal(a, b) for a, b in zip(do, do_expected))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("k", [8, 129])
def test_cuda_graph_replay(device, k):
    """Forward and backward captured in a CUDA graph and replayed (twice, one replay on another stream)
    give the eager results; the capture's arrival counter lives in its own workspace."""
    outputs, weights, grad = make_inputs((3, 7, 515), k, torch.float32, device, seed=k)
    expected = native_call(outputs, weights, grad)
    native_call(outputs, weights, grad)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = native_call(outputs, weights, grad)
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
        with torch.cuda.stream(stream):
            graph.replay()
        stream.synchronize()
        assert_same_bits(captured, expected, "graph replay")
    assert_same_bits(native_call(outputs, weights, grad), expected, "eager after the graph")


# --------------------------------------------------------------------------- registration and autograd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_native_ops(device, dtype):
    """Schemas, fake kernels and tracing of the native ops, called with device tensors."""
    outputs, weights, grad = make_inputs((3, 7, 33), 3, dtype, device, seed=5)
    torch.library.opcheck(torch.ops.fastnas._mixed_sum_forward.default, (outputs, weights))
    for args in ((grad, outputs, weights, True), (grad, outputs, weights, False), (grad, [], weights, True)):
        torch.library.opcheck(torch.ops.fastnas._mixed_sum_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, native_backend):
    native_backend(device)
    outputs, weights, _ = make_inputs((3, 4, 5), 3, torch.float64, device, seed=2)
    outputs = [o.requires_grad_() for o in outputs]
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *o: fastnas.mixed_sum(list(o), w), (weights, *outputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_sum_autograd_uses_native_kernels(device, dtype, native_backend):
    """fastnas.mixed_sum forward and backward on the device's native backend, against the reference."""
    native_backend(device)
    assert fastnas.get_backend(device) == device
    k = 5
    outputs, weights, grad = make_inputs((3, 7, 33), k, dtype, device, seed=9)
    y_exact, _, dw_exact, y_scale, dw_scale = float64_oracle(outputs, weights, grad)
    leaves = [o.clone().requires_grad_() for o in outputs]
    w = weights.clone().requires_grad_()
    y = fastnas.mixed_sum(leaves, w)
    check_forward(y, outputs, y_exact, y_scale)
    y.backward(grad)
    check_outputs_grad([o.grad for o in leaves], grad, weights)
    check_weights_grad(w.grad, grad, dw_exact, dw_scale)
