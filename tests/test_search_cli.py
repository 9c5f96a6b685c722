"""``fastnas search`` end to end: outputs, CIFAR pickles, the NB201 table, resume, and every bad input."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from search_helpers import TINY_ARGS, assert_same_state, load_checkpoint, snapshot, write_tiny_cifar10

from fastnas.__main__ import main as fastnas_main
from fastnas.search.cli import main as search_main
from fastnas.search.config import SearchConfig, resolve
from fastnas.spaces import darts, nb201

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = fastnas_main(["search", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_end_to_end_on_tiny_cifar10(tmp_path, capsys):
    data = write_tiny_cifar10(str(tmp_path / "data"))
    out = tmp_path / "run"
    rc, stdout, err = run_cli(
        [
            *("--dataset", "cifar10", "--data-dir", data, "--out", str(out), "--epochs", "2", "--cells", "1"),
            *("--batch-size", "8", "--channels", "4", "--no-progress", "--algorithm", "gaea-darts", "--threads", "1"),
        ],
        capsys,
    )
    assert rc == 0, err
    assert {"config.json", "checkpoint.pt", "history.json", "arch.txt", "result.json", "arch_weights.png"} <= set(
        os.listdir(out)
    )
    assert not [f for f in os.listdir(out) if ".tmp" in f], "a temporary file was left behind"
    arch = (out / "arch.txt").read_text().strip()
    assert nb201.parse_arch_string(arch)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "entropy", "images_per_sec"):
            assert isinstance(h[key], float)
        w = torch.tensor(h["arch_weights"]["cell"])
        assert w.shape == (6, 5)
        torch.testing.assert_close(w.sum(-1), torch.ones(6))
        ent = -(w * w.log()).sum(-1).mean().item()
        assert h["entropy"] == pytest.approx(ent, rel=1e-5)
    assert (out / "arch_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "result.json").read_text())
    assert result["arch"] == arch and result["finished"]
    ckpt = load_checkpoint(str(out))
    assert ckpt["epoch"] == 2 and ckpt["arch"] == arch
    # one line per epoch on stdout, with losses, accuracies, entropy and images/s
    lines = [ln for ln in stdout.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and all("img/s" in ln and "entropy" in ln and "acc" in ln for ln in lines)


def test_darts_space_exports_a_genotype(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(
        [
            "--space",
            "darts",
            "--algorithm",
            "gaea-pc-darts",
            "--mode",
            "erm",
            "--cells",
            "3",
            "--epochs",
            "1",
            "--out",
            str(out),
            *TINY_ARGS,
        ],
        capsys,
    )
    assert rc == 0, err
    g = darts.parse_genotype((out / "arch.txt").read_text().strip())
    assert len(g.normal) == 8 and len(g.reduce) == 8
    assert (out / "arch_weights.png").exists()


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fastnas", "search", "--out", str(out), "--epochs", "1", *TINY_ARGS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "architecture: |" in proc.stdout and (out / "arch.txt").exists()


def test_nb201_table_reports_the_benchmark_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    # a table of every cell the run could find would be 15,625 rows; the run is seeded, so find its
    # answer first, then look it up from a table that holds it among other rows
    rc, _, err = run_cli(["--out", str(tmp_path / "probe"), "--epochs", "1", *TINY_ARGS], capsys)
    assert rc == 0, err
    arch = (tmp_path / "probe" / "arch.txt").read_text().strip()
    table = tmp_path / "nb201.csv"
    table.write_text(
        "arch,cifar10_test_acc,cifar100_test_acc\n"
        "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,10.0,1.0\n"
        f"{arch},93.25,70.5\n"
    )
    rc, stdout, err = run_cli(["--out", str(out), "--epochs", "1", "--nb201-table", str(table), *TINY_ARGS], capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["benchmark"] == {"cifar10_test_acc": 93.25, "cifar100_test_acc": 70.5}
    assert "cifar10_test_acc 93.25" in stdout


# --------------------------------------------------------------------------- resume


def _args(out, epochs=2, extra=()):
    return [
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        "--channels",
        "4",
        "--limit-batches",
        "3",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize("algorithm,mode", [("gaea-gdas", "erm"), ("darts", "bilevel")])
def test_stop_and_resume_is_bit_identical(tmp_path, capsys, algorithm, mode):
    extra = ["--algorithm", algorithm, "--mode", mode]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(_args(full, extra=extra), capsys)[0] == 0
    rc, stdout, _ = run_cli(_args(part, extra=[*extra, "--stop-after", "1"]), capsys)
    assert rc == 0 and "continue with --resume" in stdout
    assert load_checkpoint(str(part))["epoch"] == 1 and not (part / "result.json").exists()
    rc, stdout, err = run_cli([*_args(part, extra=extra), "--resume"], capsys)
    assert rc == 0, err
    assert "resuming after epoch 1" in stdout
    a, b = load_checkpoint(str(full)), load_checkpoint(str(part))
    assert_same_state(a, b)  # model, both optimizers, scheduler, RNG, history: bit for bit
    assert (full / "arch.txt").read_text() == (part / "arch.txt").read_text()


def test_killed_run_resumes_to_the_same_weights(tmp_path, capsys):
    """SIGKILL a real run once its first checkpoint exists, resume it, compare with an uninterrupted run."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = _args(killed, epochs=4, extra=["--algorithm", "gaea-darts", "--limit-batches", "4"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnas", "search", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    epochs_done = load_checkpoint(str(killed))["epoch"]
    assert 1 <= epochs_done < 4
    rc, stdout, err = run_cli([*args, "--resume"], capsys)
    assert rc == 0, err
    assert run_cli(_args(full, epochs=4, extra=["--algorithm", "gaea-darts", "--limit-batches", "4"]), capsys)[0] == 0
    a, b = load_checkpoint(str(full)), load_checkpoint(str(killed))
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["arch_optimizer"], b["arch_optimizer"])
    assert_same_state(a["weight_optimizer"], b["weight_optimizer"])
    assert (full / "arch.txt").read_text() == (killed / "arch.txt").read_text()


# --------------------------------------------------------------------------- bad input


def _expect_error(args, capsys, needle, watched=None):
    before = snapshot(watched) if watched else None
    rc, stdout, err = run_cli(args, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastnas search: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    if watched:
        assert snapshot(watched) == before, "a rejected command changed the output directory"


def test_bad_names(tmp_path, capsys):
    out = str(tmp_path / "run")
    _expect_error(["--space", "mobilenet", "--out", out], capsys, "unknown space 'mobilenet'")
    _expect_error(["--algorithm", "enas", "--out", out], capsys, "unknown algorithm 'enas'")
    _expect_error(["--algorithm", "pc-darts", "--out", out], capsys, "pc-darts needs --space darts")
    _expect_error(["--mode", "trilevel", "--out", out], capsys, "unknown mode")
    _expect_error(["--dataset", "mnist", "--out", out], capsys, "unknown data set 'mnist'")
    _expect_error(["--amp", "fp8", "--out", out], capsys, "unknown --amp")
    _expect_error(["--epochs", "zero", "--out", out], capsys, "invalid int value")
    _expect_error(["--epochs", "0", "--out", out], capsys, "--epochs must be at least 1")
    _expect_error(["--bogus-flag", "--out", out], capsys, "unrecognized arguments")
    _expect_error(["--device", "tpu", "--out", out], capsys, "--device")
    _expect_error(["--entropy-weight", "20", "--out", out], capsys, "must be below 1 for GAEA")
    _expect_error(["--arch-lr", "-1", "--out", out], capsys, "--arch-lr must be a finite number >= 0")
    assert not os.path.exists(out)


def test_second_order_refuses_fp16(tmp_path, capsys):
    """darts-2nd's unrolled step runs without loss scaling: --amp fp16 is refused before anything runs."""
    out = str(tmp_path / "run")
    for device in ("cpu", "cuda"):  # refused for what it is, not for the device
        _expect_error(
            ["--algorithm", "darts-2nd", "--amp", "fp16", "--device", device, "--out", out],
            capsys,
            "darts-2nd (second order) does not support --amp fp16",
        )
    assert not os.path.exists(out)
    # the combination alone is refused: bf16 and the first-order algorithms with fp16 pass the checks
    resolve(SearchConfig(algorithm="darts-2nd", amp="bf16"))
    resolve(SearchConfig(algorithm="darts", amp="fp16"))


def test_missing_and_corrupt_data(tmp_path, capsys):
    out = str(tmp_path / "run")
    _expect_error(["--dataset", "cifar10", "--out", out], capsys, "needs --data-dir")
    _expect_error(
        ["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", out], capsys, "is not a directory"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(["--dataset", "cifar10", "--data-dir", str(empty), "--out", out], capsys, "no cifar10 data")
    data = write_tiny_cifar10(str(tmp_path / "data"))
    batch = os.path.join(data, "cifar-10-batches-py", "data_batch_3")
    with open(batch, "wb") as f:
        f.write(b"\x80\x04 this is not a pickle")
    _expect_error(["--dataset", "cifar10", "--data-dir", data, "--out", out], capsys, "corrupt data file")
    with open(batch, "wb") as f:
        pickle.dump({b"data": [[1, 2, 3]], b"labels": [0]}, f)
    _expect_error(["--dataset", "cifar10", "--data-dir", data, "--out", out], capsys, "corrupt data file")
    os.remove(batch)
    _expect_error(["--dataset", "cifar10", "--data-dir", data, "--out", out], capsys, "missing data file")
    assert not os.path.exists(out)


def test_occupied_output_and_bad_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(_args(out, epochs=1, extra=["--limit-batches", "1"]), capsys)[0] == 0
    # another run into the same directory is refused, and nothing there changes
    _expect_error(_args(out, epochs=1), capsys, "already holds a search run", watched=str(out))
    # resuming with another configuration
    _expect_error(
        [*_args(out, epochs=1, extra=["--algorithm", "darts"]), "--resume"],
        capsys,
        "from another run: algorithm",
        watched=str(out),
    )
    _expect_error(
        [*_args(out, epochs=1, extra=["--limit-batches", "1", "--seed", "3"]), "--resume"],
        capsys,
        "from another run: seed",
        watched=str(out),
    )
    # nothing to resume
    _expect_error([*_args(tmp_path / "fresh", epochs=1), "--resume"], capsys, "nothing to resume")
    assert not (tmp_path / "fresh").exists()
    # corrupt checkpoints: truncated, not a torch file, a torch file of something else
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    for payload in (good[: len(good) // 2], b"garbage"):
        ckpt.write_bytes(payload)
        _expect_error(
            [*_args(out, epochs=1, extra=["--limit-batches", "1"]), "--resume"],
            capsys,
            "corrupt checkpoint",
            watched=str(out),
        )
    torch.save({"weights": torch.zeros(3)}, ckpt)
    _expect_error(
        [*_args(out, epochs=1, extra=["--limit-batches", "1"]), "--resume"],
        capsys,
        "not a fastnas search checkpoint",
        watched=str(out),
    )
    # a checkpoint whose tensors do not fit the network
    ckpt.write_bytes(good)
    bad = load_checkpoint(str(out))
    bad["model"] = {k: v[..., :1] if v.dim() else v for k, v in bad["model"].items()}
    torch.save(bad, ckpt)
    _expect_error(
        [*_args(out, epochs=1, extra=["--limit-batches", "1"]), "--resume"],
        capsys,
        "does not fit this run",
        watched=str(out),
    )


def test_bad_nb201_table(tmp_path, capsys):
    out = str(tmp_path / "run")
    _expect_error(["--out", out, "--nb201-table", str(tmp_path / "missing.csv")], capsys, "does not exist")
    bad = tmp_path / "bad.csv"
    bad.write_text("arch,acc\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,high\n")
    _expect_error(["--out", out, "--nb201-table", str(bad)], capsys, "acc 'high' is not a number")
    _expect_error(["--space", "darts", "--out", out, "--nb201-table", str(bad)], capsys, "needs --space nb201")
    assert not os.path.exists(out)


def test_top_level_usage(capsys):
    assert fastnas_main([]) == 2
    assert fastnas_main(["evolve"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert search_main(["--help"]) == 0
    assert "--nb201-table" in capsys.readouterr().out


# --------------------------------------------------------------------------- resume with config.json


def test_resume_takes_the_settings_from_config_json(tmp_path, capsys):
    """``--resume`` alone continues a run with its own settings; flags that change what the run
    computes are refused when they contradict config.json, the others (--threads, ...) are taken."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["--algorithm", "darts", "--seed", "5", "--limit-batches", "2"]
    assert run_cli(_args(full, epochs=3, extra=extra), capsys)[0] == 0
    assert run_cli([*_args(part, epochs=3, extra=extra), "--stop-after", "1"], capsys)[0] == 0
    _expect_error(["--out", str(part), "--resume", "--seed", "6"], capsys, "from another run: seed = 5 there, 6 here")
    _expect_error(["--out", str(part), "--resume", "--algorithm", "gaea-darts"], capsys, "from another run: algorithm")
    rc, stdout, err = run_cli(["--out", str(part), "--resume", "--stop-after", "1", "--threads", "1"], capsys)
    assert rc == 0, err
    assert "darts (bilevel)" in stdout and "resuming after epoch 1" in stdout
    rc, _, err = run_cli(["--out", str(part), "--resume", "--algorithm", "darts", "--no-progress"], capsys)
    assert rc == 0, err
    assert_same_state(load_checkpoint(str(full)), load_checkpoint(str(part)))
    # the whole run's time, not only the last invocation's
    result = json.loads((part / "result.json").read_text())
    history = json.loads((part / "history.json").read_text())
    assert result["search_seconds"] >= sum(h["train_seconds"] for h in history)


def test_a_finished_run_extends_with_more_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(_args(out, epochs=2, extra=["--limit-batches", "1"]), capsys)[0] == 0
    # resuming a finished run does nothing, successfully (job scripts that always pass --resume)
    before = snapshot(str(out))
    rc, stdout, err = run_cli(["--out", str(out), "--resume"], capsys)
    assert rc == 0 and not err, err
    assert "is finished (2 epochs); nothing to do (pass --epochs with more than 2" in stdout
    assert snapshot(str(out)) == before
    _expect_error(["--out", str(out), "--resume", "--epochs", "1"], capsys, "has done 2 epochs, more than --epochs 1")
    rc, stdout, err = run_cli(["--out", str(out), "--resume", "--epochs", "4", "--no-progress"], capsys)
    assert rc == 0, err
    assert "4 epochs" in stdout and "resuming after epoch 2" in stdout
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # the learning rate follows the cosine of the longer run from epoch 3 on
    lr = lambda e, n: 0.001 + (0.025 - 0.001) * (1 + math.cos(math.pi * e / n)) / 2
    assert [h["lr"] for h in history] == pytest.approx([lr(0, 2), lr(1, 2), lr(2, 4), lr(3, 4)])
    assert json.loads((out / "config.json").read_text())["epochs"] == 4
    assert json.loads((out / "result.json").read_text())["epochs_done"] == 4


def test_arch_warmup_must_leave_epochs(tmp_path, capsys):
    out = str(tmp_path / "run")
    _expect_error(["--out", out, "--arch-warmup", "5", "--epochs", "1"], capsys, "--arch-warmup 5 leaves no epoch")
    _expect_error(["--out", out, "--arch-warmup", "2", "--epochs", "2"], capsys, "--arch-warmup 2 leaves no epoch")
    assert not os.path.exists(out)


def test_arch_weight_panels_are_named_by_edge(monkeypatch):
    from fastnas.runs import plots
    from fastnas.search.loop import edge_labels

    titles = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: titles.extend(ax.get_title() for ax in fig.axes))
    net = nb201.Network(C=4, N=1, arch="simplex")
    history = [{"epoch": 1, "arch_weights": {k: v.tolist() for k, v in net.arch_weights().items()}}]
    plots.plot_arch_weights(history, "unused.png", list(nb201.PRIMITIVES), {"cell": edge_labels(net)})
    assert titles[:6] == ["1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2"]
    labels = edge_labels(darts.Network(C=4, layers=3, in_channels=1))
    assert len(labels) == 14 and labels[:5] == ["2<-0", "2<-1", "3<-0", "3<-1", "3<-2"] and labels[-1] == "5<-4"


def test_search_reports_what_the_table_skipped(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text(
        "acc,arch\n10,|none~0|+|none~0|none~1|+|none~0|none~1|none~2|\n5,|bad~0|+|none~0|none~1|+|none~0|none~1|none~2|\n"
    )
    rc, stdout, err = run_cli(
        ["--out", str(tmp_path / "run"), "--epochs", "1", "--nb201-table", str(table), *TINY_ARGS], capsys
    )
    assert rc == 0, err
    assert "skipped 1 rows that are not NAS-Bench-201 architectures (line 3)" in stdout
