"""The Triton lean BatchNorm (``kernels/batch_norm.py``), the CUDA kernels of ``fastnas::batch_norm_parts``
and ``fastnas::batch_norm_parts_backward``.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``): float32, float16 and float64 against float64 ``F.batch_norm`` (output, running
statistics, input gradient), gradcheck in float64, chunks of more blocks than one launch takes,
missing gradients, determinism and named errors. The kernels compiled for sm_80 and sm_90 (no GPU
needed) are checked for spills, 16-byte accesses and atomics. With a GPU the same tests run on CUDA,
plus the supernet path: ``lean_batch_norm`` through the registered ops, opcheck and gradcheck.
Without one, a forward of ``lean_batch_norm`` on fake CUDA tensors proves the CUDA path is taken and
the fake kernels describe it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA

from fastnas import backend
from fastnas.ops.reference import accumulation_dtype

pytest.importorskip("triton", reason="the Triton BatchNorm needs the triton package")
if backend.unavailable_reason("triton"):
    pytest.skip(f"the Triton BatchNorm is unavailable: {backend.unavailable_reason('triton')}", allow_module_level=True)
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

from fastnas.kernels import batch_norm as kb  # noqa: E402  (after the interpreter switch)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# the interpreter rounds float32 -> bfloat16 toward zero: bfloat16 on a GPU only
DTYPES = [torch.float32, torch.float16, torch.float64] + ([] if INTERPRETED else [torch.bfloat16])
# (B, C, H, W, parts): the supernets' groups, odd planes (masked tiles, scalar accesses), planes over
# one tile, one pixel per image, more blocks than a backward launch takes (20 > 16)
SHAPES = [
    (4, 12, 5, 7, 3),
    (3, 8, 8, 8, 2),
    (2, 6, 33, 33, 1),
    (2, 4, 64, 80, 2),  # a 16-divisible plane over one tile (5120 > 4096 elements)
    (5, 4, 1, 1, 2),
    (2, 20, 3, 3, 20),
    (8, 32, 16, 16, 4),
]
# output/gradient: a few roundings to the dtype; running statistics: float32 unless float64
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-11),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
ROOT = Path(__file__).resolve().parents[1]


def stats_tolerance(dtype):
    return TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]


def random_case(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W, parts = shape
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) * 3 + 5
    g = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    rm = torch.randn(C, generator=gen, dtype=torch.float64)
    rv = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    return x.to(dtype), g.to(dtype), rm, rv


def reference(x, g, rm, rv, momentum, eps):
    """Float64 F.batch_norm (training, no affine) of x: output, running statistics, dL/dx for g."""
    rm, rv = rm.clone(), rv.clone()
    x64 = x.double().requires_grad_()
    y = F.batch_norm(x64, rm, rv, None, None, True, momentum, eps)
    (dx,) = torch.autograd.grad(y, x64, g.double())
    return y.detach(), rm, rv, dx


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_batch_norm(shape, dtype):
    parts = shape[4]
    x, g, rm, rv = random_case(shape, dtype, seed=sum(shape) + DTYPES.index(dtype))
    y_ref, rm_ref, rv_ref, dx_ref = reference(x, g, rm, rv, 0.1, 1e-5)
    stats = accumulation_dtype(dtype)
    rm_k, rv_k = rm.to(DEVICE, stats), rv.to(DEVICE, stats)
    out, mean, invstd = kb.batch_norm_parts(x.to(DEVICE), parts, rm_k, rv_k, 0.1, 1e-5)
    assert out.shape == (parts, shape[0], shape[1] // parts, *shape[2:4]) and out.dtype == dtype
    assert mean.dtype == invstd.dtype == stats
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(torch.cat(list(out.unbind(0)), 1).double().cpu(), y_ref, **tol)
    x64 = x.double()
    torch.testing.assert_close(mean.double().cpu(), x64.mean((0, 2, 3)), **stats_tolerance(dtype))
    var = x64.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd.double().cpu(), (var + 1e-5).rsqrt(), **stats_tolerance(dtype))
    torch.testing.assert_close(rm_k.double().cpu(), rm_ref, **stats_tolerance(dtype))
    torch.testing.assert_close(rv_k.double().cpu(), rv_ref, **stats_tolerance(dtype))
    grads = [t.contiguous().to(DEVICE) for t in g.chunk(parts, 1)]
    dx = kb.batch_norm_parts_backward(grads, list(out.unbind(0)), invstd)
    assert dx.shape == x.shape and dx.is_contiguous() and dx.dtype == dtype
    scale = dx_ref.abs().max().item()
    torch.testing.assert_close(dx.double().cpu(), dx_ref, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))


def test_without_running_statistics_and_missing_gradients():
    x, g, _, _ = random_case((3, 6, 4, 4, 3), torch.float64, seed=3)
    out, mean, invstd = kb.batch_norm_parts(x.to(DEVICE), 3, None, None, 0.0, 1e-3)
    y_ref = F.batch_norm(x, None, None, None, None, True, 0.0, 1e-3)
    torch.testing.assert_close(torch.cat(list(out.unbind(0)), 1).cpu(), y_ref, **TOLERANCE[torch.float64])
    # a block nobody used has no gradient (the op's Tensor?[] grads): it counts as zeros
    grads = [t.contiguous().to(DEVICE) for t in g.chunk(3, 1)]
    dx = kb.batch_norm_parts_backward([grads[0], None, grads[2]], list(out.unbind(0)), invstd)
    zeroed = [grads[0], torch.zeros_like(grads[1]), grads[2]]
    torch.testing.assert_close(dx, kb.batch_norm_parts_backward(zeroed, list(out.unbind(0)), invstd), rtol=0, atol=0)
    assert dx[:, 2:4].abs().max() == 0  # per channel: no gradient in, none out
    # ...and a gradient given in another layout is made dense first
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in grads]
    assert not strided[0].is_contiguous()
    torch.testing.assert_close(
        kb.batch_norm_parts_backward(strided, list(out.unbind(0)), invstd),
        kb.batch_norm_parts_backward(grads, list(out.unbind(0)), invstd),
        rtol=0,
        atol=0,
    )


class _TritonBatchNorm(torch.autograd.Function):
    """The kernels with an autograd node, for gradcheck (on CPU the registered op runs the C++ kernels)."""

    @staticmethod
    def forward(ctx, x, parts):
        out, _, invstd = kb.batch_norm_parts(x, parts, None, None, 0.0, 1e-5)
        ys = out.unbind(0)
        ctx.save_for_backward(invstd, *ys)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        invstd, *ys = ctx.saved_tensors
        return kb.batch_norm_parts_backward(list(grads), ys, invstd), None


def test_gradcheck_float64():
    x = (torch.randn(3, 4, 3, 2, dtype=torch.float64) * 2 + 1).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _TritonBatchNorm.apply(t, 2), (x,), eps=1e-6, atol=1e-6)


def test_deterministic():
    x, g, _, _ = random_case((8, 12, 7, 9, 3), torch.float32, seed=5)
    x, grads = x.to(DEVICE), [t.contiguous().to(DEVICE) for t in g.chunk(3, 1)]
    out1, mean1, inv1 = kb.batch_norm_parts(x, 3, None, None, 0.0, 1e-5)
    out2, mean2, inv2 = kb.batch_norm_parts(x, 3, None, None, 0.0, 1e-5)
    assert torch.equal(out1, out2) and torch.equal(mean1, mean2) and torch.equal(inv1, inv2)
    dx1 = kb.batch_norm_parts_backward(grads, list(out1.unbind(0)), inv1)
    dx2 = kb.batch_norm_parts_backward(grads, list(out1.unbind(0)), inv1)
    assert torch.equal(dx1, dx2)


def test_named_errors():
    x = torch.randn(2, 6, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        kb.batch_norm_parts(x.contiguous(memory_format=torch.channels_last), 3, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="parts must be a positive divisor"):
        kb.batch_norm_parts(x, 4, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        kb.batch_norm_parts(x[:1, :, :1, :1].contiguous(), 3, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="given together"):
        kb.batch_norm_parts(x, 3, torch.zeros(6, device=DEVICE), None, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"running_var must be a contiguous floating-point \[6\]"):
        kb.batch_norm_parts(x, 3, torch.zeros(6, device=DEVICE), torch.ones(5, device=DEVICE), 0.1, 1e-5)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        kb.batch_norm_parts(x.to(torch.int32), 3, None, None, 0.1, 1e-5)
    out, _, invstd = kb.batch_norm_parts(x, 3, None, None, 0.1, 1e-5)
    ys = list(out.unbind(0))
    with pytest.raises(ValueError, match="one length"):
        kb.batch_norm_parts_backward(ys[:2], ys, invstd)
    with pytest.raises(ValueError, match=r"grads\[1\] must be a contiguous"):
        kb.batch_norm_parts_backward([ys[0], ys[1][:1], ys[2]], ys, invstd)
    with pytest.raises(ValueError, match=r"invstd must be a contiguous torch.float32 \[6\]"):
        kb.batch_norm_parts_backward(ys, ys, invstd[:5])


def test_registered_as_the_ops_cuda_kernels():
    if not backend.load_extension():
        pytest.skip("the compiled extension (which defines the ops) is not built")
    from fastnas.ops.batch_norm import register_triton_kernels

    register_triton_kernels()
    register_triton_kernels()  # idempotent
    cuda = torch._C.DispatchKey.CUDA
    assert torch.ops.fastnas.batch_norm_parts.default.has_kernel_for_dispatch_key(cuda)
    assert torch.ops.fastnas.batch_norm_parts_backward.default.has_kernel_for_dispatch_key(cuda)


def test_lean_batch_norm_takes_the_cuda_path_on_fake_cuda_tensors(monkeypatch):
    """What a GPU's supernet runs, traced without one: the registered ops, NCHW blocks, float32 stats."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastnas.ops import batch_norm as bn_ops

    if not backend.load_extension():
        pytest.skip("the compiled extension is not built")
    monkeypatch.setattr(backend, "_selected", {"batch_norm": "triton"})
    monkeypatch.setattr(backend, "_resolved", {})
    with FakeTensorMode():
        x = torch.empty(4, 6, 5, 5, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        rm, rv = torch.zeros(6, device="cuda"), torch.ones(6, device="cuda")
        assert bn_ops.uses_kernels(x, rm, rv)
        assert not bn_ops.uses_kernels(x.detach().contiguous(memory_format=torch.channels_last), rm, rv)
        ys, mean, invstd = bn_ops.lean_batch_norm(x, 3, rm, rv, 0.1, 1e-5)
        assert "CppNode<fastnas::" in ys[0].grad_fn.name()  # the C++ autograd (csrc/batch_norm_autograd.cpp)
        assert [tuple(y.shape) for y in ys] == [(4, 2, 5, 5)] * 3 and all(y.is_contiguous() for y in ys)
        assert mean.dtype == invstd.dtype == torch.float32
        dx = torch.ops.fastnas.batch_norm_parts_backward(ys, ys, invstd)
        assert tuple(dx.shape) == (4, 6, 5, 5) and dx.is_contiguous() and dx.device.type == "cuda"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_lean_batch_norm_on_cuda_runs_the_triton_kernels():
    from torch.library import opcheck

    from fastnas.ops import batch_norm as bn_ops

    if not backend.load_extension():
        pytest.skip("the compiled extension is not built")
    assert backend.kernel_choices("cuda")["batch_norm"] == "triton"
    x = (torch.randn(4, 6, 5, 5, dtype=torch.float64, device="cuda") * 2 + 1).requires_grad_()
    assert bn_ops.uses_kernels(x)
    opcheck(torch.ops.fastnas.batch_norm_parts.default, (x.detach(), 3, None, None, 0.1, 1e-5))
    ys, _, invstd = bn_ops.lean_batch_norm(x, 3, None, None, 0.1, 1e-5)
    assert "CppNode<fastnas::" in ys[0].grad_fn.name()  # the C++ autograd (csrc/batch_norm_autograd.cpp)
    opcheck(torch.ops.fastnas.batch_norm_parts_backward.default, ([y.detach() for y in ys], ys, invstd.detach()))
    small = x[:, :, :3, :2].detach().contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bn_ops.lean_batch_norm(t, 3, None, None, 0.1, 1e-5)[0], (small,))
    assert torch.autograd.gradgradcheck(lambda t: bn_ops.lean_batch_norm(t, 3, None, None, 0.1, 1e-5)[0], (small,))


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "triton_offline.py"), "--batch-norm", "80", "90"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert run.returncode == 0, f"compiling the BatchNorm kernels failed:\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_compiled_kernels(compiled):
    """sm_80 and sm_90: no spills, no atomics; on 16-divisible planes every access of a tile is a
    16-byte vector (forward: two reads of x, one write; backward: two reads of g and y, one write of
    dx), and at least three quarters of a tile's loads are in flight at once (a program streams its
    channel alone: these loads are all an SM has in flight for it); a flat count of branches,
    whatever the number of blocks selected from."""
    assert len(compiled) == 2 * len(kb.launch_variants())
    branches = {}
    for f in compiled:
        what = f"{f['form']} {f['dtype']} plane {f['plane']} ({f['extra']}) sm_{f['capability']}"
        assert f["stack"] == 0 and f["local"] == 0, f"{what} spills: {f}"
        assert f["atomics"] == 0, what
        if f["plane"] % 16 == 0:
            dtype = getattr(torch, f["dtype"])
            itemsize = torch.empty(0, dtype=dtype).element_size()
            vectors = kb.block(f["plane"], dtype) * itemsize // 16 // (32 * kb.NUM_WARPS)  # per thread and tile
            assert vectors >= 4, what
            reads, writes, tensors = (2, 1, 1) if f["form"] == "forward" else (4, 1, 2)
            assert f["loads_128"] >= reads * vectors and f["stores_128"] >= writes * vectors, f"{what}: {f}"
            in_flight = f["loads_in_flight"]  # sm_80 float64 backward: 14 of 16
            assert in_flight >= tensors * vectors * 3 // 4, f"{what}: {in_flight} loads in flight"
        if f["form"] == "backward" and f["plane"] == 1024:
            branches.setdefault((f["dtype"], f["capability"]), set()).add(f["branches"])
    assert all(len(counts) == 1 for counts in branches.values()), branches


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_direct_launches_match_tritons_on_cuda(offset):
    """A key's first call goes through Triton's launch path, later ones call the compiled kernel's
    launcher directly: the same bits."""
    kb._LAUNCHER.compiled.clear()
    x, g, _, _ = random_case((4, 12, 8, 8, 3), torch.float32, seed=7)
    flat = torch.cat([x.new_zeros(offset), x.flatten()]).cuda()
    x = flat[offset:].view(4, 12, 8, 8)
    grads = [t.contiguous().cuda() for t in g.chunk(3, 1)]
    first = kb.batch_norm_parts(x, 3, None, None, 0.1, 1e-5)
    dx_first = kb.batch_norm_parts_backward(grads, list(first[0].unbind(0)), first[2])
    assert len(kb._LAUNCHER.compiled) == 2
    second = kb.batch_norm_parts(x, 3, None, None, 0.1, 1e-5)
    dx_second = kb.batch_norm_parts_backward(grads, list(first[0].unbind(0)), first[2])
    assert len(kb._LAUNCHER.compiled) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and torch.equal(dx_first, dx_second)
