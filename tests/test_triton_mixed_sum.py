"""Tests of the Triton backend of the mixed sum (``kernels/mixed_sum.py``).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before Triton is imported): small shapes, float32, float16 and float64. With a
GPU they are compiled and run on CUDA: every dtype, larger shapes, the direct launch path, int64
offsets. Every result is checked against the float64 reference (``fastnas.ops.reference``) with an
error bound derived from one rounding to the output dtype plus the accumulation dtype's summation
error. What the compiled kernels look like (spills, vector width, ...) is checked without a GPU by
``tests/test_triton_compiled.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, float64_oracle

import fastnas
from fastnas.ops import reference
from fastnas.ops.mixed_sum import SUPPORTED_DTYPES as SUPPORTED

pytest.importorskip("triton", reason="the triton backend needs the triton package")

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "the triton backend needs a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it when no GPU is present)",
        allow_module_level=True,
    )

from fastnas.kernels import mixed_sum as tk  # noqa: E402  (after the interpreter switch)

INTERPRETED = tk.interpreted()
if not HAS_CUDA and not INTERPRETED:
    pytest.skip(
        "fastnas.kernels.mixed_sum was imported before TRITON_INTERPRET=1 was set; no GPU to run it",
        allow_module_level=True,
    )
DEVICE = "cpu" if INTERPRETED else "cuda"
requires_cuda = pytest.mark.skipif(
    INTERPRETED, reason="needs a CUDA GPU (kernels compiled, not interpreted); this run uses the Triton interpreter"
)

# the interpreter rounds float32 -> bfloat16 toward zero and is slow: float32/float16/float64 there
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16, torch.float64])
SHAPES = [(1023,), (3, 7, 33), (1, 5, 1, 7), (5000,)]  # masked tails, size-1 dims, several programs
# every K bucket, both sides of a bucket edge, forward chunks (K > 32) and backward chunks (K > 16)
CASES = [(k, shape) for k in (1, 3, 8, 9, 32, 33) for shape in SHAPES] + [
    (k, shape) for k in (40, 112) for shape in SHAPES[:2]
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def triton_backend():
    fastnas.set_backend("triton")
    try:
        yield
    finally:
        fastnas.set_backend(None)


def make_inputs(shape, k: int, dtype: torch.dtype, seed: int = 0, memory_format=torch.contiguous_format):
    """K fresh random inputs, the weights (accumulation dtype) and an upstream gradient."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    acc = reference.accumulation_dtype(dtype)

    def randn(*size, dtype=dtype):
        return torch.randn(*size, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)

    outputs = [randn(*shape).contiguous(memory_format=memory_format) for _ in range(k)]
    weights = randn(k, dtype=acc)
    grad = randn(*shape).contiguous(memory_format=memory_format)
    return outputs, weights, grad


def assert_within(actual, expected, bound, what: str) -> None:
    """|actual - expected| <= bound elementwise (bound broadcasts); the message names the worst element."""
    err = (actual.double() - expected).abs().flatten()
    excess = err - bound.flatten() if bound.dim() else err - bound
    i = int(excess.argmax())
    b = bound.flatten()[i] if bound.dim() else bound
    assert excess[i].item() <= 0, (
        f"{what}: error {err[i].item():.3e} at flat index {i} exceeds its bound {b.item():.3e}"
    )


def subnormal_spacing(dtype: torch.dtype) -> float:
    """The absolute rounding step below the normal range (results near zero round to it)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def check_forward(y, outputs, weights, y_exact, y_scale) -> None:
    dtype, k = outputs[0].dtype, len(outputs)
    eps_out = torch.finfo(dtype).eps
    eps_acc = torch.finfo(reference.accumulation_dtype(dtype)).eps
    assert y.dtype == dtype and y.shape == outputs[0].shape and y.stride() == outputs[0].stride()
    # one rounding to the output dtype + K-term summation error in the accumulation dtype
    bound = eps_out * y_exact.abs() + (k + 1) * eps_acc * y_scale + subnormal_spacing(dtype)
    assert_within(y, y_exact, bound, "y")


def check_backward(outputs_grad, weights_grad, grad, outputs_grad_exact, weights_grad_exact, dw_scale) -> None:
    """outputs_grad against outputs_grad_exact (pairwise) and weights_grad (unless None) against the exact sums."""
    dtype = grad.dtype
    eps_out = torch.finfo(dtype).eps
    eps_acc = torch.finfo(reference.accumulation_dtype(dtype)).eps
    for k, (d, e) in enumerate(zip(outputs_grad, outputs_grad_exact)):
        assert d.dtype == dtype and d.shape == grad.shape and d.stride() == grad.stride()
        assert_within(d, e, eps_out * e.abs() + subnormal_spacing(dtype), f"outputs_grad[{k}]")
    if weights_grad is None:
        return
    # blocked tree sums: error grows with log2 of the element count
    c = 2 * math.ceil(math.log2(grad.numel() + 1)) + 4
    assert weights_grad.dtype == reference.accumulation_dtype(dtype)
    assert_within(weights_grad, weights_grad_exact, c * eps_acc * dw_scale + 1e-300, "weights_grad")


def check_triton_call(outputs, weights, grad) -> None:
    """tk.mixed_sum_forward and tk.mixed_sum_backward (outputs grad included) against the float64 oracle."""
    y_exact, dos_exact, dw_exact, y_scale, dw_scale = float64_oracle(outputs, weights, grad)
    check_forward(tk.mixed_sum_forward(outputs, weights), outputs, weights, y_exact, y_scale)
    outputs_grad, weights_grad = tk.mixed_sum_backward(grad, outputs, weights, True)
    assert len(outputs_grad) == len(outputs) and weights_grad.shape == (len(outputs),)
    check_backward(outputs_grad, weights_grad, grad, dos_exact, dw_exact, dw_scale)


# --------------------------------------------------------------------------- kernels against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,shape", CASES, ids=str)
def test_forward_backward_match_reference(k, shape, dtype):
    outputs, weights, grad = make_inputs(shape, k, dtype, seed=k)
    check_triton_call(outputs, weights, grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [3, 9, 33])
@pytest.mark.parametrize("offset", [0, 1], ids=["stacked", "stacked-at-offset-1"])
def test_misaligned_slices_of_a_stacked_tensor(k, offset, dtype):
    """Rows of a [K, 1023] tensor start at 1023 * itemsize bytes from each other (not 16-byte
    aligned); one element in, none is. Each pointer is specialised on its own alignment."""
    gen = torch.Generator(device=DEVICE).manual_seed(k)
    flat = torch.randn(k * 1023 + offset, generator=gen, device=DEVICE).to(dtype)
    stacked = flat[offset:].view(k, 1023)
    outputs = list(stacked.unbind(0))
    assert any(o.data_ptr() % 16 for o in outputs)
    _, weights, grad = make_inputs((1023,), k, dtype, seed=k + 1)
    check_triton_call(outputs, weights, grad)


def test_misaligned_weights_and_grad():
    outputs, weights, grad = make_inputs((1023,), 5, torch.float32, seed=2)
    weights = torch.cat([weights.new_zeros(1), weights])[1:]
    grad = torch.cat([grad.new_zeros(1), grad])[1:]
    assert weights.data_ptr() % 16 and grad.data_ptr() % 16
    check_triton_call(outputs, weights, grad)


def test_stacked_tensor_through_fastnas_mixed_sum(triton_backend):
    outputs, weights, grad = make_inputs((3, 7, 11), 9, torch.float16, seed=4)
    stacked = torch.stack(outputs).requires_grad_()
    w = weights.detach().requires_grad_()
    y_exact, dos_exact, dw_exact, y_scale, dw_scale = float64_oracle(outputs, weights, grad)
    y = fastnas.mixed_sum(stacked, w)
    check_forward(y.detach(), outputs, weights, y_exact, y_scale)
    y.backward(grad)
    check_backward(list(stacked.grad.unbind(0)), w.grad, grad, dos_exact, dw_exact, dw_scale)


@pytest.mark.parametrize("k", [1, 8])
def test_float64_accumulates_in_float64(k):
    outputs, weights, grad = make_inputs((1023,), k, torch.float64)
    check_triton_call(outputs, weights, grad)


def test_single_element():
    outputs, weights, grad = make_inputs((1,), 3, torch.float32)
    check_triton_call(outputs, weights, grad)


def test_compute_outputs_grad_false_returns_only_weights_grad():
    outputs, weights, grad = make_inputs((3, 7, 33), 5, torch.float32)
    _, _, dw_exact, _, dw_scale = float64_oracle(outputs, weights, grad)
    outputs_grad, weights_grad = tk.mixed_sum_backward(grad, outputs, weights, False)
    assert outputs_grad == []
    check_backward([], weights_grad, grad, [], dw_exact, dw_scale)


def test_empty_outputs_list_returns_no_weights_grad():
    outputs, weights, grad = make_inputs((3, 7, 33), 5, torch.float16)
    _, dos_exact, _, _, _ = float64_oracle(outputs, weights, grad)
    outputs_grad, weights_grad = tk.mixed_sum_backward(grad, [], weights, True)
    assert weights_grad.numel() == 0 and weights_grad.dtype == weights.dtype
    assert len(outputs_grad) == 5
    eps = torch.finfo(torch.float16).eps
    for k, (d, e) in enumerate(zip(outputs_grad, dos_exact)):
        assert_within(d, e, eps * e.abs() + subnormal_spacing(torch.float16), f"outputs_grad[{k}]")
    outputs_grad, weights_grad = tk.mixed_sum_backward(grad, [], weights, False)
    assert outputs_grad == [] and weights_grad.numel() == 0


@pytest.mark.parametrize("k", [2, 40])
def test_empty_tensors(k):
    outputs, weights, grad = make_inputs((0, 3), k, torch.float32)
    assert tk.mixed_sum_forward(outputs, weights).shape == (0, 3)
    outputs_grad, weights_grad = tk.mixed_sum_backward(grad, outputs, weights, True)
    assert [d.shape for d in outputs_grad] == [(0, 3)] * k
    assert torch.equal(weights_grad, torch.zeros_like(weights))
    outputs_grad, weights_grad = tk.mixed_sum_backward(grad, [], weights, True)
    assert [d.shape for d in outputs_grad] == [(0, 3)] * k and weights_grad.numel() == 0


def test_kernels_raise_on_contract_violations():
    outputs, weights, grad = make_inputs((4, 5), 3, torch.float32)
    with pytest.raises(TypeError, match="weights"):
        tk.mixed_sum_forward(outputs, weights.double())
    with pytest.raises(ValueError, match="weights has length"):
        tk.mixed_sum_forward(outputs, weights[:2])
    with pytest.raises(ValueError, match=r"outputs\[1\]"):
        tk.mixed_sum_forward([outputs[0], outputs[1].t().contiguous().t(), outputs[2]], weights)
    with pytest.raises(TypeError, match=r"outputs\[0\]"):
        tk.mixed_sum_backward(grad, [o.half() for o in outputs], weights, True)
    with pytest.raises(ValueError, match="dense"):
        tk.mixed_sum_forward([o[:, ::2] for o in outputs], weights)
    with pytest.raises(ValueError, match="non-empty"):
        tk.mixed_sum_forward([], weights)


def test_validated_backward_still_checks_grad():
    """The op layer checks outputs and weights; a direct call of the backward op can still pass a
    grad of another dtype or device, which the unchecked entry point refuses."""
    outputs, weights, grad = make_inputs((4, 5), 3, torch.float32)
    _, backward = tk.VALIDATED
    with pytest.raises(ValueError, match="grad"):
        backward(grad.to(torch.int32), outputs, weights, True)


# --------------------------------------------------------------------------- through fastnas.mixed_sum


def test_backend_is_selected(triton_backend, monkeypatch):
    assert fastnas.get_backend(DEVICE) == "triton"
    fastnas.set_backend(None)
    monkeypatch.setenv("FASTNAS_BACKEND", "triton")
    assert fastnas.get_backend(DEVICE) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last_through_autograd(triton_backend, dtype):
    outputs, weights, grad = make_inputs((2, 6, 5, 3), 5, dtype, memory_format=torch.channels_last)
    y_exact, dos_exact, dw_exact, y_scale, dw_scale = float64_oracle(outputs, weights, grad)
    leaves = [o.detach().requires_grad_() for o in outputs]
    w = weights.detach().requires_grad_()
    y = fastnas.mixed_sum(leaves, w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    check_forward(y.detach(), outputs, weights, y_exact, y_scale)
    y.backward(grad)
    check_backward([o.grad for o in leaves], w.grad, grad, dos_exact, dw_exact, dw_scale)


def test_frozen_weights_or_outputs_through_autograd(triton_backend):
    outputs, weights, grad = make_inputs((1023,), 3, torch.float32)
    _, dos_exact, dw_exact, _, dw_scale = float64_oracle(outputs, weights, grad)
    leaves = [o.detach().requires_grad_() for o in outputs]
    fastnas.mixed_sum(leaves, weights).backward(grad)  # weights frozen: outputs not saved, no dL/dw
    check_backward([o.grad for o in leaves], None, grad, dos_exact, None, None)
    w = weights.detach().requires_grad_()
    fastnas.mixed_sum(outputs, w).backward(grad)  # outputs frozen: no dL/do_k
    check_backward([], w.grad, grad, [], dw_exact, dw_scale)


def test_backward_op_without_outputs_grad(triton_backend):
    """What the autograd calls when the K inputs are frozen (compute_outputs_grad False)."""
    outputs, weights, grad = make_inputs((1023,), 3, torch.float16)
    _, _, dw_exact, _, dw_scale = float64_oracle(outputs, weights, grad)
    outputs_grad, weights_grad = torch.ops.fastnas.mixed_sum_backward(grad, outputs, weights, False)
    assert outputs_grad == []
    check_backward([], weights_grad, grad, [], dw_exact, dw_scale)


# --------------------------------------------------------------------------- determinism, configurations


def test_backward_is_bitwise_deterministic():
    outputs, weights, grad = make_inputs((5000,), 8, torch.float32)
    first = tk.mixed_sum_backward(grad, outputs, weights, True)
    second = tk.mixed_sum_backward(grad, outputs, weights, True)
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert torch.equal(tk.mixed_sum_forward(outputs, weights), tk.mixed_sum_forward(outputs, weights))


def test_many_tiles_per_program_and_the_last_programs_sum(monkeypatch):
    """Few programs (each walks several tiles) and a last-program sum over several blocks of rows;
    the arrival counter is back at zero after each launch, so the next one sums correctly too."""
    monkeypatch.setattr(tk, "MAX_PROGRAMS", 3)
    monkeypatch.setattr(tk, "SUM_ROWS", 2)
    for dtype in (torch.float32, torch.float16):
        outputs, weights, grad = make_inputs((5000,), 9, dtype, seed=5)
        check_triton_call(outputs, weights, grad)
        check_triton_call(outputs, weights, grad)
    assert all(ws.counter.item() == 0 for ws in tk._workspaces.values())


def test_launch_config_is_a_function_of_form_bucket_and_dtype():
    every = [(f, kb, d) for f in ("forward", "backward") for kb in (1, 2, 4, 8, 16, 32) for d in SUPPORTED]
    before = [tk.launch_config(*args) for args in every]
    outputs, weights, grad = make_inputs((1023,), 8, torch.float32)
    check_triton_call(outputs, weights, grad)
    assert [tk.launch_config(*args) for args in every] == before
    with pytest.raises(ValueError, match="form"):
        tk.launch_config("sideways", 8, torch.float32)


def test_launchers_pick_only_listed_variants(monkeypatch):
    """Every launch of every K (chunks included), form and dtype is one of launch_variants(), the
    set tests/test_triton_compiled.py compiles; and every listed variant is picked by some call."""
    picked = set()

    def record(which, grid, args, key, num_warps, device):
        picked.add(tk.variant_of((which, device, *key)))

    monkeypatch.setattr(tk, "_launch", record)  # nothing runs: only the choice matters here
    for dtype in SUPPORTED:
        acc = reference.accumulation_dtype(dtype)
        for k in range(1, 41):
            outputs = [torch.zeros(8, dtype=dtype, device=DEVICE) for _ in range(k)]
            weights = torch.zeros(k, dtype=acc, device=DEVICE)
            tk.mixed_sum_forward(outputs, weights)
            for grads, inputs in ((True, outputs), (False, outputs), (True, [])):
                tk.mixed_sum_backward(outputs[0], inputs, weights, grads)
    assert picked == set(tk.launch_variants())


def test_chunking_rule():
    assert tk._chunks(40, 32) == [(0, 32), (32, 8)]
    assert tk._chunks(40, 16) == [(0, 16), (16, 16), (32, 8)]
    assert tk._chunks(32, 32) == [(0, 32)]
    assert [tk._bucket(k) for k in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]


def test_two_processes_give_the_same_bits():
    """The weight gradient's reduction order depends on (numel, K, dtype) only: a fresh process
    that first ran other sizes, K and dtypes gets the bits of a fresh process that did not."""
    script = ROOT / "tests" / "triton_bits.py"
    runs = [
        subprocess.run([sys.executable, str(script), *history], capture_output=True, text=True, cwd=ROOT, timeout=900)
        for history in ([], ["--history"])
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    first, second = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert first == second
    assert len(first) == 4  # float32 and float16, two sizes each


# --------------------------------------------------------------------------- CUDA only


@requires_cuda
def test_auto_picks_triton_without_the_cuda_extension():
    from fastnas import backend

    if backend.extension_has_cuda():
        pytest.skip("the CUDA extension is built: auto picks 'cuda'")
    fastnas.set_backend(None)
    assert fastnas.get_backend("cuda") == "triton"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape,k", [((64, 16, 32, 32), 8), ((4097, 1029), 5), (((1 << 24) + 3,), 2)], ids=str)
def test_large_shapes_on_cuda(shape, k, dtype):
    outputs, weights, grad = make_inputs(shape, k, dtype, seed=1)
    check_triton_call(outputs, weights, grad)


@requires_cuda
@pytest.mark.parametrize("k", [8, 40])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_direct_launches_match_tritons_on_cuda(k, offset):
    """The first call of a specialisation goes through Triton's launch path, later ones call the
    compiled kernel's launcher directly: same bits, right values, aligned or not."""
    tk._LAUNCHER.compiled.clear()
    outputs, weights, grad = make_inputs((3, 1000, 1001), k, torch.bfloat16, seed=3)
    if offset:  # the same values one element into a buffer: no input 16-byte aligned
        flat = torch.cat([outputs[0].new_zeros(offset), torch.stack(outputs).flatten()])
        outputs = list(flat[offset:].view(k, 3, 1000, 1001).unbind(0))
    y = tk.mixed_sum_forward(outputs, weights)
    dos, dw = tk.mixed_sum_backward(grad, outputs, weights, True)
    assert len(tk._LAUNCHER.compiled) > 0
    y_exact, dos_exact, dw_exact, y_scale, dw_scale = float64_oracle(outputs, weights, grad)
    check_forward(y, outputs, weights, y_exact, y_scale)
    check_backward(dos, dw, grad, dos_exact, dw_exact, dw_scale)
    assert torch.equal(y, tk.mixed_sum_forward(outputs, weights))
    dos2, dw2 = tk.mixed_sum_backward(grad, outputs, weights, True)
    assert torch.equal(dw, dw2) and all(torch.equal(a, b) for a, b in zip(dos, dos2))


@requires_cuda
def test_backward_on_two_streams_on_cuda():
    """The partial-sum workspace and its counter are per stream: concurrent backwards stay right."""
    cases = [make_inputs((64, 16, 32, 32), 8, torch.float32, seed=s) for s in (6, 7)]
    streams = [torch.cuda.Stream() for _ in cases]
    results = []
    for (outputs, weights, grad), stream in zip(cases, streams):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            results.append(tk.mixed_sum_backward(grad, outputs, weights, False)[1])
    torch.cuda.synchronize()
    for (outputs, weights, grad), dw in zip(cases, results):
        _, _, dw_exact, _, dw_scale = float64_oracle(outputs, weights, grad)
        check_backward([], dw, grad, [], dw_exact, dw_scale)


@requires_cuda
@pytest.mark.slow
def test_int64_offsets_on_cuda():
    """Over 2^31 elements: the tail is written at the right place and dL/dw covers every element."""
    n = (1 << 31) + 4099
    if torch.cuda.mem_get_info()[0] < 8 * n * 2 + (4 << 30):
        pytest.skip("needs about 40 GB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    outputs = [torch.randn(n, generator=gen, device="cuda", dtype=torch.float16) for _ in range(2)]
    weights = torch.tensor([0.75, -1.5], device="cuda")
    y = tk.mixed_sum_forward(outputs, weights)
    for sl in (slice(0, 4096), slice((1 << 31) - 2048, n)):  # both sides of 2^31
        ref = (0.75 * outputs[0][sl].float() - 1.5 * outputs[1][sl].float()).half()
        assert torch.equal(y[sl], ref)
    del y
    grad = outputs[1]  # dL/dw_1 = sum(o_1^2) > 0: a wrap-around would lose most of it
    outputs_grad, dw = tk.mixed_sum_backward(grad, outputs, weights, True)
    tail = slice(n - 4096, n)
    assert torch.equal(outputs_grad[1][tail], (-1.5 * grad[tail].float()).half())
    expected = sum((grad[i : i + (1 << 28)].double() ** 2).sum() for i in range(0, n, 1 << 28))
    assert abs(dw[1].item() - expected.item()) <= 1e-4 * expected.item()


def test_launch_hooks_send_launches_through_triton():
    """A profiler's launch hook must be seen, so that launches go through Triton and call it."""
    from fastnas.kernels import launch

    knobs = launch._RUNTIME_KNOBS
    if knobs is None or not hasattr(knobs.launch_enter_hook, "add"):
        pytest.skip("this Triton has no launch hook chains")
    assert not launch.launch_hooks()

    def hook(*args, **kwargs):
        return None

    for chain in (knobs.launch_enter_hook, knobs.launch_exit_hook):
        chain.add(hook)
        try:
            assert launch.launch_hooks()
        finally:
            chain.remove(hook)
    assert not launch.launch_hooks()
