"""The summary of ``benchmarks/gpu_check.sh``, and the test report's counts.

``write``: ``summary.md``, ready to paste into ``benchmarks/RESULTS.md``: the machine, each stage's
outcome and time against its budget (cut short or skipped ones say so), the test counts, the
sanitizer's findings, the kernel-only tables with the targets met or missed, the host time per
call and the supernet step. Printed too (without the per-case kernel tables when the whole would
not fit in the last 12,000 characters of the output).

``junit``: one line of counts of a pytest junit XML file; exit status 0 only if some test passed
and none failed.

Run:  python benchmarks/gpu_summary.py write --out DIR --scratch DIR --exit-status N
      python benchmarks/gpu_summary.py junit REPORT.xml
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import DRY_LABEL  # noqa: E402
from gpu_facts import facts_line, run_quietly  # noqa: E402
from report import shape_text  # noqa: E402

PRINT_LIMIT = 11_000  # the lent machine returns the last 12,000 characters of output
EXIT_MEANINGS = {
    0: "build, tests and sanitizer passed",
    1: "the build failed",
    2: "no CUDA GPU or no torch",
    3: "tests failed, were cut short or none passed",
    4: "the sanitizer found errors (build and tests passed)",
}


# --------------------------------------------------------------------------- reading the stages' outputs


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(path: Path) -> list[dict]:
    """Rows of the shell's stage record: name, status, seconds, limit, note (tab-separated)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t") + [""] * 5
            rows.append(dict(stage=parts[0], status=parts[1], seconds=parts[2], limit=parts[3], note=parts[4]))
    return rows


def junit_counts(path: Path) -> dict | None:
    """Counts of a pytest junit XML file, failed test ids, the commonest skip reasons, autocast tests."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failed, reasons = [], {}
    autocast = {"float16": 0, "bfloat16": 0, "other": 0}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                failed.append(
                    f"{name}: {(child.get('message') or '').splitlines()[0][:160] if child.get('message') else ''}"
                )
            elif child.tag == "skipped":
                outcome = "skipped"
                reason = (child.get("message") or "").strip()[:120]
                reasons[reason] = reasons.get(reason, 0) + 1
        counts[outcome] += 1
        if outcome == "passed" and "autocast" in name.lower():
            lowered = name.lower()
            key = (
                "bfloat16"
                if re.search(r"bfloat16|bf16", lowered)
                else "float16"
                if re.search(r"float16|fp16|half", lowered)
                else "other"
            )
            autocast[key] += 1
    counts["failed_ids"] = failed[:15]
    counts["skip_reasons"] = sorted(reasons.items(), key=lambda kv: -kv[1])[:5]
    counts["autocast_passed"] = autocast
    return counts


def counts_line(counts: dict) -> str:
    return (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    )


def sanitizer_findings(log: Path) -> list[str]:
    """One line per tool: its error summary as compute-sanitizer printed it."""
    if not log.exists():
        return []
    lines = []
    tool = None
    for line in log.read_text(errors="replace").splitlines():
        section = re.match(r"=== compute-sanitizer --tool (\w+)", line)
        if section:
            tool = section.group(1) if section.group(1) != "none" else "no sanitizer (dry run)"
            continue
        for pattern in (r"ERROR SUMMARY: .*", r"RACECHECK SUMMARY: .*", r"gpu_sanitize: .*"):
            found = re.search(pattern, line)
            if found and tool:
                lines.append(f"{tool}: {found.group(0)}")
    return lines


def ptxas_report(log: Path) -> str:
    """Registers and spills of the CUDA kernels, from the build's ``-Xptxas -v`` lines; the kernels
    that spill are named (demangled when c++filt is there)."""
    if not log.exists():
        return ""
    text = log.read_text(errors="replace")
    registers = [int(r) for r in re.findall(r"ptxas info\s*: Used (\d+) registers", text)]
    if not registers:
        return ""
    frames = re.findall(
        r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
        text,
    )
    spilling = sorted({name for name, _, stores, loads in frames if int(stores) + int(loads) > 0})
    spilled = sum(int(stores) + int(loads) for _, _, stores, loads in frames)
    stack = max((int(frame) for _, frame, _, _ in frames), default=0)
    report = (
        f"ptxas: {len(registers)} kernels, at most {max(registers)} registers, "
        f"{'no spills' if spilled == 0 else f'{spilled} bytes spilled'}, largest stack frame {stack} bytes"
    )
    if spilling:
        names = run_quietly(["c++filt", *spilling]).splitlines() or spilling
        report += "; spilling: " + "; ".join(n[:140] for n in names[:4])
    return report


# --------------------------------------------------------------------------- kernel tables and targets

PASS_NAMES = {"fwd": "forward", "bwd": "backward"}


def row(*cells: object) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*columns: str) -> list[str]:
    """A markdown table's header and separator."""
    return [row(*columns), "|" + "---|" * len(columns)]


def _shape_label(shape: list[int], dtype: str) -> str:
    """The shape; a flat input also in bytes (the "64 MiB input")."""
    if len(shape) == 1:
        size = shape[0] * (2 if dtype in ("bfloat16", "float16") else 4 if dtype == "float32" else 8)
        return f"{shape[0]} ({size / 2**20:.0f} MiB)" if size >= 2**20 else f"{shape[0]} ({size / 2**10:.0f} KiB)"
    return shape_text(tuple(shape))


def _column(r: dict) -> str:
    name = r["provider"].removeprefix("fastnas-")
    return name if r["aligned"] else f"{name} mis."


def _cell(r: dict) -> str:
    if "error" in r:
        return "error"
    mark = "" if r.get("covered", 1) >= 0.9 else "†"
    return f"{r['median_us']:.1f}{mark} ({r['of_copy']:.2f})"


def kernel_tables(data: dict) -> list[str]:
    rows = data.get("rows", [])
    if not rows:
        return ["No kernel measurement finished."]
    label = f" — {DRY_LABEL}" if data.get("dry") else ""
    lines = []
    order = {p: i for i, p in enumerate(["cuda", "cpu", "triton", "reference", "eager", "compile"])}
    for which in ("fwd", "bwd"):
        for dtype in sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32"):
            group = [r for r in rows if r["pass"] == which and r["dtype"] == dtype]
            if not group:
                continue
            columns = sorted({_column(r) for r in group}, key=lambda c: (order.get(c.split()[0], 9), c))
            cases = []
            for r in group:
                key = (tuple(r["shape"]), r["K"])
                if key not in cases:
                    cases.append(key)
            cases.sort(key=lambda c: (len(c[0]) == 1, c[0][1] if len(c[0]) > 1 else 0, c[1]))
            lines += [
                "",
                f"{PASS_NAMES[which]}, {dtype}: median µs (fraction of a copy of the same bytes){label}",
                "",
                *header("shape", "K", *columns),
            ]
            for shape, K in cases:
                cells = {_column(r): _cell(r) for r in group if tuple(r["shape"]) == shape and r["K"] == K}
                lines.append(row(_shape_label(list(shape), dtype), K, *(cells.get(c, "") for c in columns)))
    if any(r.get("covered", 1) < 0.9 for r in rows if "error" not in r):
        lines += ["", "† the sleep did not always outlast the host's enqueue: the time may include launch gaps."]
    return lines


def _key(r: dict) -> tuple:
    return (r["provider"], r["pass"], r["dtype"], tuple(r["shape"]), r["K"], r["aligned"])


def _measured(data: dict) -> dict[tuple, dict]:
    """The rows that have a time, by (provider, pass, dtype, shape, K, aligned)."""
    return {_key(r): r for r in data.get("rows", []) if "error" not in r and "of_copy" in r}


def _describe(r: dict) -> str:
    return (
        f"{PASS_NAMES[r['pass']]} {r['dtype']} {_shape_label(r['shape'], r['dtype'])} K={r['K']}"
        f"{'' if r['aligned'] else ' misaligned'}"
    )


def _worst(provider: str, target: str, bound: float, values: list[tuple[float, dict]]) -> dict:
    """A target's verdict from (value, row) pairs: met when the smallest value reaches the bound."""
    if not values:
        return dict(provider=provider, target=target, verdict="not measured", worst="")
    value, case = min(values, key=lambda v: v[0])
    return dict(
        provider=provider,
        target=target,
        verdict="met" if value >= bound else "missed",
        worst=f"{value:.2f} at {_describe(case)}",
    )


def target_verdicts(data: dict) -> list[dict]:
    """The kernel targets per fastnas provider (met, missed or not measured, with the worst case):
    fraction of copy over aligned inputs at every K measured, >= 0.9 at the larger shapes and the flat
    input, >= 0.8 at the smallest; the second K within 10% of the first and misaligned within 15% of
    aligned, both in GB/s of the same pass, dtype and shape."""
    rows = _measured(data)
    out = []
    for provider in sorted({k[0] for k in rows if k[0].startswith("fastnas-")}):
        mine = {k: r for k, r in rows.items() if k[0] == provider}
        shapes = {k[3] for k in mine}
        smallest = min((s for s in shapes if len(s) > 1), key=lambda s: math.prod(s), default=None)
        aligned = [r for k, r in mine.items() if k[5]]
        out.append(
            _worst(
                provider,
                ">= 0.9 of copy at the larger shapes and the flat input",
                0.9,
                [(r["of_copy"], r) for r in aligned if tuple(r["shape"]) != smallest],
            )
        )
        out.append(
            _worst(
                provider,
                ">= 0.8 of copy at the smallest shape",
                0.8,
                [(r["of_copy"], r) for r in aligned if tuple(r["shape"]) == smallest],
            )
        )
        ks = sorted({k[4] for k in mine})
        if len(ks) > 1:
            pairs = [
                (r["GBps"] / base["GBps"], r)
                for k, r in mine.items()
                if k[4] == ks[1] and (base := mine.get((*k[:4], ks[0], k[5]))) and base["GBps"] > 0
            ]
            out.append(_worst(provider, f"K={ks[1]} within 10% of K={ks[0]} (GB/s)", 0.9, pairs))
        pairs = [
            (r["GBps"] / base["GBps"], r)
            for k, r in mine.items()
            if not k[5] and (base := mine.get((*k[:5], True))) and base["GBps"] > 0
        ]
        out.append(_worst(provider, "misaligned within 15% of aligned (GB/s)", 0.85, pairs))
    return out


def speedup_table(data: dict) -> list[str]:
    """Forward+backward time at the first K, aligned inputs: each fastnas backend against eager and
    torch.compile (rows where both passes were measured)."""
    rows = _measured(data)
    if not rows:
        return []
    k0 = min(k[4] for k in rows)
    cases = sorted({(k[2], k[3]) for k in rows if k[4] == k0}, key=lambda c: (c[0] != "float32", len(c[1]) == 1, c[1]))

    def both(provider: str, dtype: str, shape: tuple) -> float | None:
        fwd, bwd = (rows.get((provider, which, dtype, shape, k0, True)) for which in ("fwd", "bwd"))
        return fwd["median_us"] + bwd["median_us"] if fwd and bwd else None

    lines = header("shape", "dtype", "provider", "fwd+bwd µs", "x eager", "x compile")
    for dtype, shape in cases:
        eager, compiled = both("eager", dtype, shape), both("compile", dtype, shape)
        for provider in sorted({k[0] for k in rows if k[0].startswith("fastnas-")}):
            t = both(provider, dtype, shape)
            if t:
                speedups = [f"{base / t:.2f}" if base else "" for base in (eager, compiled)]
                lines.append(row(_shape_label(list(shape), dtype), dtype, provider, f"{t:.1f}", *speedups))
    return lines if len(lines) > 2 else []


# --------------------------------------------------------------------------- the summary


def host_table(data: dict) -> list[str]:
    label = f" — {DRY_LABEL}" if data.get("dry") else ""
    lines = [
        f"Host time per forward+backward (tiny tensors {shape_text(tuple(data.get('shape', [])))}, float32){label}: "
        f"{data.get('method', '')}.",
        "",
        *header("provider", "K", "host µs", "device µs (CPU)" if data.get("dry") else "GPU µs", "host / device"),
    ]
    for r in data.get("rows", []):
        if "error" in r:
            lines.append(row(r["provider"], r["K"], f"error: {r['error'][:80]}", "", ""))
        else:
            lines.append(
                row(r["provider"], r["K"], f"{r['host_us']:.1f}", f"{r['gpu_us']:.1f}", f"{r['host_over_gpu']:.1f}")
            )
    return lines


def supernet_table(data: dict) -> list[str]:
    label = f" — {DRY_LABEL}" if data.get("dry") else ""
    lines = [
        f"One training step (forward, loss, backward, SGD step), mixed sum on the `{data.get('mixed_sum_backend')}` "
        f"backend{label}:",
        "",
        *header("space", "batch", "net", "mode", "step ms (min–max)", "peak MiB", "graph MiB", "note"),
    ]
    for r in data.get("rows", []):
        time_text = f"{r['step_ms']:.2f} ({r['min_ms']:.2f}–{r['max_ms']:.2f})" if "step_ms" in r else ""
        note = r.get("error", "") or (f"compiled in {r['compile_s']} s" if "compile_s" in r else "")
        peak = r.get("peak_MiB", "")
        peak = "" if peak in ("", -1, -1.0) else peak
        lines.append(
            row(r["space"], r["batch"], r["net"], r["mode"], time_text, peak, r.get("graph_MiB", ""), note[:120])
        )
    if data.get("not_run"):
        lines += ["", f"Not run: {data['not_run']}."]
    return lines


def summary(out: Path, scratch: Path, exit_status: int) -> tuple[str, str]:
    """(the whole summary, the part to print when the whole is too long)."""
    f = read_json(scratch / "facts.json") or {}
    dry = bool(f.get("dry")) or os.environ.get("GPU_CHECK_DRY") == "1"
    stages = read_stages(scratch / "stages.tsv")
    head = [f"# GPU check: {f.get('name', 'unknown machine')}, {f.get('date_utc', '')}", ""]
    if dry:
        head += [f"**DRY RUN — {DRY_LABEL}.** The stages ran their CPU stand-ins to check the plumbing.", ""]
    head += [facts_line(f) if f else "Machine facts were not read (the facts stage failed).", ""]
    head += [
        f"Command: `bash benchmarks/gpu_check.sh`; commit {os.environ.get('GPU_CHECK_COMMIT', 'unknown')}; "
        f"exit status {exit_status}: {EXIT_MEANINGS.get(exit_status, 'see the stage table')}.",
        "",
        *header("stage", "status", "seconds", "budget s", "note"),
    ]
    for s in stages:
        status = {"cut": "**cut short**", "failed": "**failed**", "skipped": "skipped"}.get(s["status"], s["status"])
        head.append(row(s["stage"], status, s["seconds"], s["limit"], s["note"]))
    cut = [s["stage"] for s in stages if s["status"] in ("cut", "skipped")]
    head += ["", f"Stages cut short or skipped: {', '.join(cut) if cut else 'none'}."]

    tests = []
    for name in ("tests", "autocast"):
        counts = junit_counts(scratch / f"{name}.xml")
        if counts:
            line = f"- {name}: {counts_line(counts)}"
            if name == "autocast":
                passed = counts["autocast_passed"]
                line += f" (passed: float16 {passed['float16']}, bfloat16 {passed['bfloat16']})"
            tests.append(line)
            tests += [f"  - FAILED {t}" for t in counts["failed_ids"]]
            tests += [f"  - skipped ×{n}: {reason}" for reason, n in counts["skip_reasons"]]
    sanitizer = [f"- {line}" for line in sanitizer_findings(out / "sanitizer.log")]
    body = []
    if tests or sanitizer:
        body += ["", "## Tests and sanitizer", ""] + tests + sanitizer

    kernels = read_json(out / "kernels.json")
    tables = []
    if kernels:
        method = kernels.get("method", "")
        body += ["", "## Kernel-only time", "", f"Method: {method}. Backends: {', '.join(kernels.get('backends', []))}"]
        if kernels.get("missing_backends"):
            body[-1] += f" (not available: {', '.join(kernels['missing_backends'])})"
        body[-1] += "."
        copies = [c["GBps"] for c in kernels.get("copies", [])]
        if copies:
            body += [
                f"Device copy: up to {max(copies):.0f} GB/s (reads plus writes), "
                f"median of the copies {statistics.median(copies):.0f} GB/s."
            ]
        if kernels.get("fatal"):
            body += [f"**Stopped: {kernels['fatal']}**"]
        done = len(kernels.get("rows", []))
        body += [f"Measured {done} of {kernels.get('planned', '?')} (provider, pass, case) rows."]
        if kernels.get("not_reached"):
            nr = kernels["not_reached"]
            body += [
                f"Not reached within the budget ({len(nr)} tasks): {'; '.join(nr[:6])}{' ...' if len(nr) > 6 else ''}."
            ]
        verdicts = target_verdicts(kernels)
        if verdicts:
            body += ["", "Targets" + (f" — {DRY_LABEL}, verdicts mean nothing" if kernels.get("dry") else "") + ":", ""]
            body += header("provider", "target", "verdict", "worst")
            body += [row(v["provider"], v["target"], v["verdict"], v["worst"]) for v in verdicts]
        speedups = speedup_table(kernels)
        if speedups:
            where = DRY_LABEL if kernels.get("dry") else "GPU time"
            body += ["", f"Forward+backward at the first K, aligned inputs ({where}):", ""] + speedups
        tables = kernel_tables(kernels)
    host = read_json(out / "host.json")
    rest = []
    if host:
        rest += ["", "## Host time per call", ""] + host_table(host)
    supernet = read_json(out / "supernet.json")
    if supernet:
        rest += ["", "## Supernet training step", ""] + supernet_table(supernet)
    build_note = ptxas_report(out / "build.log")
    if build_note:
        rest += ["", f"Build: {build_note}."]
    files = sorted({p.name for p in out.iterdir() if p.is_file()} | {"summary.md"})
    tail = ["", f"Files in `{out.name}/`: {', '.join(files)}."]
    if dry:
        tail += ["", f"**DRY RUN — {DRY_LABEL}.**"]
    whole = "\n".join(head + body + tables + rest + tail) + "\n"
    short = "\n".join(head + body + ["", "(The per-case kernel tables are in summary.md.)"] + rest + tail) + "\n"
    return whole, short


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("junit", help="one line of counts; exit status 0 only if some test passed and none failed")
    p.add_argument("xml")
    p = sub.add_parser("write")
    p.add_argument("--out", required=True)
    p.add_argument("--scratch", required=True)
    p.add_argument("--exit-status", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "junit":
        counts = junit_counts(Path(args.xml))
        if counts is None:
            print("no test report")
            return 1
        print(counts_line(counts))
        return 0 if counts["passed"] > 0 and counts["failed"] + counts["errors"] == 0 else 1
    out, scratch = Path(args.out), Path(args.scratch)
    whole, short = summary(out, scratch, args.exit_status)
    (out / "summary.md").write_text(whole)
    print(whole if len(whole) <= PRINT_LIMIT else short)
    return 0


if __name__ == "__main__":
    sys.exit(main())
