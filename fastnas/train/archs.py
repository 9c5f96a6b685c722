"""``fastnas train --arch-file``: many architectures trained from scratch, each in its own run folder.

:func:`run_archs` claims ``config.out`` as a sweep of trainings (``config.json``: ``"sweep": "archs"``),
keeps the architectures in ``archs.txt`` there (a resumed sweep reads them from it, not from the
file), and trains each in ``arch-<k>/``: a normal training run folder, marked as a part of the sweep
(``"part": "arch"``), continued by resuming the sweep. The trainings go in this process one after
another or as Ray tasks (:mod:`fastnas.runs.sweep`). It writes ``summary.json`` (each architecture's
test accuracy, parameters and multiply-adds, and the mean and sample standard deviation of the
accuracies) and prints it as a table.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from fastnas.runs.config import RunError, read_config_json
from fastnas.runs.folder import contents, read_json
from fastnas.runs.sweep import Job, Outcome, Pool, mean_std, run_sweep, table
from fastnas.train.loop import run_train
from fastnas.train.recipes import TrainConfig, resolve

ARCHS_FILE = "archs.txt"
SOURCES = "a search run, a sweep over seeds or a finished ranking run"  # the run folders --arch-file reads


@dataclass
class ArchsConfig(TrainConfig):
    """A training per architecture of ``arch_file``, every other setting a :class:`TrainConfig`'s."""

    out: str = "runs/archs"
    arch_file: str | None = None

    SWEEP = "archs"


def read_archs(path: str) -> tuple[list[str], dict[str, Any]]:
    """The architectures ``path`` names, each once, in order, and the data set (``dataset``,
    ``data_dir``) of the run folder they come from (none for a text file). ``path`` is a text file,
    one architecture per line (blank lines and ``#`` comments skipped), or a run folder: a search
    run (its ``arch.txt``), a sweep over seeds (each seed's), or a ranking run (its top-5 by shared
    weights)."""
    if os.path.isdir(path):
        archs, saved = _folder_archs(path), read_config_json(path) or {}
        found = {k: saved[k] for k in ("dataset", "data_dir") if saved.get(k) is not None}
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise RunError(f"--arch-file {path}: {getattr(e, 'strerror', None) or e}") from None
        archs, found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")], {}
    if not archs:
        raise RunError(f"--arch-file {path} names no architecture")
    return list(dict.fromkeys(archs)), found


def _folder_archs(path: str) -> list[str]:
    found = contents(path)

    def arch_of(folder: str) -> str | None:
        file = os.path.join(folder, "arch.txt")
        return open(file, encoding="utf-8").read().strip() if os.path.isfile(file) else None

    if found.command is None:
        raise RunError(f"--arch-file {path} is a folder holding no run; give a file of architectures, {SOURCES}")
    if found.command == "search" and found.sweep == "seeds":
        archs = [arch_of(os.path.join(path, f"seed-{s}")) for s in (found.config or {}).get("seeds", [])]
        return [a for a in archs if a]
    if found.command == "search" and found.sweep is None:
        arch = arch_of(path)
        if arch is None:
            raise RunError(f"--arch-file {path}: no arch.txt there (a search that has found no architecture yet)")
        return [arch]
    if found.command == "rank" and found.finished:
        return list(read_json(os.path.join(path, "result.json"))["top5"]["archs"])
    raise RunError(f"--arch-file {path} holds {found.describe()}; give a file of architectures, {SOURCES}")


def arch_configs(cfg: ArchsConfig) -> tuple[ArchsConfig, list[TrainConfig]]:
    """The sweep's settings (its data set taken from an ``--arch-file`` run folder unless given) and
    the training of each architecture, checked (RunError before any training runs)."""
    if cfg.arch is not None or cfg.from_run is not None:
        raise RunError("give one of --arch, --from and --arch-file")
    kept = os.path.join(cfg.out, ARCHS_FILE)
    if cfg.resume and os.path.isfile(kept):
        archs, found = read_archs(kept)[0], {}
    elif cfg.arch_file is None:
        raise RunError("--arch-file names no file")
    else:
        archs, found = read_archs(cfg.arch_file)
    if cfg.dataset is None:
        cfg = dataclasses.replace(cfg, **found)
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    base.update(resume=False, stop_after=None, log=None, part="arch")
    width = max(2, len(str(len(archs) - 1)))
    runs = []
    for k, arch in enumerate(archs):
        out = os.path.join(cfg.out, f"arch-{k:0{width}d}")
        try:
            runs.append(resolve(TrainConfig(**{**base, "arch": arch, "out": out})))
        except RunError as e:
            raise RunError(f"--arch-file {cfg.arch_file}, architecture {k + 1}: {e}") from None
    return cfg, runs


def run_archs(cfg: ArchsConfig, pool: Pool | None = None) -> dict[str, Any]:
    """Train every architecture of ``cfg`` (see the module docstring); return the summary. RunError
    for bad input before any training, and, after the others have finished, naming those that failed."""
    cfg, trainings = arch_configs(cfg)
    jobs = [Job(os.path.basename(c.out), run_train, c) for c in trainings]
    files = {ARCHS_FILE: "".join(c.arch + "\n" for c in trainings)}
    return run_sweep(cfg, jobs, pool or Pool(), summarize, describe, summary_table, files=files)


def describe(result: dict[str, Any]) -> str:
    return f"test acc {result['test_acc']:.2f}%, {result['params']:,} parameters, architecture {result['arch']}"


KEPT = ("arch", "test_acc", "best_test_acc", "params", "macs", "train_seconds")


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """``summary.json``: a row per architecture and the mean and sample standard deviation of the accuracies."""
    runs = []
    for o in outcomes:
        row: dict[str, Any] = {"folder": os.path.basename(o.job.cfg.out), "arch": o.job.cfg.arch}
        if o.error is not None:
            row["error"] = o.error
        else:
            row.update({k: (o.result or {}).get(k) for k in KEPT})
        runs.append(row)
    stats = {c: mean_std([r[c] for r in runs if r.get(c) is not None]) for c in ("test_acc", "best_test_acc")}
    return {"runs": runs, "stats": stats, "std_of": "the sample (n - 1)"}


def summary_table(summary: dict[str, Any]) -> list[str]:
    rows = [{**r, "architecture": r["arch"] if "error" not in r else f"failed: {r['error']}"} for r in summary["runs"]]
    return table(rows, ["folder", "test_acc", "best_test_acc", "params", "macs", "architecture"], summary["stats"])
