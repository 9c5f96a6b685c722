"""Launching the Triton kernels of ``kernels/`` with little host time: after the first call of a
specialisation, which goes through Triton's own launch path (binding, specialisation, compilation,
launch), later calls invoke the compiled kernel's launcher directly, with the arguments Triton itself
passes it at the end of that path, skipping Triton's per-call argument binding.

Each module with kernels keeps one :class:`Launcher`; its callers build the launch key, which must
hold everything Triton specialises a call on besides the kernel and the device (constexprs, dtypes,
the 16-byte alignment of every pointer: :func:`alignment`, and how any specialised integer is
specialised). ``tests/triton_launch_keys.py`` checks the keys against Triton's own binder.
"""

from __future__ import annotations

from typing import Sequence

from fastnas.kernels import unavailable_reason

# every kernel module of kernels/ imports this one: Triton's version is checked here, before the first
# Triton name is imported
if unavailable_reason():
    raise ImportError(f"the triton kernels of fastnas: {unavailable_reason()}")

import triton  # noqa: E402
from torch import Tensor  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)
"""Triton's launch hooks live here from Triton 3.4 on; before, every launch goes through Triton."""


def alignment(tensors: Sequence[Tensor]) -> int:
    """One bit per tensor, after a leading 1: its data is 16-byte aligned (what Triton specialises
    pointers on)."""
    bits = 1
    for t in tensors:
        bits = (bits << 1) | (t.data_ptr() % 16 == 0)
    return bits


def launch_hooks() -> bool:
    """Whether a profiler installed Triton launch hooks (then every launch goes through Triton)."""
    enter, leave = _RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook
    # an empty HookChain (Triton's default) calls nothing; a plain function (older Triton) does
    return bool(
        (enter is not None and getattr(enter, "calls", True)) or (leave is not None and getattr(leave, "calls", True))
    )


class Launcher:
    """Launches ``kernels[which]`` (see the module docstring)."""

    def __init__(self, kernels: Sequence) -> None:
        self.kernels = tuple(kernels)
        self.interpreted = not isinstance(self.kernels[0], triton.runtime.JITFunction)
        self.compiled: dict[tuple, tuple] = {}
        """(kernel, device, key) -> (launcher, function handle, packed metadata, the ``CompiledKernel``)."""

    def __call__(self, which: int, grid: int, args: tuple, key: tuple, num_warps: int, device: int):
        """Launch ``kernels[which]`` on ``grid`` programs with ``args`` (every parameter, constexprs
        included, in order) on the CUDA device ``device``, the current one (-1: CPU tensors,
        interpreted or compiled offline). Returns the ``CompiledKernel`` (None when interpreted)."""
        kernel = self.kernels[which]
        if self.interpreted:
            kernel[(grid,)](*args, num_warps=num_warps)
            return None
        key = (which, device, *key)
        entry = self.compiled.get(key)
        if entry is None or _RUNTIME_KNOBS is None or launch_hooks():
            compiled = kernel[(grid,)](*args, num_warps=num_warps, num_stages=1)
            self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, compiled)
            return compiled
        run, function, metadata, compiled = entry
        run(grid, 1, 1, driver.active.get_current_stream(device), function, metadata, None, None, None, *args)
        return compiled
