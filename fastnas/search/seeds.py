"""``fastnas search --seeds``: one search per seed, and the summary papers report over them.

:func:`run_seeds` claims ``config.out`` as a sweep over seeds (``config.json``: ``"sweep": "seeds"``)
and runs one search per seed in ``seed-<s>/``: a normal search run folder, marked as a part of the
sweep (``"part": "seed"``), so it is continued by resuming the sweep (``train --from`` and
``rank --from`` take it as any search run). The searches go in this process one after another or as
Ray tasks (:mod:`fastnas.runs.sweep`). It writes ``summary.json``: each seed's architecture, test
accuracy and benchmark accuracies (``--nb201-table``), their mean and sample standard deviation over
the seeds, and the distinct architectures found; and prints them as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from fastnas.runs.config import RunError
from fastnas.runs.sweep import Job, Outcome, Pool, mean_std, run_sweep, table
from fastnas.runs.tables import load_nb201_table
from fastnas.search.config import SearchConfig, resolve
from fastnas.search.loop import run_search


@dataclass
class SeedsConfig(SearchConfig):
    """A search per seed of ``seeds``, every other setting a :class:`SearchConfig`'s."""

    out: str = "runs/seeds"
    seeds: list[int] = field(default_factory=list)

    SWEEP = "seeds"


def parse_seeds(text: str) -> list[int]:
    """``0,1,2,3``, a range ``0-3``, or both (``0-3,10``): distinct seeds >= 0, in the order given
    (argparse's type: ArgumentTypeError otherwise)."""
    seeds: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise argparse.ArgumentTypeError(f"{text!r}: give seeds as 0,1,2,3 or a range 0-3")
        seeds.extend(range(int(m[1]), int(m[2] or m[1]) + 1))
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return seeds


def seed_configs(cfg: SeedsConfig) -> list[SearchConfig]:
    """The search of each seed, its settings checked (RunError before any search runs)."""
    if not cfg.seeds:
        raise RunError("--seeds names no seed")
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SearchConfig)}
    base.update(resume=False, stop_after=None, log=None, part="seed")
    out = [
        resolve(SearchConfig(**{**base, "seed": seed, "out": os.path.join(cfg.out, f"seed-{seed}")}))[0]
        for seed in cfg.seeds
    ]
    if cfg.nb201_table is not None:
        load_nb201_table(cfg.nb201_table)
    return out


def run_seeds(cfg: SeedsConfig, pool: Pool | None = None) -> dict[str, Any]:
    """Run one search per seed of ``cfg`` (see the module docstring); return the summary. RunError
    for bad input before any search, and, after the others have finished, naming the searches that
    failed."""
    searches = seed_configs(cfg)
    jobs = [Job(os.path.basename(c.out), run_search, c) for c in searches]
    return run_sweep(cfg, jobs, pool or Pool(), summarize, describe, summary_table)


def describe(result: dict[str, Any]) -> str:
    """A finished search in a line: its test accuracy, benchmark accuracies and architecture."""
    bench = "".join(f"{k} {v:.2f}, " for k, v in (result.get("benchmark") or {}).items())
    acc = result.get("test_acc")
    return (f"test acc {acc:.2f}%, " if acc is not None else "") + bench + f"architecture {result.get('arch')}"


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """``summary.json``: every seed's row, the mean and sample standard deviation of each accuracy
    over the seeds that have it, and the distinct architectures with the seeds that found each."""
    runs, columns = [], ["test_acc"]
    for o in outcomes:
        row: dict[str, Any] = {"seed": o.job.cfg.seed, "folder": os.path.basename(o.job.cfg.out)}
        if o.error is not None:
            row["error"] = o.error
        else:
            r = o.result or {}
            bench = r.get("benchmark")
            row.update(arch=r.get("arch"), test_acc=r.get("test_acc"), test_acc_of=r.get("test_acc_of"))
            if bench is not None:
                row["benchmark"] = bench
                columns += [k for k in bench if k not in columns]
            row["search_seconds"] = r.get("search_seconds")
        runs.append(row)
    value = lambda row, c: row.get(c) if c == "test_acc" else (row.get("benchmark") or {}).get(c)
    stats = {c: mean_std([value(r, c) for r in runs if value(r, c) is not None]) for c in columns}
    archs: dict[str, list[int]] = {}
    for r in runs:
        if r.get("arch") is not None:
            archs.setdefault(r["arch"], []).append(r["seed"])
    return {
        "seeds": [r["seed"] for r in runs],
        "runs": runs,
        "stats": stats,
        "std_of": "the sample (n - 1)",
        "archs": [{"arch": a, "seeds": s} for a, s in archs.items()],
    }


def _failed(row: dict[str, Any]) -> str | None:
    return f"failed: {row['error']}" if "error" in row else None


def summary_table(summary: dict[str, Any]) -> list[str]:
    """The summary as the lines of a table: a row per seed, the mean ± std line, the distinct cells."""
    stats = summary["stats"]
    rows = [
        {"seed": r["seed"], **r, **(r.get("benchmark") or {}), "architecture": r.get("arch") or _failed(r)}
        for r in summary["runs"]
    ]
    lines = table(rows, ["seed", *stats, "architecture"], stats)
    found = len(summary["archs"])
    lines.append(f"{found} distinct architecture{'s' if found != 1 else ''} over {len(rows)} seeds")
    return lines
