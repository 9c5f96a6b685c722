"""fastnas.ops.batch_norm: the lean BatchNorm (compiled kernels and native path) against PyTorch's
BatchNorm in float64 and float32, running statistics, missing gradients, double backward, the
registered ops (opcheck, bad input), determinism and tracing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import graph_recording_backend, ops_of
from torch.library import opcheck

from fastnas import backend
from fastnas.ops import batch_norm as bn_ops
from fastnas.ops.batch_norm import lean_batch_norm

pytestmark = pytest.mark.skipif(not backend.load_extension(), reason="the compiled extension is not built")

# (B, C, H, W, parts): the supernets' groups of 1-3 edges, channel counts around the vector widths
# (1, 3, 17, 70 per part) and the kernels' blocks of 16 channels summed at once (up to 4: 96 and 136
# channels take several runs of blocks and a remainder), odd pixel counts (a partial chunk of 128
# pixels; 2448 pixels: more than one run of 16 chunks in the backward), one pixel per image
SHAPES = [
    (4, 12, 5, 7, 3),
    (2, 6, 3, 3, 1),
    (3, 70, 4, 5, 2),
    (2, 51, 9, 11, 3),
    (5, 1, 6, 6, 1),
    (3, 2, 1, 1, 2),
    (8, 32, 16, 16, 2),
    (2, 96, 5, 6, 3),
    (2, 136, 3, 5, 1),
    (9, 6, 16, 17, 3),
]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def random_input(shape, dtype, scale=3.0, shift=5.0):
    B, C, H, W, _ = shape
    return nhwc(torch.randn(B, C, H, W, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()


def reference(x, running_mean, running_var, momentum, eps):
    """Float64 F.batch_norm (training, no affine) of a copy of x: output, running statistics."""
    rm = None if running_mean is None else running_mean.detach().double().clone()
    rv = None if running_var is None else running_var.detach().double().clone()
    x64 = x.detach().double().requires_grad_()
    y = F.batch_norm(x64, rm, rv, None, None, True, momentum, eps)
    return x64, y, rm, rv


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["kernels", "native"])
def test_matches_pytorch_batch_norm(shape, dtype, memory_format):
    parts, C = shape[4], shape[1]
    x = random_input(shape, dtype).detach().contiguous(memory_format=memory_format).requires_grad_()
    assert bn_ops.uses_kernels(x) == x.is_contiguous(memory_format=torch.channels_last)  # one channel: both layouts
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    x64, y_ref, rm_ref, rv_ref = reference(x, rm, rv, 0.1, 1e-5)
    ys, mean, invstd = lean_batch_norm(x, parts, rm, rv, 0.1, 1e-5)
    assert len(ys) == parts
    for y in ys:
        assert y.shape == (shape[0], C // parts, *shape[2:4]) and y.is_contiguous(memory_format=memory_format)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(torch.cat(ys, 1).double(), y_ref.detach(), **tol)
    x_flat = x.detach().double().transpose(0, 1).reshape(C, -1)
    torch.testing.assert_close(mean.double(), x_flat.mean(1), **tol)
    torch.testing.assert_close(invstd.double(), (x_flat.var(1, unbiased=False) + 1e-5).rsqrt(), **tol)
    torch.testing.assert_close(rm.double(), rm_ref, **tol)
    torch.testing.assert_close(rv.double(), rv_ref, **tol)

    grads = [torch.randn_like(y) for y in ys]
    if parts > 1:
        grads[1] = None  # an output that does not reach the loss: its block's gradient is zero
    used = [(y, g) for y, g in zip(ys, grads) if g is not None]
    (dx,) = torch.autograd.grad([y for y, _ in used], x, [g for _, g in used])
    g_ref = torch.cat([torch.zeros_like(y) if g is None else g for y, g in zip(ys, grads)], 1).double()
    (dx_ref,) = torch.autograd.grad(y_ref, x64, g_ref)
    torch.testing.assert_close(dx.double(), dx_ref, **tol)
    assert dx.is_contiguous(memory_format=memory_format)


def test_without_running_statistics_and_large_mean():
    # the shifted sums keep the variance's digits under a mean 1e4 times the spread
    x = random_input((4, 8, 6, 6, 2), torch.float32, scale=1.0, shift=1e4)
    ys, mean, invstd = lean_batch_norm(x, 2, None, None, 0.0, 1e-5)
    _, y_ref, _, _ = reference(x, None, None, 0.0, 1e-5)
    torch.testing.assert_close(torch.cat(ys, 1).double(), y_ref.detach(), rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["kernels", "native"])
def test_gradcheck_and_double_backward(memory_format):
    x = random_input((2, 6, 3, 4, 3), torch.float64).detach().contiguous(memory_format=memory_format)
    x.requires_grad_()

    def fn(x):
        ys, _, _ = lean_batch_norm(x, 3, None, None, 0.0, 1e-5)
        return tuple(y * (i + 1) for i, y in enumerate(ys))

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))

    def with_invstd(x):  # invstd is differentiable: its gradient joins the blocks'
        ys, _, invstd = lean_batch_norm(x, 3, None, None, 0.0, 1e-5)
        return ys[0] * 2, invstd

    assert torch.autograd.gradcheck(with_invstd, (x,))
    assert torch.autograd.gradgradcheck(with_invstd, (x,))


def test_opcheck_registered_ops():
    x = random_input((2, 6, 3, 4, 3), torch.float32).detach()
    rm, rv = torch.zeros(6), torch.ones(6)
    opcheck(torch.ops.fastnas.batch_norm_parts.default, (x, 3, rm, rv, 0.1, 1e-5))
    opcheck(torch.ops.fastnas.batch_norm_parts.default, (x, 2, None, None, 0.0, 1e-3))
    out, _, invstd = torch.ops.fastnas.batch_norm_parts(x, 3, None, None, 0.0, 1e-5)
    ys = list(out.unbind(0))
    grads = [torch.randn_like(y) for y in ys]
    opcheck(torch.ops.fastnas.batch_norm_parts_backward.default, (grads, ys, invstd))
    opcheck(torch.ops.fastnas.batch_norm_parts_backward.default, ([grads[0], None, grads[2]], ys, invstd))
    xg = x.clone().requires_grad_()  # the C++ autograd that lean_batch_norm runs
    opcheck(torch.ops.fastnas._lean_batch_norm_autograd.default, (xg, 3, rm.clone(), rv.clone(), 0.1, 1e-5))
    opcheck(torch.ops.fastnas._lean_batch_norm_autograd.default, (xg, 2, None, None, 0.0, 1e-3))


def test_deterministic_across_thread_counts():
    x = random_input((16, 48, 16, 16, 3), torch.float32)
    g = [torch.randn(16, 16, 16, 16) for _ in range(3)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            ys, mean, invstd = lean_batch_norm(x, 3, None, None, 0.0, 1e-5)
            (dx,) = torch.autograd.grad(ys, x, g)
            results.append((torch.cat(ys, 1), mean, invstd, dx))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    x = random_input((2, 6, 3, 4, 3), torch.float32).detach()
    with pytest.raises(ValueError, match="parts must divide the 6 channels"):
        torch.ops.fastnas.batch_norm_parts(x, 4, None, None, 0.0, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.ops.fastnas.batch_norm_parts(x[:1, :, :1, :1], 3, None, None, 0.0, 1e-5)
    with pytest.raises(ValueError, match="running_mean must be a contiguous 1-D tensor of 6"):
        torch.ops.fastnas.batch_norm_parts(x, 3, torch.zeros(5), torch.ones(6), 0.1, 1e-5)
    with pytest.raises(TypeError, match="running_var must have the input's dtype"):
        torch.ops.fastnas.batch_norm_parts(x, 3, torch.zeros(6), torch.ones(6, dtype=torch.float64), 0.1, 1e-5)
    with pytest.raises(ValueError, match="given together"):
        torch.ops.fastnas.batch_norm_parts(x, 3, torch.zeros(6), None, 0.1, 1e-5)
    out, _, invstd = torch.ops.fastnas.batch_norm_parts(x, 3, None, None, 0.0, 1e-5)
    ys = list(out.unbind(0))
    with pytest.raises(ValueError, match="grads must have one entry per output"):
        torch.ops.fastnas.batch_norm_parts_backward([ys[0]], ys, invstd)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        torch.ops.fastnas.batch_norm_parts_backward([ys[0], ys[1][:1], ys[2]], ys, invstd)
    with pytest.raises(ValueError, match="invstd must be 1-D with 6 values"):
        torch.ops.fastnas.batch_norm_parts_backward(ys, ys, invstd[:5])


def test_used_only_where_the_kernels_apply():
    x = random_input((2, 6, 3, 4, 3), torch.float32)
    assert bn_ops.uses_kernels(x)
    assert not bn_ops.uses_kernels(x.detach().contiguous())  # NCHW: the native kernel
    assert not bn_ops.uses_kernels(x.detach().to(torch.bfloat16))
    assert not bn_ops.uses_kernels(x, torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))


def test_traces_with_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = random_input((2, 6, 3, 4, 3), torch.float32)

    def fn(x):
        ys, _, _ = lean_batch_norm(x, 3, None, None, 0.0, 1e-5)
        return sum(y.sum() * (i + 1) for i, y in enumerate(ys))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (dx_compiled,) = torch.autograd.grad(compiled(x), x)
    (dx_eager,) = torch.autograd.grad(fn(x), x)
    torch.testing.assert_close(dx_compiled, dx_eager)


@pytest.mark.parametrize("invstd_differentiable", [False, True])
def test_compiled_backward_runs_the_kernel(invstd_differentiable):
    """The compiled graph runs the kernels' backward, not PyTorch's composite one, whether ``invstd``
    is differentiable (a traced backward gives it a gradient, used or not: the graph adds the term
    through it) or not; both equal eager, ``invstd`` used in the loss or not."""
    torch._dynamo.reset()
    x = random_input((2, 6, 3, 4, 3), torch.float32)
    running_mean, running_var = torch.zeros(6), torch.ones(6)

    def fn(x, running_mean, running_var, use_invstd):
        ys, _, invstd = lean_batch_norm(x, 3, running_mean, running_var, 0.1, 1e-5, None, invstd_differentiable)
        loss = sum(y.square().sum() * (i + 1) for i, y in enumerate(ys))
        return loss + (invstd * torch.arange(1.0, 7.0)).sum() if use_invstd else loss

    kernel = torch.ops.fastnas.batch_norm_parts_backward.default
    composite = torch.ops.aten.native_batch_norm_backward.default
    for use_invstd in (False, True) if invstd_differentiable else (False,):
        torch._dynamo.reset()
        forward_graphs, backward_graphs = [], []
        backend = graph_recording_backend(forward_graphs, backward_graphs)
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        stats = running_mean.clone(), running_var.clone()
        expected_stats = running_mean.clone(), running_var.clone()
        (dx_compiled,) = torch.autograd.grad(compiled(x, *stats, use_invstd), x)
        (dx_eager,) = torch.autograd.grad(fn(x, *expected_stats, use_invstd), x)
        torch.testing.assert_close(dx_compiled, dx_eager)
        torch.testing.assert_close(stats, expected_stats)
        (backward,) = backward_graphs
        assert kernel in ops_of(backward) and composite not in ops_of(backward)
    _, _, invstd = lean_batch_norm(x, 3, None, None, 0.1, 1e-5, None, invstd_differentiable)
    assert invstd.requires_grad == invstd_differentiable


def test_compiles_with_dynamic_shapes_by_inductor():
    """``torch.compile(..., dynamic=True)`` of a convolution, the lean BatchNorm's blocks and a mixed sum
    (a supernet edge group's pattern) compiles with inductor, and its outputs, input gradient and
    weight gradients equal eager's; a second plane size compiles again and equals eager too."""
    import fastnas

    torch._dynamo.reset()
    torch.manual_seed(0)
    first = nn_conv(3, 8)
    second = nn_conv(4, 4)

    def fn(x, w):
        ys, _, _ = lean_batch_norm(first(x), 2, None, None, 0.1, 1e-5, invstd_differentiable=False)
        return second(fastnas.mixed_sum(ys, w))

    compiled = torch.compile(fn, dynamic=True)
    for size in (6, 5):
        x = nhwc(torch.randn(2, 3, size, size)).requires_grad_()
        w = torch.randn(2, requires_grad=True)
        leaves = [x, w, first.weight, second.weight]
        y_compiled = compiled(x, w)
        grads_compiled = torch.autograd.grad(y_compiled.square().sum(), leaves)
        y_eager = fn(x, w)
        grads_eager = torch.autograd.grad(y_eager.square().sum(), leaves)
        torch.testing.assert_close(y_compiled, y_eager)
        torch.testing.assert_close(grads_compiled, grads_eager)


def nn_conv(c_in: int, c_out: int) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
