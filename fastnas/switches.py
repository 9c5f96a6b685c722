"""Every environment switch of fastnas, read here and nowhere else in the package.

| switch | values (default first) | what it sets |
|---|---|---|
| ``FASTNAS_BACKEND`` | ``auto``, ``cuda``, ``triton``, ``cpu``, ``reference`` | the mixed sum's backend |
| ``FASTNAS_KERNELS`` | unset (every op ``auto``), ``op=name,...`` | the other ops' kernels (``set_kernels``) |
| ``FASTNAS_CPU_ISA`` | this CPU's best, ``avx512``, ``avx2``, ``portable`` | a cap on the CPU kernels' instructions |
| ``FASTNAS_CPU_STREAM_BYTES`` | the last-level cache's size, bytes | mixed-sum CPU calls above it stream results |
| ``FASTNAS_CPU_POOL_MB`` | ``512``, megabytes (``0``: off) | the CPU kernels' cache of page-resident results |
| ``TRITON_INTERPRET`` | unset, ``1`` | Triton's interpreter; ``triton`` then runs CPU tensors |
| ``FASTNAS_COMPILE_BACKEND`` | unset (inductor), a ``torch.compile`` backend | what ``--compile`` compiles with |
| ``RAY_ADDRESS`` | unset (runs in process), a Ray cluster's address | where sweeps run without ``--ray-address`` |
| ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` | ``1``, ``0``, ``0`` | torchrun's processes of a run |

:mod:`fastnas.backend` acts on the first six (``FASTNAS_KERNELS`` names ``batch_norm``,
``avg_pool``, ``depthwise_conv`` or ``max_pool`` with ``auto``, ``cpu``, ``triton``, ``aten`` or
``torch``, e.g. ``batch_norm=torch,max_pool=torch``; ``TRITON_INTERPRET`` is Triton's own, read by
Triton when a kernel is defined), :mod:`fastnas.runs.steps` on ``FASTNAS_COMPILE_BACKEND``,
:mod:`fastnas.runs.sweep` on ``RAY_ADDRESS`` (Ray's own variable, which ``ray.init`` reads too).
torchrun's three are read where the processes are set up (:mod:`fastnas.runs.distributed`): they
are torchrun's protocol, not switches of fastnas. The ``FASTNAS_CPU_*`` switches are handed to the
compiled extension once, when ``import fastnas`` loads it, and checked when CPU kernels are first
chosen (a value they cannot take raises ValueError naming it); the others are read at each choice
of kernels: a change to ``os.environ`` counts from the next one.

Building the extension (read by ``setup.py``, which runs before fastnas exists): ``FASTNAS_CUDA=1`` /
``0`` forces / skips the CUDA kernels, ``FASTNAS_CPU_NATIVE=1`` compiles the portable CPU kernels
with ``-march=native``; ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS`` and ``CUDA_HOME`` as for any PyTorch
extension. The benchmarks' own switches (``FASTNAS_DARTS_SRC``, ``GPU_CHECK_*``) are named in their
files.
"""

from __future__ import annotations

import os

BACKEND = "FASTNAS_BACKEND"
KERNELS = "FASTNAS_KERNELS"
CPU_ISA = "FASTNAS_CPU_ISA"
CPU_STREAM_BYTES = "FASTNAS_CPU_STREAM_BYTES"
CPU_POOL_MB = "FASTNAS_CPU_POOL_MB"
TRITON_INTERPRET = "TRITON_INTERPRET"
COMPILE_BACKEND = "FASTNAS_COMPILE_BACKEND"
RAY_ADDRESS = "RAY_ADDRESS"


def backend() -> str:
    """``FASTNAS_BACKEND`` as set (``auto`` when unset or empty), unchecked."""
    return os.environ.get(BACKEND) or "auto"


def kernels() -> str:
    """``FASTNAS_KERNELS`` as set (empty when unset), unparsed."""
    return os.environ.get(KERNELS, "")


def cpu_isa() -> str | None:
    """``FASTNAS_CPU_ISA`` as set, or None."""
    return os.environ.get(CPU_ISA) or None


def cpu_stream_bytes() -> str | None:
    """``FASTNAS_CPU_STREAM_BYTES`` as set, or None."""
    return os.environ.get(CPU_STREAM_BYTES) or None


def cpu_pool_megabytes() -> str | None:
    """``FASTNAS_CPU_POOL_MB`` as set, or None."""
    return os.environ.get(CPU_POOL_MB) or None


def triton_interpreter() -> bool:
    """Whether ``TRITON_INTERPRET=1``."""
    return os.environ.get(TRITON_INTERPRET, "0") == "1"


def compile_backend() -> str | None:
    """``FASTNAS_COMPILE_BACKEND`` as set, or None (``torch.compile``'s default)."""
    return os.environ.get(COMPILE_BACKEND) or None


def ray_address() -> str | None:
    """``RAY_ADDRESS`` as set, or None."""
    return os.environ.get(RAY_ADDRESS) or None
