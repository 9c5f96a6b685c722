"""The settings of a ranking run (:class:`RankConfig`) and their checks."""

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
)
from fastnas.search.algorithms import ALGORITHMS, MODES
from fastnas.search.config import SPACES


@dataclass
class RankConfig(RunSettings):
    """Everything that defines a ranking run. ``None`` fields take the defaults of ``search`` / ``train``."""

    space: str = "nb201"
    algorithm: str = "rs-ws"  # how the supernet is trained (any search algorithm)
    mode: str = "erm"  # rs-ws learns no architecture: every training image trains the weights
    from_run: str | None = None  # a search run whose checkpoint is the supernet
    dataset: str | None = None  # default: the --from run's, else distorted-digits
    data_dir: str | None = None
    out: str = "runs/rank"
    count: int = 10  # architectures to rank
    epochs: int | None = None  # of the supernet (search's default)
    batch_size: int = 64
    channels: int | None = None
    cells: int | None = None
    bn_batches: int = 10  # training batches that recompute BatchNorm statistics per architecture (0: keep)
    nb201_table: str | None = None
    table_column: str | None = None  # default: the data set's column if the table has one, else its first
    train_epochs: int | None = None  # of each standalone training (train's default)

    COMMAND = "rank"


DEFAULT_DATASET = "distorted-digits"


def resolve(cfg: RankConfig) -> RankConfig:
    """Check every field and fill in what ``--from`` says; RunError with one line otherwise."""
    if cfg.from_run is not None:
        from fastnas.runs.folder import contents

        found = contents(cfg.from_run)
        if found.config is None:
            raise RunError(f"--from {cfg.from_run}: no config.json there (not a search run)")
        if found.command != "search":
            raise RunError(f"--from {cfg.from_run} holds {found.describe()}, not a search run")
        saved = found.config
        # the supernet is that run's; its data set (and folder) the default one
        taken = ["space", "algorithm", "mode", "channels", "cells", "batch_size", "epochs"]
        if cfg.dataset is None:
            taken += ["dataset", "data_dir"]
        cfg = dataclasses.replace(cfg, **{k: saved[k] for k in taken if k in saved})
    if cfg.dataset is None:
        cfg = dataclasses.replace(cfg, dataset=DEFAULT_DATASET)
    require_choice(cfg.space, SPACES, "space")
    require_choice(cfg.algorithm, tuple(ALGORITHMS), "algorithm")
    require_choice(cfg.mode, MODES, "mode")
    require_choice(cfg.dataset, data_mod.DATASETS, "data set")
    if cfg.dataset == "imagenet":
        raise RunError("fastnas rank needs a data set held in memory; an image folder (imagenet) is streamed")
    require_choice(cfg.amp, AMP_MODES, "--amp")
    require_at_least(cfg, ("count",), low=2)
    require_at_least(cfg, ("epochs", "batch_size", "channels", "cells", "train_epochs", "accum_steps"))
    require_at_least(cfg, ("limit_batches", "stop_after", "threads"))
    require_at_least(cfg, ("bn_batches",), low=0)
    if cfg.nb201_table is not None and cfg.space != "nb201":
        raise RunError("--nb201-table needs --space nb201")
    if cfg.table_column is not None and cfg.nb201_table is None:
        raise RunError("--table-column needs --nb201-table")
    if cfg.nb201_table is not None and cfg.train_epochs is not None:
        raise RunError("--train-epochs sets the standalone training, which --nb201-table replaces")
    return cfg
