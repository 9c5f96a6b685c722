"""fastnas.ops.avg_pool: forward and gradient against F.avg_pool2d in float64 and float32, the registered
kernels (opcheck, bad input), double backward, determinism, fallbacks and tracing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastnas import backend
from fastnas.ops import avg_pool
from fastnas.ops.avg_pool import avg_pool2d

pytestmark = pytest.mark.skipif(not backend.load_extension(), reason="the compiled extension is not built")

# the eager autograd in C++ (csrc/avg_pool_autograd.cpp): the pooling and its input gradient
KERNEL_NODE = "torch::autograd::CppNode<fastnas::(anonymous namespace)::AvgPool>"
INPUT_GRAD_NODE = "torch::autograd::CppNode<fastnas::(anonymous namespace)::AvgPoolInputGrad>"

# (B, C, H, W, kernel, stride, padding): the spaces' 3x3 pools at both strides, 2x2 stride 2, odd
# sizes, asymmetric geometry, strides above the kernel (pixels in no window), channel counts around
# the vector widths (1, 3, 17, 70: full blocks of 4 vectors, a partial block, a scalar tail), outputs
# of one pixel
GEOMETRIES = [
    (2, 16, 8, 8, 3, 1, 1),
    (2, 16, 9, 9, 3, 2, 1),
    (2, 16, 8, 8, 2, 2, 0),
    (3, 17, 7, 9, 2, 2, 0),
    (2, 70, 11, 13, 3, 1, 1),
    (1, 3, 5, 7, (3, 5), (2, 1), (1, 2)),
    (2, 1, 9, 6, 5, 1, 2),
    (1, 17, 10, 12, (1, 3), (3, 2), (0, 1)),
    (2, 3, 3, 3, 3, 1, 0),
    (1, 70, 4, 4, 4, 4, 2),
]


def random_case(geometry, dtype, memory_format=torch.channels_last):
    B, C, H, W, kernel, stride, padding = geometry
    x = torch.randn(B, C, H, W, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    return x, kernel, stride, padding


def pytorch_pool(x, kernel, stride, padding, count_include_pad):
    x = x.detach().requires_grad_()
    return x, F.avg_pool2d(x, kernel, stride, padding, count_include_pad=count_include_pad)


@pytest.mark.parametrize("count_include_pad", [False, True], ids=["count_exclude_pad", "count_include_pad"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_pytorch_in_float64(geometry, count_include_pad):
    x, kernel, stride, padding = random_case(geometry, torch.float64)
    y = avg_pool2d(x, kernel, stride, padding, count_include_pad)
    assert y.grad_fn.name() == KERNEL_NODE
    x_ref, y_ref = pytorch_pool(x, kernel, stride, padding, count_include_pad)
    g = torch.randn_like(y_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x_ref, g)[0],
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("count_include_pad", [False, True], ids=["count_exclude_pad", "count_include_pad"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:6])
def test_matches_float64_in_float32(geometry, count_include_pad):
    x, kernel, stride, padding = random_case(geometry, torch.float32)
    y = avg_pool2d(x, kernel, stride, padding, count_include_pad)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    x64, y64 = pytorch_pool(x.double(), kernel, stride, padding, count_include_pad)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    # averages of at most 25 unit-scale terms, each rounded once per addition in float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-6, atol=1e-6)


def test_forward_equals_pytorch_in_float32():
    """The same sums in the same order as ATen's channels_last kernel: equal to the bit."""
    x, kernel, stride, padding = random_case((2, 70, 9, 10, 3, 1, 1), torch.float32)
    torch.testing.assert_close(avg_pool2d(x, kernel, stride, padding, False), pytorch_pool(x, 3, 1, 1, False)[1],
                               rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("count_include_pad", [False, True], ids=["count_exclude_pad", "count_include_pad"])
def test_gradcheck_and_double_backward(count_include_pad):
    x, kernel, stride, padding = random_case((1, 3, 5, 6, 3, (2, 1), 1), torch.float64)
    fn = lambda a: avg_pool2d(a, kernel, stride, padding, count_include_pad)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))
    # the gradient of the gradient runs the kernels too (pooling is linear: its second derivative is 0)
    (dx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    assert dx.grad_fn.name() == INPUT_GRAD_NODE
    x_ref, y_ref = pytorch_pool(x, kernel, stride, padding, count_include_pad)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref, create_graph=True)
    v = torch.randn_like(dx)
    torch.testing.assert_close(torch.autograd.grad(dx, x, v)[0], torch.autograd.grad(dx_ref, x_ref, v)[0],
                               rtol=1e-12, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, None], ids=["nchw", "strided"])
def test_other_layouts_are_pytorch_itself(memory_format):
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    x = (x.contiguous() if memory_format else x.transpose(2, 3)).requires_grad_()
    assert not avg_pool.uses_kernels(x)
    y = avg_pool2d(x, 3, 1, 1, False)
    assert y.grad_fn.name() == "AvgPool2DBackward0"
    torch.testing.assert_close(y, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), rtol=0, atol=0)


def test_input_gradient_does_not_depend_on_the_thread_count():
    x, kernel, stride, padding = random_case((4, 48, 16, 16, 3, 1, 1), torch.float32)
    g = torch.randn(4, 48, 16, 16).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = torch.ops.fastnas.avg_pool2d_nhwc(x.detach(), [3, 3], [1, 1], [1, 1], False)
            dx = torch.ops.fastnas.avg_pool2d_nhwc_backward(g, list(x.shape), [3, 3], [1, 1], [1, 1], False)
            results.append((y, dx))
    finally:
        torch.set_num_threads(threads)
    for y, dx in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(dx, results[0][1])


@pytest.mark.parametrize("count_include_pad", [False, True], ids=["count_exclude_pad", "count_include_pad"])
def test_opcheck_registered_kernels(count_include_pad):
    x, kernel, stride, padding = random_case((2, 17, 7, 9, (3, 5), (2, 1), (1, 2)), torch.float32)
    y = torch.ops.fastnas.avg_pool2d_nhwc(x.detach(), kernel, stride, padding, count_include_pad)
    opcheck(torch.ops.fastnas.avg_pool2d_nhwc.default, (x.detach(), kernel, stride, padding, count_include_pad))
    g = torch.randn_like(y)
    opcheck(
        torch.ops.fastnas.avg_pool2d_nhwc_backward.default,
        (g, list(x.shape), kernel, stride, padding, count_include_pad),
    )
    opcheck(torch.ops.fastnas._avg_pool2d_autograd.default, (x, kernel, stride, padding, count_include_pad))


def test_bad_input_is_named():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    pool = torch.ops.fastnas.avg_pool2d_nhwc
    grad = torch.ops.fastnas.avg_pool2d_nhwc_backward
    with pytest.raises(RuntimeError, match="input must be 4-D and channels_last"):
        pool(x.contiguous(), [3, 3], [1, 1], [1, 1], False)
    with pytest.raises(ValueError, match="input must be 4-D"):
        pool(x[0], [3, 3], [1, 1], [1, 1], False)
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        pool(x.half(), [3, 3], [1, 1], [1, 1], False)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        pool(x, [3, 3], [0, 1], [1, 1], False)
    with pytest.raises(ValueError, match="padding must be at most half of kernel_size"):
        pool(x, [3, 3], [1, 1], [2, 1], False)
    with pytest.raises(ValueError, match="does not fit in the padded input"):
        pool(x, [7, 3], [1, 1], [0, 1], False)
    with pytest.raises(RuntimeError, match="grad must be 4-D and channels_last"):
        grad(g.contiguous(), [2, 4, 6, 6], [3, 3], [1, 1], [1, 1], False)
    with pytest.raises(ValueError, match="grad must have shape"):
        grad(g, [2, 4, 6, 6], [3, 3], [1, 1], [0, 0], False)
    with pytest.raises(ValueError, match="the input must be 4-D"):
        grad(g, [2, 4, 6], [3, 3], [1, 1], [1, 1], False)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        avg_pool2d(x, (3, 3, 3))
    with pytest.raises(TypeError, match="x must be a tensor"):
        avg_pool2d([1.0], 3)


def test_falls_back_to_pytorch_where_the_kernels_do_not_run():
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert not avg_pool.uses_kernels(x)
    assert avg_pool2d(x.requires_grad_(), 3, 1, 1).grad_fn.name() == "AvgPool2DBackward0"
    x32 = x.float().detach().requires_grad_()
    assert avg_pool2d(x32, 3, 1, 1).grad_fn.name() == KERNEL_NODE
    assert not avg_pool.uses_kernels(x32[0])  # unbatched [C, H, W]: PyTorch's
    torch.testing.assert_close(avg_pool2d(x32[0], 3, 1, 1), F.avg_pool2d(x32[0], 3, 1, 1), rtol=0, atol=0)
    if torch.cuda.is_available():
        assert not avg_pool.uses_kernels(x32.cuda())
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD: PyTorch's own pooling
        dual = torch.autograd.forward_ad.make_dual(x32.detach(), torch.ones_like(x32))
        tangent = torch.autograd.forward_ad.unpack_dual(avg_pool2d(dual, 3, 1, 1, False)).tangent
    torch.testing.assert_close(tangent, F.avg_pool2d(torch.ones_like(x32), 3, 1, 1, count_include_pad=False))
    batched = torch.func.vmap(lambda t: avg_pool2d(t, 3, 1, 1, False))(x32.detach()[None])  # a torch.func transform
    torch.testing.assert_close(batched[0], F.avg_pool2d(x32.detach(), 3, 1, 1, count_include_pad=False))


def test_compiles_without_graph_breaks():
    x, kernel, stride, padding = random_case((2, 17, 9, 8, 3, 2, 1), torch.float64)
    compiled = torch.compile(lambda a: avg_pool2d(a, kernel, stride, padding, False).square().sum(),
                             backend="aot_eager", fullgraph=True)  # fmt: skip
    (dx,) = torch.autograd.grad(compiled(x), x)
    x_ref, y_ref = pytorch_pool(x, kernel, stride, padding, False)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


def test_compiled_with_dynamic_shapes_keeps_the_sizes_symbolic():
    """The input gradient op takes the input's size as SymInt[]: one graph serves every size."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda a: avg_pool2d(a, 3, 1, 1, False).square().sum(),
                             backend="aot_eager", fullgraph=True, dynamic=True)  # fmt: skip
    for shape in [(2, 17, 9, 8), (3, 6, 12, 10), (4, 24, 7, 11)]:
        x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
        (dx,) = torch.autograd.grad(compiled(x), x)
        x_ref, y_ref = pytorch_pool(x, 3, 1, 1, False)
        (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]
