"""``fastnas search``, ``train`` and ``rank`` end to end on ImageNet16-120 (pickles written here), with a
NAS-Bench-201 table whose ImageNet16-120 column is the one looked up."""

from __future__ import annotations

import itertools
import json

import pytest
from imagenet_helpers import write_imagenet16
from search_helpers import load_checkpoint
from train_helpers import NB201_ARCH

from fastnas.__main__ import main as fastnas_main
from fastnas.spaces.nb201 import PRIMITIVES

TINY = ["--channels", "4", "--cells", "1", "--batch-size", "16", "--limit-batches", "2", "--no-progress"]


def _value(arch: str, salt: int) -> float:
    return float(sum(ord(c) * (i + salt) for i, c in enumerate(arch)) % 5000) / 100


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The pickles, and a table of every NAS-Bench-201 cell: a CIFAR-10 column first, then ImageNet16-120's."""
    root = tmp_path_factory.mktemp("imagenet16")
    folder = write_imagenet16(str(root / "ImageNet16"), val=96)  # 32 x-valid images of 120 classes: 2 batches
    lines = ["arch,cifar10_test_acc,ImageNet16-120_test_acc"]
    for ops in itertools.product(PRIMITIVES, repeat=6):
        arch = "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|".format(*ops)
        lines.append(f"{arch},{_value(arch, 1)},{_value(arch, 2)}")
    table = root / "nb201.csv"
    table.write_text("\n".join(lines) + "\n")
    return folder, str(table)


def test_search_looks_the_cell_up(files, tmp_path, capsys):
    folder, table = files
    out = tmp_path / "search"
    args = ["--dataset", "imagenet16-120", "--data-dir", folder, "--epochs", "2", "--nb201-table", table]
    assert fastnas_main(["search", *args, *TINY, "--out", str(out)]) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    arch = result["arch"]
    assert result["benchmark"] == {"cifar10_test_acc": _value(arch, 1), "ImageNet16-120_test_acc": _value(arch, 2)}
    history = json.loads((out / "history.json").read_text())
    assert all(h["arch_updates"] for h in history) and len(history) == 2
    assert "imagenet16-120" in capsys.readouterr().out


def test_train_an_architecture(files, tmp_path, capsys):
    folder, _ = files
    out = tmp_path / "train"
    args = ["--arch", NB201_ARCH, "--dataset", "imagenet16-120", "--data-dir", folder, "--epochs", "1", *TINY]
    assert fastnas_main(["train", *args, "--out", str(out)]) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["dataset"] == "imagenet16-120" and result["test_top5"] >= result["test_acc"]
    assert result["params"] > 0 and result["macs"] > 0
    assert load_checkpoint(str(out))["model"]["classifier.weight"].shape[0] == 120  # the classes kept


def test_rank_by_the_imagenet16_column(files, tmp_path, capsys):
    """The default ground truth is the data set's column of the table, not its first."""
    folder, table = files
    out = tmp_path / "rank"
    args = ["--dataset", "imagenet16-120", "--data-dir", folder, "--count", "4", "--epochs", "1"]
    args += ["--bn-batches", "1", "--nb201-table", table, "--out", str(out)]
    assert fastnas_main(["rank", *args, *TINY]) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["truth"] == f"ImageNet16-120_test_acc of {table}"
    assert all(r["truth"] == _value(r["arch"], 2) for r in result["rows"]) and result["count"] == 4
