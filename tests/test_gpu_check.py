"""Tests of the GPU check (``benchmarks/gpu_check.sh``) without a GPU.

The script runs in its dry mode (``GPU_CHECK_DRY=1``: every stage a quick CPU stand-in), three times
at once: with roomy budgets (every stage passes), with tiny budgets for some stages (they are cut
short, the next ones still run, the exit status says the tests did not pass) and with no time at
all (every stage skipped, the summary still written); and once for real on this GPU-less machine
(it stops at once with exit status 2). Then the pieces of the summary on made-up
results: the targets, the test report, the sanitizer's and ptxas's lines, the order of measurements.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gpu_kernels  # benchmarks/ is on sys.path (tests/conftest.py)
import gpu_summary
import pytest
from conftest import HAS_CUDA
from gpu_common import DRY_LABEL

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES = {
    "summary.md",
    "check.log",
    "build.log",
    "tests.log",
    "sanitizer.log",
    "kernels.json",
    "host.json",
    "supernet.json",
}
STAGES = ["facts", "build", "tests", "sanitizer", "kernels", "host", "supernet"]

# budgets far above what the stand-ins need, so that a loaded CI machine cannot cut them short
ROOMY = {"GPU_CHECK_BUDGET_S": "3000", **{f"GPU_CHECK_BUDGET_{stage.upper()}": "300" for stage in STAGES}}
RUNS = {
    "full": ROOMY,
    "cut": {**ROOMY, **{f"GPU_CHECK_BUDGET_{stage}": "1" for stage in ("TESTS", "KERNELS", "HOST", "SUPERNET")}},
    "no_time": {"GPU_CHECK_BUDGET_S": "0"},
    "no_gpu": {"GPU_CHECK_DRY": "0"},  # a real run on a machine without a GPU
}


class Run:
    def __init__(self, returncode: int, stdout: str, out: Path):
        self.returncode, self.stdout, self.out = returncode, stdout, out
        self.summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""

    def stage_status(self) -> dict[str, str]:
        """Stage -> status, from summary.md's stage table."""
        rows = {}
        for line in self.summary.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 5 and cells[0] in STAGES:
                rows[cells[0]] = cells[1]
        return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The three dry runs, started together (each is mostly one process at a time)."""
    started = {}
    for name, extra in RUNS.items():
        if name == "no_gpu" and HAS_CUDA:
            continue
        out = tmp_path_factory.mktemp(name) / "gpu_check"
        env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_OUT=str(out), PYTHON=sys.executable)
        env.update(extra)
        env.pop("FASTNAS_BACKEND", None)
        process = subprocess.Popen(
            ["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        started[name] = (process, out)
    done = {}
    for name, (process, out) in started.items():
        stdout, _ = process.communicate(timeout=600)
        done[name] = Run(process.returncode, stdout, out)
    return done


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_passes_every_stage_and_leaves_eight_flat_files(runs):
    run = runs["full"]
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.stage_status() == {stage: "ok" for stage in STAGES}
    assert {p.name for p in run.out.iterdir()} == FILES
    assert all(p.is_file() for p in run.out.iterdir())
    assert "Stages cut short or skipped: none." in run.summary
    # summary.md is printed last (the lent machine returns only the end of the output)
    tail = run.stdout.rstrip().splitlines()
    assert tail[-1].startswith("gpu_check: exit status 0")
    assert run.summary.rstrip().splitlines()[-1] in tail[-3:]
    assert (run.out / "check.log").read_text().rstrip().endswith(tail[-1])


def test_dry_results_are_labelled_as_cpu_stand_ins(runs):
    run = runs["full"]
    assert run.summary.startswith("# GPU check: no GPU (dry run")
    assert "**DRY RUN" in run.summary.splitlines()[2]
    for name in ("kernels.json", "host.json", "supernet.json"):
        data = json.loads((run.out / name).read_text())
        assert data["dry"] is True and data["label"] == DRY_LABEL and data["device"] == "cpu"
        assert data["rows"], name
        assert not any("cuda" in r["provider"] or "triton" in r["provider"] for r in data["rows"] if "provider" in r)
    kernels = json.loads((run.out / "kernels.json").read_text())
    assert not kernels["not_reached"] and len(kernels["rows"]) == kernels["planned"]
    assert {"fwd", "bwd"} == {r["pass"] for r in kernels["rows"]}
    assert {True, False} == {r["aligned"] for r in kernels["rows"]}
    assert not [r for r in kernels["rows"] if "error" in r]
    # every table of numbers says it holds stand-ins: the kernel tables, targets, host and supernet
    sections = run.summary.split("\n## ")[1:]
    for section in sections:
        if section.startswith(("Kernel-only", "Host", "Supernet")):
            assert DRY_LABEL in section, section[:200]
    assert run.summary.count(DRY_LABEL) >= 4 + 4  # four kernel tables, targets, speed-ups, host, supernet


def test_stages_cut_short_say_so_and_the_next_still_run(runs):
    run = runs["cut"]
    assert run.returncode == 3, run.stdout[-3000:]  # the tests did not finish
    status = run.stage_status()
    assert status == {
        "facts": "ok",
        "build": "ok",
        "tests": "**cut short**",
        "sanitizer": "ok",
        "kernels": "**cut short**",
        "host": "**cut short**",
        "supernet": "**cut short**",
    }
    assert "Stages cut short or skipped: tests, kernels, host, supernet." in run.summary
    assert "exit status 3: tests failed, were cut short or none passed" in run.summary
    assert {p.name for p in run.out.iterdir()} <= FILES


def test_no_time_left_skips_every_stage_and_still_writes_the_summary(runs):
    run = runs["no_time"]
    assert run.returncode == 1  # no build
    assert set(run.stage_status().values()) == {"skipped"}
    assert {p.name for p in run.out.iterdir()} == {"summary.md", "check.log"}


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_a_real_run_without_a_gpu_stops_with_status_2(runs):
    run = runs["no_gpu"]
    assert run.returncode == 2
    assert "no CUDA GPU visible" in run.summary and "exit status 2" in run.summary
    assert set(run.stage_status()) == {"facts"}
    assert {p.name for p in run.out.iterdir()} == {"summary.md", "check.log"}


# --------------------------------------------------------------------------- the pieces, on made-up results


def kernel_row(provider, which, shape, K, aligned, us, of_copy, dtype="float32"):
    nbytes = ((K + 1) if which == "fwd" else (2 * K + 1)) * 4 * math.prod(shape)
    return dict(
        provider=provider,
        **{"pass": which},
        shape=list(shape),
        dtype=dtype,
        K=K,
        aligned=aligned,
        bytes=nbytes,
        median_us=us,
        GBps=nbytes / us / 1e3,
        of_copy=of_copy,
        covered=1.0,
    )


def test_target_verdicts_take_the_worst_case():
    small, large = (64, 16, 32, 32), (64, 64, 32, 32)
    rows = [
        kernel_row("fastnas-cuda", "fwd", large, 8, True, 100.0, 0.95),
        kernel_row("fastnas-cuda", "bwd", large, 8, True, 190.0, 0.91),
        kernel_row("fastnas-cuda", "fwd", small, 8, True, 30.0, 0.79),  # misses the 0.8 target
        kernel_row("fastnas-cuda", "fwd", large, 40, True, 470.0, 0.93),  # 40/8 GB/s ratio ~1.03
        kernel_row("fastnas-cuda", "fwd", large, 8, False, 125.0, 0.76),  # misaligned at 0.8 of aligned
        {
            "provider": "fastnas-cuda",
            "pass": "bwd",
            "shape": list(small),
            "dtype": "float32",
            "K": 8,
            "aligned": True,
            "error": "RuntimeError: boom",
        },  # fmt: skip
        kernel_row("eager", "fwd", large, 8, True, 400.0, 0.2),
    ]
    verdicts = {v["target"]: v for v in gpu_summary.target_verdicts({"rows": rows})}
    assert {v["provider"] for v in verdicts.values()} == {"fastnas-cuda"}
    larger = verdicts[">= 0.9 of copy at the larger shapes and the flat input"]
    assert larger["verdict"] == "met" and larger["worst"].startswith("0.91 at backward float32 64x64x32x32 K=8")
    assert verdicts[">= 0.8 of copy at the smallest shape"]["verdict"] == "missed"
    assert verdicts["K=40 within 10% of K=8 (GB/s)"]["verdict"] == "met"
    misaligned = verdicts["misaligned within 15% of aligned (GB/s)"]
    assert misaligned["verdict"] == "missed" and misaligned["worst"].startswith("0.80 at forward")
    table = gpu_summary.kernel_tables({"rows": rows})
    assert "| 64x64x32x32 | 8 | 100.0 (0.95) | 125.0 (0.76) | 400.0 (0.20) |" in table
    assert "| 64x16x32x32 | 8 | error |" in "\n".join(table)


def test_junit_counts_and_autocast_dtypes(tmp_path):
    xml = tmp_path / "report.xml"
    xml.write_text(
        """<testsuites><testsuite>
        <testcase classname="tests.test_mixed_sum" name="test_autocast[cuda-bfloat16]"/>
        <testcase classname="tests.test_mixed_sum" name="test_autocast[cuda-float16]"/>
        <testcase classname="tests.test_mixed_sum" name="test_x[cuda]">
          <failure message="assert 1 == 2&#10;more"/></testcase>
        <testcase classname="tests.test_mixed_sum" name="test_y"><skipped message="no GPU"/></testcase>
        </testsuite></testsuites>"""
    )
    counts = gpu_summary.junit_counts(xml)
    assert gpu_summary.counts_line(counts) == "2 passed, 1 failed, 0 errors, 1 skipped"
    assert counts["autocast_passed"] == {"float16": 1, "bfloat16": 1, "other": 0}
    assert counts["failed_ids"] == ["tests.test_mixed_sum::test_x[cuda]: assert 1 == 2"]
    assert gpu_summary.main(["junit", str(xml)]) == 1  # a failure
    assert gpu_summary.junit_counts(tmp_path / "missing.xml") is None


def test_sanitizer_and_ptxas_lines(tmp_path):
    log = tmp_path / "sanitizer.log"
    log.write_text(
        "=== compute-sanitizer --tool memcheck (budget 30s)\n========= ERROR SUMMARY: 0 errors\n"
        "gpu_sanitize: 0 wrong results on cuda (cuda, triton)\n"
        "=== compute-sanitizer --tool racecheck (budget 25s)\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    )
    assert gpu_summary.sanitizer_findings(log) == [
        "memcheck: ERROR SUMMARY: 0 errors",
        "memcheck: gpu_sanitize: 0 wrong results on cuda (cuda, triton)",
        "racecheck: RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)",
    ]
    build = tmp_path / "build.log"
    build.write_text(
        "ptxas info    : Function properties for k1\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 29 registers, used 1 barriers, 128 bytes smem\n"
        "ptxas info    : Function properties for k2\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers\n"
    )
    assert gpu_summary.ptxas_report(build) == (
        "ptxas: 2 kernels, at most 64 registers, 8 bytes spilled, largest stack frame 8 bytes; spilling: k2"
    )


def test_measurements_run_in_priority_order():
    order = gpu_kernels.priority_order(gpu_kernels.GPU_GRID, ["fastnas-cuda", "fastnas-triton"])
    first = order[0][1]
    assert order[0][0] == "fastnas-cuda" and order[1] == ("fastnas-triton", first)
    assert (first.K, first.aligned, first.shape) == (8, True, (64, 64, 32, 32))
    # every (shape, dtype, K, alignment) of the grid, a 64 MiB flat input included, once per provider
    assert len(order) == len(set(order))
    units = {u for p, u in order if p == "fastnas-cuda"}
    assert len(units) == 3 * 2 * 3 * 2 and units == {u for p, u in order if p == "eager"}
    assert {u.numel * u.element_size for u in units if len(u.shape) == 1} == {64 << 20}
    assert {u for p, u in order if p == "compile"} == {u for u in units if u.aligned}

    def rank(provider, K, aligned):
        return min(i for i, (p, u) in enumerate(order) if p == provider and (u.K, u.aligned) == (K, aligned))

    # the targets' cases first (K=8, K=40, misaligned K=8), eager and compile at K=8 for context, then the rest
    assert rank("fastnas-cuda", 40, True) < rank("fastnas-cuda", 8, False) < rank("eager", 8, True)
    assert rank("eager", 8, True) < rank("compile", 8, True) < rank("fastnas-cuda", 112, True)
    assert rank("fastnas-triton", 112, False) < rank("eager", 40, True) < rank("compile", 40, True)
    assert order[-1][0] == "compile"


def test_rotation_keeps_inputs_out_of_l2():
    l2 = 50 << 20
    assert gpu_kernels.rotation_sets(16 << 20, l2) == 11  # 3 x 50 MiB over 16 MiB sets, plus one
    assert gpu_kernels.rotation_sets(8 << 30, l2) == 2  # a set far beyond L2: alternate two
    assert gpu_kernels.rotation_sets(40 << 30, l2) == 1  # never more than the memory cap
