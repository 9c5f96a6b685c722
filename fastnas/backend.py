"""The one place that decides which backend computes the mixed sum.

Backends:

* ``cuda``      CUDA C++ kernels of the compiled extension (``csrc/cuda``), CUDA tensors.
* ``triton``    Triton kernels (``kernels/``), CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``.
* ``cpu``       vectorised C++ kernels of the compiled extension (``csrc/cpu``), CPU tensors.
* ``reference`` plain PyTorch (``fastnas/ops/reference.py``), any device.

``auto`` (the default) picks, per device, the fastest one available: ``cuda`` then ``triton`` then
``reference`` on CUDA tensors, ``cpu`` then ``reference`` on CPU tensors. The environment variable
``FASTNAS_BACKEND`` and :func:`set_backend` override it; :func:`get_backend` tells what is in use.
A missing compiled extension falls back to the reference with one warning.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
COMPILED_BACKENDS = ("cpu", "cuda")  # kernels of the compiled extension fastnas._C, with a C++ autograd node
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_selected: str | None = None  # set_backend's choice; None means "read FASTNAS_BACKEND"


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Force a backend for every later call (``None`` or ``"auto"`` restores automatic choice).

    Raises ValueError for an unknown name and RuntimeError if that backend cannot run here.
    """
    global _selected
    _resolved.clear()
    if name is None:
        _selected = None
        return
    name = _check_name(name, "set_backend(name)")
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(f"fastnas backend {name!r} is not available: {reason}")
    _selected = name


def requested_backend() -> str:
    """What was asked for: set_backend's choice, else FASTNAS_BACKEND, else ``auto``."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get("FASTNAS_BACKEND", "auto") or "auto", "FASTNAS_BACKEND")


@functools.cache
def _extension():
    """The compiled extension module, or the reason it is missing."""
    try:
        module = importlib.import_module("fastnas._C")
    except ImportError as exc:  # not built, or built against another torch
        return None, f"the compiled extension fastnas._C could not be loaded ({exc})"
    from fastnas.ops.avg_pool import register_native_fakes as register_avg_pool_fakes
    from fastnas.ops.batch_norm import register_native_fakes as register_batch_norm_fakes
    from fastnas.ops.depthwise_conv import register_native_fakes as register_depthwise_fakes
    from fastnas.ops.mixed_sum import register_native_fakes as register_mixed_sum_fakes

    register_mixed_sum_fakes()
    register_depthwise_fakes()
    register_batch_norm_fakes()
    register_avg_pool_fakes()
    return module, None


def load_extension() -> bool:
    """Load fastnas._C (its kernels register with torch.library); False if it is missing."""
    return _extension()[0] is not None


def extension_has_cuda() -> bool:
    ext, _ = _extension()
    return ext is not None and torch.ops.fastnas._mixed_sum_forward.default.has_kernel_for_dispatch_key(
        torch._C.DispatchKey.CUDA
    )


TRITON_MINIMUM = (3, 3)
"""Tuples of tensors as kernel arguments (``kernels/``): Triton 3.2 compiled, 3.3 interpreted."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


@functools.cache
def _triton_reason() -> str | None:
    try:
        import triton
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if _version(triton.__version__) < TRITON_MINIMUM:
        return f"triton >= {'.'.join(map(str, TRITON_MINIMUM))} is needed, found {triton.__version__}"
    return None


def triton_installed() -> bool:
    """Whether Triton >= :data:`TRITON_MINIMUM` is installed, read from its package metadata without
    importing it (what start-up may ask: importing Triton and its kernels waits for their first use)."""
    try:
        return _version(importlib.metadata.version("triton")) >= TRITON_MINIMUM
    except importlib.metadata.PackageNotFoundError:
        return False


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device_type: str | None = None) -> str | None:
    """None if backend ``name`` can run on ``device_type`` (any device when None), else why not."""
    if name == "reference":
        return None
    if name == "cpu":
        if device_type not in (None, "cpu"):
            return f"it runs CPU tensors only, not {device_type} tensors"
        return _extension()[1]
    if name == "cuda":
        if device_type not in (None, "cuda"):
            return f"it runs CUDA tensors only, not {device_type} tensors"
        reason = _extension()[1]
        if reason is None and not extension_has_cuda():
            reason = "fastnas._C was built without CUDA kernels (see README: building with CUDA)"
        return reason
    if name == "triton":
        reason = _triton_reason()
        if reason is None and device_type == "cpu" and not triton_interpreter_on():
            reason = "Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
        if reason is None and device_type not in (None, "cpu", "cuda"):
            reason = f"it runs CUDA tensors only, not {device_type} tensors"
        return reason
    raise ValueError(f"unknown fastnas backend {name!r}")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_resolved: dict[tuple[str, str], str] = {}  # (requested, device type) -> backend, for the hot path


def get_backend(device: torch.device | str = "cpu") -> str:
    """The backend that computes the mixed sum of tensors on ``device``.

    ``auto`` resolves to the first available of the device's order; an explicit choice that
    cannot run on this device raises RuntimeError naming the backend and the reason.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    # keyed by the raw request (the variable's text as set): names are checked on a miss only
    raw = _selected if _selected is not None else os.environ.get("FASTNAS_BACKEND", "auto")
    name = _resolved.get((raw, device_type))
    if name is None:
        name = _resolved[(raw, device_type)] = _resolve(requested_backend(), device_type)
    return name


def _resolve(requested: str, device_type: str) -> str:
    if requested != "auto":
        reason = unavailable_reason(requested, device_type)
        if reason is not None:
            raise RuntimeError(f"fastnas backend {requested!r} cannot run {device_type} tensors: {reason}")
        if requested == "cpu":
            check_cpu_isa_env()
        return requested
    for name in _AUTO_ORDER.get(device_type, ("reference",)):
        reason = unavailable_reason(name, device_type)
        if reason is None:
            if name == "cpu":
                check_cpu_isa_env()
            return name
        if name in COMPILED_BACKENDS and device_type == name:
            _warn_once(f"fastnas: backend {name!r} unavailable, falling back ({reason})")
    return "reference"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Every backend that can run tensors on ``device`` here."""
    device_type = torch.device(device).type
    return [n for n in BACKENDS[1:] if unavailable_reason(n, device_type) is None]


CPU_ISA_LEVELS = ("avx512", "avx2", "portable")  # instruction-set levels of the CPU kernels, best first


def check_cpu_isa_env() -> None:
    """Raise ValueError when FASTNAS_CPU_ISA names no level (any case is accepted): a misspelt cap
    would otherwise be ignored without a word."""
    value = os.environ.get("FASTNAS_CPU_ISA")
    if value and value.lower() not in CPU_ISA_LEVELS:
        raise ValueError(f"FASTNAS_CPU_ISA must be one of {', '.join(CPU_ISA_LEVELS)} (any case), got {value!r}")


def cpu_isa_levels() -> list[str]:
    """The levels of the CPU kernels this machine runs, best first (none without the extension).
    ``FASTNAS_CPU_ISA`` caps them; ``torch.ops.fastnas._cpu_settings(level)`` picks one."""
    if not load_extension():
        return []
    best, _ = torch.ops.fastnas._cpu_settings()
    return list(CPU_ISA_LEVELS[CPU_ISA_LEVELS.index(best) :])


@functools.cache
def kernels_for(name: str) -> tuple[Callable, Callable]:
    """The (forward, backward) callables of backend ``name``, all with the native ops' contract."""
    if name in COMPILED_BACKENDS:
        _extension()
        return torch.ops.fastnas._mixed_sum_forward, torch.ops.fastnas._mixed_sum_backward
    if name == "triton":
        from fastnas.kernels import mixed_sum as triton_mixed_sum

        return triton_mixed_sum.VALIDATED  # the op layer checked the inputs: no second check
    from fastnas.ops import reference

    return reference.mixed_sum_forward_reference, reference.mixed_sum_backward_reference
