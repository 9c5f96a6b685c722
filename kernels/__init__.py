"""Triton kernels of fastnas (installed as ``fastnas.kernels``), one module per op, each holding its
``@triton.jit`` kernels and their launchers:

* :mod:`fastnas.kernels.mixed_sum` -- the ``triton`` backend of ``torch.ops.fastnas.mixed_sum``;
* :mod:`fastnas.kernels.batch_norm` -- the CUDA kernels of ``fastnas::batch_norm_parts`` and its
  backward;
* :mod:`fastnas.kernels.launch` -- the launcher both share.

This package's ``__init__`` imports neither Triton nor the kernels (``import fastnas`` never imports
Triton): it only says which Triton they need, :func:`triton_installed` from the package's metadata,
:func:`unavailable_reason` by importing it. :mod:`fastnas.backend` asks both before it chooses the
Triton kernels; the op layer imports a kernel module at its first use.
"""

from __future__ import annotations

import functools
import importlib.metadata

TRITON_MINIMUM = (3, 3)
"""Tuples of tensors as kernel arguments: Triton 3.2 compiled them, 3.3 also interprets them."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def triton_installed() -> bool:
    """Whether Triton >= :data:`TRITON_MINIMUM` is installed, read from its package metadata without
    importing it (what start-up may ask: importing Triton and its kernels waits for their first use)."""
    try:
        return _version(importlib.metadata.version("triton")) >= TRITON_MINIMUM
    except importlib.metadata.PackageNotFoundError:
        return False


@functools.cache
def unavailable_reason() -> str | None:
    """None when Triton imports and is recent enough for these kernels, else why not."""
    try:
        import triton
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if _version(triton.__version__) < TRITON_MINIMUM:
        return f"triton >= {'.'.join(map(str, TRITON_MINIMUM))} is needed, found {triton.__version__}"
    return None
