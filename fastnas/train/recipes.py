"""The settings of a training run (:class:`TrainConfig`), the papers' recipes and their checks.

* ``darts``: 600 epochs, batch 96, SGD 0.025 with momentum 0.9 and cosine decay to 0, weight decay
  3e-4, gradient clip 5; ``NetworkCIFAR`` with C=36 and 20 layers; cutout 16, drop path 0.2,
  auxiliary head with weight 0.4.
* ``nb201``: 200 epochs, batch 256, SGD 0.1 with Nesterov momentum 0.9 and cosine decay to 0,
  weight decay 5e-4; ``TinyNetwork`` with C=16 and N=5; no other regularisation.
* ``darts-imagenet``: 250 epochs, batch 128, SGD 0.1 decayed by 0.97 each epoch, momentum 0.9, weight
  decay 3e-5, gradient clip 5, label smoothing 0.1; ``NetworkImageNet`` with C=48 and 14 layers,
  auxiliary head with weight 0.4; random-resized 224 crops, flips, colour jitter 0.4/0.4/0.4/0.2.
* ``pc-darts-imagenet``: the same with batch 1024, SGD 0.5 with 5 warm-up epochs and PC-DARTS's
  linear decay.

As in the papers' code (DARTS's ``train.py`` and ``train_imagenet.py``, PC-DARTS's
``train_imagenet.py``; NAS-Bench-201's ``hp=200`` setting). On the small data sets embedded in
installed packages the network, the epochs and the batch are small (:data:`EMBEDDED_SIZES`), and the
regularisers meant for 32x32 images are off. Every value is a flag.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from fastnas.networks import for_space
from fastnas.runs import data as data_mod
from fastnas.runs.config import (
    AMP_MODES,
    RunError,
    RunSettings,
    flag,
    read_config_json,
    require_at_least,
    require_choice,
    require_finite,
    require_fraction,
    require_lr_range,
)
from fastnas.runs.imagefolder import parse_color_jitter
from fastnas.spaces import get_space, space_names, space_of

DEFAULT_DATASET = "distorted-digits"

LR_SCHEDULES = ("cosine", "exponential", "linear")

RECIPES: dict[str, dict[str, Any]] = {
    "darts": dict(
        epochs=600, batch_size=96, channels=36, cells=20, lr=0.025, lr_min=0.0, momentum=0.9, nesterov=False,
        weight_decay=3e-4, grad_clip=5.0, cutout=16, drop_path=0.2, auxiliary_weight=0.4,
        lr_schedule="cosine", warmup_epochs=0, label_smoothing=0.0,
    ),
    "nb201": dict(
        epochs=200, batch_size=256, channels=16, cells=5, lr=0.1, lr_min=0.0, momentum=0.9, nesterov=True,
        weight_decay=5e-4, grad_clip=0.0, cutout=0, drop_path=0.0, auxiliary_weight=0.0,
        lr_schedule="cosine", warmup_epochs=0, label_smoothing=0.0,
    ),
    "darts-imagenet": dict(
        epochs=250, batch_size=128, channels=48, cells=14, lr=0.1, lr_min=0.0, momentum=0.9, nesterov=False,
        weight_decay=3e-5, grad_clip=5.0, cutout=0, drop_path=0.0, auxiliary_weight=0.4,
        lr_schedule="exponential", lr_decay=0.97, warmup_epochs=0, label_smoothing=0.1,
        color_jitter="0.4,0.4,0.4,0.2", crop_size=224,
    ),
    "pc-darts-imagenet": dict(
        epochs=250, batch_size=1024, channels=48, cells=14, lr=0.5, lr_min=0.0, momentum=0.9, nesterov=False,
        weight_decay=3e-5, grad_clip=5.0, cutout=0, drop_path=0.0, auxiliary_weight=0.4,
        lr_schedule="linear", warmup_epochs=5, label_smoothing=0.1,
        color_jitter="0.4,0.4,0.4,0.2", crop_size=224,
    ),
}  # fmt: skip
IMAGE_FOLDER_VALUES = ("color_jitter", "crop_size")  # recipe values of image folders (--dataset imagenet) only

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
    lr_schedule: str | None = None  # cosine (to lr_min), exponential (lr_decay ** epoch) or linear (PC-DARTS's)
    lr_decay: float | None = None  # exponential: the factor per epoch
    warmup_epochs: int | None = None  # linear warm-up to lr over these first epochs
    label_smoothing: float | None = None
    color_jitter: str | None = None  # imagenet: "brightness,contrast,saturation,hue" (0: none)
    crop_size: int | None = None  # imagenet: training crop and evaluation centre crop
    loader_workers: int | None = None  # imagenet: loader processes (how a run executes, not what it computes)

    _RESUME_FREE = (*RunSettings._RESUME_FREE, "loader_workers")

    COMMAND = "train"

    @property
    def space(self) -> str:
        """The name of the space :attr:`arch` is written in (``darts`` or ``nb201``)."""
        return space_of(self.arch or "").name


def parse_arch(arch: str) -> Any:
    """The parsed architecture (a DARTS ``Genotype`` or NAS-Bench-201 nodes); RunError naming ``--arch``."""
    space = space_of(arch)
    try:
        return space.parse(arch)
    except (TypeError, ValueError, SyntaxError) as e:
        if str(e).startswith("not a "):  # a well-formed string outside the space: the reason says it all
            raise RunError(f"--arch {arch!r} is {e}") from None
        if space.looks_like(arch):
            what = f"not {space.notation}"
        else:
            what = "neither " + " nor ".join(get_space(name).notation for name in space_names())
        raise RunError(f"--arch {arch!r} is {what} ({e})".replace("\n", " ")) from None


def _from_search_run(folder: str, warn: Any = None) -> dict[str, Any]:
    """``arch``, ``dataset`` and ``data_dir`` of the search run in ``folder``; an unfinished one is
    taken as it stands, with a warning naming its epoch (``warn``: where it goes, default stderr)."""
    from fastnas.runs.folder import contents, unfinished_note

    found_run = contents(folder)
    if found_run.command not in (None, "search"):
        raise RunError(f"--from {folder} holds {found_run.describe()}, not a search run")
    arch_path = os.path.join(folder, "arch.txt")
    if not os.path.isfile(arch_path):
        saved = found_run.config or {}
        if saved.get("algorithm") == "rs-ws" and saved.get("rs_samples") == 0:
            raise RunError(f"--from {folder}: its RS-WS search selects no architecture (--rs-samples 0)")
        raise RunError(f"--from {folder}: no arch.txt there (not a search run, or not past its first epoch)")
    note = unfinished_note(folder, found_run)
    if note:
        (warn or _stderr)(f"fastnas train: warning: --from {note}: training the architecture it has found so far")
    with open(arch_path) as f:
        found = {"arch": f.read().strip()}
    saved = read_config_json(folder) or {}
    found.update({k: saved[k] for k in ("dataset", "data_dir") if k in saved})
    return found


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Check every field and fill in the recipe; RunError with one line otherwise."""
    if cfg.arch is None and cfg.from_run is None:
        raise RunError("give the architecture with --arch, a search run with --from, or many with --arch-file")
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
    require_choice(cfg.dataset, data_mod.DATASETS, "data set")
    image_folder = cfg.dataset == "imagenet"
    if image_folder and not for_space(cfg.space).imagenet:
        raise RunError("--dataset imagenet trains DARTS's NetworkImageNet: give a DARTS Genotype(...)")
    recipe = cfg.recipe or (f"{cfg.space}-imagenet" if image_folder else cfg.space)
    require_choice(recipe, tuple(RECIPES), "recipe")
    require_choice(cfg.amp, AMP_MODES, "--amp")
    values = dict(RECIPES[recipe])
    if data_mod.is_embedded(cfg.dataset):
        values.update(EMBEDDED_SIZES.get(recipe, EMBEDDED_SIZES[cfg.space]))
    if cfg.lr_schedule not in (None, "exponential"):
        values.pop("lr_decay", None)  # the recipe's decay goes with the recipe's exponential schedule
    if not image_folder:
        for name in IMAGE_FOLDER_VALUES:
            if getattr(cfg, name) is not None:
                raise RunError(f"{flag(name)} applies to --dataset imagenet (the other data sets are held in memory)")
            values.pop(name, None)
    cfg = dataclasses.replace(cfg, recipe=recipe, **{k: v for k, v in values.items() if getattr(cfg, k) is None})
    require_at_least(cfg, ("epochs", "batch_size", "channels", "cells", "accum_steps"))
    require_at_least(cfg, ("limit_batches", "stop_after", "threads"))
    require_at_least(cfg, ("cutout", "warmup_epochs", "loader_workers"), low=0)
    require_at_least(cfg, ("crop_size",), low=8)
    require_finite(cfg, ("lr", "lr_min", "momentum", "weight_decay", "grad_clip", "drop_path", "auxiliary_weight"))
    require_finite(cfg, ("lr_decay",))
    require_choice(cfg.lr_schedule, LR_SCHEDULES, "--lr-schedule")
    if cfg.lr_schedule == "exponential" and cfg.lr_decay is None:
        raise RunError("--lr-schedule exponential needs --lr-decay (the factor per epoch)")
    if cfg.lr_schedule != "exponential" and cfg.lr_decay is not None:
        raise RunError(f"--lr-decay applies to --lr-schedule exponential, not {cfg.lr_schedule}")
    try:
        parse_color_jitter(cfg.color_jitter)
    except ValueError as e:
        raise RunError(str(e)) from None
    if image_folder and cfg.cutout:
        raise RunError("--cutout applies to the in-memory data sets, not --dataset imagenet")
    require_fraction(cfg, ("momentum", "label_smoothing"))
    require_lr_range(cfg)
    if cfg.nesterov and cfg.momentum == 0:
        raise RunError("--nesterov needs --momentum above 0 (Nesterov momentum without momentum is plain SGD)")
    if cfg.drop_path >= 1:
        raise RunError(f"--drop-path must lie in [0, 1), got {cfg.drop_path}")
    space = get_space(cfg.space)
    if cfg.cells < space.min_cells:
        raise RunError(
            f"--cells (layers) of a {space.title} network must be at least {space.min_cells}, got {cfg.cells}"
        )
    if not for_space(cfg.space).drop_path and (cfg.drop_path > 0 or cfg.auxiliary_weight > 0):
        raise RunError(f"--drop-path and --auxiliary-weight need a DARTS network ({space.title}'s has neither)")
    return cfg


def epoch_lr(cfg: TrainConfig, epoch: int, cosine: float) -> float:
    """The learning rate of 0-based ``epoch`` under a resolved config's schedule, in closed form:
    ``lr * (epoch + 1) / warmup_epochs`` in the warm-up epochs, then ``cosine`` (the value of the
    cosine schedule, computed by the caller), ``lr * lr_decay ** epoch`` (DARTS's ImageNet
    ``StepLR``), or PC-DARTS's linear decay: ``lr * (E - 5 - epoch) / (E - 5)`` until the last 5 of
    the ``E`` epochs, then ``lr * (E - epoch) / (5 * (E - 5))`` (a fifth of the slope, above 0)."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.lr_schedule == "exponential":
        return cfg.lr * cfg.lr_decay**epoch
    if cfg.lr_schedule == "linear":
        body = max(cfg.epochs - 5, 1)
        if cfg.epochs - epoch > 5:
            return cfg.lr * (body - epoch) / body
        return cfg.lr * (cfg.epochs - epoch) / (body * 5)
    return cosine
