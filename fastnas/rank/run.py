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

With a pool of Ray workers (:mod:`fastnas.runs.sweep`), the supernet is trained and the architectures
drawn here; the standalone trainings are Ray tasks, and so are the shared-weight evaluations when
there are at least ``2 * SHARED_PER_TASK`` (in chunks of at least ``SHARED_PER_TASK``, each task
loading the supernet). The results are those of the run in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fastnas.rank import shared
from fastnas.rank.config import RankConfig, resolve
from fastnas.runs import data as data_mod
from fastnas.runs.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint
from fastnas.runs.config import RunError, config_json
from fastnas.runs.distributed import Dist, process_group
from fastnas.runs.engine import default_threads, device_and_data
from fastnas.runs.folder import claim, contents, read_json, unfinished_note
from fastnas.runs.plots import plot_rank_scatter
from fastnas.runs.steps import check_cuda_graphs
from fastnas.runs.sweep import Job, Pool, executor, for_workers
from fastnas.runs.tables import AccuracyTable, load_nb201_table
from fastnas.search.algorithms import get_algorithm
from fastnas.search.config import SearchConfig
from fastnas.search.config import resolve as resolve_search
from fastnas.search.loop import CHECKPOINT_FORMAT as SEARCH_FORMAT
from fastnas.search.loop import run_search
from fastnas.spaces import get_space
from fastnas.train.archs import describe as describe_training
from fastnas.train.loop import run_train
from fastnas.train.recipes import TrainConfig
from fastnas.train.recipes import resolve as resolve_train

TOP_K = 5
SHARED_PER_TASK = 10  # shared-weight evaluations of one Ray task, at least: each loads the supernet and data


def run_rank(cfg: RankConfig, pool: Pool | None = None) -> dict[str, Any]:
    """Rank ``cfg.count`` architectures with a supernet's shared weights and compare with the ground
    truth; return the summary also written to ``result.json`` (``finished`` False when ``stop_after``
    ended it early). ``pool``: where the standalone trainings (and many shared-weight evaluations)
    run, default this process. Raises :class:`~fastnas.runs.RunError` (before writing anything) for
    bad input: every setting, the table, the count and the ``--from`` supernet are checked before
    any training."""
    cfg = resolve(cfg)
    pool = pool or Pool()
    if Dist().world > 1:
        raise RunError("fastnas rank runs in one process (its search and trainings each can run under torchrun)")
    pool.check(cfg)
    search_cfg = _search_config(cfg)
    table = _table(cfg)
    _check_count(cfg, table)
    if table is None:  # the standalone trainings' settings are checked now, not after the supernet
        resolve_train(_train_config(cfg, search_cfg, get_space(cfg.space).example_arch, "unused"))
    supernet_dir = cfg.from_run or os.path.join(cfg.out, "supernet")
    log = cfg.log or (lambda s: print(s, flush=True))
    with claim(cfg.out, cfg.COMMAND, cfg.resume) as folder:
        if folder.decision.finished:
            log(f"{cfg.out}: the ranking run is finished; nothing to do")
            return read_json(os.path.join(cfg.out, "result.json"))
        device, data = device_and_data(cfg, Dist())
        if cfg.cuda_graphs:
            check_cuda_graphs(device, 1, cfg.amp)
        if cfg.from_run is not None:
            _check_from(cfg, search_cfg, data)
        atomic_write_text(os.path.join(cfg.out, "config.json"), config_json(cfg))
        return _Rank(cfg, search_cfg, supernet_dir, table, data, device, log, pool).run()


def _check_count(cfg: RankConfig, table: AccuracyTable | None) -> None:
    """``--count`` distinct architectures exist: in the table's rows (a CSV) or in the space."""
    if table is not None and table.archs is not None and len(table.archs) < cfg.count:
        raise RunError(f"--count {cfg.count} exceeds the {len(table.archs)} architectures of --nb201-table")
    size = get_space(cfg.space).size
    if size is not None and size < cfg.count:
        raise RunError(f"--count {cfg.count} exceeds the {size} architectures of the {cfg.space} space")


def _check_from(cfg: RankConfig, search_cfg: SearchConfig, data: data_mod.ImageData) -> None:
    """The ``--from`` search run holds a checkpoint of this supernet; an unfinished one is used as it
    stands, with a warning naming its epoch."""
    path = os.path.join(cfg.from_run, "checkpoint.pt")
    if not os.path.isfile(path):
        raise RunError(f"--from {cfg.from_run}: no checkpoint.pt there (a search that has not finished an epoch)")
    ckpt = load_checkpoint(path, SEARCH_FORMAT, "fastnas search checkpoint")
    alg = get_algorithm(search_cfg.algorithm)
    try:
        shared.restrictable_supernet(search_cfg, alg, data.num_classes, data.in_channels, ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise RunError(f"--from {cfg.from_run}: its supernet does not fit: {str(e).splitlines()[0]}") from None
    note = unfinished_note(cfg.from_run)
    if note:
        print(f"fastnas rank: warning: --from {note}: ranking with its supernet as it stands", file=sys.stderr)


def _search_config(cfg: RankConfig) -> SearchConfig:
    """The search that trains (or trained, ``--from``) the supernet."""
    alg = get_algorithm(cfg.algorithm)
    if alg.partial_channels > 1:
        raise RunError(f"rank restricts supernets to one architecture; {alg.name}'s partial channels cannot be")
    search_cfg = SearchConfig(
        space=cfg.space, algorithm=cfg.algorithm, mode=cfg.mode, dataset=cfg.dataset, data_dir=cfg.data_dir,
        out=os.path.join(cfg.out, "supernet"), part="supernet", epochs=cfg.epochs, batch_size=cfg.batch_size,
        channels=cfg.channels, cells=cfg.cells, seed=cfg.seed, device=cfg.device, amp=cfg.amp, compile=cfg.compile,
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
        arch=arch, dataset=cfg.dataset, data_dir=cfg.data_dir, out=out, part="standalone", epochs=cfg.train_epochs,
        seed=cfg.seed,
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


@dataclass
class SharedWeights:
    """What evaluating architectures with a supernet's shared weights needs, here or in a Ray task."""

    cfg: RankConfig
    search_cfg: SearchConfig
    supernet_dir: str

    def evaluator(self, data: data_mod.ImageData, device: Any) -> tuple[Any, Callable[[list[Any]], float]]:
        """The restricted supernet on ``device`` and the shared-weight accuracy of an architecture's
        weights on ``data`` (there too), BatchNorm statistics recomputed on the same batches for each."""
        cfg = self.cfg
        ckpt = load_checkpoint(
            os.path.join(self.supernet_dir, "checkpoint.pt"), SEARCH_FORMAT, "fastnas search checkpoint"
        )
        alg = get_algorithm(self.search_cfg.algorithm)
        try:
            net = shared.restrictable_supernet(self.search_cfg, alg, data.num_classes, data.in_channels, ckpt["model"])
        except (KeyError, RuntimeError) as e:
            raise RunError(f"the supernet in {self.supernet_dir} does not fit: {str(e).splitlines()[0]}") from None
        net.to(device)
        batches = shared.bn_batches(data, cfg.bn_batches, cfg.batch_size, cfg.seed)
        limit = None if cfg.limit_batches is None else cfg.limit_batches * cfg.batch_size
        return net, lambda weights: shared.shared_accuracy(net, weights, data, batches, limit)


def shared_accuracies(spec: SharedWeights, weights: list[list[Any]], threads: int | None) -> list[float]:
    """The shared-weight accuracy of each architecture's ``weights`` (a Ray task: loads the data and the supernet)."""
    device, data = device_and_data(spec.cfg, Dist())
    data = data.to(device)
    with process_group(Dist(), device, threads):
        _, accuracy = spec.evaluator(data, device)
        return [accuracy(w) for w in weights]


class _Rank:
    def __init__(self, cfg, search_cfg, supernet_dir, table, data, device, log: Callable[[str], None], pool) -> None:
        self.cfg, self.search_cfg, self.supernet_dir = cfg, search_cfg, supernet_dir
        self.table, self.data, self.device, self.log, self.pool = table, data, device, log, pool
        self.budget = cfg.stop_after  # epochs this invocation may still run (None: no limit)
        self._ex: Any = None  # the pool's executor, once started
        self._stack: contextlib.ExitStack
        self.seconds: dict[str, float] = {}

    def _part(self, run: Callable[[Any], dict[str, Any]], part_cfg: Any, what: str) -> bool:
        """Run (or resume) one part, within what is left of ``--stop-after``; True if it finished."""
        if self.budget == 0:
            return False
        resume = contents(part_cfg.out).command is not None  # begun: continued (from epoch 0 without a checkpoint)
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
        with contextlib.ExitStack() as self._stack:  # the pool starts when a task is first sent
            rows = self._shared()
            if self.table is not None:
                column = cfg.table_column or self.table.column_for(cfg.dataset)
                for row in rows:
                    found = self.table.lookup(row["arch"])
                    row["truth"] = None if found is None else found.get(column)
                truth_name = f"{column} of {cfg.nb201_table}"
            else:
                results = self._standalone_tasks(rows) if self.pool.uses_ray else self._standalone_here(rows)
                if results is None:
                    return self._stopped()
                for row, result in zip(rows, results):
                    row.update(truth=result["test_acc"], params=result["params"], macs=result["macs"])
                truth_name = f"standalone test accuracy after {results[-1]['epochs_done']} epochs"
        return self._report(rows, truth_name)

    def _executor(self) -> Any:
        if self._ex is None:
            self._ex = self._stack.enter_context(executor(self.pool, self.cfg.device))
        return self._ex

    def _shared(self) -> list[dict[str, Any]]:
        """The architectures and their shared-weight accuracies (computed once, kept in ``shared.json``):
        drawn here, evaluated here or, when many, in Ray tasks."""
        path = os.path.join(self.cfg.out, "shared.json")
        if os.path.isfile(path):
            return read_json(path)
        cfg, data = self.cfg, self.data.to(self.device)
        t0 = time.perf_counter()
        spec = SharedWeights(cfg, self.search_cfg, self.supernet_dir)
        with process_group(Dist(), self.device, default_threads(cfg)):
            net, accuracy = spec.evaluator(data, self.device)
            pool = None
            if self.table is not None and self.table.archs is not None:
                pool = self.table.archs
                if len(pool) < cfg.count:
                    raise RunError(f"--count {cfg.count} exceeds the {len(pool)} architectures of the table")
            gen = data_mod.epoch_generator(cfg.seed, 0, stream=5)
            drawn = shared.candidates(cfg.space, net, cfg.count, gen, pool)
            if self.pool.uses_ray and len(drawn) >= 2 * SHARED_PER_TASK:
                accs = self._shared_tasks(spec, [w for _, w in drawn])
            else:
                accs = [accuracy(w) for _, w in drawn]
        rows = []
        for (arch, _), acc in zip(drawn, accs):
            rows.append({"arch": arch, "shared_acc": acc})
            self.log(f"shared weights {acc:6.2f}%  {arch}")
        self.seconds["shared"] = time.perf_counter() - t0
        atomic_write_json(path, rows)
        return rows

    def _shared_tasks(self, spec: SharedWeights, weights: list[list[Any]]) -> list[float]:
        """Shared-weight accuracies in Ray tasks of ``SHARED_PER_TASK`` architectures or more."""
        ex = self._executor()
        chunks = min(len(weights) // SHARED_PER_TASK, self.pool.workers or len(weights))
        size = -(-len(weights) // chunks)
        spec = dataclasses.replace(
            spec, cfg=for_workers(spec.cfg), search_cfg=for_workers(spec.search_cfg),
            supernet_dir=os.path.abspath(spec.supernet_dir),
        )  # fmt: skip
        threads = default_threads(self.cfg) or ex.shares.threads
        calls = [(spec, weights[i : i + size], threads) for i in range(0, len(weights), size)]
        return [acc for chunk in ex.map(shared_accuracies, calls) for acc in chunk]

    def _standalone_here(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Each architecture's finished training, run here one after another (None: stopped early)."""
        results = []
        for k, row in enumerate(rows):
            result = self._standalone(k, row["arch"])
            if result is None:
                return None
            results.append(result)
        return results

    def _standalone_tasks(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each architecture's finished training, those not yet finished run as Ray tasks; RunError
        naming the trainings that failed, once the others have finished."""
        jobs = []
        for k, row in enumerate(rows):
            out = self._standalone_dir(k)
            if not os.path.isfile(os.path.join(out, "result.json")):
                cfg = _train_config(self.cfg, self.search_cfg, row["arch"], out)
                jobs.append(Job(os.path.relpath(out, self.cfg.out), run_train, cfg))
        t0 = time.perf_counter()
        outcomes = self._executor().run(jobs, self.cfg.progress, self.log, describe_training) if jobs else []
        failed = [o for o in outcomes if o.error is not None]
        self.seconds["standalone"] = self.seconds.get("standalone", 0.0) + time.perf_counter() - t0
        if failed:
            names = "; ".join(f"{o.job.name}: {o.error}" for o in failed)
            raise RunError(f"{len(failed)} of {len(rows)} standalone trainings failed (the others finished): {names}")
        return [read_json(os.path.join(self._standalone_dir(k), "result.json")) for k in range(len(rows))]

    def _standalone_dir(self, k: int) -> str:
        return os.path.join(self.cfg.out, "standalone", f"{k:02d}")

    def _standalone(self, k: int, arch: str) -> dict[str, Any] | None:
        """The finished training run of architecture ``k`` (run or resumed here), None if it stopped early."""
        out = self._standalone_dir(k)
        done = os.path.join(out, "result.json")
        if not os.path.isfile(done) and not self._part(
            run_train, _train_config(self.cfg, self.search_cfg, arch, out), "standalone"
        ):
            return None
        return read_json(done)

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
        atomic_write_json(os.path.join(cfg.out, "result.json"), summary)
        plot_rank_scatter(sw, truth, os.path.join(cfg.out, "scatter.png"), summary, truth_name)
        return summary
