"""Two gloo processes on loopback (torchrun) against one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from search_helpers import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--epochs", "2", "--batch-size", "16", "--channels", "4", "--limit-batches", "3", "--no-progress"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    return _run([
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "fastnas", "search", *args,
    ])  # fmt: skip


def _arch_and_weights(out: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(out)["model"]


def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    """2 ranks x 8 images (DDP, gloo) == 1 process x 2 micro-batches of 8 (gradient accumulation):
    the same images in the same groups, so BatchNorm sees the same batches, and the averaged
    gradients are equal bit for bit ((g0 + g1) / 2 against g0 / 2 + g1 / 2: halving is exact)."""
    two, one = tmp_path / "two", tmp_path / "one"
    args = ["--algorithm", "gaea-darts", "--mode", "bilevel", *COMMON]
    proc = _torchrun([*args, "--out", str(two)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    # rank 0 alone wrote the outputs, each once
    assert proc.stdout.count("architecture: |") == 1
    # one process under the same OMP_NUM_THREADS=1: some CPU kernels round differently with another
    # OpenMP thread pool, even at one torch thread
    proc = _run([sys.executable, "-m", "fastnas", "search", *args, "--out", str(one), "--accum-steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _arch_and_weights(str(two)), _arch_and_weights(str(one))
    assert set(a) == set(b)
    for name in a:
        if a[name].is_floating_point() and "running" not in name:  # BN running stats: rank 0's batches only
            assert torch.equal(a[name], b[name]), name
    assert (a["alphas"] - 0.2).abs().max() > 1e-3  # the architecture moved away from uniform


def test_gdas_samples_agree_across_ranks(tmp_path):
    """GAEA-GDAS samples one op per edge per step from ``net.generator``: seeded alike, the ranks
    sample alike, so their architecture parameters stay identical (the trainer compares them bit for
    bit at every epoch's end and exits with an error otherwise)."""
    out = tmp_path / "gdas"
    proc = _torchrun(["--algorithm", "gaea-gdas", "--mode", "erm", *COMMON, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = load_checkpoint(str(out))["history"]
    assert [h["tau"] for h in history] == [10.0, pytest.approx(0.1)]
    w = _arch_and_weights(str(out))["alphas"]
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
