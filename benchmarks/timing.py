"""Timing helpers shared by the benchmarks: interleaved rounds and medians, synchronised on CUDA."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds for one call of fn, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device | str, rounds: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds of each fn, measured in interleaved rounds (one call of each per round), so
    that drift of a shared, noisy machine hits every provider alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_once(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


# Rows of the side-by-side tables, printed by benchmarks/conftest.py at the end of the session.
SUMMARY_ROWS: list[dict] = []
