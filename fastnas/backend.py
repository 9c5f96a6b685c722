"""The one place that decides, for every op, which kernels compute it.

The mixed sum (:func:`fastnas.mixed_sum`) has four backends:

* ``cuda``      CUDA C++ kernels of the compiled extension (``csrc/cuda``), CUDA tensors.
* ``triton``    Triton kernels (``kernels/``), CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``.
* ``cpu``       vectorised C++ kernels of the compiled extension (``csrc/cpu``), CPU tensors.
* ``reference`` plain PyTorch (``fastnas/ops/reference.py``), any device.

``auto`` (the default) picks, per device, the fastest one available: ``cuda`` then ``triton`` then
``reference`` on CUDA tensors, ``cpu`` then ``reference`` on CPU tensors. The environment variable
``FASTNAS_BACKEND`` and :func:`set_backend` override it; :func:`get_backend` tells what is in use.
A missing compiled extension falls back to the reference with one warning.

The supernets' other ops have kernels of their own where PyTorch's are slow, and PyTorch's
(``torch``) everywhere else; ``auto`` takes the first that can run:

* ``batch_norm``: ``cpu`` (``csrc/cpu/batch_norm_cpu.cpp``) on CPU tensors, ``triton``
  (``kernels/batch_norm.py``, Triton installed) on CUDA tensors, then ``torch``;
* ``avg_pool``: ``cpu`` (``csrc/cpu/avg_pool_cpu.cpp``) on CPU tensors, then ``torch``;
* ``depthwise_conv``: ``cpu`` (the backward of ``csrc/cpu/depthwise_conv_cpu.cpp``) on CPU tensors,
  then ``torch``;
* ``max_pool``: ``aten`` on CPU tensors (ATen's kernels as an op that ``torch.compile`` does not
  decompose, ``fastnas/ops/max_pool.py``; eager calls are ``F.max_pool2d`` either way), then ``torch``.

``cpu`` and ``triton`` need the compiled extension (it defines the ops). ``FASTNAS_KERNELS``
(``op=name`` pairs, comma-separated) and :func:`set_kernels` override the choice; :func:`get_kernels`
tells it and :func:`kernel_choices` reports every op's for a device. Where the chosen kernels are
``cpu`` or ``triton``, each op still takes PyTorch's path for tensors outside their contract (a
dtype or layout they do not take, torch.func transforms, forward-mode AD: see each op's module).
A choice made while ``torch.compile`` traces is a constant of the graph.

The environment is read by :mod:`fastnas.switches`.
"""

from __future__ import annotations

import functools
import warnings

import torch

from fastnas import extension, switches
from fastnas import kernels as triton_kernels

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
COMPILED_BACKENDS = ("cpu", "cuda")  # kernels of the compiled extension fastnas._C, with a C++ autograd node

OPS = ("mixed_sum", "batch_norm", "avg_pool", "depthwise_conv", "max_pool")
KERNELS = {
    "mixed_sum": BACKENDS[1:],
    "batch_norm": ("cpu", "triton", "torch"),
    "avg_pool": ("cpu", "torch"),
    "depthwise_conv": ("cpu", "torch"),
    "max_pool": ("aten", "torch"),
}
"""Each op's kernels, besides ``auto``."""
_AUTO_ORDER = {
    "mixed_sum": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    "batch_norm": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "avg_pool": {"cpu": ("cpu", "torch")},
    "depthwise_conv": {"cpu": ("cpu", "torch")},
    "max_pool": {"cpu": ("aten", "torch")},
}
_FALLBACK = {op: names[-1] for op, names in KERNELS.items()}  # runs anywhere: reference, torch

_selected: dict[str, str] = {}  # set_backend's and set_kernels's choices; absent: read the environment


# --------------------------------------------------------------------------- the compiled extension


def _extension() -> tuple[bool, str | None]:
    """Whether the compiled extension is loaded, and why not."""
    reason = extension.missing_reason()
    return reason is None, reason


def load_extension() -> bool:
    """Load fastnas._C (its kernels register with torch.library, its CPU kernels take the
    ``FASTNAS_CPU_*`` switches); False if it is missing."""
    loaded = bool(_extension()[0])
    if loaded:
        _configure_cpu_kernels()
    return loaded


def extension_has_cuda() -> bool:
    """Whether fastnas._C is loaded with its CUDA kernels."""
    return bool(_extension()[0]) and extension.has_cuda_kernels()


TRITON_MINIMUM = triton_kernels.TRITON_MINIMUM
triton_installed = triton_kernels.triton_installed


def triton_interpreter_on() -> bool:
    return switches.triton_interpreter()


# --------------------------------------------------------------------------- what can run where


def unavailable_reason(name: str, device_type: str | None = None) -> str | None:
    """None if the mixed sum's backend ``name`` can run on ``device_type`` (any device when None),
    else why not."""
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
        reason = triton_kernels.unavailable_reason()
        if reason is None and device_type == "cpu" and not triton_interpreter_on():
            reason = "Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
        if reason is None and device_type not in (None, "cpu", "cuda"):
            reason = f"it runs CUDA tensors only, not {device_type} tensors"
        return reason
    raise ValueError(f"unknown fastnas backend {name!r}")


def kernels_unavailable_reason(op: str, name: str, device_type: str | None = None) -> str | None:
    """None if kernels ``name`` of ``op`` can run on ``device_type`` (any device when None), else why not."""
    _check_op(op, "op")
    if op == "mixed_sum":
        return unavailable_reason(name, device_type)
    if name not in KERNELS[op]:
        raise ValueError(f"unknown {op} kernels {name!r}; known: {', '.join(KERNELS[op])}")
    if name == "torch":
        return None
    on = "cuda" if name == "triton" else "cpu"
    if device_type not in (None, on):
        return f"they run {'CPU' if on == 'cpu' else 'CUDA'} tensors only, not {device_type} tensors"
    if name == "aten":  # ATen's own kernels behind a Python op
        return None
    if name == "triton" and not triton_installed():
        return f"triton >= {'.'.join(map(str, TRITON_MINIMUM))} is not installed"
    return _extension()[1]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Every backend of the mixed sum that can run tensors on ``device`` here."""
    return available_kernels("mixed_sum", device)


def available_kernels(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Every kernels of ``op`` that can run tensors on ``device`` here."""
    device_type = _device_type(device)
    return [n for n in KERNELS[_check_op(op, "op")] if kernels_unavailable_reason(op, n, device_type) is None]


# --------------------------------------------------------------------------- choosing


def set_backend(name: str | None) -> None:
    """Force a backend of the mixed sum for every later call (``None`` or ``"auto"`` restores
    automatic choice). Raises ValueError for an unknown name and RuntimeError if that backend cannot
    run here."""
    _select("mixed_sum", name, "set_backend(name)")


def set_kernels(op: str, name: str | None) -> None:
    """Force the kernels of ``op`` (one of :data:`OPS`) for every later call: ``name`` one of
    :data:`KERNELS` ``[op]``, or ``None`` / ``"auto"`` for the automatic choice (``set_kernels(
    "mixed_sum", name)`` is :func:`set_backend`). Raises ValueError for an unknown op or name and
    RuntimeError if those kernels cannot run here."""
    _select(_check_op(op, "set_kernels(op)"), name, "set_kernels(name)")


def _select(op: str, name: str | None, where: str) -> None:
    _resolved.clear()
    if name is None:
        _selected.pop(op, None)
        return
    name = _check_name(op, name, where)
    if name != "auto":
        reason = kernels_unavailable_reason(op, name)
        if reason is not None:
            what = f"fastnas backend {name!r}" if op == "mixed_sum" else f"fastnas {op} kernels {name!r}"
            raise RuntimeError(f"{what} is not available: {reason}")
    _selected[op] = name


def requested_backend() -> str:
    """What was asked for the mixed sum: set_backend's choice, else FASTNAS_BACKEND, else ``auto``."""
    return _requested("mixed_sum", _raw_request("mixed_sum"))


_resolved: dict[tuple, str] = {}  # (op, raw request, device type) -> kernels, for the hot path


@torch.compiler.assume_constant_result  # a traced call takes the kernels chosen while tracing
def get_kernels(op: str, device: torch.device | str = "cpu") -> str:
    """The kernels that compute ``op`` for tensors on ``device`` (a device or its type).

    ``auto`` resolves to the first available of the device's order; an explicit choice that cannot
    run on this device raises RuntimeError naming the kernels and the reason."""
    device_type = device if isinstance(device, str) and device in ("cpu", "cuda") else _device_type(device)
    raw = _raw_request(op)  # the request as set: names are checked on a cache miss only
    name = _resolved.get((op, raw, device_type))
    if name is None:
        name = _resolved[(op, raw, device_type)] = _resolve(_check_op(op, "op"), _requested(op, raw), device_type)
    return name


def get_backend(device: torch.device | str = "cpu") -> str:
    """The backend that computes the mixed sum of tensors on ``device``.

    ``auto`` resolves to the first available of the device's order; an explicit choice that
    cannot run on this device raises RuntimeError naming the backend and the reason.
    """
    return get_kernels("mixed_sum", device)


def kernel_choices(device: torch.device | str = "cpu") -> dict[str, str]:
    """``{op: kernels}`` for every op of :data:`OPS` on ``device``: what computes each there now."""
    return {op: get_kernels(op, device) for op in OPS}


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _check_op(op: str, where: str) -> str:
    if op not in KERNELS:
        raise ValueError(f"{where} must be one of {', '.join(OPS)}; got {op!r}")
    return op


def _check_name(op: str, name: str, where: str) -> str:
    names = ("auto", *KERNELS[op])
    if not isinstance(name, str) or name.lower() not in names:
        raise ValueError(f"{where} must be one of {', '.join(names)}; got {name!r}")
    return name.lower()


def _raw_request(op: str) -> str:
    """The request for ``op`` as set: the override, else the environment's text (unparsed)."""
    selected = _selected.get(op)
    if selected is not None:
        return selected
    return switches.backend() if op == "mixed_sum" else switches.kernels()


def _requested(op: str, raw: str) -> str:
    """The kernels asked for ``op`` (``auto`` when nothing names it), from its raw request."""
    if op in _selected:
        return raw
    if op == "mixed_sum":
        return _check_name(op, raw, switches.BACKEND)
    return _kernels_variable().get(op, "auto")


@functools.lru_cache(maxsize=8)
def _parse_kernels(text: str) -> dict[str, str]:
    """``FASTNAS_KERNELS`` (``op=name`` pairs, comma-separated) as ``{op: name}``; ValueError naming
    the variable for anything else."""
    choices = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, sep, name = (s.strip() for s in item.partition("="))
        if op == "mixed_sum":
            raise ValueError(f"{switches.KERNELS}: the mixed sum's backend is set by {switches.BACKEND}, got {item!r}")
        if not sep or op not in KERNELS:
            ops = ", ".join(OPS[1:])
            raise ValueError(f"{switches.KERNELS} must hold op=name pairs with op one of {ops}; got {item!r}")
        choices[op] = _check_name(op, name, f"{switches.KERNELS}: {op}")
    return choices


def _kernels_variable() -> dict[str, str]:
    return _parse_kernels(switches.kernels())


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _resolve(op: str, requested: str, device_type: str) -> str:
    if requested != "auto":
        reason = kernels_unavailable_reason(op, requested, device_type)
        if reason is not None:
            what = f"fastnas backend {requested!r}" if op == "mixed_sum" else f"fastnas {op} kernels {requested!r}"
            raise RuntimeError(f"{what} cannot run {device_type} tensors: {reason}")
        chosen = requested
    else:
        chosen = _FALLBACK[op]
        for name in _AUTO_ORDER[op].get(device_type, ()):
            reason = kernels_unavailable_reason(op, name, device_type)
            if reason is None:
                chosen = name
                break
            if op == "mixed_sum" and name in COMPILED_BACKENDS and device_type == name:
                _warn_once(f"fastnas: backend {name!r} unavailable, falling back ({reason})")
    if chosen == "cpu":
        check_cpu_switches()
    return chosen


# --------------------------------------------------------------------------- CPU instruction sets

CPU_ISA_LEVELS = ("avx512", "avx2", "portable")  # instruction-set levels of the CPU kernels, best first


def _cpu_switches(strict: bool) -> tuple[str | None, int | None, int | None]:
    """``FASTNAS_CPU_ISA`` (lower case), ``FASTNAS_CPU_STREAM_BYTES`` and ``FASTNAS_CPU_POOL_MB``, each
    None when unset; a value the kernels cannot take raises ValueError naming it (``strict``) or is None."""
    isa, stream, pool = switches.cpu_isa(), switches.cpu_stream_bytes(), switches.cpu_pool_megabytes()
    if isa is not None and isa.lower() not in CPU_ISA_LEVELS:
        if strict:
            raise ValueError(f"{switches.CPU_ISA} must be one of {', '.join(CPU_ISA_LEVELS)} (any case), got {isa!r}")
        isa = None
    numbers = []
    for name, text in ((switches.CPU_STREAM_BYTES, stream), (switches.CPU_POOL_MB, pool)):
        if text is not None and not text.strip().isdigit():
            if strict:
                raise ValueError(f"{name} must be a non-negative integer, got {text!r}")
            text = None
        numbers.append(None if text is None else int(text))
    return (None if isa is None else isa.lower()), numbers[0], numbers[1]


def check_cpu_switches() -> None:
    """Raise ValueError naming the variable when a ``FASTNAS_CPU_*`` switch holds what the CPU kernels
    cannot take (``FASTNAS_CPU_ISA``: a level, any case; the others: non-negative integers): a misspelt
    value would otherwise be ignored without a word. Called when CPU kernels are first chosen."""
    _cpu_switches(strict=True)


@functools.cache
def _configure_cpu_kernels() -> None:
    """Hand the CPU kernels the ``FASTNAS_CPU_*`` switches, once, when the extension loads (at
    ``import fastnas``); a value they cannot take is left out here and raises at the first choice of
    CPU kernels (:func:`check_cpu_switches`)."""
    isa, stream_bytes, pool_megabytes = _cpu_switches(strict=False)
    if isa is not None or stream_bytes is not None:
        torch.ops.fastnas._cpu_settings(isa, stream_bytes)
    if pool_megabytes is not None:
        torch.ops.fastnas._cpu_pool_settings(pool_megabytes)


def cpu_isa_levels() -> list[str]:
    """The levels of the CPU kernels this machine runs, best first (none without the extension).
    ``FASTNAS_CPU_ISA`` caps them; ``torch.ops.fastnas._cpu_settings(level)`` picks one."""
    if not load_extension():
        return []
    best, _ = torch.ops.fastnas._cpu_settings()
    return list(CPU_ISA_LEVELS[CPU_ISA_LEVELS.index(best) :])
