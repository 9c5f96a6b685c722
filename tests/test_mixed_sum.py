"""fastnas.mixed_sum on every backend against the float64 reference, plus registration, layouts,
determinism, dispatch and bad input."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from conftest import TOLERANCES, cpu_kernel_settings, float64_oracle, interpreted
from torch.library import opcheck

import fastnas
from fastnas import backend
from fastnas.ops import reference

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (K, shape): K from 1 to 40, odd sizes, size-1 dimensions, more than one backward chunk
CASES = [
    (1, (1023,)),
    (2, (3, 7, 33)),
    (3, (2, 1, 5, 1)),
    (5, (4, 16, 8, 8)),
    (8, (1, 3, 1, 341)),
    (17, (40_009,)),  # two backward chunks on the CPU kernel
    (40, (257,)),
]
INTERPRETER_CASES = [(1, (1023,)), (3, (3, 7, 33)), (8, (2, 1, 5, 1)), (40, (257,))]


def dtypes_for(name: str, device: str) -> tuple:
    # the Triton interpreter has no bfloat16 arithmetic
    return (torch.float32, torch.float16) if interpreted(name, device) else ALL_DTYPES


def cases_for(name: str, device: str) -> list:
    return INTERPRETER_CASES if interpreted(name, device) else CASES


def random_inputs(K, shape, dtype, device, requires_grad=False):
    outputs = [torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(K)]
    weights = torch.randn(K, dtype=torch.float32, device=device, requires_grad=requires_grad)
    return outputs, weights


def assert_close(actual, expected64, dtype, scale):
    """|actual - expected| <= atol * scale + rtol * |expected| (+ one subnormal step), scale being the
    size of the terms summed."""
    tol = TOLERANCES[dtype]
    err = (actual.double() - expected64).abs()
    subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    bound = tol["atol"] * scale + tol["rtol"] * expected64.abs() + subnormal_step
    assert actual.dtype == dtype
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} over bound (dtype {dtype})"


# --------------------------------------------------------------------------- numerics


def test_forward_and_backward_match_float64_reference(backend_device):
    name, device = backend_device
    for dtype in dtypes_for(name, device):
        for K, shape in cases_for(name, device):
            outputs, weights = random_inputs(K, shape, dtype, device, requires_grad=True)
            grad = torch.randn(shape, dtype=dtype, device=device)
            y = fastnas.mixed_sum(outputs, weights)
            y.backward(grad)
            oracle = float64_oracle(outputs, weights, grad)
            assert y.shape == torch.Size(shape)
            assert_close(y, oracle.y, dtype, oracle.y_scale)
            for o, expected in zip(outputs, oracle.outputs_grad):
                assert_close(o.grad, expected, dtype, grad.double().abs())
            assert weights.grad.dtype == torch.float32
            assert_close(weights.grad, oracle.weights_grad, torch.float32, oracle.weights_grad_scale)


def test_weights_grad_only_and_outputs_grad_only(backend_device):
    name, device = backend_device
    K, shape = 4, (3, 5, 7)
    outputs, weights = random_inputs(K, shape, torch.float32, device)
    grad = torch.randn(shape, device=device)
    _, outputs_grad64, weights_grad64 = float64_oracle(outputs, weights, grad)[:3]
    weights.requires_grad_()
    fastnas.mixed_sum(outputs, weights).backward(grad)
    assert_close(weights.grad, weights_grad64, torch.float32, grad.abs().sum() * 10)
    weights = weights.detach()
    for o in outputs:
        o.requires_grad_()
    fastnas.mixed_sum(outputs, weights).backward(grad)
    for o, expected in zip(outputs, outputs_grad64):
        assert_close(o.grad, expected, torch.float32, grad.double().abs())
    # the backward op itself: no outputs kept -> no weights gradient; no outputs gradient asked -> none
    outputs_grad, weights_grad = torch.ops.fastnas.mixed_sum_backward(grad, [], weights, True)
    assert len(outputs_grad) == K and weights_grad.numel() == 0
    outputs_grad, weights_grad = torch.ops.fastnas.mixed_sum_backward(grad, outputs, weights, False)
    assert outputs_grad == [] and weights_grad.shape == (K,)


@pytest.mark.parametrize("weights_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_weights_dtype_is_kept_for_their_gradient(backend_device, weights_dtype):
    name, device = backend_device
    outputs, _ = random_inputs(3, (2, 9), torch.float16, device)
    weights = torch.rand(3, dtype=weights_dtype, device=device, requires_grad=True)
    y = fastnas.mixed_sum(outputs, weights)
    y.sum().backward()
    assert y.dtype == torch.float16 and weights.grad.dtype == weights_dtype


def test_zero_size_tensors(backend_device):
    name, device = backend_device
    outputs, weights = random_inputs(3, (0, 4), torch.float32, device, requires_grad=True)
    y = fastnas.mixed_sum(outputs, weights)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(weights.grad, torch.zeros(3, device=device))


def test_gradcheck_float64(backend_device):
    name, device = backend_device
    outputs, weights = random_inputs(3, (2, 3, 5), torch.float64, device, requires_grad=True)
    weights = weights.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *args: fastnas.mixed_sum(args[:-1], args[-1]), (*outputs, weights))


def test_gradients_reach_only_the_inputs_that_require_them(backend_device):
    name, device = backend_device
    outputs, weights = random_inputs(3, (5, 7), torch.float32, device)
    outputs[1].requires_grad_()
    grad = torch.randn(5, 7, device=device)
    fastnas.mixed_sum(outputs, weights).backward(grad)
    assert outputs[0].grad is None and outputs[2].grad is None and weights.grad is None
    assert_close(outputs[1].grad, weights[1].double() * grad.double(), torch.float32, grad.double().abs())


def test_inference_mode_and_no_grad(backend_device):
    name, device = backend_device
    outputs, weights = random_inputs(3, (4, 9), torch.float32, device, requires_grad=True)
    expected = float64_oracle(outputs, weights, torch.zeros(4, 9, device=device)).y
    with torch.inference_mode():
        y_inference = fastnas.mixed_sum(outputs, weights)
    with torch.no_grad():
        y_no_grad = fastnas.mixed_sum(outputs, weights)
    for y in (y_inference, y_no_grad):
        assert not y.requires_grad
        assert_close(y, expected, torch.float32, torch.tensor(10.0))


def test_double_backward_matches_the_eager_sum(backend_device):
    """create_graph=True records the backward: second derivatives equal those of sum(w * o)."""
    name, device = backend_device
    outputs, weights = random_inputs(3, (4, 9), torch.float64, device, requires_grad=True)
    weights = weights.detach().double().requires_grad_()

    def second_derivatives(mixed):
        y = mixed(outputs, weights)
        loss = (y**2).sum() + (weights**2).sum()
        weights_grad, *outputs_grad = torch.autograd.grad(loss, [weights, *outputs], create_graph=True)
        mixed_term = weights_grad.sum() + sum((g * torch.cos(o)).sum() for g, o in zip(outputs_grad, outputs))
        return torch.autograd.grad(mixed_term, [weights, *outputs])

    actual = second_derivatives(fastnas.mixed_sum)
    expected = second_derivatives(lambda oo, w: sum(w[k] * o for k, o in enumerate(oo)))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_gradgradcheck_float64(backend_device):
    name, device = backend_device
    outputs, weights = random_inputs(3, (2, 5), torch.float64, device, requires_grad=True)
    weights = weights.detach().double().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda *args: fastnas.mixed_sum(args[:-1], args[-1]), (*outputs, weights))


def test_gradgradcheck_through_the_registered_op(backend_device):
    """torch.ops.fastnas.mixed_sum (what torch.compile traces) records its backward too."""
    name, device = backend_device
    outputs, weights = random_inputs(3, (2, 5), torch.float64, device, requires_grad=True)
    weights = weights.detach().double().requires_grad_()
    call = lambda *args: torch.ops.fastnas.mixed_sum(list(args[:-1]), args[-1])  # noqa: E731
    assert torch.autograd.gradgradcheck(call, (*outputs, weights))


def test_gradgradcheck_with_frozen_weights(backend_device):
    """Weights that need no gradient: the inputs are not saved, the outputs' gradients still differentiate."""
    name, device = backend_device
    outputs, weights = random_inputs(3, (2, 5), torch.float64, device, requires_grad=True)
    weights = weights.detach().double()
    assert torch.autograd.gradgradcheck(lambda *args: fastnas.mixed_sum(args, weights), tuple(outputs))


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_promotes_mixed_dtypes_like_the_eager_sum(backend_device, amp_dtype):
    """An AMP supernet edge: a convolution in the autocast dtype beside float32 identity and pooling."""
    name, device = backend_device
    if interpreted(name, device) and amp_dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")
    dtypes = [amp_dtype, torch.float32, torch.float32, amp_dtype]
    outputs = [torch.randn(3, 4, 5, device=device).to(d).requires_grad_() for d in dtypes]
    weights = torch.softmax(torch.randn(4, device=device), 0).requires_grad_()
    grad = torch.randn(3, 4, 5, device=device)
    with torch.autocast(device, dtype=amp_dtype):
        y = fastnas.mixed_sum(outputs, weights)
        eager = sum(w * o for w, o in zip(weights, outputs))
    assert y.dtype == eager.dtype == torch.float32
    y.backward(grad)
    y64, outputs_grad64, weights_grad64 = float64_oracle(outputs, weights, grad)[:3]
    # inputs already rounded to amp_dtype; the sum itself is float32
    assert_close(y, y64, torch.float32, torch.tensor(10.0))
    for o, expected in zip(outputs, outputs_grad64):
        assert o.grad.dtype == o.dtype
        assert_close(o.grad, expected, o.dtype, grad.double().abs())
    assert_close(weights.grad, weights_grad64, torch.float32, torch.tensor(100.0))


def test_autocast_through_the_registered_op(backend_device):
    name, device = backend_device
    outputs = [torch.randn(6, device=device).to(d) for d in (torch.float16, torch.float32)]
    weights = torch.randn(2, device=device)
    with torch.autocast(device, dtype=torch.float16):
        y = torch.ops.fastnas.mixed_sum(outputs, weights)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, weights[0] * outputs[0].float() + weights[1] * outputs[1])


def test_autocast_keeps_one_dtype_as_it_is_and_mixed_dtypes_outside_it_raise(backend_device):
    name, device = backend_device
    outputs = [torch.randn(6, device=device, dtype=torch.float16) for _ in range(2)]
    with torch.autocast(device, dtype=torch.bfloat16):
        assert fastnas.mixed_sum(outputs, torch.randn(2, device=device)).dtype == torch.float16
    with pytest.raises(TypeError, match=r"outputs\[1\] has dtype torch.float32"):
        fastnas.mixed_sum([outputs[0], outputs[1].float()], torch.randn(2, device=device))


# --------------------------------------------------------------------------- torch.func


def _eager_sum(outputs, weights):
    return sum(weights[k] * o for k, o in enumerate(outputs))


def test_vmap_over_outputs_and_over_weights(backend_device):
    name, device = backend_device
    gen = torch.Generator().manual_seed(5)
    batch = [torch.randn(4, 3, 6, generator=gen, dtype=torch.float64).to(device) for _ in range(3)]  # batch dim 0
    shared = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(device)  # unbatched input
    weights = torch.randn(3, generator=gen, dtype=torch.float64).to(device)
    per_sample_weights = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device)

    def fn(o0, o1, w):
        return fastnas.mixed_sum([o0, o1, shared], w)

    def eager(o0, o1, w):
        return _eager_sum([o0, o1, shared], w)

    cases = [
        ((0, 0, None), (batch[0], batch[1], weights)),  # batched outputs, shared weights: one fused call
        ((0, None, 0), (batch[0], batch[1][0], per_sample_weights)),
        ((None, None, 0), (batch[0][0], batch[1][0], per_sample_weights)),
    ]
    for in_dims, args in cases:
        actual = torch.func.vmap(fn, in_dims=in_dims)(*args)
        expected = torch.func.vmap(eager, in_dims=in_dims)(*args)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_func_grad_jacrev_and_hessian_match_the_eager_sum(backend_device):
    name, device = backend_device
    outputs, _ = random_inputs(3, (2, 5), torch.float64, device)
    weights = torch.randn(3, dtype=torch.float64, device=device)

    def loss(w, mixed):
        return (mixed(outputs, w) ** 2).sum()

    for transform in (torch.func.grad, torch.func.jacrev, torch.func.hessian):
        actual = transform(lambda w: loss(w, fastnas.mixed_sum))(weights)
        expected = transform(lambda w: loss(w, _eager_sum))(weights)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(lambda o: fastnas.mixed_sum([o, outputs[1]], weights[:2]))(outputs[0])
    torch.testing.assert_close(jac, weights[0] * torch.eye(10, dtype=torch.float64, device=device).view(2, 5, 2, 5))


def test_forward_mode_ad_outside_torch_func(backend_device):
    """torch.autograd.forward_ad dual numbers: the tangent of the bilinear op is one more mixed sum."""
    import torch.autograd.forward_ad as fwAD

    name, device = backend_device
    outputs, weights = random_inputs(3, (4, 5), torch.float64, device)
    weights = weights.double()
    tangents = [torch.randn_like(o) for o in outputs]
    weights_tangent = torch.randn_like(weights)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(o, t) for o, t in zip(outputs, tangents)]
        y = fastnas.mixed_sum(duals, fwAD.make_dual(weights, weights_tangent))
        tangent = fwAD.unpack_dual(y).tangent
    expected = _eager_sum(outputs, weights_tangent) + _eager_sum(tangents, weights)
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- layouts


def test_channels_last_is_preserved_without_copies(backend_device):
    name, device = backend_device
    outputs = [
        torch.randn(2, 6, 5, 3, device=device).to(memory_format=torch.channels_last).requires_grad_() for _ in range(3)
    ]
    weights = torch.randn(3, device=device, requires_grad=True)
    y = fastnas.mixed_sum(outputs, weights)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y)
    y.backward(grad)
    y64, outputs_grad64, weights_grad64 = float64_oracle(outputs, weights, grad)[:3]
    assert_close(y, y64, torch.float32, torch.tensor(10.0))
    for o, expected in zip(outputs, outputs_grad64):
        assert o.grad.is_contiguous(memory_format=torch.channels_last)
        assert_close(o.grad, expected, torch.float32, torch.tensor(10.0))
    # an upstream gradient in another layout (contiguous) is brought to the inputs' one
    contiguous_grad = torch.randn(y.shape, device=device)
    outputs_grad = torch.autograd.grad(fastnas.mixed_sum(outputs, weights), [*outputs, weights], contiguous_grad)
    _, outputs_grad64, weights_grad64 = float64_oracle(outputs, weights, contiguous_grad)[:3]
    for actual, expected in zip(outputs_grad[:3], outputs_grad64):
        assert_close(actual, expected, torch.float32, torch.tensor(10.0))
    assert_close(outputs_grad[3], weights_grad64, torch.float32, torch.tensor(1000.0))


def test_non_contiguous_views_and_mixed_layouts(backend_device):
    name, device = backend_device
    base = torch.randn(4, 8, 6, 10, device=device, requires_grad=True)
    channels_last = torch.randn(4, 4, 6, 10, device=device).to(memory_format=torch.channels_last).requires_grad_()
    contiguous = torch.randn(4, 4, 6, 10, device=device, requires_grad=True)
    views = [
        base[:, ::2],  # strided slice
        base.transpose(1, 3)[:, :, :, 2:6].transpose(1, 3),  # permuted slice
        channels_last,
        contiguous,
    ]
    weights = torch.randn(4, device=device, requires_grad=True)
    y = fastnas.mixed_sum(views, weights)
    grad = torch.randn_like(y)
    y.backward(grad)
    y64, outputs_grad64, weights_grad64 = float64_oracle(views, weights, grad)[:3]
    assert_close(y, y64, torch.float32, torch.tensor(10.0))
    # the gradients reach the tensors the views were taken from, through any layout copies
    base_grad64 = torch.zeros(base.shape, dtype=torch.float64, device=device)
    base_grad64[:, ::2] += outputs_grad64[0]
    base_grad64.transpose(1, 3)[:, :, :, 2:6].transpose(1, 3).add_(outputs_grad64[1])
    assert_close(base.grad, base_grad64, torch.float32, torch.tensor(10.0))
    assert_close(channels_last.grad, outputs_grad64[2], torch.float32, torch.tensor(10.0))
    assert_close(contiguous.grad, outputs_grad64[3], torch.float32, torch.tensor(10.0))
    assert_close(weights.grad, weights_grad64, torch.float32, torch.tensor(1000.0))


def test_outputs_as_one_stacked_tensor(backend_device):
    name, device = backend_device
    stacked = torch.randn(5, 3, 11, device=device, requires_grad=True)
    weights = torch.randn(5, device=device, requires_grad=True)
    y = fastnas.mixed_sum(stacked, weights)
    y.sum().backward()
    expected = (weights.detach()[:, None, None] * stacked.detach()).sum(0)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(stacked.grad, weights.detach()[:, None, None].expand(5, 3, 11))
    y_tuple = fastnas.mixed_sum(tuple(stacked.detach()), weights.detach())
    torch.testing.assert_close(y_tuple, expected)


# --------------------------------------------------------------------------- determinism


def test_bit_identical_across_runs(backend_device):
    name, device = backend_device
    K, shape = 5, ((4099,) if interpreted(name, device) else (3, 70_001))
    outputs, weights = random_inputs(K, shape, torch.float32, device)
    grad = torch.randn(shape, device=device)
    first = torch.ops.fastnas.mixed_sum_backward(grad, outputs, weights, True)
    second = torch.ops.fastnas.mixed_sum_backward(grad, outputs, weights, True)
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert torch.equal(fastnas.mixed_sum(outputs, weights), fastnas.mixed_sum(outputs, weights))


@pytest.mark.parametrize("isa", backend.cpu_isa_levels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_bit_identical_across_thread_counts(dtype, isa):
    fastnas.set_backend("cpu")
    threads = torch.get_num_threads()
    try:
        outputs, weights = random_inputs(7, (5, 100_003), dtype, "cpu")
        grad = torch.randn(5, 100_003, dtype=dtype)
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with cpu_kernel_settings(isa=isa):
                y = fastnas.mixed_sum(outputs, weights)
                outputs_grad, weights_grad = torch.ops.fastnas.mixed_sum_backward(grad, outputs, weights, True)
            results.append((y, outputs_grad, weights_grad))
        for y, outputs_grad, weights_grad in results[1:]:
            assert torch.equal(y, results[0][0])
            assert torch.equal(weights_grad, results[0][2])
            assert all(torch.equal(a, b) for a, b in zip(outputs_grad, results[0][1]))
    finally:
        torch.set_num_threads(threads)
        fastnas.set_backend(None)


# --------------------------------------------------------------------------- registration


def test_opcheck_public_ops(backend_device):
    name, device = backend_device
    outputs, weights = random_inputs(3, (2, 5), torch.float32, device, requires_grad=True)
    opcheck(torch.ops.fastnas.mixed_sum.default, (outputs, weights))
    grad = torch.randn(2, 5, device=device)
    detached = [o.detach() for o in outputs]
    opcheck(torch.ops.fastnas.mixed_sum_backward.default, (grad, detached, weights.detach(), True))
    opcheck(torch.ops.fastnas.mixed_sum_backward.default, (grad, [], weights.detach(), True))


@pytest.mark.skipif(not backend.load_extension(), reason="fastnas._C is not built")
def test_opcheck_native_cpu_ops():
    outputs, weights = random_inputs(3, (4, 7), torch.float32, "cpu")
    grad = torch.randn(4, 7)
    opcheck(torch.ops.fastnas._mixed_sum_forward.default, (outputs, weights))
    opcheck(torch.ops.fastnas._mixed_sum_backward.default, (grad, outputs, weights, True))
    opcheck(torch.ops.fastnas._mixed_sum_backward.default, (grad, [], weights, True))


@pytest.mark.skipif(not backend.load_extension(), reason="fastnas._C is not built")
def test_native_ops_reject_broken_contract():
    weights = torch.randn(2)
    with pytest.raises(RuntimeError, match="dense"):
        torch.ops.fastnas._mixed_sum_forward([torch.randn(4, 6)[:, ::2]] * 2, weights)
    with pytest.raises(TypeError, match="weights must be"):
        torch.ops.fastnas._mixed_sum_forward([torch.randn(3)] * 2, weights.double())
    with pytest.raises(RuntimeError, match="outputs\\[1\\]"):
        torch.ops.fastnas._mixed_sum_forward([torch.randn(3), torch.randn(4)], weights)
    with pytest.raises(ValueError, match="outputs for"):
        torch.ops.fastnas._mixed_sum_backward(torch.randn(3), [torch.randn(3)], weights, True)


def test_torch_compile_fullgraph_traces_without_graph_break():
    torch._dynamo.reset()

    def edge(xs: list[torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
        return fastnas.mixed_sum([torch.relu(x) for x in xs], torch.softmax(alpha, 0)).sum()

    compiled = torch.compile(edge, fullgraph=True)
    xs = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(3)]
    alpha = torch.randn(3, requires_grad=True)
    loss = compiled(xs, alpha)
    loss.backward()
    got = [alpha.grad.clone()] + [x.grad.clone() for x in xs]
    for t in (alpha, *xs):
        t.grad = None
    edge(xs, alpha).backward()
    torch.testing.assert_close(loss, edge(xs, alpha))
    for a, b in zip(got, [alpha.grad] + [x.grad for x in xs]):
        torch.testing.assert_close(a, b)


def test_registered_op_and_eager_function_agree(backend_device):
    """fastnas.mixed_sum runs its eager autograd (C++ on cpu/cuda, an autograd.Function on the others)
    and the registered op when compiled: the same results."""
    name, device = backend_device
    outputs, weights = random_inputs(3, (4, 33), torch.float32, device, requires_grad=True)
    grad = torch.randn(4, 33, device=device)
    results = []
    for call in (fastnas.mixed_sum, torch.ops.fastnas.mixed_sum):
        y = call(outputs, weights)
        y.backward(grad)
        results.append([y.detach(), weights.grad, *(o.grad for o in outputs)])
        for t in (weights, *outputs):
            t.grad = None
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("call", ["function", "op"])
def test_frozen_weights_do_not_keep_outputs_alive(backend_device, call):
    name, device = backend_device
    outputs, weights = random_inputs(4, (64, 64), torch.float32, device)
    for o in outputs:
        o.requires_grad_()
    saved = []
    mixed_sum = fastnas.mixed_sum if call == "function" else torch.ops.fastnas.mixed_sum
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        mixed_sum(outputs, weights)
    assert saved == [torch.Size([4])]  # only the weights


# --------------------------------------------------------------------------- dispatch


def test_dispatch_names_and_override(monkeypatch):
    assert fastnas.get_backend("cpu") in ("cpu", "reference")
    assert "reference" in fastnas.available_backends("cpu")
    fastnas.set_backend("reference")
    try:
        assert fastnas.get_backend("cpu") == "reference"
    finally:
        fastnas.set_backend(None)
    monkeypatch.setenv("FASTNAS_BACKEND", "reference")
    assert fastnas.get_backend("cpu") == "reference"
    monkeypatch.setenv("FASTNAS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTNAS_BACKEND"):
        fastnas.get_backend("cpu")
    with pytest.raises(ValueError, match="set_backend"):
        fastnas.set_backend("gpu")
    monkeypatch.setenv("FASTNAS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        fastnas.get_backend("cpu")


def test_missing_extension_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.delenv("FASTNAS_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_extension", lambda: (None, "pretend it was not built"))
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_resolved", {})
    with pytest.warns(RuntimeWarning, match="pretend it was not built"):
        assert fastnas.get_backend("cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastnas.get_backend("cpu") == "reference"
        y = fastnas.mixed_sum([torch.ones(3), torch.ones(3)], torch.tensor([1.0, 2.0]))
    assert torch.equal(y, torch.full((3,), 3.0))
    with pytest.raises(RuntimeError, match="not available"):
        fastnas.set_backend("cpu")


# --------------------------------------------------------------------------- bad input


def _bad_inputs():
    x = torch.randn(2, 3)
    w2 = torch.randn(2)
    return [
        ("empty list", [], torch.randn(0), ValueError, "at least one"),
        ("empty stacked", torch.randn(0, 3), torch.randn(0), ValueError, "leading dimension"),
        ("0-d stacked", torch.tensor(1.0), torch.randn(1), ValueError, "leading dimension"),
        ("not a sequence", {"a": x}, w2, TypeError, "outputs must be"),
        ("non-tensor entry", [x, 3.0], w2, TypeError, r"outputs\[1\] must be a torch.Tensor"),
        ("shape mismatch", [x, torch.randn(3, 2)], w2, ValueError, r"outputs\[1\] has shape"),
        ("dtype mismatch", [x, x.double()], w2, TypeError, r"outputs\[1\] has dtype"),
        ("device mismatch", [x, torch.empty(2, 3, device="meta")], w2, ValueError, r"outputs\[1\] is on"),
        ("integer outputs", [torch.ones(2, dtype=torch.int64)] * 2, w2, TypeError, r"outputs\[0\] has dtype"),
        ("complex outputs", [torch.randn(2, dtype=torch.complex64)] * 2, w2, TypeError, r"outputs\[0\] has dtype"),
        ("sparse outputs", [x.to_sparse(), x.to_sparse()], w2, TypeError, r"outputs\[0\] must be a dense"),
        ("weights wrong length", [x, x], torch.randn(3), ValueError, "weights has length 3"),
        ("weights 2-D", [x, x], torch.randn(1, 2), ValueError, "weights must be 1-D"),
        ("weights 0-D", [x], torch.tensor(1.0), ValueError, "weights must be 1-D"),
        ("weights integer", [x, x], torch.ones(2, dtype=torch.int32), TypeError, "weights must be a real"),
        ("weights complex", [x, x], torch.randn(2, dtype=torch.complex64), TypeError, "weights must be a real"),
        ("weights sparse", [x, x], w2.to_sparse(), TypeError, "weights must be a dense"),
        ("weights not a tensor", [x, x], [0.5, 0.5], TypeError, "weights must be a torch.Tensor"),
        ("weights device", [x, x], torch.empty(2, device="meta"), ValueError, "weights is on"),
    ]


@pytest.mark.parametrize("label,outputs,weights,error,message", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises_a_clear_error(label, outputs, weights, error, message):
    with pytest.raises(error, match=message):
        fastnas.mixed_sum(outputs, weights)


def test_bad_input_through_the_registered_op_is_caught_too():
    with pytest.raises(ValueError, match="weights has length"):
        torch.ops.fastnas.mixed_sum([torch.randn(3), torch.randn(3)], torch.randn(5))
    with pytest.raises(ValueError, match="at least one"):
        torch.ops.fastnas.mixed_sum([], torch.randn(0))
    backward = torch.ops.fastnas.mixed_sum_backward
    with pytest.raises(TypeError, match="grad has dtype torch.int64"):
        backward(torch.ones(3, dtype=torch.int64), [], torch.randn(2), True)
    # the implementation itself (a meta grad would be routed to the fake kernel)
    implementation = importlib.import_module("fastnas.ops.mixed_sum")._mixed_sum_backward_op._init_fn
    with pytest.raises(ValueError, match="grad is on meta but weights is on cpu"):
        implementation(torch.empty(3, device="meta"), [], torch.randn(2), True)


@pytest.mark.skipif(not backend.load_extension(), reason="fastnas._C is not built")
def test_cpu_result_cache_reuses_blocks_without_aliasing_live_tensors():
    fastnas.set_backend("cpu")
    try:
        outputs, weights = random_inputs(3, (512, 1024), torch.float32, "cpu")  # 2 MiB: cached size
        expected = reference.mixed_sum_forward_reference(outputs, weights)
        first = fastnas.mixed_sum(outputs, weights)
        address = first.data_ptr()
        del first
        second = fastnas.mixed_sum(outputs, weights)
        third = fastnas.mixed_sum([o * 2 for o in outputs], weights)
        assert second.data_ptr() == address  # the freed block came back
        assert third.data_ptr() != second.data_ptr()  # a live result is never handed out twice
        torch.testing.assert_close(second, expected)
        torch.testing.assert_close(third, 2 * expected)
        grads, _ = torch.ops.fastnas.mixed_sum_backward(torch.ones_like(second), outputs, weights, True)
        assert len({g.data_ptr() for g in grads} | {second.data_ptr(), third.data_ptr()}) == 5
        for g, w in zip(grads, weights):
            assert torch.equal(g, torch.full_like(g, w.item()))
    finally:
        fastnas.set_backend(None)


@pytest.mark.skipif(not backend.load_extension(), reason="fastnas._C is not built")
def test_cpu_results_are_ordinary_resizable_tensors_seen_by_the_memory_profiler():
    """Results of 1 MiB and more come from the block cache, through a real allocator."""
    fastnas.set_backend("cpu")
    try:
        outputs, weights = random_inputs(2, (512, 1024), torch.float32, "cpu")  # 2 MiB each
        y = fastnas.mixed_sum(outputs, weights)
        expected = reference.mixed_sum_forward_reference(outputs, weights)
        y.resize_(1024, 1024)  # grows: the storage is resizable
        torch.testing.assert_close(y.flatten()[: expected.numel()], expected.flatten())
        z = fastnas.mixed_sum(outputs, weights).resize_(0)
        torch.add(torch.ones(1024, 1024), 1.0, out=z)  # an out= op that needs more room than the result had
        assert torch.equal(z, torch.full((1024, 1024), 2.0))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            w = fastnas.mixed_sum(outputs, weights)
            del w
        events = prof.events()
        # the 2 MiB result is reported as allocated by the forward kernel, and as freed
        assert [e.self_cpu_memory_usage for e in events if e.name == "fastnas::_mixed_sum_forward"] == [2 << 20]
        assert [e.cpu_memory_usage for e in events if e.name == "[memory]"] == [-(2 << 20)]
    finally:
        fastnas.set_backend(None)


@pytest.mark.skipif(not backend.load_extension(), reason="fastnas._C is not built")
@pytest.mark.parametrize("shape", [(3, 5), (64, 16, 9, 9)], ids=["tiny", "odd-numel"])
def test_eager_backward_allocates_the_input_gradients_once(shape):
    """The C++ autograd node takes the K gradients from one allocation (64-byte aligned slots); the
    registered ops return K separate ones, as torch.library requires."""
    fastnas.set_backend("cpu")
    try:
        outputs, weights = random_inputs(5, shape, torch.float32, "cpu", requires_grad=True)
        grad = torch.randn(shape)
        fastnas.mixed_sum(outputs, weights).backward(grad)
        assert len({o.grad.untyped_storage().data_ptr() for o in outputs}) == 1
        assert all(o.grad.data_ptr() % 64 == 0 and o.grad._base is None for o in outputs)
        for o, w in zip(outputs, weights):
            torch.testing.assert_close(o.grad, w.detach() * grad, rtol=0, atol=0)
        detached = [o.detach() for o in outputs]
        for op in (torch.ops.fastnas._mixed_sum_backward, torch.ops.fastnas.mixed_sum_backward):
            grads, _ = op(grad, detached, weights.detach(), True)
            assert len({g.untyped_storage().data_ptr() for g in grads}) == len(grads)
    finally:
        fastnas.set_backend(None)


def test_cpu_isa_environment_variable_is_checked(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("FASTNAS_CPU_ISA", "sse")
    backend._resolved.clear()
    try:
        with pytest.raises(ValueError, match="FASTNAS_CPU_ISA must be one of avx512, avx2, portable.*'sse'"):
            backend.get_backend("cpu")
    finally:
        monkeypatch.delenv("FASTNAS_CPU_ISA")
        backend._resolved.clear()
    if "portable" in backend.cpu_isa_levels():
        code = "import torch, fastnas; print(torch.ops.fastnas._cpu_settings()[0])"
        env = {**__import__("os").environ, "FASTNAS_CPU_ISA": "Portable"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "portable"  # any case is accepted


@pytest.mark.parametrize("isa", backend.cpu_isa_levels())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cpu_kernel_streamed_results_equal_cached_ones(dtype, isa):
    """Calls larger than the last-level cache write their results with non-temporal stores: the
    same values as ordinary stores, bit for bit, at every K, size and level (forced here with a
    streaming threshold of 0 bytes: real sizes would take more inputs than the last-level cache)."""
    fastnas.set_backend("cpu")
    try:
        for K, shape in CASES:
            outputs, weights = random_inputs(K, shape, dtype, "cpu")
            weights = weights.to(torch.float64 if dtype == torch.float64 else torch.float32)
            grad = torch.randn(shape, dtype=dtype)
            results = {}
            for stream_above_bytes in (1 << 62, 0):
                with cpu_kernel_settings(isa=isa, stream_above_bytes=stream_above_bytes):
                    y = fastnas.mixed_sum(outputs, weights)
                    outputs_grad, weights_grad = torch.ops.fastnas.mixed_sum_backward(grad, outputs, weights, True)
                    only_outputs_grad, _ = torch.ops.fastnas.mixed_sum_backward(grad, [], weights, True)
                results[stream_above_bytes] = (y, outputs_grad, weights_grad, only_outputs_grad)
            cached, streamed = results.values()
            assert torch.equal(cached[0], streamed[0]) and torch.equal(cached[2], streamed[2])
            for a, b, c in zip(cached[1], streamed[1], streamed[3]):
                assert torch.equal(a, b) and torch.equal(a, c)
            oracle = float64_oracle(outputs, weights, grad)
            assert_close(streamed[0], oracle.y, dtype, oracle.y_scale)
            for actual, expected in zip(streamed[1], oracle.outputs_grad):
                assert_close(actual, expected, dtype, grad.double().abs())
            assert_close(streamed[2], oracle.weights_grad, weights.dtype, oracle.weights_grad_scale)
    finally:
        fastnas.set_backend(None)


@pytest.mark.skipif(not backend.load_extension(), reason="fastnas._C is not built")
def test_cpu_settings_reject_unknown_levels_and_report_the_active_one():
    best = backend.cpu_isa_levels()[0]
    with pytest.raises(ValueError, match="isa must be"):
        torch.ops.fastnas._cpu_settings("sse9")
    with pytest.raises(ValueError, match="stream_above_bytes"):
        torch.ops.fastnas._cpu_settings(None, -1)
    with cpu_kernel_settings(isa="portable"):
        assert torch.ops.fastnas._cpu_settings()[0] == "portable"
    assert torch.ops.fastnas._cpu_settings()[0] == best
