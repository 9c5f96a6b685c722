"""``fastnas train``: train one architecture from scratch (DARTS's evaluation network or NAS-Bench-201's
inferred-cell network) with the papers' recipes, on the run machinery of :mod:`fastnas.runs`."""

from fastnas.train.loop import run_train
from fastnas.train.recipes import RECIPES, TrainConfig

__all__ = ["RECIPES", "TrainConfig", "run_train"]
