"""Prints the side-by-side tables of the mixed-sum benchmarks after the pytest-benchmark table."""

from __future__ import annotations

import platform

import torch
from report import cpu_levels_table, side_by_side_table
from timing import SUMMARY_ROWS


def machine_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def pytest_terminal_summary(terminalreporter):
    entries = [{"extra_info": info} for info in SUMMARY_ROWS]
    tables = [
        (f"CPU kernels alone, caches flushed, interleaved medians on {machine_name()}", cpu_levels_table(entries)),
        (
            f"mixed_sum forward+backward, interleaved medians on {machine_name()} (torch {torch.__version__})",
            side_by_side_table(entries),
        ),
    ]
    for title, lines in tables:
        if lines:
            terminalreporter.write_line("")
            terminalreporter.write_line(title)
            for line in lines:
                terminalreporter.write_line(line)
