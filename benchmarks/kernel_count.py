"""Kernels per training step: the ATen operators one forward+backward dispatches, views excluded.

On a GPU each such operator is (at least) one kernel launch, and at supernet sizes the launches, not
the FLOPs, set the step time; on CPU the count is the same, so it can be measured here. Counted with a
``TorchDispatchMode`` (below autograd, so the backward's operators are seen too); an operator that
returns an alias of its input (``view``, ``permute``, ``unbind``, ``detach``, ...) launches nothing
and is not counted (nor ``_unsafe_view``, the alias ``reshape`` returns after a copy). Factory
operators that only allocate (``empty``, ``empty_like``, ...) are counted
apart as ``allocations`` (no kernel, but host work).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# operators that are not views in their schema but return an alias of their input (no kernel)
ALIASES = {"_unsafe_view", "alias", "lift_fresh"}


class KernelCounter(TorchDispatchMode):
    """Counts non-view ATen operators by name (``counts``) and allocation-only ones (``allocations``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ALLOCATIONS:
            self.allocations += 1
        elif not func.is_view and name not in ALIASES:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_kernels(step: Callable[[], object]) -> KernelCounter:
    """Run ``step`` once under a :class:`KernelCounter` and return it."""
    with KernelCounter() as counter:
        step()
    return counter
