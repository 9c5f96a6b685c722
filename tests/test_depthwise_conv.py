"""fastnas.ops.depthwise_conv: gradients against PyTorch's convolution in float64 and float32, the
registered kernels (opcheck, bad input), determinism, fallbacks and tracing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastnas import backend
from fastnas.ops import depthwise_conv
from fastnas.ops.depthwise_conv import depthwise_conv2d

pytestmark = pytest.mark.skipif(not backend.load_extension(), reason="the compiled extension is not built")

# (B, C, H, W, kernel, stride, padding, dilation): DARTS's sep/dil convs at both strides, odd sizes,
# asymmetric geometry, channel counts around the vector widths (1, 3, 17, 70: full blocks of 4
# vectors, a partial block, a scalar tail), outputs of one pixel
GEOMETRIES = [
    (2, 16, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 16, 8, 8, (5, 5), (1, 1), (2, 2), (1, 1)),
    (2, 16, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 16, 9, 8, (5, 5), (2, 2), (2, 2), (1, 1)),
    (2, 16, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2)),
    (2, 16, 8, 8, (5, 5), (1, 1), (4, 4), (2, 2)),
    (2, 16, 8, 8, (3, 3), (2, 2), (2, 2), (2, 2)),
    (2, 16, 8, 8, (5, 5), (2, 2), (4, 4), (2, 2)),
    (3, 70, 7, 5, (3, 5), (2, 1), (0, 3), (1, 2)),
    (1, 17, 6, 11, (1, 7), (1, 3), (0, 1), (1, 1)),
    (2, 3, 5, 5, (5, 5), (1, 1), (0, 0), (1, 1)),
    (1, 1, 4, 4, (3, 3), (3, 3), (1, 1), (2, 2)),
]


def native_grads(x, w, g, stride, padding, dilation):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])
    return (y.detach(), *torch.autograd.grad(y, (x, w), g))


def random_case(geometry, dtype, memory_format=torch.channels_last):
    B, C, H, W, kernel, stride, padding, dilation = geometry
    x = torch.randn(B, C, H, W, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.randn(C, 1, *kernel, dtype=dtype, requires_grad=True)
    return x, w, stride, padding, dilation


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_gradients_match_pytorch_in_float64(geometry, memory_format):
    x, w, stride, padding, dilation = random_case(geometry, torch.float64, memory_format)
    y = depthwise_conv2d(x, w, stride, padding, dilation)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    y_ref, dx_ref, dw_ref = native_grads(x, w, g, stride, padding, dilation)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the forward is PyTorch's own
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-12)
    assert dx.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("geometry", GEOMETRIES[:8])
def test_gradients_match_float64_in_float32(geometry):
    x, w, stride, padding, dilation = random_case(geometry, torch.float32)
    y = depthwise_conv2d(x, w, stride, padding, dilation)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    _, dx64, dw64 = native_grads(x.double(), w.double(), g.double(), stride, padding, dilation)
    # each gradient sums at most B * H * W products of unit-scale terms in float32
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-4)


def test_gradcheck_and_double_backward():
    x, w, stride, padding, dilation = random_case((1, 3, 5, 6, (3, 3), (2, 1), (2, 1), (2, 1)), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: depthwise_conv2d(a, b, stride, padding, dilation), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: depthwise_conv2d(a, b, stride, padding, dilation), (x, w))


def test_weight_gradient_does_not_depend_on_the_thread_count():
    x, w, stride, padding, dilation = random_case((4, 48, 16, 16, (5, 5), (1, 1), (2, 2), (1, 1)), torch.float32)
    g = torch.randn(4, 48, 16, 16).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            dw = torch.ops.fastnas.depthwise_conv2d_weight_grad(g, x.detach(), [5, 5], stride, padding, dilation)
            dx = torch.ops.fastnas.depthwise_conv2d_input_grad(g, w.detach(), list(x.shape), stride, padding, dilation)
            results.append((dw, dx))
    finally:
        torch.set_num_threads(threads)
    for dw, dx in results[1:]:
        assert torch.equal(dw, results[0][0]) and torch.equal(dx, results[0][1])


def test_opcheck_registered_kernels():
    x, w, stride, padding, dilation = random_case(GEOMETRIES[8], torch.float32)
    g = torch.randn_like(depthwise_conv2d(x, w, stride, padding, dilation))
    opcheck(torch.ops.fastnas.depthwise_conv2d_weight_grad.default, (g, x.detach(), [3, 5], stride, padding, dilation))
    opcheck(
        torch.ops.fastnas.depthwise_conv2d_input_grad.default, (g, w.detach(), list(x.shape), stride, padding, dilation)
    )


def test_bad_input_is_named():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 3, 3)
    weight_grad = torch.ops.fastnas.depthwise_conv2d_weight_grad
    input_grad = torch.ops.fastnas.depthwise_conv2d_input_grad
    with pytest.raises(RuntimeError, match="grad must be 4-D and channels_last"):
        weight_grad(g.contiguous(), x, [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="input must be 4-D and channels_last"):
        weight_grad(g, x.contiguous(), [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="grad must have shape"):
        weight_grad(g, x, [3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        weight_grad(g, x, [3, 3], [0, 1], [1, 1], [1, 1])
    with pytest.raises(TypeError, match="grad must be float32 or float64"):
        weight_grad(g.half(), x.half(), [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(TypeError, match="input must have grad's dtype"):
        weight_grad(g, x.double(), [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="weight must be \\[C, 1, KH, KW\\]"):
        input_grad(g, torch.randn(4, 2, 3, 3), [2, 4, 6, 6], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="weight has 4 channels, the input 5"):
        input_grad(g, w, [2, 5, 6, 6], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="weight must be \\[C, 1, KH, KW\\] with C = 4"):
        depthwise_conv2d(x, torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        depthwise_conv2d(x, w, stride=(1, 1, 1))


def test_falls_back_to_pytorch_where_the_kernels_do_not_run():
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    assert not depthwise_conv.uses_kernels(x, w)
    y = depthwise_conv2d(x, w, padding=1)
    assert y.grad_fn.name() == "ConvolutionBackward0"
    x32, w32 = x.float().detach().requires_grad_(), w.float().detach().requires_grad_()
    assert depthwise_conv2d(x32, w32, padding=1).grad_fn.name() == "_DepthwiseConv2dBackward"
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD: PyTorch's own convolution
        dual = torch.autograd.forward_ad.make_dual(x32.detach(), torch.ones_like(x32))
        tangent = torch.autograd.forward_ad.unpack_dual(depthwise_conv2d(dual, w32.detach(), padding=1)).tangent
    torch.testing.assert_close(tangent, F.conv2d(torch.ones_like(x32), w32.detach(), None, 1, 1, 1, 4))


def test_compiles_without_graph_breaks():
    x, w, stride, padding, dilation = random_case(GEOMETRIES[3], torch.float64)
    compiled = torch.compile(lambda a, b: depthwise_conv2d(a, b, stride, padding, dilation).square().sum(),
                             backend="aot_eager", fullgraph=True)  # fmt: skip
    dx, dw = torch.autograd.grad(compiled(x, w), (x, w))
    y = F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])
    dx_ref, dw_ref = torch.autograd.grad(y.square().sum(), (x, w))
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-12)
