"""Helpers of the search-driver tests: tiny configurations, a tiny CIFAR-10 on disk, directory snapshots."""

from __future__ import annotations

import itertools
import os
import pickle
import re

import numpy as np
import torch

# a search small enough for a test: a few steps of a 4-channel network on the 8x8 digits
TINY = dict(batch_size=16, channels=4, limit_batches=2, progress=False, rs_samples=2)
TINY_ARGS = ["--batch-size", "16", "--channels", "4", "--limit-batches", "2", "--no-progress", "--rs-samples", "2"]


def tiny_cells(space: str) -> int:
    return 1 if space == "nb201" else 3


def write_tiny_cifar10(root: str, per_batch: int = 12, test: int = 16, seed: int = 0) -> str:
    """A CIFAR-10 python-pickle release with ``per_batch`` images in each of the 5 training batches;
    returns the parent folder to pass as ``--data-dir``."""
    rng = np.random.RandomState(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def dump(name: str, n: int) -> None:
        d = {
            b"batch_label": name.encode(),
            b"labels": rng.randint(0, 10, size=n).tolist(),
            b"data": rng.randint(0, 256, size=(n, 3072)).astype(np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", test)
    return root


def benchmark_accuracy(arch: str) -> tuple[float, float]:
    """A made-up benchmark: two accuracies of a NAS-Bench-201 cell, from its ops."""
    from fastnas.spaces.nb201 import PRIMITIVES

    score = sum(PRIMITIVES.index(op) * (i + 1) for i, op in enumerate(re.findall(r"\|(\w+)~", arch)))
    return 50.0 + score / 4, 20.0 + score / 8


def write_nb201_table(path: str) -> str:
    """A CSV of every NAS-Bench-201 cell with :func:`benchmark_accuracy`'s columns ``c10`` and ``c100``."""
    from fastnas.spaces.nb201 import PRIMITIVES

    lines = ["arch,c10,c100"]
    for a, b, c, d, e, f in itertools.product(PRIMITIVES, repeat=6):
        arch = f"|{a}~0|+|{b}~0|{c}~1|+|{d}~0|{e}~1|{f}~2|"
        lines.append("{},{},{}".format(arch, *benchmark_accuracy(arch)))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def snapshot(path: str) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (a lock file a killed process left is no data: a later
    command may take it away)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            if f == ".fastnas.lock":
                continue
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def load_checkpoint(out: str) -> dict:
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)


TIMING_KEYS = ("images_per_sec", "train_seconds", "elapsed_seconds")


def assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Checkpoint contents equal bit for bit (tensors by torch.equal), timings excepted."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            if k in TIMING_KEYS:
                continue
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def expect_one_line_error(command: str, args: list[str], capsys, needle: str, watched: str | None = None) -> None:
    """``fastnas <command> <args>`` exits with status 2 and one ``fastnas <command>: error: ...`` line
    holding ``needle``, without a traceback; ``watched`` (a folder) is left as it was."""
    from fastnas.__main__ import main

    before = snapshot(watched) if watched else None
    rc = main([command, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastnas {command}: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    if watched:
        assert snapshot(watched) == before, "a rejected command changed the output directory"
