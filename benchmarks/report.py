"""Turn pytest-benchmark JSON from ``benchmarks/bench_mixed_sum.py`` into markdown tables and a plot.

Usage::

    python benchmarks/report.py RUN.json [MORE.json ...] [--machine "NVIDIA H100 80GB HBM3"]
                                [--markdown OUT.md] [--plot OUT.png]

Each benchmark's ``extra_info`` names its ``provider`` (fastnas-cuda, fastnas-triton, fastnas-cpu, eager,
compile, copy), ``shape``, ``dtype``, ``K``, ``pass`` (fwd, bwd, fwd+bwd, copy) and the ``bytes`` it
moves. The table gives, per shape, K, dtype and pass, each provider's median time, its bandwidth
(bytes / median), that bandwidth as a fraction of the copy bandwidth (the fastest ``copy`` benchmark
of the run: the machine's measured ceiling) and its speed-up over eager and over torch.compile.
Providers missing from a run are left out; speed-ups are blank when eager or compile is missing.
Rows of ``test_side_by_side`` (interleaved fwd+bwd medians, ``median_ms`` in ``extra_info``) make a
second table. ``--plot`` draws each provider's bandwidth against the copy bandwidth (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PASSES = ("fwd", "bwd", "fwd+bwd")
PROVIDER_ORDER = ("fastnas-cuda", "fastnas-triton", "fastnas-cpu", "compile", "eager")


@dataclass(frozen=True)
class Row:
    """One timed provider: median seconds and bytes moved at one shape, K, dtype and pass."""

    provider: str
    shape: tuple[int, ...]
    K: int
    dtype: str
    which: str
    median_s: float
    bytes: int

    @property
    def key(self) -> tuple:
        return (self.shape, self.K, self.dtype, self.which)

    @property
    def gbps(self) -> float:
        return self.bytes / self.median_s / 1e9


def load_benchmarks(paths: Iterable[str | Path]) -> list[dict]:
    """The ``benchmarks`` entries of every pytest-benchmark JSON file, in order."""
    entries = []
    for path in paths:
        with open(path) as f:
            entries.extend(json.load(f).get("benchmarks", []))
    return entries


def provider_rows(entries: list[dict]) -> list[Row]:
    """Rows of the per-provider benchmarks; entries without the expected extra_info keys are skipped.

    A benchmark that timed its kernel itself (``kernel_median_ms``, CUDA events) is taken at that
    median rather than pytest-benchmark's; the copy it timed alongside (``copy_median_ms`` and
    ``copy_GBps``) becomes a copy row.
    """
    rows = []
    for entry in entries:
        info = entry.get("extra_info", {})
        if info.get("pass") not in (*PASSES, "copy") or "provider" not in info or "bytes" not in info:
            continue
        own = info.get("kernel_median_ms")
        median = own / 1e3 if own else entry.get("stats", {}).get("median")
        if not median or median <= 0:
            continue
        shape = tuple(int(s) for s in info.get("shape", ()))
        common = dict(shape=shape, K=int(info.get("K", 0)), dtype=str(info.get("dtype", "")))
        rows.append(
            Row(
                provider=str(info["provider"]),
                which=str(info["pass"]),
                median_s=float(median),
                bytes=int(info["bytes"]),
                **common,
            )
        )
        copy_ms, copy_gbps = info.get("copy_median_ms"), info.get("copy_GBps")
        if copy_ms and copy_gbps:
            rows.append(
                Row(
                    provider="copy",
                    which="copy",
                    median_s=copy_ms / 1e3,
                    bytes=int(copy_gbps * 1e6 * copy_ms),
                    **common,
                )
            )
    return rows


def copy_bandwidth(rows: list[Row]) -> Row | None:
    """The fastest copy benchmark (highest GB/s), or None when the run has none."""
    copies = [r for r in rows if r.which == "copy"]
    return max(copies, key=lambda r: r.gbps) if copies else None


def _provider_rank(provider: str) -> tuple[int, str]:
    return (PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER), provider)


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def _ratio(value: float | None, digits: int = 2) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "?"


def provider_table(rows: list[Row], ceiling: Row | None) -> list[str]:
    """Markdown lines: one row per (shape, K, dtype, pass, provider), copy rows excluded; 'of copy'
    against ``ceiling``, the run's fastest copy."""
    by_key: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        if r.which != "copy":
            by_key.setdefault(r.key, {})[r.provider] = r
    lines = [
        "| shape | K | dtype | pass | provider | median | GB/s | of copy | x eager | x compile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(by_key, key=lambda k: (k[2], k[0], k[1], PASSES.index(k[3]))):
        group = by_key[key]
        eager, compiled = group.get("eager"), group.get("compile")
        for provider in sorted(group, key=_provider_rank):
            r = group[provider]
            fraction = r.gbps / ceiling.gbps if ceiling else None
            lines.append(
                f"| {shape_text(r.shape)} | {r.K} | {r.dtype} | {r.which} | {provider} | {_time(r.median_s)} | "
                f"{r.gbps:.1f} | {_ratio(fraction)} | "
                f"{_ratio(eager.median_s / r.median_s if eager else None)} | "
                f"{_ratio(compiled.median_s / r.median_s if compiled else None)} |"
            )
    return lines


def side_by_side_table(entries: list[dict]) -> list[str]:
    """Markdown lines for the interleaved fwd+bwd rounds of test_side_by_side (empty if none ran)."""
    infos = [e.get("extra_info", {}) for e in entries]
    infos = [i for i in infos if isinstance(i.get("median_ms"), dict)]
    if not infos:
        return []
    lines = [
        "| shape | K | dtype | provider | median | x eager | x compile | GB/s | of copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for info in sorted(infos, key=lambda i: (str(i.get("dtype")), tuple(i.get("shape", ())), i.get("K", 0))):
        for provider in sorted(info["median_ms"], key=_provider_rank):
            stats = info.get(provider, {}) if isinstance(info.get(provider), dict) else {}
            gbps = info.get("copy_GBps") if provider == "copy" else stats.get("GBps")
            lines.append(
                f"| {shape_text(tuple(info.get('shape', ())))} | {info.get('K', '')} | {info.get('dtype', '')} | "
                f"{provider} | {_time(info['median_ms'][provider] / 1e3)} | "
                f"{_ratio(stats.get('speedup_vs_eager'))} | {_ratio(stats.get('speedup_vs_compile'))} | "
                f"{_ratio(gbps, 1)} | {_ratio(stats.get('fraction_of_copy'))} |"
            )
    return lines


def cpu_levels_table(entries: list[dict]) -> list[str]:
    """Markdown lines for test_cpu_kernel_levels: the CPU kernels alone at each instruction-set level."""
    infos = [e.get("extra_info", {}) for e in entries]
    infos = [i for i in infos if isinstance(i.get("level_ms"), dict)]
    if not infos:
        return []
    lines = ["| shape | K | dtype | level | forward | backward |", "|---|---|---|---|---|---|"]
    for info in infos:
        for level, ms in info["level_ms"].items():
            lines.append(
                f"| {shape_text(tuple(info.get('shape', ())))} | {info.get('K', '')} | {info.get('dtype', '')} | "
                f"{level} | {_time(ms['fwd'] / 1e3)} | {_time(ms['bwd'] / 1e3)} |"
            )
    return lines


def report(entries: list[dict], machine: str | None = None) -> str:
    """The whole markdown report of one or more benchmark runs."""
    rows = provider_rows(entries)
    ceiling = copy_bandwidth(rows)
    out = [f"### mixed_sum on {machine}" if machine else "### mixed_sum", ""]
    if ceiling:
        out.append(
            f"Copy bandwidth (reads + writes of the fastest copy, {shape_text(ceiling.shape)} x K={ceiling.K} "
            f"{ceiling.dtype}): **{ceiling.gbps:.0f} GB/s**; 'of copy' is each provider's GB/s over it."
        )
    else:
        out.append("No copy benchmark in this run: the 'of copy' column is blank.")
    out.append(
        "Times are medians: of CUDA events where a benchmark timed its kernels itself (bench_large_tensors.py),"
        " else of pytest-benchmark's host clock around a synchronised call. GB/s counts each input read once"
        " and each output written once."
    )
    out.append("")
    if any(r.which != "copy" for r in rows):
        out += provider_table(rows, ceiling)
    else:
        out.append("No per-provider benchmarks in this run.")
    side = side_by_side_table(entries)
    if side:
        out += ["", "Forward+backward, all providers in interleaved rounds (medians):", ""] + side
    levels = cpu_levels_table(entries)
    if levels:
        out += ["", "CPU kernels alone at each instruction-set level, caches flushed (medians):", ""] + levels
    return "\n".join(out) + "\n"


def plot(rows: list[Row], path: str | Path, machine: str | None = None) -> None:
    """Bandwidth of every provider per (shape, K, dtype), one panel per pass, against the copy bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceiling = copy_bandwidth(rows)
    passes = [p for p in PASSES if any(r.which == p for r in rows)]
    if not passes:
        raise ValueError("no per-provider benchmarks to plot")
    fig, axes = plt.subplots(len(passes), 1, figsize=(12, 3.6 * len(passes)), squeeze=False)
    providers = sorted({r.provider for r in rows if r.which != "copy"}, key=_provider_rank)
    for ax, which in zip(axes[:, 0], passes):
        groups = sorted({(r.dtype, r.shape, r.K) for r in rows if r.which == which})
        width = 0.8 / max(len(providers), 1)
        for j, provider in enumerate(providers):
            found = {(r.dtype, r.shape, r.K): r.gbps for r in rows if r.which == which and r.provider == provider}
            xs = [i + j * width for i, g in enumerate(groups) if g in found]
            ax.bar(xs, [found[g] for g in groups if g in found], width, label=provider)
        if ceiling:
            ax.axhline(ceiling.gbps, color="black", linestyle="--", linewidth=1, label=f"copy {ceiling.gbps:.0f} GB/s")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{shape_text(s)}\nK={k} {d}" for d, s, k in groups], fontsize=7)
        ax.set_ylabel("GB/s")
        ax.set_title(f"mixed_sum {which}" + (f" on {machine}" if machine else ""))
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--machine", help="name of the GPU or CPU the benchmarks ran on, for the titles")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument("--plot", help="write a PNG of bandwidth against the copy bandwidth")
    args = parser.parse_args(argv)
    existing = [p for p in args.json if Path(p).exists()]
    for missing in sorted(set(args.json) - set(existing)):
        print(f"report.py: skipping {missing}: no such file", file=sys.stderr)
    if not existing:
        print("report.py: no benchmark JSON to report", file=sys.stderr)
        return 1
    entries = load_benchmarks(existing)
    text = report(entries, args.machine)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        try:
            plot(provider_rows(entries), args.plot, args.machine)
        except (ImportError, ValueError) as exc:
            print(f"report.py: no plot ({exc})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
