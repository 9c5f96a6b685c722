"""Shared test set-up: backends to test on this machine, tolerances, seeding."""

from __future__ import annotations

import os

# Triton must see TRITON_INTERPRET before it is first imported: without a GPU its kernels run on CPU
# tensors under the interpreter. torch itself does not import triton at import time.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastnas  # noqa: E402
from fastnas import backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def backend_cases() -> list:
    """(backend, device) pairs every kernel test runs on, each skipped with its reason if unavailable."""
    cases = []
    for device in ("cpu", "cuda"):
        for name in ("reference", "cpu", "cuda", "triton"):
            if device == "cpu" and name == "cuda" or device == "cuda" and name == "cpu":
                continue
            reason = "no CUDA device here" if device == "cuda" and not HAS_CUDA else None
            reason = reason or backend.unavailable_reason(name, device)
            marks = [pytest.mark.skip(reason=f"backend {name} on {device}: {reason}")] if reason else []
            cases.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return cases


def interpreted(name: str, device: str) -> bool:
    """Triton on CPU runs in its interpreter: slow, and without bfloat16 arithmetic."""
    return name == "triton" and device == "cpu"


@pytest.fixture(params=backend_cases())
def backend_device(request):
    """Force one backend for the test; yields (backend name, device)."""
    name, device = request.param
    fastnas.set_backend(name)
    try:
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
