"""Sweeps of many runs in one process (``search --seeds``, ``train --arch-file``): each run a normal run
folder equal to the single run, the summary with mean and standard deviation, the sweep and its parts
as kinds every command checks, a failed run reported while the others go on, and the pool's flags."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import pytest
from search_helpers import (
    assert_same_state,
    benchmark_accuracy,
    expect_one_line_error,
    load_checkpoint,
    snapshot,
    write_nb201_table,
)

from fastnas.__main__ import main as fastnas_main
from fastnas.runs.config import RunError
from fastnas.runs.sweep import mean_std, table
from fastnas.search.seeds import SeedsConfig, parse_seeds

TINY = ["--batch-size", "16", "--channels", "4", "--limit-batches", "2", "--no-progress"]
SEARCH = ["--cells", "1", *TINY, "--rs-samples", "2", "--epochs", "2"]
TRAIN = ["--cells", "1", *TINY, "--epochs", "1"]


def run(command: str, args: list[str], capsys) -> tuple[int, str, str]:
    rc = fastnas_main([command, *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def nb201_csv(tmp_path_factory) -> str:
    return write_nb201_table(str(tmp_path_factory.mktemp("table") / "nb201.csv"))


@pytest.fixture(scope="module")
def seeds_sweep(tmp_path_factory, nb201_csv):
    """``search --seeds 0-2`` in this process, with the benchmark table."""
    out = tmp_path_factory.mktemp("seeds") / "s"
    assert fastnas_main(["search", "--seeds", "0-2", "--nb201-table", nb201_csv, "--out", str(out), *SEARCH]) == 0
    return out


def test_parse_seeds():
    assert parse_seeds("0,1,2,3") == parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 0-2,10") == [5, 0, 1, 2, 10]
    for bad in ("", "a", "3-1", "0,0", "0-2,1", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)


def test_each_seed_is_the_search_of_that_seed(seeds_sweep, tmp_path, capsys):
    assert sorted(os.listdir(seeds_sweep)) == ["config.json", "seed-0", "seed-1", "seed-2", "summary.json"]
    config = json.loads((seeds_sweep / "config.json").read_text())
    assert config["command"] == "search" and config["sweep"] == "seeds" and config["seeds"] == [0, 1, 2]
    alone = str(tmp_path / "alone")
    assert run("search", ["--seed", "1", "--out", alone, *SEARCH], capsys)[0] == 0
    part = seeds_sweep / "seed-1"
    assert_same_state(load_checkpoint(alone), load_checkpoint(str(part)))
    assert (part / "arch.txt").read_text() == (tmp_path / "alone" / "arch.txt").read_text()
    child = json.loads((part / "config.json").read_text())
    assert child["command"] == "search" and child["part"] == "seed" and "sweep" not in child
    assert "epoch 2/2" in (part / "log.txt").read_text()


def test_the_summary_gives_mean_and_std_over_the_seeds(seeds_sweep):
    summary = json.loads((seeds_sweep / "summary.json").read_text())
    assert summary["finished"] and summary["seeds"] == [0, 1, 2]
    runs = summary["runs"]
    for r in runs:
        arch = (seeds_sweep / r["folder"] / "arch.txt").read_text().strip()
        assert r["arch"] == arch
        assert r["benchmark"] == dict(zip(("c10", "c100"), benchmark_accuracy(arch)))
        assert r["test_acc"] == json.loads((seeds_sweep / r["folder"] / "result.json").read_text())["test_acc"]
    c10 = [r["benchmark"]["c10"] for r in runs]
    mean = sum(c10) / 3
    assert summary["stats"]["c10"]["mean"] == pytest.approx(mean)
    assert summary["stats"]["c10"]["std"] == pytest.approx((sum((v - mean) ** 2 for v in c10) / 2) ** 0.5)
    assert summary["stats"]["test_acc"]["n"] == 3
    assert sorted(s for a in summary["archs"] for s in a["seeds"]) == [0, 1, 2]


def test_mean_std_and_table():
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
    assert mean_std([2.0]) == {"mean": 2.0, "std": None, "n": 1}
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "n": 2}
    rows = [{"seed": 0, "acc": 1.0, "arch": "x"}, {"seed": 1, "acc": 3.0, "arch": "yy"}]
    lines = table(rows, ["seed", "acc", "arch"], {"acc": mean_std([1.0, 3.0])})
    assert lines[0].split() == ["seed", "acc", "arch"]
    assert lines[1].split() == ["0", "1.00", "x"] and lines[-1].split() == ["mean", "±", "std", "2.00", "±", "1.41"]


def test_a_sweep_and_its_parts_are_kinds_every_command_checks(seeds_sweep, tmp_path, capsys):
    out, part = str(seeds_sweep), str(seeds_sweep / "seed-0")
    before = snapshot(out)
    sweep = "a sweep of searches over seeds (finished)"
    expect_one_line_error("search", ["--out", out, *SEARCH], capsys, f"holds {sweep}, not a search run")
    expect_one_line_error("search", ["--seeds", "0-2", "--out", out, *SEARCH], capsys, f"already holds {sweep}")
    expect_one_line_error("train", ["--out", out, "--resume"], capsys, f"holds {sweep}, not a training run")
    expect_one_line_error("rank", ["--out", out, "--resume"], capsys, f"holds {sweep}, not a ranking run")
    expect_one_line_error(
        "search", ["--out", out, "--resume", "--seeds", "0-3"], capsys, "seeds = [0, 1, 2] there, [0, 1, 2, 3] here"
    )
    expect_one_line_error(
        "search", ["--out", part, "--resume"], capsys,
        f"is a search of a sweep over seeds (finished) in {out}: continue it with fastnas search --out {out} --resume",
    )  # fmt: skip
    expect_one_line_error("train", ["--arch-file", out, "--out", part], capsys, "not a sweep of trainings")
    # a plain search folder is not a sweep
    single = str(tmp_path / "single")
    assert run("search", ["--out", single, *SEARCH], capsys)[0] == 0
    expect_one_line_error(
        "search", ["--seeds", "0-1", "--out", single, "--resume"], capsys,
        "holds a search run (finished), not a sweep of searches over seeds",
    )  # fmt: skip
    rc, stdout, _ = run("search", ["--out", out, "--resume"], capsys)
    assert rc == 0 and "is finished; nothing to do" in stdout
    assert snapshot(out) == before
    # the searches are search runs for the commands that read them
    rc, _, err = run("train", ["--from", part, "--out", str(tmp_path / "t"), *TRAIN], capsys)
    assert rc == 0, err


def test_train_arch_file_trains_each_as_train_does(seeds_sweep, tmp_path, capsys):
    archs = [json.loads((seeds_sweep / f"seed-{s}" / "result.json").read_text())["arch"] for s in range(3)]
    listed = tmp_path / "archs.txt"
    listed.write_text(f"# found by the seeds\n{archs[0]}\n\n{archs[1]}\n  {archs[0]}\n")
    out = tmp_path / "many"
    rc, stdout, err = run("train", ["--arch-file", str(listed), "--out", str(out), *TRAIN], capsys)
    assert rc == 0, err
    assert (out / "archs.txt").read_text() == f"{archs[0]}\n{archs[1]}\n"  # comments, blanks, repeats left out
    assert "[2/2] arch-01: test acc" in stdout
    alone = str(tmp_path / "alone")
    assert run("train", ["--arch", archs[1], "--out", alone, *TRAIN], capsys)[0] == 0
    assert_same_state(load_checkpoint(alone), load_checkpoint(str(out / "arch-01")))
    summary = json.loads((out / "summary.json").read_text())
    assert [r["arch"] for r in summary["runs"]] == archs[:2] and summary["finished"]
    assert json.loads((out / "arch-00" / "config.json").read_text())["part"] == "arch"
    # a sweep over seeds names its architectures; --resume reads them from the sweep's archs.txt
    from_sweep = tmp_path / "from-sweep"
    assert run("train", ["--arch-file", str(seeds_sweep), "--out", str(from_sweep), *TRAIN], capsys)[0] == 0
    assert (from_sweep / "archs.txt").read_text() == "".join(f"{a}\n" for a in dict.fromkeys(archs))
    rc, stdout, _ = run("train", ["--out", str(from_sweep), "--resume"], capsys)
    assert rc == 0 and "nothing to do" in stdout


def test_arch_file_bad_input(seeds_sweep, tmp_path, capsys):
    out = str(tmp_path / "t")
    bad = tmp_path / "bad.txt"
    bad.write_text(
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|\nx\n"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    cases = [
        (["--arch-file", str(bad)], "architecture 2: --arch 'x' is neither"),
        (["--arch-file", str(empty)], "names no architecture"),
        (["--arch-file", str(tmp_path / "missing")], "No such file or directory"),
        (["--arch-file", str(bad), "--arch", "x"], "give one of --arch, --from and --arch-file"),
        (["--arch-file", str(tmp_path)], "is a folder holding no run; give a file of architectures"),
    ]
    for args, needle in cases:
        expect_one_line_error("train", [*args, "--out", out, *TRAIN], capsys, needle)
        assert not os.path.exists(out)


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    out = tmp_path / "s"
    (out / "seed-1").mkdir(parents=True)
    (out / "seed-1" / "config.json").write_text("{not json")
    before = snapshot(str(out / "seed-1"))
    rc, stdout, err = run("search", ["--seeds", "0-2", "--out", str(out), *SEARCH], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastnas search: error: 1 of 3 runs failed (the others finished)")
    assert "seed-1: corrupt" in lines[0]
    assert "seed-1: failed: corrupt" in stdout and "[3/3] seed-2: test acc" in stdout
    assert snapshot(str(out / "seed-1")) == before
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["finished"] and summary["stats"]["test_acc"]["n"] == 2
    assert "corrupt" in summary["runs"][1]["error"]
    # repaired, the sweep's --resume runs what failed and leaves the finished searches as they are
    shutil.rmtree(out / "seed-1")
    finished = snapshot(str(out / "seed-0"))
    rc, stdout, err = run("search", ["--out", str(out), "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["finished"]
    assert {k: v for k, v in snapshot(str(out / "seed-0")).items() if k != "log.txt"} == {
        k: v for k, v in finished.items() if k != "log.txt"
    }


def test_pool_flags_are_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    cases = [
        ("search", ["--workers", "2", *SEARCH], "--workers and --ray-address run many searches: give --seeds"),
        ("train", ["--workers", "2", "--arch", "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "give --arch-file"),
        ("search", ["--seeds", "0-1", "--workers", "0", *SEARCH], "--workers must be at least 1, got 0"),
        ("search", ["--seeds", "0-1", "--seed", "3", *SEARCH], "give --seed or --seeds, not both"),
        ("search", ["--seeds", "0-1", "--workers", "2", "--stop-after", "1", *SEARCH], "--stop-after counts"),
        ("rank", ["--workers", "2", "--device", "cuda:1"], "Ray gives each run its GPU; use --device cuda"),
        ("search", ["--seeds", "0-x", *SEARCH], "give seeds as 0,1,2,3 or a range 0-3"),
    ]
    for command, args, needle in cases:
        expect_one_line_error(command, ["--out", out, *args], capsys, needle)
        assert not os.path.exists(out)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    expect_one_line_error(
        "search", ["--seeds", "0-1", "--workers", "2", "--out", out, *SEARCH], capsys,
        "--workers needs Ray, an optional dependency: pip install -e '.[ray]'",
    )  # fmt: skip
    assert not os.path.exists(out)


def test_one_run_functions_refuse_a_sweep(tmp_path):
    from fastnas.search.loop import run_search

    with pytest.raises(RunError, match="a seeds sweep is many runs"):
        run_search(SeedsConfig(seeds=[0, 1], out=str(tmp_path / "s")))
    assert not os.path.exists(tmp_path / "s")
