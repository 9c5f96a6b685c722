"""The settings of a search (:class:`SearchConfig`) and their checks (:func:`resolve`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastnas.runs import data as data_mod
from fastnas.runs.config import (
    AMP_MODES,
    RunError,
    RunSettings,
    require_at_least,
    require_choice,
    require_finite,
    require_fraction,
    require_lr_range,
)
from fastnas.search.algorithms import MODES, Algorithm, get_algorithm
from fastnas.spaces import get_space, space_names

SPACES = space_names()
SearchError = RunError  # the name search users know; every run raises RunError

# per-data-set defaults of the network size, the epochs, the batch size and a factor on the papers'
# architecture learning rates: distorted-digits gives 8 architecture steps per epoch (250 held-out
# images, batch 32) where CIFAR-10 gives 390, and at the papers' rates (or at batch 64, 4 steps per
# epoch) GAEA's weights do not decide in a short run
DATASET_DEFAULTS: dict[str, dict[str, dict[str, float]]] = {
    "distorted-digits": {
        "nb201": dict(channels=8, cells=1, epochs=40, batch_size=32, arch_lr_scale=3.0),
        "darts": dict(channels=8, cells=5, epochs=10, batch_size=32, arch_lr_scale=3.0),
    },
    "digits": {
        "nb201": dict(channels=8, cells=1, epochs=20, batch_size=64),
        "darts": dict(channels=8, cells=5, epochs=10, batch_size=64),
    },
    "cifar10": {
        "nb201": dict(channels=16, cells=5, epochs=50, batch_size=64),
        "darts": dict(channels=16, cells=8, epochs=50, batch_size=64),
    },
}
for _name in ("cifar100", *data_mod.IMAGENET16):
    DATASET_DEFAULTS[_name] = DATASET_DEFAULTS["cifar10"]
DATASET_DEFAULTS["imagenet"] = {"darts": DATASET_DEFAULTS["cifar10"]["darts"]}  # PC-DARTS's C=16, 8 layers


def parse_subset(text: str) -> tuple[float, float]:
    """``--subset W,A``: the fractions of every class for the weights and for the architecture."""
    try:
        w, a = (float(v) for v in text.split(","))
    except ValueError:
        w = a = -1.0
    if not (0 < w <= 1 and 0 < a <= 1 and w + a <= 1):
        raise RunError(f"--subset must be two fractions W,A in (0, 1] with W + A <= 1 (e.g. 0.1,0.025), got {text!r}")
    return w, a


@dataclass
class SearchConfig(RunSettings):
    """Everything that defines a search run. ``None`` fields take the algorithm's or data set's default."""

    space: str = "nb201"
    algorithm: str = "gaea-darts"
    mode: str = "bilevel"
    dataset: str = "distorted-digits"
    data_dir: str | None = None
    out: str = "runs/search"
    epochs: int | None = None
    batch_size: int | None = None  # the data set's
    channels: int | None = None
    cells: int | None = None
    # network weights: SGD with cosine decay (DARTS)
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    # architecture
    arch_lr: float | None = None
    arch_weight_decay: float | None = None
    entropy_weight: float | None = None
    arch_warmup: int = 0
    train_portion: float = 0.5
    rs_samples: int = 20  # rs-ws: random architectures scored at the end (0: none, the supernet alone)
    # bilevel: class-balanced fractions "W,A" of the training set for the weights and the architecture
    subset: str | None = None
    # image folders (--dataset imagenet): crop size and loader processes (default: loader's)
    crop_size: int | None = None
    loader_workers: int | None = None
    # a NAS-Bench-201 accuracy table to look the found cell up in
    nb201_table: str | None = None

    _RESUME_FREE = (*RunSettings._RESUME_FREE, "nb201_table", "loader_workers")
    COMMAND = "search"


def resolve(cfg: SearchConfig) -> tuple[SearchConfig, Algorithm]:
    """Check every field and fill in the defaults; RunError with one line otherwise."""
    require_choice(cfg.space, SPACES, "space")
    try:
        alg = get_algorithm(cfg.algorithm)
    except ValueError as e:
        raise RunError(str(e)) from None
    if cfg.space not in alg.spaces:
        raise RunError(f"algorithm {alg.name} needs --space {' or '.join(alg.spaces)}, not {cfg.space}")
    require_choice(cfg.mode, MODES, "mode")
    if alg.second_order and cfg.mode != "bilevel":
        raise RunError(f"algorithm {alg.name} (second order) needs --mode bilevel")
    require_choice(cfg.dataset, data_mod.DATASETS, "data set")
    if cfg.dataset == "imagenet" and "imagenet" not in get_space(cfg.space).stems:
        with_stem = [name for name in space_names() if "imagenet" in get_space(name).stems]
        others = ", ".join(data_mod.IMAGENET16)
        raise RunError(
            f"--dataset imagenet needs --space {' or '.join(with_stem)} (NAS-Bench-201's ImageNet is {others})"
        )
    require_choice(cfg.amp, AMP_MODES, "--amp")
    if alg.second_order and cfg.amp == "fp16":
        raise RunError(
            f"algorithm {alg.name} (second order) does not support --amp fp16: its unrolled step runs "
            "without loss scaling; use --amp bf16 or none"
        )
    defaults = dict(DATASET_DEFAULTS[cfg.dataset][cfg.space])
    arch_lr_scale = defaults.pop("arch_lr_scale", 1.0)
    if alg.arch_optimizer is not None:  # config.json records the values the run uses
        defaults["arch_lr"] = alg.arch_lr * arch_lr_scale
        defaults["arch_weight_decay" if alg.arch_optimizer == "adam" else "entropy_weight"] = (
            alg.arch_weight_decay if alg.arch_optimizer == "adam" else alg.entropy_weight
        )
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    require_at_least(cfg, ("epochs", "batch_size", "channels", "cells", "accum_steps"))
    require_at_least(cfg, ("limit_batches", "stop_after", "threads"))
    require_at_least(cfg, ("arch_warmup", "rs_samples", "loader_workers"), low=0)
    require_at_least(cfg, ("crop_size",), low=8)
    if cfg.crop_size is not None and cfg.dataset != "imagenet":
        raise RunError("--crop-size applies to --dataset imagenet (the other data sets are held at their size)")
    if cfg.subset is not None:
        parse_subset(cfg.subset)
        if cfg.mode != "bilevel":
            raise RunError("--subset draws the weight and the architecture data of --mode bilevel")
    if not 0.0 < cfg.train_portion < 1.0:
        raise RunError(f"--train-portion must lie in (0, 1), got {cfg.train_portion}")
    require_finite(cfg, ("lr", "lr_min", "momentum", "weight_decay", "grad_clip"))
    require_fraction(cfg, ("momentum",))
    require_lr_range(cfg)
    require_finite(cfg, ("arch_lr", "arch_weight_decay", "entropy_weight"))
    if alg.arch_optimizer == "gaea" and cfg.arch_lr * cfg.entropy_weight >= 1.0:
        raise RunError(
            f"--arch-lr times --entropy-weight must be below 1 for GAEA, got {cfg.arch_lr} * {cfg.entropy_weight}"
        )
    if alg.arch_optimizer is not None and cfg.arch_warmup >= cfg.epochs:
        raise RunError(
            f"--arch-warmup {cfg.arch_warmup} leaves no epoch of architecture updates in --epochs {cfg.epochs}"
        )
    min_cells = get_space(cfg.space).min_cells
    if cfg.cells < min_cells:
        raise RunError(f"--cells (layers) of the {cfg.space} space must be at least {min_cells}, got {cfg.cells}")
    if cfg.nb201_table is not None and cfg.space != "nb201":
        raise RunError("--nb201-table needs --space nb201")
    return cfg, alg
