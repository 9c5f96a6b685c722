"""``fastnas train`` end to end on the embedded data: outputs, recipes, --from, resume, DDP and bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from search_helpers import assert_same_state, expect_one_line_error, load_checkpoint
from train_helpers import DARTS_ARCH, NB201_ARCH, TINY_TRAIN

from fastnas import networks
from fastnas.__main__ import main as fastnas_main
from fastnas.runs.data import cutout
from fastnas.train import RECIPES, TrainConfig
from fastnas.train.recipes import resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = fastnas_main(["train", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _expect_error(args, capsys, needle, watched=None):
    expect_one_line_error("train", args, capsys, needle, watched)


def test_nb201_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["--arch", NB201_ARCH, "--out", str(out), "--epochs", "2", *TINY_TRAIN], capsys)
    assert rc == 0, err
    assert {"config.json", "checkpoint.pt", "history.json", "arch.txt", "result.json", "curves.png"} == set(
        os.listdir(out)
    )
    assert (out / "arch.txt").read_text().strip() == NB201_ARCH
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["lr"] == 0.1 and history[1]["lr"] == pytest.approx(0.05)  # nb201: 0.1, cosine to 0
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["test_acc"] == history[-1]["test_acc"]
    net = networks.TinyNetwork(4, 1, NB201_ARCH, 10, in_channels=1)
    assert result["params"] == networks.count_parameters(net) > 0
    assert result["macs"] == networks.count_macs(net, (1, 16, 16))
    assert result["macs"] > 0 and result["dataset"] == "distorted-digits"
    assert sum(ln.startswith("epoch ") for ln in stdout.splitlines()) == 2
    assert "multiply-adds" in stdout


def test_darts_recipe_values_and_regularisers(tmp_path, capsys):
    cfg = resolve(TrainConfig(arch=DARTS_ARCH, dataset="cifar10"))
    assert {k: getattr(cfg, k) for k in RECIPES["darts"]} == RECIPES["darts"]
    assert (cfg.epochs, cfg.channels, cfg.cells, cfg.cutout, cfg.auxiliary_weight) == (600, 36, 20, 16, 0.4)
    cfg = resolve(TrainConfig(arch=NB201_ARCH, dataset="cifar10", lr=0.05))
    assert (cfg.recipe, cfg.epochs, cfg.batch_size, cfg.nesterov, cfg.weight_decay, cfg.lr) == (
        "nb201",
        200,
        256,
        True,
        5e-4,
        0.05,
    )
    out = tmp_path / "darts"
    args = ["--arch", DARTS_ARCH, "--out", str(out), "--epochs", "2", "--cells", "3", *TINY_TRAIN]
    rc, _, err = run_cli([*args, "--cutout", "3", "--drop-path", "0.3", "--dataset", "digits"], capsys)
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["recipe"], config["cutout"], config["drop_path"], config["dataset"]) == ("darts", 3, 0.3, "digits")


def test_cutout_masks_one_clipped_square():
    x = torch.ones(64, 2, 9, 9)
    y = cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (y[:, 0] == 0).sum((-2, -1))
    assert torch.equal(y[:, 0], y[:, 1]) and ((zeros >= 4) & (zeros <= 16)).all() and (zeros == 16).any()
    rows = (y[:, 0] == 0).any(-1).sum(-1)
    assert (rows <= 4).all()


def test_from_a_search_run_and_resume(tmp_path, capsys):
    search = tmp_path / "search"
    search.mkdir()
    (search / "arch.txt").write_text(NB201_ARCH + "\n")
    (search / "config.json").write_text(json.dumps({"dataset": "digits", "data_dir": None, "space": "nb201"}))
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--from", str(search), "--epochs", "3", *TINY_TRAIN]
    rc, stdout, err = run_cli([*args, "--out", str(full)], capsys)
    assert rc == 0, err
    assert "digits, 3 epochs" in stdout and json.loads((full / "result.json").read_text())["arch"] == NB201_ARCH
    assert run_cli([*args, "--out", str(part), "--stop-after", "1"], capsys)[0] == 0
    assert not (part / "result.json").exists() and (part / "curves.png").exists()
    _expect_error(["--out", str(part), "--resume", "--lr", "0.2"], capsys, "from another run: lr = 0.1 there")
    rc, stdout, err = run_cli(["--out", str(part), "--resume"], capsys)
    assert rc == 0, err
    assert "resuming after epoch 1" in stdout
    assert_same_state(load_checkpoint(str(full)), load_checkpoint(str(part)))
    # extended by one epoch
    rc, _, err = run_cli(["--out", str(part), "--resume", "--epochs", "4"], capsys)
    assert rc == 0, err
    assert [h["epoch"] for h in json.loads((part / "history.json").read_text())] == [1, 2, 3, 4]
    assert json.loads((part / "result.json").read_text())["epochs_done"] == 4


def test_bf16_autocast(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(
        ["--arch", NB201_ARCH, "--out", str(out), "--epochs", "1", "--amp", "bf16", *TINY_TRAIN], capsys
    )
    assert rc == 0, err
    assert torch.isfinite(torch.tensor(json.loads((out / "result.json").read_text())["test_acc"]))


def test_bad_input(tmp_path, capsys):
    out = str(tmp_path / "run")
    _expect_error(["--out", out], capsys, "or many with --arch-file")
    _expect_error(["--arch", "|conv~0|", "--out", out], capsys, "is not a NAS-Bench-201 string")
    _expect_error(["--arch", "Genotype(normal=", "--out", out], capsys, "--arch")
    _expect_error(["--arch", NB201_ARCH, "--recipe", "enas", "--out", out], capsys, "unknown recipe 'enas'")
    _expect_error(["--arch", NB201_ARCH, "--drop-path", "0.2", "--out", out], capsys, "need a DARTS network")
    _expect_error(["--arch", DARTS_ARCH, "--auxiliary-weight", "0.4", "--out", out], capsys, "needs 32x32 images")
    _expect_error(["--arch", NB201_ARCH, "--epochs", "0", "--out", out], capsys, "--epochs must be at least 1")
    _expect_error(["--arch", NB201_ARCH, "--amp", "fp16", "--out", out], capsys, "--amp fp16 needs a CUDA device")
    _expect_error(["--arch", NB201_ARCH, "--batch-size", "5000", "--out", out], capsys, "exceeds the 500 training")
    _expect_error(["--from", str(tmp_path / "nowhere"), "--out", out], capsys, "no arch.txt there")
    _expect_error(["--out", out, "--resume"], capsys, "nothing to resume")
    _expect_error(["--arch", NB201_ARCH, "--lr", "nan", "--out", out], capsys, "--lr must be a finite number")
    assert not os.path.exists(out)
    # an occupied output directory, a checkpoint of a search
    assert run_cli(["--arch", NB201_ARCH, "--out", out, "--epochs", "1", *TINY_TRAIN], capsys)[0] == 0
    _expect_error(["--arch", NB201_ARCH, "--out", out], capsys, "already holds a training run", watched=out)
    torch.save({"format": "fastnas-search-checkpoint/1"}, os.path.join(out, "checkpoint.pt"))
    _expect_error(["--out", out, "--resume", "--epochs", "2"], capsys, "not a fastnas training checkpoint", out)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """2 gloo ranks x 8 images == 1 process x 2 micro-batches of 8, bit for bit (BatchNorm running
    statistics excepted: each rank's come from its own half). Both under OMP_NUM_THREADS=1: some CPU
    kernels round differently with another OpenMP thread pool, even at one torch thread."""
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "fastnas"]
    args = ["train", "--arch", NB201_ARCH, "--epochs", "1", *TINY_TRAIN]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *launch[1:]]  # fmt: skip
    run = lambda cmd: subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    proc = run([*torchrun, *args, "--out", str(two)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("test accuracy") == 1
    proc = run([*launch, *args, "--out", str(one), "--accum-steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(str(two))["model"], load_checkpoint(str(one))["model"]
    for name in a:
        if a[name].is_floating_point() and "running" not in name:
            assert torch.equal(a[name], b[name]), name
