"""The settings of a training run (:class:`TrainConfig`), the papers' recipes and their checks.

* ``darts``: 600 epochs, batch 96, SGD 0.025 with momentum 0.9 and cosine decay to 0, weight decay
  3e-4, gradient clip 5; ``NetworkCIFAR`` with C=36 and 20 layers; cutout 16, drop path 0.2,
  auxiliary head with weight 0.4.
* ``nb201``: 200 epochs, batch 256, SGD 0.1 with Nesterov momentum 0.9 and cosine decay to 0,
  weight decay 5e-4; ``TinyNetwork`` with C=16 and N=5; no other regularisation.

Both as in the papers' CIFAR code (DARTS's ``train.py``; NAS-Bench-201's ``hp=200`` setting). On the
small data sets embedded in installed packages the network, the epochs and the batch are small
(:data:`EMBEDDED_SIZES`), and the regularisers meant for 32x32 images are off. Every value is a flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from fastnas.runs import data as data_mod
from fastnas.runs.config import (
    AMP_MODES,
    RunError,
    RunSettings,
    require_at_least,
    require_choice,
    require_finite,
)
from fastnas.spaces import get_space, space_of

DEFAULT_DATASET = "distorted-digits"

RECIPES: dict[str, dict[str, Any]] = {
    "darts": dict(
        epochs=600, batch_size=96, channels=36, cells=20, lr=0.025, lr_min=0.0, momentum=0.9, nesterov=False,
        weight_decay=3e-4, grad_clip=5.0, cutout=16, drop_path=0.2, auxiliary_weight=0.4,
    ),
    "nb201": dict(
        epochs=200, batch_size=256, channels=16, cells=5, lr=0.1, lr_min=0.0, momentum=0.9, nesterov=True,
        weight_decay=5e-4, grad_clip=0.0, cutout=0, drop_path=0.0, auxiliary_weight=0.0,
    ),
}  # fmt: skip

# on the embedded data sets: small networks and runs (the auxiliary head needs 32x32 images)
EMBEDDED_SIZES: dict[str, dict[str, Any]] = {
    "darts": dict(epochs=10, batch_size=64, channels=8, cells=5, cutout=0, drop_path=0.0, auxiliary_weight=0.0),
    "nb201": dict(epochs=10, batch_size=64, channels=8, cells=1),
}


@dataclass
class TrainConfig(RunSettings):
    """Everything that defines a training run. ``None`` fields take the recipe's value."""

    arch: str | None = None  # DARTS "Genotype(...)" or a NAS-Bench-201 string
    from_run: str | None = None  # a search run's folder: its arch.txt (and data set)
    recipe: str | None = None  # darts or nb201; default: the architecture's space
    dataset: str | None = None  # default: the --from run's, else DEFAULT_DATASET
    data_dir: str | None = None
    out: str = "runs/train"
    epochs: int | None = None
    batch_size: int | None = None
    channels: int | None = None
    cells: int | None = None
    lr: float | None = None
    lr_min: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    cutout: int | None = None
    drop_path: float | None = None
    auxiliary_weight: float | None = None

    @property
    def space(self) -> str:
        """The name of the space :attr:`arch` is written in (``darts`` or ``nb201``)."""
        return space_of(self.arch or "").name


def parse_arch(arch: str) -> Any:
    """The parsed architecture (a DARTS ``Genotype`` or NAS-Bench-201 nodes); RunError naming ``--arch``."""
    try:
        return space_of(arch).parse(arch)
    except (TypeError, ValueError, SyntaxError) as e:
        raise RunError(
            f"--arch {arch!r} is neither a DARTS Genotype(...) nor a NAS-Bench-201 string ({e})".replace("\n", " ")
        ) from None


def _from_search_run(folder: str) -> dict[str, Any]:
    """``arch``, ``dataset`` and ``data_dir`` of the search run in ``folder``."""
    arch_path = os.path.join(folder, "arch.txt")
    if not os.path.isfile(arch_path):
        raise RunError(f"--from {folder}: no arch.txt there (not a search run, or not begun)")
    with open(arch_path) as f:
        found = {"arch": f.read().strip()}
    try:
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        found.update({k: saved[k] for k in ("dataset", "data_dir") if k in saved})
    except (OSError, ValueError):
        pass  # the architecture alone is enough
    return found


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Check every field and fill in the recipe; RunError with one line otherwise."""
    if cfg.arch is None and cfg.from_run is None:
        raise RunError("give the architecture with --arch, or a search run with --from")
    if cfg.from_run is not None:
        found = _from_search_run(cfg.from_run)
        if cfg.arch is not None and cfg.arch != found["arch"]:
            raise RunError(f"--arch and --from {cfg.from_run} name different architectures")
        if cfg.dataset is not None:  # the search's data folder goes with the search's data set only
            found = {"arch": found["arch"]}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in found.items() if getattr(cfg, k) is None})
    parse_arch(cfg.arch)
    if cfg.dataset is None:
        cfg = dataclasses.replace(cfg, dataset=DEFAULT_DATASET)
    recipe = cfg.recipe or cfg.space
    require_choice(recipe, tuple(RECIPES), "recipe")
    require_choice(cfg.dataset, data_mod.DATASETS, "data set")
    require_choice(cfg.amp, AMP_MODES, "--amp")
    values = dict(RECIPES[recipe])
    if data_mod.is_embedded(cfg.dataset):
        values.update(EMBEDDED_SIZES[recipe])
    cfg = dataclasses.replace(cfg, recipe=recipe, **{k: v for k, v in values.items() if getattr(cfg, k) is None})
    require_at_least(cfg, ("epochs", "batch_size", "channels", "cells", "accum_steps"))
    require_at_least(cfg, ("limit_batches", "stop_after", "threads"))
    require_at_least(cfg, ("cutout",), low=0)
    require_finite(cfg, ("lr", "lr_min", "momentum", "weight_decay", "grad_clip", "drop_path", "auxiliary_weight"))
    if cfg.drop_path >= 1:
        raise RunError(f"--drop-path must lie in [0, 1), got {cfg.drop_path}")
    space = get_space(cfg.space)
    if cfg.cells < space.min_cells:
        raise RunError(
            f"--cells (layers) of a {space.title} network must be at least {space.min_cells}, got {cfg.cells}"
        )
    if not space.drop_path and (cfg.drop_path > 0 or cfg.auxiliary_weight > 0):
        raise RunError(f"--drop-path and --auxiliary-weight need a DARTS network ({space.title}'s has neither)")
    return cfg
