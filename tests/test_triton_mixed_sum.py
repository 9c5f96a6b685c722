"""Tests of the Triton backend of the mixed sum (``kernels/mixed_sum.py``).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before Triton is imported): small shapes, float32, float16 and float64. With a
GPU they are compiled and run on CUDA: every dtype, larger shapes, real autotuning, int64 offsets.
Every result is checked against the float64 reference (``fastnas.ops.reference``) with an error
bound derived from one rounding to the output dtype plus the accumulation dtype's summation error.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import HAS_CUDA, float64_oracle

import fastnas
from fastnas.ops import reference

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
KS = [1, 2, 3, 5, 8, 17, 40]
SHAPES = [(1023,), (3, 7, 33), (1, 5, 1, 7), (5000,)]  # masked tails, size-1 dims, several programs
FIXED_BLOCK = tk.FIXED_CONFIG.kwargs["BLOCK"]


@pytest.fixture
def triton_backend():
    fastnas.set_backend("triton")
    try:
        yield
    finally:
        fastnas.set_backend(None)


@pytest.fixture(autouse=True)
def _fixed_config(monkeypatch):
    """One configuration (5x fewer compilations on a GPU); the autotuning test turns tuning back on."""
    monkeypatch.setenv("FASTNAS_TRITON_AUTOTUNE", "0")


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
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k", KS)
def test_forward_backward_match_reference(k, shape, dtype):
    outputs, weights, grad = make_inputs(shape, k, dtype, seed=k)
    check_triton_call(outputs, weights, grad)


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


def test_empty_tensors():
    outputs, weights, grad = make_inputs((0, 3), 2, torch.float32)
    assert tk.mixed_sum_forward(outputs, weights).shape == (0, 3)
    outputs_grad, weights_grad = tk.mixed_sum_backward(grad, outputs, weights, True)
    assert [d.shape for d in outputs_grad] == [(0, 3), (0, 3)]
    assert torch.equal(weights_grad, torch.zeros_like(weights))


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


def test_deterministic_mode_uses_the_fixed_config():
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tk.uses_fixed_config()
        outputs, weights, grad = make_inputs((5000,), 3, torch.float32)
        assert tk._forward_launch(torch.empty_like(grad), None, outputs, weights) == FIXED_BLOCK
        first = tk.mixed_sum_backward(grad, outputs, weights, False)[1]
        assert torch.equal(first, tk.mixed_sum_backward(grad, outputs, weights, False)[1])
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's fixed configuration")
def test_interpreter_uses_the_fixed_config_without_autotuning():
    assert tk.uses_fixed_config()
    outputs, weights, grad = make_inputs((5000,), 3, torch.float16)
    tk._mixed_sum_fwd_kernel.cache.clear()
    tk._mixed_sum_bwd_kernel.cache.clear()
    assert tk._forward_launch(torch.empty_like(grad), None, outputs, weights) == FIXED_BLOCK
    tk.mixed_sum_backward(grad, outputs, weights, True)
    assert tk._mixed_sum_fwd_kernel.cache == {} and tk._mixed_sum_bwd_kernel.cache == {}  # no tuning ran


def test_prune_configs_drops_tiles_larger_than_the_tensor():
    assert {c.kwargs["BLOCK"] for c in tk._prune_configs(tk.CONFIGS, {"N": 100})} == {1024}
    assert tk._prune_configs(tk.CONFIGS, {"N": 1 << 20}) == tk.CONFIGS
    assert tk._size_key(5000) == tk._size_key(8192) and tk._size_key(1) == 4096


@pytest.mark.parametrize("config", tk.CONFIGS, ids=str)
def test_weights_grad_sums_exactly_the_rows_each_config_writes(config):
    """The partial-sum buffer is sized per configuration: a launch writes one whole row per
    program and only those rows are summed, so rows left by another configuration (NaN here, a
    stale autotuning trial in practice) never reach the result."""
    outputs, weights, grad = make_inputs((5000,), 5, torch.float32)
    _, _, dw_exact, _, dw_scale = float64_oracle(outputs, weights, grad)
    rows = math.ceil(5000 / min(c.kwargs["BLOCK"] for c in tk.CONFIGS))
    partials = torch.full((rows, 5), float("nan"), device=DEVICE)
    weights_grad = tk._backward_launch(grad, outputs, [], weights, config=config, partials=partials)
    used = math.ceil(5000 / config.kwargs["BLOCK"])
    assert torch.isfinite(partials[:used]).all() and torch.isnan(partials[used:]).all()
    check_backward([], weights_grad, grad, [], dw_exact, dw_scale)


def test_autotuning_trials_do_not_leak(monkeypatch):
    """Replays every launch with each configuration first, as the autotuner's trials do, with K
    chunked (MAX_BUCKET=4): the results must equal one plain launch bit for bit."""
    outputs, weights, grad = make_inputs((5000,), 11, torch.float16)
    monkeypatch.setattr(tk, "MAX_BUCKET", 4)  # chunks 4+4+3: forward running sums, several backward passes
    launch = tk._launch
    final = tk.CONFIGS[-1]

    def once(kernel, n, args, meta, config):
        return launch(kernel, n, args, meta, final)

    def with_trials(kernel, n, args, meta, config):
        for trial in tk.CONFIGS[:-1]:  # smaller tiles first: more programs, more rows than the final launch
            launch(kernel, n, args, meta, trial)
        return launch(kernel, n, args, meta, final)

    results = {}
    for name, fn in (("once", once), ("with_trials", with_trials)):
        monkeypatch.setattr(tk, "_launch", fn)
        results[name] = (tk.mixed_sum_forward(outputs, weights), *tk.mixed_sum_backward(grad, outputs, weights, True))
    y, dos, dw = results["with_trials"]
    y1, dos1, dw1 = results["once"]
    assert torch.equal(y, y1) and torch.equal(dw, dw1) and all(torch.equal(a, b) for a, b in zip(dos, dos1))
    y_exact, dos_exact, dw_exact, y_scale, dw_scale = float64_oracle(outputs, weights, grad)
    check_forward(y, outputs, weights, y_exact, y_scale)
    check_backward(dos, dw, grad, dos_exact, dw_exact, dw_scale)


def test_chunking_rule():
    assert tk._chunks(40) == [(0, 32), (32, 8)]
    assert tk._chunks(32) == [(0, 32)]
    assert [tk._bucket(k) for k in (1, 2, 3, 5, 8, 17, 32)] == [1, 2, 4, 8, 8, 32, 32]


def test_autotune_switch(monkeypatch):
    monkeypatch.setenv("FASTNAS_TRITON_AUTOTUNE", "0")
    assert tk.uses_fixed_config()
    monkeypatch.setenv("FASTNAS_TRITON_AUTOTUNE", "1")
    assert tk.uses_fixed_config() == (INTERPRETED or torch.are_deterministic_algorithms_enabled())


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
def test_real_autotuning_on_cuda(k, monkeypatch):
    """Autotuning from an empty cache (trials replay the launches) gives correct results, and the
    tuned, cached launches that follow are bit-identical to the first."""
    monkeypatch.delenv("FASTNAS_TRITON_AUTOTUNE")
    if tk.uses_fixed_config():
        pytest.skip("autotuning is off here (deterministic mode)")
    tk._mixed_sum_fwd_kernel.cache.clear()
    tk._mixed_sum_bwd_kernel.cache.clear()
    outputs, weights, grad = make_inputs((3, 1000, 1001), k, torch.bfloat16, seed=3)
    y = tk.mixed_sum_forward(outputs, weights)
    dos, dw = tk.mixed_sum_backward(grad, outputs, weights, True)
    assert len(tk._mixed_sum_bwd_kernel.cache) > 0  # the autotuner ran
    y_exact, dos_exact, dw_exact, y_scale, dw_scale = float64_oracle(outputs, weights, grad)
    check_forward(y, outputs, weights, y_exact, y_scale)
    check_backward(dos, dw, grad, dos_exact, dw_exact, dw_scale)
    assert torch.equal(y, tk.mixed_sum_forward(outputs, weights))
    dos2, dw2 = tk.mixed_sum_backward(grad, outputs, weights, True)
    assert torch.equal(dw, dw2) and all(torch.equal(a, b) for a, b in zip(dos, dos2))


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
