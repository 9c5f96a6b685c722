"""``fastnas rank`` end to end on the embedded data: a run with standalone ground truth, stop and
resume, a synthetic ground truth whose answer is known (tau = 1), the benchmark API patched, bad input."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
from search_helpers import expect_one_line_error

from fastnas.__main__ import main as fastnas_main
from fastnas.rank.run import rank_correlations, top_k

# 5 cells, a supernet of 2 epochs, standalone trainings of 1 epoch: every part a few steps
TINY_RANK = [
    *("--count", "5", "--epochs", "2", "--train-epochs", "1", "--channels", "4", "--batch-size", "16"),
    *("--limit-batches", "2", "--bn-batches", "2", "--no-progress"),
]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = fastnas_main(["rank", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _expect_error(args, capsys, needle, watched=None):
    expect_one_line_error("rank", args, capsys, needle, watched)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """One tiny ranking run with standalone ground truth, shared by the tests below."""
    out = tmp_path_factory.mktemp("rank") / "run"
    rc = fastnas_main(["rank", "--out", str(out), *TINY_RANK])
    assert rc == 0
    return out


def test_outputs_of_a_ranking_run(ranked):
    files = set(os.listdir(ranked))
    assert {"config.json", "shared.json", "result.json", "scatter.png", "supernet", "standalone"} == files
    assert (ranked / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((ranked / "result.json").read_text())
    rows = result["rows"]
    assert len(rows) == 5 == len({r["arch"] for r in rows}) == len(os.listdir(ranked / "standalone"))
    for k, row in enumerate(rows):
        trained = json.loads((ranked / "standalone" / f"{k:02d}" / "result.json").read_text())
        assert trained["arch"] == row["arch"] and trained["test_acc"] == row["truth"]
        assert row["params"] == trained["params"] > 0 and row["macs"] == trained["macs"] > 0
        assert 0.0 <= row["shared_acc"] <= 100.0
    shared_acc, truth = [r["shared_acc"] for r in rows], [r["truth"] for r in rows]
    assert {k: result[k] for k in ("kendall_tau", "spearman_rho")} == rank_correlations(shared_acc, truth)
    best = max(range(5), key=lambda i: (shared_acc[i], -i))
    assert result["top1"]["arch"] == rows[best]["arch"] and result["top1"]["truth"] == truth[best]
    assert result["top5"]["best_truth"] == max(truth) and result["top5"]["percentile"] == 100.0
    assert result["truth"] == "standalone test accuracy after 1 epochs"
    assert json.loads((ranked / "supernet" / "config.json").read_text())["algorithm"] == "rs-ws"


def test_metrics_on_known_orders():
    assert rank_correlations([1, 2, 3, 4], [10, 20, 30, 40]) == {"kendall_tau": 1.0, "spearman_rho": 1.0}
    assert rank_correlations([1, 2, 3, 4], [40, 30, 20, 10]) == {"kendall_tau": -1.0, "spearman_rho": -1.0}
    assert rank_correlations([1, 1, 1], [1, 2, 3]) == {"kendall_tau": None, "spearman_rho": None}
    top = top_k([50.0, 70.0, 60.0, 70.0], [1.0, 2.0, 4.0, 3.0], 2)
    assert top["indices"] == [1, 3] and top["best_truth"] == 3.0 and top["percentile"] == 75.0


def test_synthetic_truth_from_the_shared_weights_gives_tau_one(ranked, tmp_path, capsys, monkeypatch):
    """A table whose accuracies are the supernet's own shared-weight accuracies: tau = rho = 1, the
    shared-weight top-1 is the best architecture. Once as a CSV, once through the (patched) API."""
    rows = json.loads((ranked / "shared.json").read_text())
    assert len({r["shared_acc"] for r in rows}) > 1, "the tiny supernet must tell some cells apart"
    csv = tmp_path / "self.csv"
    csv.write_text("arch,shared\n" + "".join(f"{r['arch']},{r['shared_acc']}\n" for r in rows))
    args = ["--from", str(ranked / "supernet"), "--count", "5", "--bn-batches", "2", "--limit-batches", "2"]
    rc, stdout, err = run_cli([*args, "--nb201-table", str(csv), "--out", str(tmp_path / "csv")], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "csv" / "result.json").read_text())
    assert result["kendall_tau"] == pytest.approx(1.0) and result["spearman_rho"] == pytest.approx(1.0)
    assert result["top1"]["percentile"] == 100.0 and result["top1"]["truth"] == max(r["shared_acc"] for r in rows)
    assert "Kendall tau 1.000" in stdout and not (tmp_path / "csv" / "supernet").exists()

    shared = {r["arch"]: r["shared_acc"] for r in rows}

    class API:  # NASBench201API's query_index_by_arch / get_more_info, over the five cells
        def __init__(self, path, verbose):
            self.archs = list(shared)

        def query_index_by_arch(self, arch):
            return self.archs.index(arch) if arch in self.archs else -1

        def get_more_info(self, index, dataset, hp, is_random):
            acc = shared[self.archs[index]]
            return {"test-accuracy": acc if dataset == "cifar100" else -acc}

    pth = tmp_path / "NAS-Bench-201-v1_1-096897.pth"
    pth.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "nas_201_api", types.SimpleNamespace(NASBench201API=API))
    # the benchmark holds every cell: the draw (same seed) is the five cells of the run the API was built from
    out = tmp_path / "api"
    rc, _, err = run_cli(
        [*args, "--nb201-table", str(pth), "--table-column", "cifar100_test_acc", "--out", str(out)], capsys
    )
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    known = [r for r in result["rows"] if r["truth"] is not None]
    assert all(r["truth"] == shared[r["arch"]] for r in known)
    assert result["truth"] == f"cifar100_test_acc of {pth}"


def test_stop_and_resume(ranked, tmp_path, capsys):
    """Stopped after each epoch and resumed with --resume alone: the same numbers as the uninterrupted run."""
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["--out", str(out), *TINY_RANK, "--stop-after", "1"], capsys)
    assert rc == 0, err
    assert "continue with --resume" in stdout and not (out / "result.json").exists()
    _expect_error(["--out", str(out), "--resume", "--count", "6"], capsys, "from another run: count = 5 there, 6 here")
    for _ in range(20):
        rc, stdout, err = run_cli(["--out", str(out), "--resume", "--stop-after", "1"], capsys)
        assert rc == 0, err
        if (out / "result.json").exists():
            break
    a = json.loads((ranked / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert [(r["arch"], r["shared_acc"], r["truth"]) for r in a["rows"]] == [
        (r["arch"], r["shared_acc"], r["truth"]) for r in b["rows"]
    ]
    assert a["kendall_tau"] == b["kendall_tau"]


def test_bad_input(ranked, tmp_path, capsys):
    out = str(tmp_path / "run")
    _expect_error(["--out", out, "--algorithm", "enas"], capsys, "unknown algorithm 'enas'")
    _expect_error(["--out", out, "--count", "1"], capsys, "--count must be at least 2")
    _expect_error(["--out", out, "--space", "darts", "--algorithm", "pc-darts"], capsys, "partial channels")
    _expect_error(["--out", out, "--table-column", "x"], capsys, "--table-column needs --nb201-table")
    _expect_error(["--out", out, "--space", "darts", "--nb201-table", "t.csv"], capsys, "needs --space nb201")
    _expect_error(["--out", out, "--from", str(tmp_path)], capsys, "no config.json there")
    _expect_error(["--out", out, "--resume"], capsys, "nothing to resume: ")
    _expect_error(["--out", out, "--dataset", "cifar10"], capsys, "cifar10 needs --data-dir")
    csv = tmp_path / "t.csv"
    csv.write_text("arch,acc\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,10\n")
    _expect_error(["--out", out, "--nb201-table", str(csv), "--table-column", "top1"], capsys, "not a column")
    _expect_error(
        ["--out", out, "--nb201-table", str(csv), "--from", str(ranked / "supernet")], capsys, "exceeds the 1"
    )
    assert not os.path.exists(os.path.join(out, "result.json"))
    _expect_error(["--out", str(ranked), *TINY_RANK], capsys, "already holds a ranking run", watched=str(ranked))
