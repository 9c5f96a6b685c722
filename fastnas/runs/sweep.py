"""Many independent runs: in this process one after another, or as Ray tasks on a machine or a cluster.

A sweep's runs are :class:`Job` s: a command's run function (``run_search``, ``run_train``) and the
config of one run, whose ``out`` is its own run folder. :func:`executor` opens what runs them:

* without ``--workers`` or ``--ray-address`` (``RAY_ADDRESS``), this process, one run after another;
* ``--workers N``: a local Ray started here with this machine's CPUs and GPUs, N runs at once;
* ``--ray-address ADDR``: the Ray cluster at ``ADDR`` (N runs at once with ``--workers N``, else one
  per GPU, or per CPU for CPU runs).

Ray (an optional dependency, ``pip install -e ".[ray]"``, imported only here and only when asked for)
does the scheduling, the resources and the retries. Each run is one task asking for its share of the
cluster (:class:`Shares`: a fraction of the GPUs, or of the CPUs, whose count becomes the run's
``--threads`` when neither the flag nor the data set fixes one); a task whose worker process dies (a
preempted node, ``kill -9``) is retried up to :data:`RETRIES` times, and the retry claims the run's
folder again (its lock died with the worker) and resumes it from its last checkpoint (a folder begun
without one from epoch 0), so at most one epoch is lost. Bad input (:class:`RunError`, a refused
write) ends a run with its one-line error, returned as a value: Ray never retries it, and the other
runs go on. The run folders must lie on a file system every worker sees.

Each run of a sweep logs to ``log.txt`` in its folder; the sweep prints one line per finished run
and a progress bar over the runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from fastnas import switches
from fastnas.runs.checkpoint import atomic_write_json, atomic_write_text
from fastnas.runs.config import RunError, config_json
from fastnas.runs.distributed import Dist
from fastnas.runs.engine import default_threads
from fastnas.runs.folder import SWEEPS, claim, contents, read_json

RETRIES = 3  # Ray retries of a run whose worker process died
LOG_FILE = "log.txt"
RAY_MISSING = "needs Ray, an optional dependency: pip install -e '.[ray]' (or pip install ray)"
_PATH_FIELDS = ("out", "data_dir", "nb201_table", "from_run")  # made absolute for workers elsewhere


@dataclass(frozen=True)
class Pool:
    """Where a sweep's runs go: ``workers`` runs at once on a local Ray, or on the Ray cluster at
    ``address``; neither: in this process."""

    workers: int | None = None
    address: str | None = None

    @property
    def uses_ray(self) -> bool:
        return self.workers is not None or self.address is not None

    def check(self, cfg: Any) -> None:
        """RunError for a pool that cannot run ``cfg``'s runs: before anything is written."""
        if self.workers is not None and self.workers < 1:
            raise RunError(f"--workers must be at least 1, got {self.workers}")
        if not self.uses_ray:
            return
        if Dist().world > 1:
            raise RunError("--workers and --ray-address start runs of their own: not under torchrun")
        if cfg.stop_after is not None:
            raise RunError("--stop-after counts the epochs of one process: not with --workers or --ray-address")
        if cfg.device.startswith("cuda:"):
            raise RunError(f"--device {cfg.device}: Ray gives each run its GPU; use --device cuda")
        _import_ray(self)


def pool_from_args(args: Any) -> Pool:
    """The pool of a command line: ``--workers``, ``--ray-address`` (default ``RAY_ADDRESS``)."""
    address = getattr(args, "ray_address", None) or switches.ray_address()
    return Pool(workers=getattr(args, "workers", None), address=address)


@dataclass
class Job:
    """One run of a sweep: ``run(cfg)`` (a module-level function: Ray sends it by name), named
    ``name`` in the progress lines; ``cfg.out`` is its run folder."""

    name: str
    run: Callable[[Any], dict[str, Any]]
    cfg: Any


@dataclass
class Outcome:
    """How a job ended: its ``result`` (``result.json``'s content), or its one-line ``error``."""

    job: Job
    result: dict[str, Any] | None = None
    error: str | None = None
    retried: bool = False  # its worker died, and a retry resumed it


@dataclass(frozen=True)
class Shares:
    """What each Ray task asks for: ``cpus`` and ``gpus`` (fractions of one when runs share one), and
    the CPU threads of a run whose ``--threads`` and data set fix none."""

    cpus: float
    gpus: float
    threads: int


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split())


def _append_to(path: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    return log


def begun(out: str) -> bool:
    """Whether ``out`` holds a run (begun, finished, or unreadable: its run will say)."""
    try:
        return contents(out).command is not None
    except RunError:
        return True


def run_job(
    run: Callable[[Any], dict[str, Any]], cfg: Any, threads: int | None = None, begun_before: bool = True
) -> dict[str, Any]:
    """Run one job where it was sent (this process or a Ray worker): resumed when its folder holds a
    begun run (a retried task, or a resumed sweep), its log in ``log.txt``, ``threads`` CPU threads
    when its config fixes none. Returns ``{"result": ...}`` (without the history) or ``{"error": line}``,
    and ``retried`` when the folder, fresh when the job was sent (``begun_before`` False), holds a
    run now: an earlier attempt's, whose worker died."""
    try:
        resume = contents(cfg.out).command is not None
        log = _append_to(os.path.join(cfg.out, LOG_FILE))
        cfg = dataclasses.replace(cfg, resume=resume, progress=False, log=log, threads=cfg.threads or threads)
        result = dict(run(cfg))
    except (RunError, OSError) as e:
        return {"error": one_line(e)}
    result.pop("history", None)
    return {"result": result, "retried": resume and not begun_before}


def _run_threads(cfg: Any, shares: Shares | None) -> int | None:
    """The threads a job is given: none when its config or data set fixes them (the count is then the
    same whatever the pool), else its share's."""
    if shares is None or cfg.threads or default_threads(cfg):
        return None
    return shares.threads


class _Progress:
    """One line per finished run (``[k/n] name: what``) and a progress bar over the runs."""

    def __init__(self, total: int, progress: bool, log: Callable[[str], None], describe: Callable[[dict], str]):
        self.total, self.done, self.log, self.describe = total, 0, log, describe
        self.bar = None
        if progress and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="runs", unit="run", file=sys.stderr, dynamic_ncols=True)

    def finished(self, outcome: Outcome) -> None:
        self.done += 1
        what = f"failed: {outcome.error}" if outcome.error else self.describe(outcome.result or {})
        if outcome.retried:
            what += " (its worker died: retried, resumed from its last checkpoint)"
        line = f"[{self.done}/{self.total}] {outcome.job.name}: {what}"
        if self.bar is None:
            self.log(line)
            return
        with self.bar.external_write_mode():
            self.log(line)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class InProcess:
    """Runs here, one after another."""

    shares: Shares | None = None

    def run(self, jobs: Sequence[Job], progress: bool, log: Callable[[str], None], describe) -> list[Outcome]:
        """Every job's outcome, in the jobs' order (one line each as it finishes)."""
        bar = _Progress(len(jobs), progress, log, describe)
        outcomes = []
        try:
            for job in jobs:
                outcomes.append(Outcome(job, **run_job(job.run, job.cfg)))
                bar.finished(outcomes[-1])
        finally:
            bar.close()
        return outcomes

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        """``[fn(*args) for args in calls]``."""
        return [fn(*args) for args in calls]


class RayTasks:
    """Runs as Ray tasks, each asking for ``shares``."""

    def __init__(self, ray: Any, shares: Shares) -> None:
        self.ray, self.shares = ray, shares
        self._options = dict(num_cpus=shares.cpus, num_gpus=shares.gpus, max_retries=RETRIES, retry_exceptions=False)
        self._run_job = ray.remote(run_job)

    def run(self, jobs: Sequence[Job], progress: bool, log: Callable[[str], None], describe) -> list[Outcome]:
        """Every job's outcome, in the jobs' order (one line each as it finishes, in any order)."""
        ray = self.ray
        pending = {}
        for i, job in enumerate(jobs):
            cfg = for_workers(job.cfg)
            task = self._run_job.options(name=job.name, **self._options)
            ref = task.remote(job.run, cfg, _run_threads(cfg, self.shares), begun(cfg.out))
            pending[ref] = i
        outcomes: list[Outcome | None] = [None] * len(jobs)
        bar = _Progress(len(jobs), progress, log, describe)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                try:
                    outcomes[i] = Outcome(jobs[i], **ray.get(ready[0]))
                except ray.exceptions.RayError as e:
                    outcomes[i] = Outcome(jobs[i], error=_task_failure(e))
                bar.finished(outcomes[i])
        finally:
            bar.close()
        return outcomes  # type: ignore[return-value]

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        """``[fn(*args) for args in calls]``, each call a task; RunError in one is raised here."""
        remote = self.ray.remote(fn).options(**self._options)
        try:
            return self.ray.get([remote.remote(*args) for args in calls])
        except self.ray.exceptions.RayError as e:
            raise RunError(_task_failure(e)) from None


def _task_failure(e: BaseException) -> str:
    """One line for a task Ray gave up on: its worker died more than RETRIES times, or it raised."""
    import ray

    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause
        if isinstance(cause, (RunError, OSError)):
            return one_line(cause)
        print(str(e), file=sys.stderr)  # a bug: its traceback
        return f"{type(cause).__name__}: {one_line(cause)}"
    if isinstance(e, ray.exceptions.WorkerCrashedError):
        return f"its worker process died {RETRIES + 1} times (killed, or out of memory)"
    return one_line(e)


def for_workers(cfg: Any) -> Any:
    """``cfg`` as a Ray worker gets it: its paths absolute (a worker's working folder need not be
    this process's), without a log function (the worker logs to the run's folder)."""
    paths = {name: os.path.abspath(getattr(cfg, name)) for name in _PATH_FIELDS if getattr(cfg, name, None)}
    return dataclasses.replace(cfg, log=None, **paths)


def _import_ray(pool: Pool) -> Any:
    flag = "--workers" if pool.address is None else "--ray-address"
    try:
        import ray
    except ImportError:
        raise RunError(f"{flag} {RAY_MISSING}") from None
    return ray


def _local_resources() -> dict[str, int]:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"num_cpus": cpus, "num_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def shares(ray: Any, pool: Pool, device: str) -> Shares:
    """Each run's share of the Ray cluster: its CPUs (and GPUs, for CUDA runs) over ``pool.workers``
    runs (default: one per GPU, or per CPU), at most one GPU and one node's CPUs; a share above one
    is a whole number (Ray's rule)."""
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    node_cpus = max((float(n.get("CPU", 0)) for n in nodes), default=cpus)
    cuda = device.startswith("cuda")
    if cuda and gpus == 0:
        raise RunError(f"--device {device}: the Ray cluster has no GPU")
    if cpus == 0:
        raise RunError("the Ray cluster has no CPU")
    runs = pool.workers or int(gpus if cuda else cpus)
    cpu_share = min(cpus / runs, node_cpus)
    cpu_share = float(math.floor(cpu_share)) if cpu_share >= 1 else cpu_share
    gpu_share = min(1.0, gpus / runs) if cuda else 0.0
    return Shares(cpus=cpu_share, gpus=gpu_share, threads=max(1, int(cpu_share)))


@contextlib.contextmanager
def executor(pool: Pool, device: str = "cpu") -> Iterator[InProcess | RayTasks]:
    """What runs a sweep's jobs for the body (see the module docstring). A local Ray started here is
    shut down after; one this process had already joined is used as it is."""
    if not pool.uses_ray:
        yield InProcess()
        return
    ray = _import_ray(pool)
    started = not ray.is_initialized()
    if started:
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        try:
            if pool.address is not None:
                ray.init(address=pool.address, **quiet)
            else:
                ray.init(**_local_resources(), **quiet)
        except Exception as e:  # any failure to start or reach Ray: one line, not Ray's traceback
            where = f"the Ray cluster at {pool.address}" if pool.address else "a local Ray"
            raise RunError(f"cannot start {where}: {one_line(e)}") from None
    try:
        yield RayTasks(ray, shares(ray, pool, device))
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- sweeps


def run_sweep(
    cfg: Any,
    jobs: list[Job],
    pool: Pool,
    summarize: Callable[[list[Outcome]], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    summary_lines: Callable[[dict[str, Any]], list[str]],
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the sweep ``cfg`` (a ``cfg.SWEEP`` of ``cfg.COMMAND``) in its folder ``cfg.out``, claimed for
    the whole sweep: write its ``config.json`` (and ``files``, name to text), run ``jobs`` (each in a
    folder inside; ``describe(result)`` says in the progress line how one ended), write
    ``summarize(outcomes)`` to ``summary.json``, log ``summary_lines(summary)`` (its table) and return it. A run
    that failed is named in one RunError after the others have finished (the summary then says
    ``finished`` false, and ``--resume`` runs the failed ones again)."""
    if Dist().world > 1:
        raise RunError(f"a {SWEEPS[cfg.SWEEP]} runs its runs itself: not under torchrun")
    pool.check(cfg)
    log = cfg.log or (lambda s: print(s, flush=True))
    with claim(cfg.out, cfg.COMMAND, cfg.resume, sweep=cfg.SWEEP) as folder:
        path = os.path.join(cfg.out, "summary.json")
        if folder.decision.finished:
            log(f"{cfg.out}: the {SWEEPS[cfg.SWEEP]} is finished; nothing to do")
            return read_json(path)
        atomic_write_text(os.path.join(cfg.out, "config.json"), config_json(cfg))
        for name, text in (files or {}).items():
            atomic_write_text(os.path.join(cfg.out, name), text)
        with executor(pool, cfg.device) as ex:
            where = "in this process" if isinstance(ex, InProcess) else f"as Ray tasks of {_share_words(ex.shares)}"
            log(f"fastnas {cfg.COMMAND}: {len(jobs)} runs in {cfg.out}, {where}")
            outcomes = ex.run(jobs, cfg.progress, log, describe)
        failed = [o for o in outcomes if o.error is not None]
        summary = {**summarize(outcomes), "finished": not failed}
        atomic_write_json(path, summary)
        for line in summary_lines(summary):
            log(line)
        if failed:
            names = "; ".join(f"{o.job.name}: {o.error}" for o in failed)
            raise RunError(f"{len(failed)} of {len(outcomes)} runs failed (the others finished): {names}")
        return summary


def _share_words(s: Shares) -> str:
    gpus = f", {s.gpus:g} GPU" if s.gpus else ""
    return f"{s.cpus:g} CPU{gpus} each"


# ---------------------------------------------------------------------------------------------- summaries


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n - 1; None for one value) of ``values``, and their count."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def table(rows: list[dict[str, Any]], columns: list[str], stats: dict[str, dict[str, Any]]) -> list[str]:
    """The lines of a plain-text table of ``rows`` (numbers as ``%.2f``), a last column left-aligned,
    and a ``mean ± std`` line for the columns in ``stats``."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    foot = ["mean ± std", *("" for _ in columns[1:])]
    for i, c in enumerate(columns):
        if c in stats and stats[c]["n"]:
            s = stats[c]
            foot[i] = f"{s['mean']:.2f} ± {s['std']:.2f}" if s["std"] is not None else f"{s['mean']:.2f}"
    widths = [max(len(x[i]) for x in [columns, *body, foot]) for i in range(len(columns) - 1)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [f"{fmt(x[:-1])}  {x[-1]}".rstrip() for x in [columns, *body, foot]]
