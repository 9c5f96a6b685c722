"""A ranking run: supernet, shared-weight accuracies, ground truth, rank correlations.

:func:`run_rank` writes, in ``config.out``:

* ``supernet/``: the search run that trains the supernet (unless ``--from`` names one);
* ``shared.json``: the architectures drawn and their shared-weight test accuracies;
* ``standalone/<k>/``: the training run of architecture ``k`` (ground truth without a table);
* ``result.json``: Kendall's tau, Spearman's rho, the ground truth of the shared-weight top-1 and
  top-5 architectures with their percentiles, and every architecture's numbers;
* ``scatter.png``: shared-weight accuracy against the ground truth;
* ``config.json``: the run's settings.

Each part is written when it is done, so ``--resume`` continues where a run stopped (a killed
supernet or standalone training continues from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import numpy as np

from fastnas.rank import shared
from fastnas.rank.config import RankConfig, resolve
from fastnas.runs import data as data_mod
from fastnas.runs.checkpoint import atomic_write_text, load_checkpoint
from fastnas.runs.config import RunError, check_out_dir, config_json
from fastnas.runs.distributed import Dist, process_group
from fastnas.runs.engine import default_threads, device_and_data
from fastnas.runs.plots import plot_rank_scatter
from fastnas.runs.steps import check_cuda_graphs
from fastnas.runs.tables import AccuracyTable, load_nb201_table
from fastnas.search.algorithms import get_algorithm
from fastnas.search.config import SearchConfig
from fastnas.search.config import resolve as resolve_search
from fastnas.search.loop import CHECKPOINT_FORMAT as SEARCH_FORMAT
from fastnas.search.loop import run_search
from fastnas.spaces import get_space
from fastnas.train.loop import run_train
from fastnas.train.recipes import TrainConfig
from fastnas.train.recipes import resolve as resolve_train

RUN_FILES = ("config.json", "shared.json", "result.json", "scatter.png", "supernet", "standalone")
TOP_K = 5


def run_rank(cfg: RankConfig) -> dict[str, Any]:
    """Rank ``cfg.count`` architectures with a supernet's shared weights and compare with the ground
    truth; return the summary also written to ``result.json`` (``finished`` False when ``stop_after``
    ended it early). Raises :class:`~fastnas.runs.RunError` (before writing anything) for bad input."""
    cfg = resolve(cfg)
    if Dist().world > 1:
        raise RunError("fastnas rank runs in one process (its search and trainings each can run under torchrun)")
    check_out_dir(cfg.out, cfg.resume, RUN_FILES, "ranking run", resume_file=cfg.RESUME_FILE)
    search_cfg = _search_config(cfg)
    table = _table(cfg)
    if table is None:  # the standalone trainings' settings are checked now, not after the supernet
        resolve_train(_train_config(cfg, search_cfg, get_space(cfg.space).example_arch, "unused"))
    supernet_dir = cfg.from_run or os.path.join(cfg.out, "supernet")
    if cfg.from_run is not None and not os.path.isfile(os.path.join(cfg.from_run, "checkpoint.pt")):
        raise RunError(f"--from {cfg.from_run}: no checkpoint.pt there")
    device, data = device_and_data(cfg, Dist())
    if cfg.cuda_graphs:
        check_cuda_graphs(device, 1, cfg.amp)
    log = cfg.log or (lambda s: print(s, flush=True))
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_text(os.path.join(cfg.out, "config.json"), config_json(cfg))
    return _Rank(cfg, search_cfg, supernet_dir, table, data, device, log).run()


def _search_config(cfg: RankConfig) -> SearchConfig:
    """The search that trains (or trained, ``--from``) the supernet."""
    alg = get_algorithm(cfg.algorithm)
    if alg.partial_channels > 1:
        raise RunError(f"rank restricts supernets to one architecture; {alg.name}'s partial channels cannot be")
    search_cfg = SearchConfig(
        space=cfg.space, algorithm=cfg.algorithm, mode=cfg.mode, dataset=cfg.dataset, data_dir=cfg.data_dir,
        out=os.path.join(cfg.out, "supernet"), epochs=cfg.epochs, batch_size=cfg.batch_size, channels=cfg.channels,
        cells=cfg.cells, seed=cfg.seed, device=cfg.device, amp=cfg.amp, compile=cfg.compile,
        cuda_graphs=cfg.cuda_graphs, accum_steps=cfg.accum_steps,
        limit_batches=cfg.limit_batches, threads=cfg.threads, progress=cfg.progress, log=cfg.log, rs_samples=0,
    )  # fmt: skip
    return resolve_search(search_cfg)[0]


def _table(cfg: RankConfig) -> AccuracyTable | None:
    if cfg.nb201_table is None:
        return None
    table = load_nb201_table(cfg.nb201_table)
    if cfg.table_column is not None and cfg.table_column not in table.columns:
        raise RunError(f"--table-column {cfg.table_column!r} is not a column of the table: {', '.join(table.columns)}")
    return table


def _train_config(cfg: RankConfig, search_cfg: SearchConfig, arch: str, out: str) -> TrainConfig:
    """The standalone training of ``arch`` that gives its ground truth: a network of the supernet's
    size (channels, cells), ``fastnas train``'s recipe otherwise."""
    return TrainConfig(
        arch=arch, dataset=cfg.dataset, data_dir=cfg.data_dir, out=out, epochs=cfg.train_epochs, seed=cfg.seed,
        channels=search_cfg.channels, cells=search_cfg.cells,
        device=cfg.device, amp=cfg.amp, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
        accum_steps=cfg.accum_steps, limit_batches=cfg.limit_batches,
        threads=cfg.threads, progress=cfg.progress, log=cfg.log,
    )  # fmt: skip


def rank_correlations(shared_acc: list[float], truth: list[float]) -> dict[str, float | None]:
    """Kendall's tau-b and Spearman's rho of two accuracy lists (None where undefined: a constant list)."""
    from scipy import stats

    if len(set(shared_acc)) < 2 or len(set(truth)) < 2:
        return {"kendall_tau": None, "spearman_rho": None}
    tau = stats.kendalltau(shared_acc, truth).statistic
    rho = stats.spearmanr(shared_acc, truth).statistic
    finite = lambda v: float(v) if v is not None and math.isfinite(v) else None
    return {"kendall_tau": finite(tau), "spearman_rho": finite(rho)}


def top_k(shared_acc: list[float], truth: list[float], k: int) -> dict[str, Any]:
    """The ``k`` architectures with the best shared-weight accuracy (ties: the earlier drawn): their
    indices, best and mean ground truth, and the best one's percentile among all (100: the best)."""
    order = sorted(range(len(shared_acc)), key=lambda i: -shared_acc[i])[:k]
    best = max(truth[i] for i in order)
    return {
        "indices": order,
        "best_truth": best,
        "mean_truth": float(np.mean([truth[i] for i in order])),
        "percentile": 100.0 * sum(t <= best for t in truth) / len(truth),
    }


class _Rank:
    def __init__(self, cfg, search_cfg, supernet_dir, table, data, device, log: Callable[[str], None]) -> None:
        self.cfg, self.search_cfg, self.supernet_dir = cfg, search_cfg, supernet_dir
        self.table, self.data, self.device, self.log = table, data, device, log
        self.budget = cfg.stop_after  # epochs this invocation may still run (None: no limit)
        self.seconds: dict[str, float] = {}

    def _part(self, run: Callable[[Any], dict[str, Any]], part_cfg: Any, what: str) -> bool:
        """Run (or resume) one part, within what is left of ``--stop-after``; True if it finished."""
        if self.budget == 0:
            return False
        resume = os.path.isfile(os.path.join(part_cfg.out, "checkpoint.pt"))
        t0 = time.perf_counter()
        result = run(dataclasses.replace(part_cfg, resume=resume, stop_after=self.budget))
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0
        if self.budget is not None:
            self.budget -= result["epochs_run"]
        return bool(result["finished"])

    def _stopped(self) -> dict[str, Any]:
        self.log("stopping as asked; continue with --resume")
        return {"finished": False}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.log(
            f"fastnas rank: {cfg.count} architectures of {cfg.space} on {cfg.dataset}, supernet "
            + (f"from {cfg.from_run}" if cfg.from_run else f"trained by {cfg.algorithm} ({cfg.mode})")
            + (f", ground truth from {cfg.nb201_table}" if self.table else ", ground truth by standalone training")
        )
        if cfg.from_run is None and not os.path.isfile(os.path.join(self.supernet_dir, "result.json")):
            if not self._part(run_search, self.search_cfg, "supernet"):
                return self._stopped()
        rows = self._shared()
        if self.table is not None:
            column = cfg.table_column or self.table.columns[0]
            for row in rows:
                found = self.table.lookup(row["arch"])
                row["truth"] = None if found is None else found[column]
            truth_name = f"{column} of {cfg.nb201_table}"
        else:
            for k, row in enumerate(rows):
                result = self._standalone(k, row["arch"])
                if result is None:
                    return self._stopped()
                row.update(truth=result["test_acc"], params=result["params"], macs=result["macs"])
            truth_name = f"standalone test accuracy after {result['epochs_done']} epochs"
        return self._report(rows, truth_name)

    def _shared(self) -> list[dict[str, Any]]:
        """The architectures and their shared-weight accuracies (computed once, kept in ``shared.json``)."""
        path = os.path.join(self.cfg.out, "shared.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        cfg, data = self.cfg, self.data.to(self.device)
        t0 = time.perf_counter()
        ckpt = load_checkpoint(
            os.path.join(self.supernet_dir, "checkpoint.pt"), SEARCH_FORMAT, "fastnas search checkpoint"
        )
        alg = get_algorithm(self.search_cfg.algorithm)
        with process_group(Dist(), self.device, default_threads(cfg)):
            try:
                net = shared.restrictable_supernet(
                    self.search_cfg, alg, data.num_classes, data.in_channels, ckpt["model"]
                )
            except (KeyError, RuntimeError) as e:
                raise RunError(f"the supernet in {self.supernet_dir} does not fit: {str(e).splitlines()[0]}") from None
            net.to(self.device)
            pool = None
            if self.table is not None and self.table.archs is not None:
                pool = self.table.archs
                if len(pool) < cfg.count:
                    raise RunError(f"--count {cfg.count} exceeds the {len(pool)} architectures of the table")
            gen = data_mod.epoch_generator(cfg.seed, 0, stream=5)
            batches = shared.bn_batches(data, cfg.bn_batches, cfg.batch_size, cfg.seed)
            limit = None if cfg.limit_batches is None else cfg.limit_batches * cfg.batch_size
            rows = []
            for arch, weights in shared.candidates(cfg.space, net, cfg.count, gen, pool):
                acc = shared.shared_accuracy(net, weights, data, batches, limit)
                rows.append({"arch": arch, "shared_acc": acc})
                self.log(f"shared weights {acc:6.2f}%  {arch}")
        self.seconds["shared"] = time.perf_counter() - t0
        atomic_write_text(path, json.dumps(rows, indent=1))
        return rows

    def _standalone(self, k: int, arch: str) -> dict[str, Any] | None:
        """The finished training run of architecture ``k`` (run or resumed here), None if it stopped early."""
        out = os.path.join(self.cfg.out, "standalone", f"{k:02d}")
        done = os.path.join(out, "result.json")
        if not os.path.isfile(done) and not self._part(
            run_train, _train_config(self.cfg, self.search_cfg, arch, out), "standalone"
        ):
            return None
        with open(done) as f:
            return json.load(f)

    def _report(self, rows: list[dict[str, Any]], truth_name: str) -> dict[str, Any]:
        cfg = self.cfg
        known = [r for r in rows if r["truth"] is not None]
        if len(known) < len(rows):
            self.log(f"{len(rows) - len(known)} of {len(rows)} architectures are not in the table: left out")
        if len(known) < 2:
            raise RunError("fewer than 2 architectures have a ground truth: nothing to rank")
        sw = [r["shared_acc"] for r in known]
        truth = [r["truth"] for r in known]
        corr = rank_correlations(sw, truth)
        top1, top5 = top_k(sw, truth, 1), top_k(sw, truth, TOP_K)
        summary = {
            "space": cfg.space,
            "dataset": cfg.dataset,
            "supernet": self.supernet_dir,
            "supernet_algorithm": self.search_cfg.algorithm,
            "count": len(known),
            "bn_batches": cfg.bn_batches,
            "truth": truth_name,
            **corr,
            "top1": {
                "arch": known[top1["indices"][0]]["arch"],
                "shared_acc": sw[top1["indices"][0]],
                "truth": top1["best_truth"],
                "percentile": top1["percentile"],
            },
            "top5": {
                "archs": [known[i]["arch"] for i in top5["indices"]],
                "best_truth": top5["best_truth"],
                "mean_truth": top5["mean_truth"],
                "percentile": top5["percentile"],
            },
            "best_truth": max(truth),
            "seconds": self.seconds,
            "finished": True,
            "rows": rows,
        }
        fmt = lambda v: "undefined" if v is None else f"{v:.3f}"
        self.log(
            f"Kendall tau {fmt(corr['kendall_tau'])}, Spearman rho {fmt(corr['spearman_rho'])} over {len(known)} "
            f"architectures; shared-weight top-1: {top1['best_truth']:.2f} ({top1['percentile']:.0f}th percentile), "
            f"best of the top-{min(TOP_K, len(known))}: {top5['best_truth']:.2f} ({top5['percentile']:.0f}th); "
            f"best of all: {max(truth):.2f}"
        )
        atomic_write_text(os.path.join(cfg.out, "result.json"), json.dumps(summary, indent=1))
        plot_rank_scatter(sw, truth, os.path.join(cfg.out, "scatter.png"), summary, truth_name)
        return summary
