"""Prints the side-by-side tables of the mixed-sum benchmarks after the pytest-benchmark table."""

from __future__ import annotations

import platform

import torch
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
    write = terminalreporter.write_line
    level_rows = [r for r in SUMMARY_ROWS if "level_ms" in r]
    if level_rows:
        write("")
        write(f"CPU kernels alone, caches flushed, interleaved medians on {machine_name()}")
        write("| shape | K | dtype | level | forward ms | backward ms |")
        write("|---|---|---|---|---|---|")
        for r in level_rows:
            shape = "x".join(map(str, r["shape"]))
            for level in dict.fromkeys(name.split()[0] for name in r["level_ms"]):
                write(
                    f"| {shape} | {r['K']} | {r['dtype']} | {level} | "
                    f"{r['level_ms'][level + ' fwd']:.3f} | {r['level_ms'][level + ' bwd']:.3f} |"
                )
    rows = [r for r in SUMMARY_ROWS if "median_ms" in r]
    if not rows:
        return
    write("")
    write(f"mixed_sum forward+backward, interleaved medians on {machine_name()} (torch {torch.__version__})")
    write("| shape | K | dtype | provider | ms | x eager | x compile | GB/s | of copy |")
    write("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        for provider, ms in r["median_ms"].items():
            stats = r.get(provider, {})
            write(
                f"| {shape} | {r['K']} | {r['dtype']} | {provider} | {ms:.3f} | "
                f"{stats.get('speedup_vs_eager', '')} | {stats.get('speedup_vs_compile', '')} | "
                f"{stats.get('GBps', r['copy_GBps'] if provider == 'copy' else '')} | "
                f"{stats.get('fraction_of_copy', '')} |"
            )
