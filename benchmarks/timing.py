"""Timing helpers shared by the benchmarks: interleaved rounds and medians, synchronised on CUDA."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # that device, not the current one


def time_once(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds for one call of fn, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class CacheFlush:
    """Evicts the caches by reading a buffer larger than any last-level cache (256 MB), so that a
    timed call does not find its inputs left in cache by the call before it, which would favour
    whichever provider runs second on the same inputs. Reading leaves clean lines behind; writing
    (as triton.testing.do_bench does on GPUs) would leave dirty ones, and the timed call would pay
    for writing them back."""

    def __init__(self, device: torch.device | str, megabytes: int = 256):
        self.device = torch.device(device)
        self.buffer = torch.ones(megabytes << 18, dtype=torch.float32, device=self.device)

    def __call__(self) -> None:
        self.buffer.sum()
        synchronize(self.device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str,
    rounds: int,
    warmup: int = 3,
    flush_cache: bool = False,
) -> dict[str, float]:
    """Median seconds of each fn, measured in interleaved rounds (one call of each per round), so
    that drift of a shared, noisy machine hits every provider alike. With ``flush_cache`` every
    call starts from evicted caches (the flush itself is not timed)."""
    flush = CacheFlush(device) if flush_cache else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            flush()
            samples[name].append(time_once(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def print_forward_backward_table(
    title: str,
    providers: dict[str, Callable],
    cases: dict[str, tuple],
    forward: Callable,
    forward_backward: Callable,
    rounds: int,
) -> None:
    """A markdown table of two CPU providers side by side (the first the baseline): per case, median
    milliseconds of ``forward(fn, *case)`` and of the backward (the median of
    ``forward_backward(fn, *case)`` less the forward's), in interleaved rounds, with speed-ups."""
    base, new = providers
    print(f"{title}, {torch.get_num_threads()} threads, median ms")
    print(f"| case | forward {base} | forward {new} | speed-up | backward {base} | backward {new} | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        fwd = {p: (lambda fn=fn, case=case: forward(fn, *case)) for p, fn in providers.items()}
        both = {p: (lambda fn=fn, case=case: forward_backward(fn, *case)) for p, fn in providers.items()}
        f = interleaved_medians(fwd, "cpu", rounds=rounds)
        fb = interleaved_medians(both, "cpu", rounds=rounds)
        b = {p: fb[p] - f[p] for p in providers}
        cells = [f"{f[base] * 1e3:.3f}", f"{f[new] * 1e3:.3f}", f"{f[base] / f[new]:.1f}x"]
        cells += [f"{b[base] * 1e3:.3f}", f"{b[new] * 1e3:.3f}", f"{b[base] / b[new]:.1f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")


# Rows of the side-by-side tables, printed by benchmarks/conftest.py at the end of the session.
SUMMARY_ROWS: list[dict] = []
