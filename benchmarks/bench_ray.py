"""Wall time of ``fastnas rank --count 8`` in one process against ``--workers 2`` (Ray), and Ray's start-up cost.

Each rank runs as a user runs it: a fresh ``python -m fastnas rank`` process with a fresh ``--out``,
in-process and Ray runs alternated (``--repeats`` pairs). Beside the wall time it reports the run's
own ``result.json`` seconds (supernet, shared-weight evaluations, standalone trainings: with Ray,
its start-up included). Ray's
start-up is measured alone: ``ray.init`` of a local Ray with ``--workers`` CPUs, the first round of
tasks (each worker process starting and importing fastnas), a second round on the warm workers,
and ``ray.shutdown``.

Run on a quiet machine:  python benchmarks/bench_ray.py                 # the default rank, 2 repeats
Check that it runs:      python benchmarks/bench_ray.py --tiny --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    *("--epochs", "1", "--train-epochs", "1", "--bn-batches", "1", "--batch-size", "16", "--channels", "4"),
    *("--limit-batches", "2"),
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}


def time_rank(out: str, count: int, workers: int | None, extra: list[str]) -> dict:
    """Wall time of one ``fastnas rank`` process and its result.json seconds."""
    cmd = [sys.executable, "-m", "fastnas", "rank", "--count", str(count), "--out", out, "--no-progress", *extra]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    return {"wall_s": wall, "parts_s": result["seconds"], "kendall_tau": result["kendall_tau"]}


def _ready() -> int:
    import fastnas  # noqa: F401  (what a run's worker imports first)

    return os.getpid()


def ray_start_up(workers: int) -> dict[str, float]:
    """Seconds of ``ray.init``, a first and a second round of ``workers`` tasks, and ``ray.shutdown``."""
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    t1 = time.perf_counter()
    task = ray.remote(_ready).options(num_cpus=1)
    ray.get([task.remote() for _ in range(workers)])
    t2 = time.perf_counter()
    ray.get([task.remote() for _ in range(workers)])
    t3 = time.perf_counter()
    ray.shutdown()
    t4 = time.perf_counter()
    return {"init_s": t1 - t0, "first_tasks_s": t2 - t1, "warm_tasks_s": t3 - t2, "shutdown_s": t4 - t3}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternated pairs of in-process and Ray runs")
    p.add_argument("--tiny", action="store_true", help="tiny networks and runs: checks that the script works")
    p.add_argument("--json", help="also write the measurements here")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    extra = TINY if args.tiny else []
    runs: dict[str, list[dict]] = {"in process": [], f"--workers {args.workers}": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, workers in (("in process", None), (f"--workers {args.workers}", args.workers)):
                out = os.path.join(tmp, f"{r}-{workers or 0}")
                runs[name].append(time_rank(out, args.count, workers, extra))
    start = ray_start_up(args.workers)
    size = " (tiny)" if args.tiny else ""
    print(f"fastnas rank --count {args.count}{size}, {platform.node()}, {os.cpu_count()} CPUs")
    print(f"{'':<14} {'wall s':>8} {'supernet s':>11} {'shared s':>9} {'standalone s':>13}")
    for name, rows in runs.items():
        for row in rows:
            parts = row["parts_s"]
            print(
                f"{name:<14} {row['wall_s']:>8.1f} {parts.get('supernet', 0):>11.1f} {parts.get('shared', 0):>9.2f} "
                f"{parts.get('standalone', 0):>13.1f}"
            )
    taus = {row["kendall_tau"] for rows in runs.values() for row in rows}
    print(f"Kendall tau of every run: {sorted(taus, key=str)} (one value: the same result whatever the pool)")
    print("Ray start-up: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in start.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"count": args.count, "tiny": args.tiny, "runs": runs, "ray_start_up": start}, f, indent=1)


if __name__ == "__main__":
    main()
