"""NAS-Bench-201 accuracy tables: a CSV, the official benchmark file (``nas_201_api``) or NATS-Bench's
topology file (``nats_bench``).

:func:`load_nb201_table` reads any of them into an :class:`AccuracyTable`: ``table.lookup(arch)``
gives ``{column: value}`` for a NAS-Bench-201 string, or None when the table does not hold it.

The CSV format (:data:`CSV_FORMAT`): a header row that names the columns, one of them ``arch``
(NAS-Bench-201 strings, ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``), every other one numbers, e.g.::

    arch,cifar10_test_acc,cifar100_test_acc
    |nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|,94.37,73.51

Rows whose architecture is not a NAS-Bench-201 string are skipped and a repeated architecture keeps
its first row; both are reported in one line (``table.report``). The benchmark files are read
through their packages, imported only when such a file is given, and give the columns
:data:`API_COLUMNS`: test accuracies after the 200-epoch training (``hp="200"``).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from fastnas.runs.config import RunError

CSV_FORMAT = "a CSV with a header row naming an 'arch' column and numeric ones, e.g. 'arch,cifar10_test_acc'"
TABLE_HELP = (
    f"{CSV_FORMAT}; or the official benchmark file (NAS-Bench-201-*.pth, needs nas_201_api) or NATS-Bench's "
    "topology file (NATS-tss-*, needs nats_bench)"
)
API_DATASETS = ("cifar10", "cifar100", "ImageNet16-120")
API_COLUMNS = tuple(f"{name}_test_acc" for name in API_DATASETS)
DATASET_COLUMNS = dict(zip(("cifar10", "cifar100", "imagenet16-120"), API_COLUMNS))  # fastnas's data set names


@dataclass
class AccuracyTable:
    """Accuracies by NAS-Bench-201 string. ``columns``: the value names, the first the default one;
    ``report``: one line saying what was skipped while reading, or None; ``archs``: the architectures
    a CSV holds (None for the benchmark files, which hold every cell)."""

    source: str
    columns: tuple[str, ...]
    lookup_fn: Callable[[str], dict[str, float] | None] = field(repr=False)
    report: str | None = None
    archs: list[str] | None = field(default=None, repr=False)

    def lookup(self, arch: str) -> dict[str, float] | None:
        """The row of ``arch`` (any spelling NAS-Bench-201's parser accepts), or None."""
        key = canonical_arch(arch)
        return None if key is None else self.lookup_fn(key)

    def __call__(self, arch: str) -> dict[str, float] | None:
        return self.lookup(arch)

    def column_for(self, dataset: str) -> str:
        """The column of data set ``dataset`` (``cifar10_test_acc``, ``cifar100_test_acc``,
        ``ImageNet16-120_test_acc``) when the table has it, else its first column."""
        column = DATASET_COLUMNS.get(dataset)
        return column if column in self.columns else self.columns[0]


def canonical_arch(text: str) -> str | None:
    """``text`` as NAS-Bench-201 writes it (spaces removed), or None if it is not such a string."""
    from fastnas.spaces import nb201

    try:
        nodes = nb201.parse_arch_string(text.replace(" ", ""))
    except (TypeError, ValueError):
        return None
    return None if nb201.benchmark_cell_error(nodes) else nb201.format_arch_string(nodes)


def load_nb201_table(path: str, flag: str = "--nb201-table") -> AccuracyTable:
    """Read ``path``: ``.csv`` / ``.txt`` as :data:`CSV_FORMAT`; a folder or a file named ``*NATS*``
    through ``nats_bench`` (the topology search space, ``tss``); any other file through
    ``nas_201_api``. RunError (naming ``flag``) for a missing, unreadable or malformed table."""
    if not os.path.exists(path):
        raise RunError(f"{flag} {path} does not exist")
    if os.path.isfile(path) and path.lower().endswith((".csv", ".txt")):
        return _read_csv(path, flag)
    if os.path.isdir(path) or "nats" in os.path.basename(os.path.normpath(path)).lower():
        return _read_api(path, flag, "nats_bench")
    return _read_api(path, flag, "nas_201_api")


def _read_csv(path: str, flag: str) -> AccuracyTable:
    where = f"{flag} {path}"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RunError(f"{where} is not a readable CSV: {e}") from None
    numbered = [(i, row) for i, row in enumerate(rows, start=1) if any(cell.strip() for cell in row)]
    if not numbered:
        raise RunError(f"{where} is empty; expected {CSV_FORMAT}")
    header_line, header = numbered[0]
    names = [h.strip() for h in header]
    if "arch" not in names:
        if any(canonical_arch(cell) for cell in header):
            raise RunError(
                f"{where} has no header row (line {header_line} holds an architecture); expected {CSV_FORMAT}"
            )
        raise RunError(f"{where} has no 'arch' column (header: {','.join(names)}); expected {CSV_FORMAT}")
    if len(set(names)) != len(names) or "" in names:
        raise RunError(f"{where}: the header names a column twice or leaves one unnamed ({','.join(names)})")
    arch_col = names.index("arch")
    value_cols = [(k, name) for k, name in enumerate(names) if k != arch_col]
    if not value_cols:
        raise RunError(f"{where} has no column besides 'arch'; expected {CSV_FORMAT}")
    table: dict[str, dict[str, float]] = {}
    skipped: list[int] = []
    duplicates: list[int] = []
    for line, row in numbered[1:]:
        if len(row) != len(names):
            raise RunError(f"{where} line {line}: {len(row)} fields, the header has {len(names)}")
        values = {}
        for k, name in value_cols:
            try:
                values[name] = float(row[k])
            except ValueError:
                raise RunError(f"{where} line {line}: {name} {row[k].strip()!r} is not a number") from None
            if not math.isfinite(values[name]):
                raise RunError(f"{where} line {line}: {name} {row[k].strip()!r} is not a finite number")
        key = canonical_arch(row[arch_col])
        if key is None:
            skipped.append(line)
        elif key in table:
            duplicates.append(line)
        else:
            table[key] = values
    if not table:
        raise RunError(f"{where} holds no NAS-Bench-201 architecture")
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} rows that are not NAS-Bench-201 architectures ({_lines(skipped)})")
    if duplicates:
        notes.append(f"{len(duplicates)} repeated architectures kept their first row ({_lines(duplicates)})")
    report = f"{where}: {len(table)} architectures; " + "; ".join(notes) if notes else None
    return AccuracyTable(path, tuple(name for _, name in value_cols), table.get, report, list(table))


def _lines(lines: list[int], most: int = 5) -> str:
    shown = ", ".join(str(n) for n in lines[:most])
    return ("line " if len(lines) == 1 else "lines ") + shown + (", ..." if len(lines) > most else "")


def _read_api(path: str, flag: str, package: str) -> AccuracyTable:
    """The official file through ``package`` (imported here, so that it stays optional)."""
    try:
        if package == "nats_bench":
            from nats_bench import create

            make = lambda: create(path, "tss", fast_mode=os.path.isdir(path), verbose=False)
        else:
            from nas_201_api import NASBench201API

            make = lambda: NASBench201API(path, verbose=False)
    except ImportError:
        raise RunError(
            f"{flag} {path} is not a .csv and reading it needs the {package} package (pip install "
            f"{package.replace('_', '-')})"
        ) from None
    try:
        api = make()
    except Exception as e:  # the packages raise anything from AssertionError to pickle errors
        raise RunError(f"{flag} {path}: {package} cannot read it ({type(e).__name__}: {e})".splitlines()[0]) from None

    def lookup(arch: str) -> dict[str, float] | None:
        index = api.query_index_by_arch(arch)
        if index is None or index < 0:
            return None
        row = {
            column: _test_accuracy(api.get_more_info(index, dataset, hp="200", is_random=False))
            for dataset, column in zip(API_DATASETS, API_COLUMNS)
        }
        return {k: v for k, v in row.items() if math.isfinite(v)} or None  # a missing accuracy is no value

    return AccuracyTable(path, API_COLUMNS, lookup)


def _test_accuracy(info: Any) -> float:
    return float(info.get("test-accuracy", float("nan"))) if isinstance(info, dict) else float("nan")
