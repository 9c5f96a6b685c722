"""Tests of benchmarks/report.py: the markdown table built from pytest-benchmark JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "fastnas_benchmark_report", Path(__file__).parents[1] / "benchmarks" / "report.py"
)
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report  # dataclasses look their module up while the file executes
_spec.loader.exec_module(report)


def entry(provider: str, which: str, median_s: float, nbytes: int, shape=(64, 16, 32, 32), K=8, dtype="float32"):
    info = {"provider": provider, "shape": list(shape), "K": K, "dtype": dtype, "pass": which, "bytes": nbytes}
    return {"name": f"test_provider[{provider}]", "extra_info": info, "stats": {"median": median_s, "min": median_s}}


def test_table_gives_bandwidth_fraction_of_copy_and_speedups(tmp_path):
    entries = [
        entry("copy", "copy", 1e-3, 3_000_000_000),  # 3000 GB/s: the ceiling
        entry("copy", "copy", 1e-3, 1_000_000_000, shape=(2, 2)),  # slower copy: ignored as ceiling
        entry("fastnas-cuda", "fwd+bwd", 2e-3, 5_400_000_000),  # 2700 GB/s
        entry("eager", "fwd+bwd", 12e-3, 5_400_000_000),
        entry("compile", "fwd+bwd", 4e-3, 5_400_000_000),
        entry("fastnas-cuda", "fwd", 1e-3, 900_000_000, dtype="bfloat16"),  # no eager/compile: blank speed-ups
        {"name": "unrelated", "extra_info": {}, "stats": {"median": 1.0}},
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": entries}))
    text = report.report(report.load_benchmarks([path]), machine="Test GPU")
    assert "Test GPU" in text and "**3000 GB/s**" in text
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in text.splitlines() if "| fwd" in line}
    key = ("64x16x32x32", "8")
    assert (*key, "float32", "fwd+bwd", "fastnas-cuda", "2.000 ms", "2700.0", "0.90", "6.00", "2.00") in rows
    assert (*key, "float32", "fwd+bwd", "eager", "12.000 ms", "450.0", "0.15", "1.00", "0.33") in rows
    assert (*key, "bfloat16", "fwd", "fastnas-cuda", "1.000 ms", "900.0", "0.30", "", "") in rows
    assert not any("copy" == r[4] for r in rows)


def test_missing_copy_and_cli(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": [entry("fastnas-triton", "bwd", 5e-6, 1_000_000)]}))
    md = tmp_path / "out.md"
    assert report.main([str(path), str(tmp_path / "absent.json"), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "No copy benchmark" in out and "| 64x16x32x32 | 8 | float32 | bwd | fastnas-triton | 5.0 us | 200.0 |" in out
    assert md.read_text() == out.rstrip("\n") + "\n"
    assert report.main([str(tmp_path / "absent.json")]) == 1


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = report.provider_rows([entry("copy", "copy", 1e-3, 10**9), entry("eager", "fwd", 1e-3, 10**8)])
    report.plot(rows, tmp_path / "bw.png", machine="Test GPU")
    assert (tmp_path / "bw.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_timed_by_the_benchmark_itself_and_their_copy():
    """bench_large_tensors.py entries: kernel_median_ms (CUDA events) wins over pytest-benchmark's median,
    and the copy timed alongside becomes the ceiling."""
    info = {
        "provider": "fastnas-cuda", "shape": [1000], "K": 2, "dtype": "float32", "pass": "fwd",
        "bytes": 12_000_000_000, "kernel_median_ms": 5.0, "copy_median_ms": 5.0, "copy_GBps": 3200.0,
    }  # fmt: skip
    rows = report.provider_rows([{"extra_info": info, "stats": {"median": 1.0}}])
    kernel, copy = sorted(rows, key=lambda r: r.which != "fwd")
    assert kernel.median_s == pytest.approx(5e-3) and kernel.gbps == pytest.approx(2400.0)
    assert copy.which == "copy" and copy.gbps == pytest.approx(3200.0)
    text = report.report([{"extra_info": info, "stats": {"median": 1.0}}])
    assert "**3200 GB/s**" in text
    assert "| 1000 | 2 | float32 | fwd | fastnas-cuda | 5.000 ms | 2400.0 | 0.75 |  |  |" in text
