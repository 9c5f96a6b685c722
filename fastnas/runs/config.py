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
    part: str | None = None  # set for the parts of a ranking run or sweep (fastnas.runs.folder.PARTS)
    log: Callable[[str], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    # fields that may differ between a run and its resumption (``epochs``: a run may be extended;
    # the learning rate then follows the longer schedule; ``compile``, ``cuda_graphs``: how steps run;
    # ``threads``: how many CPU threads, which changes floating-point sums, so it is warned about)
    _RESUME_FREE: ClassVar[tuple[str, ...]] = (
        "out", "device", "resume", "stop_after", "threads", "progress", "data_dir", "log", "epochs",
        "compile", "cuda_graphs", "part",
    )  # fmt: skip

    COMMAND: ClassVar[str] = ""  # the command whose runs this configures: search, train or rank
    SWEEP: ClassVar[str | None] = None  # for a sweep of many runs, which (fastnas.runs.folder.SWEEPS)

    def run_defining(self) -> dict[str, Any]:
        """The fields a checkpoint must agree with to be resumed by this config."""
        return {k: v for k, v in self.as_dict().items() if k not in self._RESUME_FREE}

    def as_dict(self) -> dict[str, Any]:
        return as_dict(self)


def require_fraction(cfg: Any, names: tuple[str, ...]) -> None:
    """Each field in ``names`` is None or a number in [0, 1) (momentum)."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and not 0.0 <= v < 1.0:
            raise RunError(f"{flag(name)} must lie in [0, 1), got {v}")


def require_lr_range(cfg: Any) -> None:
    """``lr_min`` at most ``lr``: the cosine schedule decays from one to the other."""
    if cfg.lr_min > cfg.lr:
        raise RunError(f"--lr-min {cfg.lr_min} is above --lr {cfg.lr}; the schedule decays from --lr to --lr-min")


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None)}


def check_setting_types(config_cls: type, values: dict[str, Any], where: str) -> None:
    """Each of ``values`` has the type of its field in ``config_cls`` (a hand-edited ``config.json``
    holding ``"epochs": "many"`` is refused here, naming ``where``, not deep inside the run)."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(config_cls)}
    for name, value in values.items():
        if name not in hints or name == "log":
            continue
        allowed = tuple(t for word in hints[name].replace(" ", "").split("|") for t in _flat(_TYPES.get(word)))
        if not allowed:
            continue
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise RunError(f"{where}: {name} = {value!r} is not {' or '.join(_type_words(hints[name]))}")


def _flat(t: Any) -> tuple[type, ...]:
    return () if t is None else t if isinstance(t, tuple) else (t,)


def _type_words(hint: str) -> list[str]:
    words = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "null"}
    return [words.get(w, w) for w in hint.replace(" ", "").split("|")]


def config_json(cfg: Any) -> str:
    """``config.json`` of a run: the command that made it (and the sweep, for one), then its settings."""
    kind = {"command": cfg.COMMAND, **({"sweep": cfg.SWEEP} if cfg.SWEEP else {})}
    return json.dumps({**kind, **as_dict(cfg)}, indent=1, allow_nan=False)


def read_config_json(out: str) -> dict[str, Any] | None:
    """The settings in ``out/config.json``, or None when there is none; RunError if it is corrupt."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"corrupt {path}: {e}") from None
    if not isinstance(saved, dict):
        raise RunError(f"corrupt {path}: not a JSON object")
    return saved
