"""Plumbing shared by the Python stages of ``benchmarks/gpu_check.sh``: dry mode, budgets, JSON files.

Every stage runs on a CUDA GPU, or with ``--dry`` on the CPU as a quick stand-in that exercises the
same code (tiny sizes, few repetitions). A dry result carries ``"dry": true`` and its tables say
that they are CPU stand-ins, so its numbers cannot be taken for GPU measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DRY_LABEL = "CPU stand-in (dry run): not GPU numbers"


class Deadline:
    """A stage's own budget, so it can stop starting work before ``timeout`` kills it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def write_json(path: str | Path, data: dict) -> None:
    """Write atomically: a stage killed by its budget leaves the last complete file, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def stage_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every timing stage takes: output file, budget in seconds, dry mode."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", required=True, help="results file (rewritten after every measurement)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop starting measurements after this")
    parser.add_argument("--dry", action="store_true", help="CPU stand-in: tiny sizes, labelled as not GPU numbers")
    return parser


def device_for(dry: bool) -> str:
    """``cuda`` for a real run (which needs a visible GPU), ``cpu`` for a dry one."""
    import torch

    if dry:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible to torch (use --dry for the CPU stand-in)")
    return "cuda"
