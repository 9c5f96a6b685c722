"""NAS-Bench-201 accuracy tables: a CSV, or the official benchmark file through ``nas_201_api``."""

from __future__ import annotations

import os
from typing import Callable

from fastnas.runs.config import RunError


def load_nb201_table(path: str) -> Callable[[str], dict[str, float] | None]:
    """A lookup ``arch string -> {column: value}`` from a CSV (header row; the first column holds
    architecture strings, the others numbers), or from the official NAS-Bench-201 file through
    ``nas_201_api`` when that package is installed and ``path`` is not a CSV."""
    if not os.path.isfile(path):
        raise RunError(f"--nb201-table {path} does not exist")
    if path.endswith(".csv") or path.endswith(".txt"):
        import csv

        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise RunError(f"--nb201-table {path} is not a readable CSV: {e}") from None
        if len(rows) < 2 or len(rows[0]) < 2:
            raise RunError(f"--nb201-table {path} needs a header and rows of 'arch,accuracy,...'")
        header = rows[0]
        table: dict[str, dict[str, float]] = {}
        for i, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise RunError(f"--nb201-table {path} line {i}: {len(row)} fields, header has {len(header)}")
            try:
                table[row[0].strip()] = {h: float(v) for h, v in zip(header[1:], row[1:])}
            except ValueError:
                raise RunError(f"--nb201-table {path} line {i}: non-numeric accuracy") from None
        return table.get
    try:
        from nas_201_api import NASBench201API  # optional
    except ImportError:
        raise RunError(f"--nb201-table {path} is not a .csv and nas_201_api is not installed") from None
    try:
        api = NASBench201API(path, verbose=False)
    except Exception as e:
        raise RunError(f"--nb201-table {path}: the NAS-Bench-201 API cannot read it ({type(e).__name__})") from None

    def lookup(arch: str) -> dict[str, float] | None:
        index = api.query_index_by_arch(arch)
        if index < 0:
            return None
        out = {}
        for name in ("cifar10", "cifar100", "ImageNet16-120"):
            info = api.get_more_info(index, name, hp="200", is_random=False)
            out[f"{name}_test_acc"] = float(info.get("test-accuracy", float("nan")))
        return out

    return lookup
