"""Helpers of the tests of how run steps execute (``test_runs_steps.py`` on CPU, ``test_cuda_graph_steps.py``
on a GPU): tiny searches and trainings, and supernets that compute every op."""

from __future__ import annotations

from search_helpers import TINY, tiny_cells
from train_helpers import NB201_ARCH

from fastnas.search import SearchConfig, run_search
from fastnas.search import loop as search_loop
from fastnas.train import TrainConfig
from fastnas.train.loop import run_train


def tiny_search(out, algorithm: str, mode: str, space: str = "nb201", **kw) -> dict:
    """A search of ``limit_batches=3`` steps, 1 epoch, no RS-WS selection, silent (``kw`` overrides)."""
    cfg = dict(TINY, limit_batches=3, epochs=1, log=lambda s: None, rs_samples=0, cells=tiny_cells(space))
    cfg.update(kw)
    return run_search(SearchConfig(space=space, algorithm=algorithm, mode=mode, out=str(out), **cfg))


def tiny_train(out, **kw) -> dict:
    """A training of a NAS-Bench-201 network, C=4, ``limit_batches=3`` steps, 1 epoch, silent."""
    cfg = dict(arch=NB201_ARCH, channels=4, batch_size=16, limit_batches=3, epochs=1, progress=False)
    cfg.update(kw)
    return run_train(TrainConfig(out=str(out), log=lambda s: None, **cfg))


def compute_every_op(monkeypatch) -> None:
    """Searches build supernets that compute every op (as --compile and --cuda-graphs do), so that
    eager runs compare with those."""
    build = search_loop.build_network

    def build_all_ops(*args, **kwargs):
        net = build(*args, **kwargs)
        net.compute_all_ops = True
        return net

    monkeypatch.setattr(search_loop, "build_network", build_all_ops)
