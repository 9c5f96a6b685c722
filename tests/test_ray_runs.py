"""Runs as Ray tasks on a local Ray of 2 CPUs (``--workers 2``): the same results as in one process,
a worker killed in the middle of a training retried from its checkpoint, the summary of a sweep over
seeds, and bad input in one run reported, not retried, while the others go on. Tiny networks and a
handful of batches: most of the time is Ray's start-up."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from search_helpers import assert_same_state, load_checkpoint, snapshot, write_nb201_table

from fastnas.__main__ import main as fastnas_main
from fastnas.runs.folder import LOCK_FILE

pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): the Ray tests need it")

TINY = ["--batch-size", "16", "--channels", "4", "--limit-batches", "2", "--no-progress"]
RANK = ["--count", "4", "--epochs", "1", "--train-epochs", "1", "--bn-batches", "1", *TINY]
SEARCH = ["--cells", "1", *TINY, "--rs-samples", "2", "--epochs", "2"]
WORKERS = ["--workers", "2"]
TIMINGS = ("seconds", "supernet", "search_seconds", "train_seconds")


def run(command: str, args: list[str], capsys) -> tuple[int, str, str]:
    rc = fastnas_main([command, *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def read(path) -> dict:
    return json.loads(open(path).read())


def test_rank_over_two_workers_equals_in_process(tmp_path, capsys):
    here, ray = tmp_path / "here", tmp_path / "ray"
    assert run("rank", ["--out", str(here), *RANK], capsys)[0] == 0
    rc, stdout, err = run("rank", ["--out", str(ray), *RANK, *WORKERS], capsys)
    assert rc == 0, err
    assert "[4/4] standalone/" in stdout
    assert without_timings(read(here / "result.json")) == without_timings(read(ray / "result.json"))
    for k in range(4):
        a, b = here / "standalone" / f"{k:02d}", ray / "standalone" / f"{k:02d}"
        assert_same_state(load_checkpoint(str(a)), load_checkpoint(str(b)))
        assert "epoch 1/1" in (b / "log.txt").read_text()


def test_shared_weight_evaluations_as_tasks_equal_in_process(tmp_path, capsys):
    """20 architectures with a table for ground truth: the evaluations go to two tasks of 10."""
    from fastnas.rank.run import SHARED_PER_TASK

    supernet = tmp_path / "supernet"
    assert run("search", ["--algorithm", "rs-ws", "--mode", "erm", "--out", str(supernet), *SEARCH], capsys)[0] == 0
    from fastnas.runs.data import epoch_generator
    from fastnas.spaces.nb201 import random_arch_strings

    archs = random_arch_strings(60, epoch_generator(0, 0, stream=9))
    csv = tmp_path / "t.csv"
    csv.write_text("arch,acc\n" + "".join(f"{a},{i}\n" for i, a in enumerate(archs)))
    count = str(2 * SHARED_PER_TASK)
    args = ["--from", str(supernet), "--count", count, "--nb201-table", str(csv), "--bn-batches", "1", *TINY]
    here, ray = tmp_path / "here", tmp_path / "ray"
    assert run("rank", [*args, "--out", str(here)], capsys)[0] == 0
    rc, _, err = run("rank", [*args, "--out", str(ray), *WORKERS], capsys)
    assert rc == 0, err
    assert (here / "shared.json").read_text() == (ray / "shared.json").read_text()
    assert without_timings(read(here / "result.json")) == without_timings(read(ray / "result.json"))


def _kill_when_checkpointed(folder: str, killed: list[int], stop: threading.Event) -> None:
    """Kill -9 the process that owns ``folder`` once it has written its first checkpoint."""
    while not stop.is_set():
        if os.path.isfile(os.path.join(folder, "checkpoint.pt")):
            try:
                pid = int(open(os.path.join(folder, LOCK_FILE)).read().strip())
            except (OSError, ValueError):
                pid = None
            if pid and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.01)


def test_a_killed_worker_is_retried_from_its_checkpoint(tmp_path, capsys):
    archs = tmp_path / "archs.txt"
    archs.write_text(
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|\n"
        "|skip_connect~0|+|nor_conv_1x1~0|none~1|+|avg_pool_3x3~0|nor_conv_3x3~1|none~2|\n"
    )
    args = ["--arch-file", str(archs), "--cells", "1", "--epochs", "6", *TINY]
    here, ray = tmp_path / "here", tmp_path / "ray"
    assert run("train", [*args, "--out", str(here)], capsys)[0] == 0
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_when_checkpointed, args=(str(ray / "arch-00"), killed, stop))
    watcher.start()
    try:
        rc, stdout, err = run("train", [*args, "--out", str(ray), *WORKERS], capsys)
    finally:
        stop.set()
        watcher.join()
    assert rc == 0, err
    assert killed, "the training finished before it could be killed"
    log = (ray / "arch-00" / "log.txt").read_text()
    assert "resuming after epoch" in log  # the retry continued from a checkpoint, not from scratch
    assert "arch-00: test acc" in stdout and "its worker died: retried" in stdout
    for name in ("arch-00", "arch-01"):
        assert_same_state(load_checkpoint(str(here / name)), load_checkpoint(str(ray / name)))
        assert without_timings(read(here / name / "result.json")) == without_timings(read(ray / name / "result.json"))
    assert without_timings(read(here / "summary.json")) == without_timings(read(ray / "summary.json"))


def test_seeds_over_two_workers_write_the_summary(tmp_path, capsys):
    table = write_nb201_table(str(tmp_path / "t.csv"))
    args = ["--seeds", "0-1", "--nb201-table", table, *SEARCH]
    here, ray = tmp_path / "here", tmp_path / "ray"
    assert run("search", [*args, "--out", str(here)], capsys)[0] == 0
    rc, stdout, err = run("search", [*args, "--out", str(ray), *WORKERS], capsys)
    assert rc == 0, err
    summary = read(ray / "summary.json")
    assert without_timings(summary) == without_timings(read(here / "summary.json"))
    assert summary["finished"] and summary["stats"]["c10"]["n"] == 2 and summary["stats"]["c10"]["std"] is not None
    assert "mean ± std" in stdout and "seed-0: test acc" in stdout and "seed-1: test acc" in stdout
    for seed in (0, 1):
        part = f"seed-{seed}"
        assert_same_state(load_checkpoint(str(here / part)), load_checkpoint(str(ray / part)))


def test_bad_input_in_one_run_is_reported_and_not_retried(tmp_path, capsys):
    out = tmp_path / "s"
    (out / "seed-1").mkdir(parents=True)
    (out / "seed-1" / "config.json").write_text('{"command": "train", "part": "arch"}')  # another sweep's part
    before = snapshot(str(out / "seed-1"))
    rc, stdout, err = run("search", ["--seeds", "0-2", "--out", str(out), *SEARCH, *WORKERS], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "1 of 3 runs failed (the others finished): seed-1: --out" in lines[0], err
    assert "holds a training of a sweep of many architectures" in lines[0]
    assert stdout.count("seed-1: failed:") == 1 and "retried" not in stdout
    assert snapshot(str(out / "seed-1")) == before
    summary = read(out / "summary.json")
    assert not summary["finished"] and [r["seed"] for r in summary["runs"] if "error" not in r] == [0, 2]
    assert all(os.path.isfile(out / f"seed-{s}" / "result.json") for s in (0, 2))
