"""benchmarks/bench_imagenet_loader.py runs on a tiny synthetic folder and reports both providers
(the numbers are not checked: timing belongs on a quiet machine)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision", reason="the image-folder pipeline needs torchvision (fastnas[imagenet])")

_path = Path(__file__).parents[1] / "benchmarks" / "bench_imagenet_loader.py"
_spec = importlib.util.spec_from_file_location("fastnas_bench_imagenet_loader", _path)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def test_runs_on_a_tiny_synthetic_folder(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--synthetic", "24", "--image-size", "64", "48", "--workers", "0", "1", "--batch-size", "4"]
    rows = bench.main([*args, "--batches", "1", "--warmup", "1", "--rounds", "1", "--crop", "32", "--json", str(out)])
    assert [(r["provider"], r["workers"]) for r in rows] == [
        ("fastnas", 0), ("torchvision", 0), ("fastnas", 1), ("torchvision", 1)
    ]  # fmt: skip
    assert all(r["images_per_sec"] > 0 and len(r["rounds"]) == 1 for r in rows)
    assert json.loads(out.read_text()) == rows
    stdout = capsys.readouterr().out
    assert "| workers | fastnas images/s | torchvision images/s |" in stdout and stdout.count("\n| ") == 3
    with pytest.raises(SystemExit, match="too few images"):
        bench.main(
            ["--synthetic", "8", "--image-size", "64", "48", "--workers", "0", "--batch-size", "4", "--crop", "32"]
        )
