"""fastnas.backend, the one place that chooses every op's kernels: what ``auto`` picks on each device,
``FASTNAS_KERNELS`` and ``fastnas.set_kernels`` forcing a choice (the ops then run those kernels,
with the same results), bad names, a missing extension, and a choice made while tracing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import graph_recording_backend, ops_of

import fastnas
from fastnas import backend
from fastnas.ops import avg_pool, batch_norm, depthwise_conv
from fastnas.ops.max_pool import max_pool2d

needs_extension = pytest.mark.skipif(not backend.load_extension(), reason="the compiled extension is not built")


@pytest.fixture(autouse=True)
def automatic_choice(monkeypatch):
    """Every test starts and ends with nothing forced."""
    monkeypatch.delenv("FASTNAS_KERNELS", raising=False)
    monkeypatch.delenv("FASTNAS_BACKEND", raising=False)
    for op in backend.OPS:
        fastnas.set_kernels(op, None)
    yield
    for op in backend.OPS:
        fastnas.set_kernels(op, None)


def nhwc(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()


@needs_extension
def test_auto_takes_fastnas_kernels_on_cpu_and_reports_them():
    assert fastnas.kernel_choices("cpu") == {
        "mixed_sum": "cpu",
        "batch_norm": "cpu",
        "avg_pool": "cpu",
        "depthwise_conv": "cpu",
        "max_pool": "aten",
    }
    assert fastnas.kernel_choices(torch.device("cpu")) == fastnas.kernel_choices("cpu")
    assert backend.get_kernels("mixed_sum", "cpu") == fastnas.get_backend("cpu")
    assert backend.available_kernels("batch_norm", "cpu") == ["cpu", "torch"]
    assert backend.available_kernels("max_pool", "cuda") == ["torch"]


@pytest.mark.filterwarnings("ignore:fastnas. backend .cuda. unavailable")  # a CPU-only build
def test_auto_on_cuda_tensors_takes_triton_batch_norm_and_torch_elsewhere():
    choices = fastnas.kernel_choices("cuda")
    triton = backend.load_extension() and backend.triton_installed()
    assert choices["batch_norm"] == ("triton" if triton else "torch")
    assert {op: choices[op] for op in ("avg_pool", "depthwise_conv", "max_pool")} == dict.fromkeys(
        ("avg_pool", "depthwise_conv", "max_pool"), "torch"
    )
    assert fastnas.kernel_choices("meta") == {
        "mixed_sum": "reference",
        "batch_norm": "torch",
        "avg_pool": "torch",
        "depthwise_conv": "torch",
        "max_pool": "torch",
    }


@needs_extension
def test_set_kernels_routes_each_op_to_pytorch_with_the_same_results():
    x = nhwc(2, 6, 5, 5, dtype=torch.float64)
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64, requires_grad=True)

    def run():
        ys, _, invstd = batch_norm.lean_batch_norm(x, 3, None, None, 0.1, 1e-5)
        pooled = avg_pool.avg_pool2d(ys[0], 3, 1, 1)
        conv = depthwise_conv.depthwise_conv2d(x, w, 1, 1)
        loss = pooled.square().sum() + ys[2].sum() * invstd.sum() + conv.square().sum()
        return [pooled, conv, *torch.autograd.grad(loss, (x, w))]

    assert batch_norm.uses_kernels(x) and avg_pool.uses_kernels(x) and depthwise_conv.uses_kernels(x, w)
    with_kernels = run()
    for op in ("batch_norm", "avg_pool", "depthwise_conv"):
        fastnas.set_kernels(op, "torch")
    assert fastnas.kernel_choices("cpu")["batch_norm"] == "torch"
    assert not (batch_norm.uses_kernels(x) or avg_pool.uses_kernels(x) or depthwise_conv.uses_kernels(x, w))
    torch.testing.assert_close(run(), with_kernels, rtol=1e-10, atol=1e-10)
    fastnas.set_kernels("batch_norm", "auto")
    assert batch_norm.uses_kernels(x) and not avg_pool.uses_kernels(x)


@needs_extension
def test_fastnas_kernels_variable_forces_kernels_and_is_read_at_each_choice(monkeypatch):
    x = nhwc(2, 4, 5, 5)
    monkeypatch.setenv("FASTNAS_KERNELS", " avg_pool=torch , depthwise_conv=TORCH,")
    assert not avg_pool.uses_kernels(x)
    choices = fastnas.kernel_choices("cpu")
    assert (choices["avg_pool"], choices["depthwise_conv"], choices["batch_norm"]) == ("torch", "torch", "cpu")
    fastnas.set_kernels("avg_pool", "cpu")  # the function wins over the variable
    assert avg_pool.uses_kernels(x)
    monkeypatch.setenv("FASTNAS_KERNELS", "batch_norm=auto")
    assert fastnas.kernel_choices("cpu")["depthwise_conv"] == "cpu"


@pytest.mark.parametrize(
    "value,match",
    [
        ("avg_pool=fast", r"FASTNAS_KERNELS: avg_pool must be one of auto, cpu, torch; got 'fast'"),
        ("pool=cpu", r"FASTNAS_KERNELS must hold op=name pairs with op one of batch_norm, avg_pool"),
        ("batch_norm", r"FASTNAS_KERNELS must hold op=name pairs"),
        ("mixed_sum=cpu", r"FASTNAS_KERNELS: the mixed sum's backend is set by FASTNAS_BACKEND"),
    ],
)
def test_a_bad_fastnas_kernels_variable_raises_naming_it(monkeypatch, value, match):
    monkeypatch.setenv("FASTNAS_KERNELS", value)
    with pytest.raises(ValueError, match=match):
        fastnas.kernel_choices("cpu")


def test_set_kernels_refuses_unknown_ops_and_names_and_kernels_that_cannot_run():
    with pytest.raises(ValueError, match=r"set_kernels\(op\) must be one of mixed_sum, batch_norm"):
        fastnas.set_kernels("conv", "torch")
    with pytest.raises(ValueError, match=r"set_kernels\(name\) must be one of auto, cpu, torch; got 'triton'"):
        fastnas.set_kernels("avg_pool", "triton")
    with pytest.raises(ValueError, match=r"op must be one of"):
        backend.get_kernels("conv", "cpu")
    if backend.load_extension() and backend.triton_installed():
        fastnas.set_kernels("batch_norm", "triton")  # a CUDA choice: CPU tensors cannot take it
        with pytest.raises(RuntimeError, match=r"fastnas batch_norm kernels 'triton' cannot run cpu tensors"):
            backend.get_kernels("batch_norm", "cpu")
        assert backend.get_kernels("batch_norm", "cuda") == "triton"


def test_set_kernels_of_the_mixed_sum_is_set_backend():
    fastnas.set_kernels("mixed_sum", "reference")
    assert fastnas.get_backend("cpu") == "reference" == backend.requested_backend()
    fastnas.set_backend(None)
    assert backend.requested_backend() == "auto"


def test_without_the_extension_every_op_takes_pytorch(monkeypatch):
    monkeypatch.setattr(backend, "_extension", lambda: (None, "pretend it was not built"))
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_resolved", {})
    with pytest.warns(RuntimeWarning, match="pretend it was not built"):
        choices = fastnas.kernel_choices("cpu")
    assert choices == {
        "mixed_sum": "reference",
        "batch_norm": "torch",
        "avg_pool": "torch",
        "depthwise_conv": "torch",
        "max_pool": "aten",  # ATen's kernels: no extension needed
    }
    assert not avg_pool.uses_kernels(nhwc(2, 4, 5, 5))
    with pytest.raises(RuntimeError, match=r"fastnas avg_pool kernels 'cpu' is not available: pretend"):
        fastnas.set_kernels("avg_pool", "cpu")


@pytest.mark.parametrize("choice", ["aten", "torch"])
def test_a_traced_call_takes_the_kernels_chosen_while_tracing(choice):
    """Under torch.compile on CPU, max pooling is fastnas::max_pool2d (``aten``) or PyTorch's own
    (``torch``), as chosen when the graph is traced; the compiled results equal eager's either way."""
    fastnas.set_kernels("max_pool", choice)
    x = nhwc(2, 4, 6, 6, dtype=torch.float64)
    forward_graphs, backward_graphs = [], []
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda t: max_pool2d(t, 3, 1, 1).relu(),
        fullgraph=True,
        backend=graph_recording_backend(forward_graphs, backward_graphs),
    )
    y = compiled(x)
    (forward,) = forward_graphs
    assert (torch.ops.fastnas.max_pool2d.default in ops_of(forward)) == (choice == "aten")
    torch.testing.assert_close(y, F.max_pool2d(x, 3, 1, 1).relu(), rtol=0, atol=0)
    torch._dynamo.reset()


@needs_extension
def test_cpu_switches_reach_the_kernels_at_import():
    """``FASTNAS_CPU_ISA``, ``FASTNAS_CPU_STREAM_BYTES`` and ``FASTNAS_CPU_POOL_MB`` are read by
    fastnas.switches and handed to the compiled kernels when ``import fastnas`` loads them."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, fastnas; "
        "print(*torch.ops.fastnas._cpu_settings(), torch.ops.fastnas._cpu_pool_settings(), sep=',')"
    )
    env = {**os.environ, "FASTNAS_CPU_ISA": "Portable", "FASTNAS_CPU_STREAM_BYTES": "12345", "FASTNAS_CPU_POOL_MB": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "portable,12345,0"
    env = {k: v for k, v in env.items() if not k.startswith("FASTNAS_CPU_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    isa, stream_bytes, pool_megabytes = out.stdout.strip().split(",")
    assert isa == backend.cpu_isa_levels()[0] and int(stream_bytes) > 0 and pool_megabytes == "512"


@needs_extension
@pytest.mark.parametrize(
    "name,value,match",
    [
        ("FASTNAS_CPU_ISA", "sse", r"FASTNAS_CPU_ISA must be one of avx512, avx2, portable \(any case\), got 'sse'"),
        ("FASTNAS_CPU_STREAM_BYTES", "32M", r"FASTNAS_CPU_STREAM_BYTES must be a non-negative integer, got '32M'"),
        ("FASTNAS_CPU_POOL_MB", "-1", r"FASTNAS_CPU_POOL_MB must be a non-negative integer, got '-1'"),
    ],
)
def test_a_bad_cpu_switch_raises_when_cpu_kernels_are_chosen(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    backend._resolved.clear()
    with pytest.raises(ValueError, match=match):
        backend.get_kernels("avg_pool", "cpu")
    assert backend.get_kernels("max_pool", "cpu") == "aten"  # no CPU kernels of fastnas there
    monkeypatch.delenv(name)
    backend._resolved.clear()
    assert backend.get_kernels("avg_pool", "cpu") == "cpu"
