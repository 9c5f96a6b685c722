"""The run folder's integrity, on the command line as a user runs it: one owner per folder, a kind
every command checks, resume of runs killed before their first checkpoint, nothing partial after a
failure (full or read-only disks), divergence, and every check made before training."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from search_helpers import assert_same_state, expect_one_line_error, load_checkpoint, snapshot, write_tiny_cifar10

from fastnas.__main__ import main as fastnas_main
from fastnas.runs import folder as folder_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB201_ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
TINY = ["--batch-size", "16", "--channels", "4", "--limit-batches", "2", "--no-progress"]
SEARCH = ["--cells", "1", *TINY, "--rs-samples", "2"]
TRAIN = ["--arch", NB201_ARCH, "--cells", "1", *TINY]
RANK = ["--count", "2", "--epochs", "1", "--train-epochs", "1", "--bn-batches", "1", *TINY]
COMMAND_ARGS = {"search": [*SEARCH, "--epochs", "2"], "train": [*TRAIN, "--epochs", "2"], "rank": RANK}


def run(command: str, args: list[str], capsys) -> tuple[int, str, str]:
    rc = fastnas_main([command, *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def expect_error(command: str, args: list[str], capsys, needle: str, watched: str | None = None) -> None:
    expect_one_line_error(command, args, capsys, needle, watched)


def temporary_files(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files if ".tmp." in f]


def json_files_are_strict(path: str) -> None:
    """Every JSON file under ``path`` parses without NaN or infinity."""

    def refuse(token: str):
        raise AssertionError(f"non-finite number {token} in a JSON file")

    for d, _, files in os.walk(path):
        for f in files:
            if f.endswith(".json"):
                with open(os.path.join(d, f)) as fh:
                    json.load(fh, parse_constant=refuse)


# a fastnas command in a fresh process that dies (os._exit, like a kill -9) at its n-th checkpoint write,
# or waits for a file to appear before its epochs start (holding its folder's lock meanwhile)
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from fastnas.runs import engine
    die_at, wait_for = int(os.environ.get("DIE_AT_SAVE", "0")), os.environ.get("WAIT_FOR")
    calls = [0]
    save = engine.EpochRun.save
    def dying_save(self, epoch):
        calls[0] += 1
        if calls[0] == die_at:
            os._exit(137)
        save(self, epoch)
    engine.EpochRun.save = dying_save
    if wait_for:
        run = engine.EpochRun.run
        def waiting_run(self):
            open(wait_for + ".started", "w").close()
            while not os.path.exists(wait_for):
                time.sleep(0.05)
            return run(self)
        engine.EpochRun.run = waiting_run
    from fastnas.__main__ import main
    sys.exit(main(sys.argv[1:]))
    """
)


def child(args: list[str], die_at_save: int = 0, wait_for: str | None = None, block: bool = True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    env["DIE_AT_SAVE"] = str(die_at_save)
    if wait_for:
        env["WAIT_FOR"] = wait_for
    cmd = [sys.executable, "-c", _CHILD, *args]
    if block:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------------------------- owner


def test_two_processes_never_share_a_folder(tmp_path, capsys):
    out = str(tmp_path / "run")
    gate = str(tmp_path / "go")
    first = child(["search", "--out", out, *SEARCH, "--epochs", "1"], wait_for=gate, block=False)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(gate + ".started"):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first search did not start"
            time.sleep(0.05)
        for args in (["--algorithm", "darts", *SEARCH], ["--resume", "--no-progress"]):
            expect_error("search", ["--out", out, *args], capsys, f"{out} is in use by pid {first.pid}")
        expect_error("train", ["--out", out, *TRAIN], capsys, f"{out} is in use by pid {first.pid}")
        open(gate, "w").close()
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    assert "architecture:" in stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["algorithm"] == "gaea-darts"
    # the lock went with the process: the folder is free again
    assert folder_mod.owner_of(out) is None
    expect_error("search", ["--out", out, *SEARCH], capsys, "already holds a search run (finished)")


def test_a_killed_process_leaves_no_stale_lock(tmp_path, capsys):
    out = str(tmp_path / "run")
    killed = child(["search", "--out", out, *SEARCH, "--epochs", "2"], die_at_save=2)
    assert killed.returncode == 137, killed.stderr
    assert os.path.exists(os.path.join(out, folder_mod.LOCK_FILE))  # the file stays, its lock does not
    assert folder_mod.owner_of(out) is None
    expect_error("search", ["--out", out, *SEARCH], capsys, "already holds a search run (unfinished)")
    rc, _, err = run("search", ["--out", out, "--resume", "--no-progress"], capsys)
    assert rc == 0, err
    assert not os.path.exists(os.path.join(out, folder_mod.LOCK_FILE))


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("command", ["search", "train"])
def test_killed_before_the_first_checkpoint_resumes_from_epoch_0(tmp_path, capsys, command):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = COMMAND_ARGS[command]
    assert run(command, ["--out", full, *args], capsys)[0] == 0
    killed = child([command, "--out", part, *args], die_at_save=1)
    assert killed.returncode == 137, killed.stderr
    assert os.path.isfile(os.path.join(part, "config.json")) and not os.path.exists(os.path.join(part, "checkpoint.pt"))
    # starting afresh names what is there; --resume starts the run from epoch 0 with its settings
    expect_error(command, ["--out", part, *args], capsys, "pass --resume to start it again with its settings", part)
    rc, stdout, err = run(command, ["--out", part, "--resume", "--no-progress"], capsys)
    assert rc == 0, err
    assert "resuming" not in stdout
    assert_same_state(load_checkpoint(full), load_checkpoint(part))
    assert (tmp_path / "full" / "arch.txt").read_text() == (tmp_path / "part" / "arch.txt").read_text()


def test_rank_killed_in_each_part_resumes(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run("rank", ["--out", full, *RANK], capsys)[0] == 0
    # the supernet's first epoch (1st checkpoint write), then the first standalone training's (2nd)
    for die_at in (1, 2):
        args = ["--out", part, *(["--resume", "--no-progress"] if die_at > 1 else RANK)]
        killed = child(["rank", *args], die_at_save=die_at)
        assert killed.returncode == 137, killed.stderr
    assert not os.path.exists(os.path.join(part, "standalone", "00", "checkpoint.pt"))
    assert os.path.isfile(os.path.join(part, "standalone", "00", "config.json"))
    rc, _, err = run("rank", ["--out", part, "--resume", "--no-progress"], capsys)
    assert rc == 0, err
    a = json.loads((tmp_path / "full" / "result.json").read_text())
    b = json.loads((tmp_path / "part" / "result.json").read_text())
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "supernet")}
    assert strip(a) == strip(b)


@pytest.mark.parametrize("command", ["search", "train", "rank"])
def test_resuming_a_finished_run_does_nothing(tmp_path, capsys, command):
    out = str(tmp_path / "run")
    assert run(command, ["--out", out, *COMMAND_ARGS[command]], capsys)[0] == 0
    before = snapshot(out)
    rc, stdout, err = run(command, ["--out", out, "--resume", "--no-progress"], capsys)
    assert rc == 0 and not err, err
    assert "is finished" in stdout and "nothing to do" in stdout
    assert snapshot(out) == before


def test_stale_temporary_files_are_removed_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("search", ["--out", str(out), *SEARCH, "--epochs", "2", "--stop-after", "1"], capsys)[0] == 0
    stale = [out / "checkpoint.pt.tmp.99999", out / "history.json.tmp.123"]
    for path in stale:
        path.write_bytes(b"partial")
    assert run("search", ["--out", str(out), "--resume", "--no-progress"], capsys)[0] == 0
    assert not any(p.exists() for p in stale)
    assert temporary_files(str(out)) == []


def test_resume_keeps_the_thread_count_and_warns_when_told_another(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = [*SEARCH, "--epochs", "2", "--threads", "2"]
    assert run("search", ["--out", full, *args], capsys)[0] == 0
    assert run("search", ["--out", part, *args, "--stop-after", "1"], capsys)[0] == 0
    assert load_checkpoint(part)["cpu_threads"] == 2
    # config.json keeps --threads 2: the resumed run uses it and is bit-identical
    rc, _, err = run("search", ["--out", part, "--resume", "--no-progress"], capsys)
    assert rc == 0 and "warning" not in err, err
    assert_same_state(load_checkpoint(full), load_checkpoint(part))
    # a different count is obeyed, and said not to be bit-identical
    other = str(tmp_path / "other")
    assert run("search", ["--out", other, *args, "--stop-after", "1"], capsys)[0] == 0
    rc, _, err = run("search", ["--out", other, "--resume", "--threads", "1", "--no-progress"], capsys)
    assert rc == 0
    assert "ran with 2 CPU threads, this resumption with 1" in err and "not be bit-identical" in err


# ---------------------------------------------------------------------------------------------- kinds


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A finished run of each command, an unfinished search, and a ranking run's parts."""
    root = tmp_path_factory.mktemp("kinds")
    made = {}
    for command in ("search", "train", "rank"):
        made[command] = str(root / command)
        assert fastnas_main([command, "--out", made[command], *COMMAND_ARGS[command]]) == 0
    made["unfinished search"] = str(root / "unfinished")
    assert (
        fastnas_main(["search", "--out", made["unfinished search"], *SEARCH, "--epochs", "2", "--stop-after", "1"]) == 0
    )
    made["supernet part"] = os.path.join(made["rank"], "supernet")
    made["standalone part"] = os.path.join(made["rank"], "standalone", "01")
    return made


EXPECTED = {
    "search": "a search run (finished)",
    "train": "a training run (finished)",
    "rank": "a ranking run (finished)",
    "unfinished search": "a search run (unfinished)",
    "supernet part": "the supernet of a ranking run (finished)",
    "standalone part": "a standalone training of a ranking run (finished)",
}


def _own_kind(kind: str, command: str) -> bool:
    return kind.split()[-1] == command


# every folder given to every command, fresh or resumed (resuming a run of its own kind is the normal case)
KIND_CASES = [
    (kind, command, resume)
    for kind in EXPECTED
    for command in ("search", "train", "rank")
    for resume in (False, True)
    if not (resume and _own_kind(kind, command))
]


@pytest.mark.parametrize("kind,command,resume", KIND_CASES, ids=["-".join(map(str, c)) for c in KIND_CASES])
def test_every_command_names_what_a_folder_holds(folders, capsys, kind, command, resume):
    out = folders[kind]
    same = _own_kind(kind, command)
    args = ["--out", out, *(["--resume", "--no-progress"] if resume else COMMAND_ARGS[command])]
    if kind.endswith("part"):
        needle = f"is {EXPECTED[kind]} in {folders['rank']}: continue it with fastnas rank --out {folders['rank']}"
        if command != ("search" if kind == "supernet part" else "train"):
            needle = f"holds {EXPECTED[kind]}, not a"
    elif same:
        needle = f"already holds {EXPECTED[kind]}; " + ("choose another --out" if kind == "rank" else "pass --resume")
    else:
        needle = f"holds {EXPECTED[kind]}, not a"
    expect_error(command, args, capsys, needle, watched=folders["rank"] if kind.endswith("part") else out)


def test_from_takes_only_search_runs_and_warns_when_unfinished(folders, tmp_path, capsys):
    expect_error("train", ["--from", folders["train"], "--out", str(tmp_path / "t")], capsys, "not a search run")
    expect_error("rank", ["--from", folders["rank"], "--out", str(tmp_path / "r")], capsys, "not a search run")
    rc, _, err = run("train", ["--from", folders["unfinished search"], "--out", str(tmp_path / "t"), *TINY], capsys)
    assert rc == 0, err
    assert f"warning: --from {folders['unfinished search']} is unfinished (after epoch 1 of 2)" in err
    rc, _, err = run("rank", ["--from", folders["unfinished search"], "--out", str(tmp_path / "r"), *RANK], capsys)
    assert rc == 0, err
    assert "is unfinished (after epoch 1 of 2): ranking with its supernet as it stands" in err


def test_a_failed_from_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys):
    data = write_tiny_cifar10(str(tmp_path / "data"))
    cifar = str(tmp_path / "cifar")
    args = ["--dataset", "cifar10", "--data-dir", data, "--cells", "1", "--epochs", "1", "--batch-size", "8"]
    assert run("search", ["--out", cifar, *args, "--channels", "4", "--no-progress"], capsys)[0] == 0
    out = str(tmp_path / "rank")
    # digits have one channel, the supernet was trained on three
    expect_error("rank", ["--from", cifar, "--dataset", "digits", "--out", out, *RANK], capsys, "does not fit")
    assert not os.path.exists(out)
    table = tmp_path / "t.csv"
    table.write_text(f"arch,acc\n{NB201_ARCH},90.0\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,10.0\n")
    rc, _, err = run(
        "rank", ["--from", cifar, "--out", out, "--count", "2", "--nb201-table", str(table), *TINY], capsys
    )
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------- failures


def _fail_writes(monkeypatch, name: str, code: int, after: int = 0) -> None:
    """Make the checkpoint writer's fsync fail with ``code`` for files named ``name*`` after ``after`` good ones."""
    import fastnas.runs.checkpoint as checkpoint

    real_fsync, real_open, seen = os.fsync, open, {"n": 0}
    current = {"path": ""}

    def tracking_open(path, *a, **k):
        current["path"] = str(path)
        return real_open(path, *a, **k)

    def failing_fsync(fd):
        if os.path.basename(current["path"]).startswith(name):
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint, "open", tracking_open, raising=False)
    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out, full = str(tmp_path / "run"), str(tmp_path / "full")
    args = [*SEARCH, "--epochs", "3"]
    assert run("search", ["--out", full, *args], capsys)[0] == 0
    with monkeypatch.context() as m:
        _fail_writes(m, "checkpoint.pt", errno.ENOSPC, after=1)
        expect_error("search", ["--out", out, *args], capsys, "checkpoint.pt: No space left on device")
    assert temporary_files(out) == []
    assert load_checkpoint(out)["epoch"] == 1  # the last good checkpoint, not a partial one
    rc, _, err = run("search", ["--out", out, "--resume", "--no-progress"], capsys)
    assert rc == 0, err
    assert_same_state(load_checkpoint(full), load_checkpoint(out))


def test_a_full_disk_before_the_first_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        _fail_writes(m, "checkpoint.pt", errno.ENOSPC)
        expect_error("search", ["--out", out, *SEARCH], capsys, "No space left on device")
    assert not os.path.exists(out)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(options)``: a tmpfs mounted in ``tmp_path`` (unmounted after the test), or a skip where
    mounting is not allowed (the ``*_injected`` tests inject the same errors)."""
    mounted = []

    def mount(options: str) -> str:
        path = str(tmp_path / f"disk{len(mounted)}")
        os.makedirs(path)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs needs root here ({done.stderr.decode().strip()})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", path], check=False)


def test_a_real_full_disk(tmpfs, capsys):
    disk = tmpfs("size=256k")  # a checkpoint of the tiny search is about 1 MB
    expect_error("search", ["--out", os.path.join(disk, "run"), *SEARCH], capsys, "No space left on device")
    assert os.listdir(disk) == []


def test_a_read_only_folder(tmpfs, capsys):
    disk = tmpfs("ro,size=64k")
    for command in ("search", "train", "rank"):
        out = os.path.join(disk, "run")
        expect_error(command, ["--out", out, *COMMAND_ARGS[command]], capsys, "Read-only file system")


def test_a_read_only_folder_injected(tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(folder_mod.os, "makedirs", refuse)
    expect_error("search", ["--out", str(tmp_path / "run"), *SEARCH], capsys, "Read-only file system")


def test_paths_that_cannot_be_folders(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    expect_error("search", ["--out", "", *SEARCH], capsys, "--out must name a folder")
    expect_error("search", ["--out", str(tmp_path / "afile" / "sub"), *SEARCH], capsys, "afile is a file")
    expect_error("train", ["--out", str(tmp_path / "afile"), *TRAIN], capsys, "exists and is not a folder")


# ---------------------------------------------------------------------------------------------- divergence


def test_a_diverged_run_stops_and_exports_nothing(tmp_path, capsys):
    out = str(tmp_path / "run")
    expect_error(
        "search", ["--out", out, *SEARCH, "--lr", "1e30", "--grad-clip", "0", "--epochs", "3"], capsys,
        "the run diverged in epoch 1",
    )  # fmt: skip
    assert not os.path.exists(out)


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    from fastnas.search import loop

    out = str(tmp_path / "run")
    epoch = loop.Search.epoch

    def poisoned(self, e):
        if e == 1:  # the second epoch starts from a broken weight
            with torch.no_grad():
                next(self.net.parameters()).fill_(float("nan"))
        return epoch(self, e)

    monkeypatch.setattr(loop.Search, "epoch", poisoned)
    expect_error("search", ["--out", out, *SEARCH, "--epochs", "3"], capsys, "the run diverged in epoch 2")
    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == 1 and torch.isfinite(next(iter(ckpt["model"].values()))).all()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 1
    assert (tmp_path / "run" / "arch.txt").read_text().strip() == history[0]["arch"]
    assert not os.path.exists(os.path.join(out, "result.json"))
    json_files_are_strict(out)


def test_json_files_never_hold_nan(tmp_path):
    from fastnas.runs.checkpoint import atomic_write_json

    path = str(tmp_path / "x.json")
    atomic_write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    json_files_are_strict(str(tmp_path))
    assert json.loads(open(path).read()) == {"a": None, "b": [1.0, None], "c": {"d": None}}


# ---------------------------------------------------------------------------------------------- checks


BAD_GENOTYPES = {
    "Genotype(normal=[('sep_conv_3x3', 2), ('skip_connect', 0)], normal_concat=range(2, 3), "
    "reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=range(2, 3))": "node 2 takes input 2",
    "Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=range(2, 4), "
    "reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=range(2, 3))": "names a state outside 0..2",
    "Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1), ('skip_connect', 2)], normal_concat=range(2, 3), "
    "reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=range(2, 3))": "each node takes 2",
}


@pytest.mark.parametrize("genotype", list(BAD_GENOTYPES), ids=["input", "concat", "uneven"])
def test_malformed_darts_genotypes(tmp_path, capsys, genotype):
    out = str(tmp_path / "run")
    expect_error("train", ["--arch", genotype, "--out", out], capsys, BAD_GENOTYPES[genotype])
    assert not os.path.exists(out)


def test_flags_checked_before_training(tmp_path, capsys):
    out = str(tmp_path / "run")
    cases = [
        ("train", [*TRAIN, "--nesterov", "--momentum", "0"], "--nesterov needs --momentum above 0"),
        ("train", [*TRAIN, "--momentum", "2"], "--momentum must lie in [0, 1)"),
        ("search", [*SEARCH, "--momentum", "1"], "--momentum must lie in [0, 1)"),
        ("search", [*SEARCH, "--lr-min", "0.5"], "--lr-min 0.5 is above --lr 0.025"),
        ("train", [*TRAIN, "--lr", "0.01", "--lr-min", "0.1"], "--lr-min 0.1 is above --lr 0.01"),
        ("train", ["--arch", "|nor_conv_3x3~0|", *TINY], "is not a NAS-Bench-201 cell: it has 1 nodes"),
        ("train", ["--arch", "|nor_conv_3x3~0|+|none~1|+|none~0|none~1|none~2|"], "node 2 takes inputs [1]"),
        ("rank", [*RANK, "--count", "100000"], "--count 100000 exceeds the 15625 architectures of the nb201 space"),
    ]
    for command, args, needle in cases:
        expect_error(command, ["--out", out, *args], capsys, needle)
        assert not os.path.exists(out)


def test_rank_checks_the_count_against_the_table_before_training(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("arch,acc\n" + NB201_ARCH + ",90.0\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,10.0\n")
    out = str(tmp_path / "run")
    args = ["--out", out, "--count", "3", "--epochs", "1", *TINY, "--nb201-table", str(table)]
    expect_error("rank", args, capsys, "--count 3 exceeds the 2 architectures of --nb201-table")
    assert not os.path.exists(out)


def test_a_hand_edited_config_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("search", ["--out", str(out), *SEARCH, "--epochs", "2", "--stop-after", "1"], capsys)[0] == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "epochs": "many"}))
    expect_error("search", ["--out", str(out), "--resume"], capsys, "epochs = 'many' is not an integer", str(out))


def test_corrupt_checkpoint_message_gives_no_unsafe_advice(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("search", ["--out", str(out), *SEARCH, "--epochs", "2", "--stop-after", "1"], capsys)[0] == 0
    torch.save({"format": "fastnas-search-checkpoint/1", "x": argparse.Namespace(a=1)}, out / "c.pt")
    os.replace(out / "c.pt", out / "checkpoint.pt")
    rc, _, err = run("search", ["--out", str(out), "--resume", "--no-progress"], capsys)
    assert rc == 2 and "fastnas cannot read it" in err
    assert "weights_only" not in err and "trust" not in err


# ---------------------------------------------------------------------------------------------- reporting


def test_rs_ws_reports_the_cells_it_samples_and_selects(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("search", ["--out", str(out), *SEARCH, "--algorithm", "rs-ws", "--epochs", "2"], capsys)[0] == 0
    history = json.loads((out / "history.json").read_text())
    assert all(h["test_acc_of"] == "uniformly sampled cells" and h["arch"] is None for h in history)
    result = json.loads((out / "result.json").read_text())
    assert result["test_acc_of"] == "the selected cell"
    assert result["arch"] == (out / "arch.txt").read_text().strip()
    # without a selection there is no architecture to export or to train
    bare = tmp_path / "bare"
    args = ["--out", str(bare), *SEARCH[:-2], "--rs-samples", "0", "--algorithm", "rs-ws", "--epochs", "1"]
    assert run("search", args, capsys)[0] == 0
    assert not (bare / "arch.txt").exists()
    assert json.loads((bare / "result.json").read_text())["arch"] is None
    expect_error("train", ["--from", str(bare), "--out", str(tmp_path / "t")], capsys, "selects no architecture")


def test_arch_weights_plot_names_its_axes_and_marks_the_chosen_ops():
    from fastnas.runs.plots import arch_weights_figure

    history = [{"epoch": e, "arch_weights": {"cell": [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]}} for e in (1, 2)]
    fig = arch_weights_figure(history, ["a", "b", "c"], {"cell": ["1<-0", "2<-0"]}, {"cell": {"1<-0": "c"}})
    first, second = fig.axes[0], fig.axes[1]
    assert first.get_ylabel() == "op weight" and first.get_xlabel() == "epoch"
    assert first.get_title() == "1<-0: c" and second.get_title() == "2<-0"
    widths = {line.get_label(): line.get_linewidth() for line in first.get_lines()}
    assert widths["c"] > widths["a"] == widths["b"]
    assert [line.get_marker() for line in first.get_lines()] == ["None", "None", "*"]


def test_version(capsys):
    from fastnas import __version__

    assert fastnas_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastnas {__version__}"
    assert fastnas_main(["search", "--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastnas {__version__}"


def test_nb201_table_with_a_byte_order_mark_and_a_nan(tmp_path):
    from fastnas.runs.config import RunError
    from fastnas.runs.tables import load_nb201_table

    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffarch,acc\n".encode() + f"{NB201_ARCH},91.5\n".encode())
    assert load_nb201_table(str(path)).lookup(NB201_ARCH) == {"acc": 91.5}
    path.write_text(f"arch,acc\n{NB201_ARCH},nan\n")
    with pytest.raises(RunError, match="line 2: acc 'nan' is not a finite number"):
        load_nb201_table(str(path))
