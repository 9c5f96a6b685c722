"""Shared test set-up: backends to test on this machine, tolerances, seeding."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton must see TRITON_INTERPRET before it is first imported: without a GPU its kernels run on CPU
# tensors under the interpreter. torch itself does not import triton at import time.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from contextlib import contextmanager  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402

import fastnas  # noqa: E402
from fastnas import backend  # noqa: E402
from fastnas.ops import reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# the eager reference supernets live with the benchmarks, which time against them; Triton's offline
# driver (compiling for a GPU without one) is development tooling, in tools/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


@contextmanager
def cpu_kernel_settings(isa: str | None = None, stream_above_bytes: int | None = None):
    """Run the CPU kernels at one instruction-set level and/or streaming threshold, then restore."""
    previous_isa, previous_threshold = torch.ops.fastnas._cpu_settings()
    torch.ops.fastnas._cpu_settings(isa, stream_above_bytes)
    try:
        yield
    finally:
        torch.ops.fastnas._cpu_settings(previous_isa, previous_threshold)


def backend_cases() -> list:
    """(backend, device, CPU instruction-set level) triples every kernel test runs on, each skipped
    with its reason if unavailable. The CPU kernel runs once per level this machine has."""
    cases = []
    for device in ("cpu", "cuda"):
        for name in ("reference", "cpu", "cuda", "triton"):
            if device == "cpu" and name == "cuda" or device == "cuda" and name == "cpu":
                continue
            reason = "no CUDA device here" if device == "cuda" and not HAS_CUDA else None
            reason = reason or backend.unavailable_reason(name, device)
            marks = [pytest.mark.skip(reason=f"backend {name} on {device}: {reason}")] if reason else []
            if name == "cpu" and not reason:
                for isa in backend.cpu_isa_levels():
                    cases.append(pytest.param((name, device, isa), id=f"{name}-{isa}-{device}"))
            else:
                cases.append(pytest.param((name, device, None), id=f"{name}-{device}", marks=marks))
    return cases


def interpreted(name: str, device: str) -> bool:
    """Triton on CPU runs in its interpreter: slow, and without bfloat16 arithmetic."""
    return name == "triton" and device == "cpu"


@pytest.fixture(params=backend_cases())
def backend_device(request):
    """Force one backend (and CPU instruction-set level) for the test; yields (backend name, device)."""
    name, device, isa = request.param
    fastnas.set_backend(name)
    try:
        if isa is None:
            yield name, device
        else:
            with cpu_kernel_settings(isa=isa):
                yield name, device
    finally:
        fastnas.set_backend(None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Absolute tolerance per element and per unit of magnitude, by dtype (the float64 reference is exact
# to ~1e-16; the kernel rounds its result once to the dtype, so errors are about one ulp of |y|).
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


class Oracle(NamedTuple):
    """Float64 results of the mixed sum and the magnitudes that bound a kernel's rounding errors."""

    y: torch.Tensor
    outputs_grad: list
    weights_grad: torch.Tensor
    y_scale: torch.Tensor  # sum_k |w_k| |o_k|, elementwise
    weights_grad_scale: torch.Tensor  # sum |g| |o_k|, per k


def float64_oracle(outputs, weights, grad) -> Oracle:
    o64 = [o.detach().double() for o in outputs]
    w64, g64 = weights.detach().double(), grad.detach().double()
    y = reference.mixed_sum_forward_reference(o64, w64)
    outputs_grad, weights_grad = reference.mixed_sum_backward_reference(g64, o64, w64, True)
    y_scale = sum(w.abs() * o.abs() for w, o in zip(w64, o64))
    weights_grad_scale = torch.stack([(g64 * o).abs().sum() for o in o64])
    return Oracle(y, outputs_grad, weights_grad, y_scale, weights_grad_scale)


@pytest.fixture
def mixed_sum_calls(monkeypatch):
    """The number of inputs of every fastnas.mixed_sum call made during the test."""
    calls = []
    real = fastnas.mixed_sum

    def spy(outputs, weights):
        calls.append(len(outputs))
        return real(outputs, weights)

    from fastnas.spaces import engine

    monkeypatch.setattr(fastnas, "mixed_sum", spy)
    monkeypatch.setattr(engine, "mixed_sum", spy)  # where the supernets' cells call it
    return calls


TOL = dict(rtol=1e-9, atol=1e-10)  # supernets against their eager references, float64 throughout


def assert_close_dicts(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), msg=lambda m, k=k: f"{k}: {m}", **tol)


def assert_fp32_step_close(fast, eager, x) -> None:
    """One training step of a fastnas supernet and its eager reference in float32: logits and every
    parameter's gradient equal within fp32 tolerance (gradients relative to their own scale, since
    rounding passes through batch statistics). With the compiled extension, fastnas's step must run
    its CPU BatchNorm and pooling kernels (else this would not test them)."""
    from eager_supernets import run_step
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastnas import backend

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    eager.load_state_dict(fast.state_dict())
    with OpNames() as seen:
        logits_fast, grads_fast = run_step(fast, x)
    if backend.load_extension():
        assert {"fastnas::batch_norm_parts", "fastnas::batch_norm_parts_backward"} <= seen.names
        assert {"fastnas::avg_pool2d_nhwc", "fastnas::avg_pool2d_nhwc_backward"} <= seen.names
    logits_eager, grads_eager = run_step(eager, x)
    torch.testing.assert_close(logits_fast, logits_eager, rtol=1e-4, atol=1e-5)
    for k in grads_fast:
        scale = grads_eager[k].abs().max().item()
        torch.testing.assert_close(grads_fast[k], grads_eager[k], rtol=1e-3, atol=1e-3 * scale + 1e-5)


def graph_recording_backend(forward_graphs: list, backward_graphs: list):
    """An AOTAutograd backend that runs the graphs as traced and keeps them."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(graphs):
        def compiler(gm, example_inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep(forward_graphs), bw_compiler=keep(backward_graphs))


def ops_of(gm) -> set:
    """The operators a graph calls, mutating ones included (functionalised: wrapped by a higher-order op)."""
    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    wrapped = [node.args[0] for node in calls if "auto_functionalized" in str(node.target)]
    return {node.target for node in calls} | set(wrapped)
