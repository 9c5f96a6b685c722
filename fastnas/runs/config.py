"""What every run shares about its configuration: the error type, argument checks, the output directory.

A run's configuration is a dataclass (``SearchConfig``, ``TrainConfig``, ...) whose fields are the
command's flags (``batch_size`` is ``--batch-size``). It is written to ``config.json`` in the output
directory when the run starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, ClassVar

import torch

AMP_MODES = ("none", "bf16", "fp16")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunError(Exception):
    """Bad input to a run (unknown name, missing or corrupt data or checkpoint, occupied output
    directory, ...). The message is one line, meant for the user."""


def flag(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def require_at_least(cfg: Any, names: tuple[str, ...], low: int = 1) -> None:
    """Each field in ``names`` is None or an integer >= ``low``."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and int(v) < low:
            raise RunError(f"{flag(name)} must be at least {low}, got {v}")


def require_finite(cfg: Any, names: tuple[str, ...]) -> None:
    """Each field in ``names`` is None or a finite number >= 0."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise RunError(f"{flag(name)} must be a finite number >= 0, got {v}")


def require_choice(value: str, choices: tuple[str, ...] | list[str], what: str) -> None:
    if value not in choices:
        raise RunError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def setting_names(config_cls: type) -> list[str]:
    """The fields of a config class that are settings (not callables): the command's own first, then
    those of :class:`RunSettings` (the order of ``config.json`` and of the resume checks)."""
    shared = {f.name for f in dataclasses.fields(RunSettings)}
    names = [f.name for f in dataclasses.fields(config_cls) if f.name != "log"]
    return sorted(names, key=lambda name: name in shared)


def as_dict(cfg: Any) -> dict[str, Any]:
    """The config's settings, in :func:`setting_names` order."""
    return {name: getattr(cfg, name) for name in setting_names(type(cfg))}


@dataclasses.dataclass
class RunSettings:
    """What the configs of the commands (dataclasses deriving from this one) share: the fields of how
    a run executes, which come first in every config, and which fields define a run."""

    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    compile: bool = False
    cuda_graphs: bool = False
    resume: bool = False
    accum_steps: int = 1
    limit_batches: int | None = None
    stop_after: int | None = None
    threads: int | None = None
    progress: bool = True
    log: Callable[[str], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    # fields that may differ between a run and its resumption (``epochs``: a run may be extended;
    # the learning rate then follows the longer schedule; ``compile``, ``cuda_graphs``: how steps run)
    _RESUME_FREE: ClassVar[tuple[str, ...]] = (
        "out", "device", "resume", "stop_after", "threads", "progress", "data_dir", "log", "epochs",
        "compile", "cuda_graphs",
    )  # fmt: skip

    RESUME_FILE: ClassVar[str] = "checkpoint.pt"  # what a run in ``out`` must hold to be resumed

    def run_defining(self) -> dict[str, Any]:
        """The fields a checkpoint must agree with to be resumed by this config."""
        return {k: v for k, v in self.as_dict().items() if k not in self._RESUME_FREE}

    def as_dict(self) -> dict[str, Any]:
        return as_dict(self)


def check_out_dir(
    out: str, resume: bool, run_files: tuple[str, ...], what: str, resume_file: str = "checkpoint.pt"
) -> None:
    """Refuse to start a new run where one lies (``run_files``), or to resume where none lies
    (no ``resume_file``)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a directory")
    present = [f for f in run_files if os.path.exists(os.path.join(out, f))]
    if resume:
        if not os.path.isfile(os.path.join(out, resume_file)):
            raise RunError(f"nothing to resume: {out} holds no {resume_file}")
    elif present:
        raise RunError(
            f"--out {out} already holds a {what} ({present[0]}); pass --resume to continue it or choose another --out"
        )


def config_json(cfg: Any) -> str:
    return json.dumps(as_dict(cfg), indent=1)


def read_config_json(out: str) -> dict[str, Any] | None:
    """The settings in ``out/config.json``, or None when there is none; RunError if it is corrupt."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"corrupt {path}: {e}") from None
    if not isinstance(saved, dict):
        raise RunError(f"corrupt {path}: not a JSON object")
    return saved
