"""NAS-Bench-201 accuracy tables: the CSV format, what is skipped and reported, the benchmark APIs (patched)."""

from __future__ import annotations

import sys
import types

import pytest

from fastnas.runs import RunError
from fastnas.runs.tables import API_COLUMNS, CSV_FORMAT, load_nb201_table

A = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
B = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
C = "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|none~0|none~1|nor_conv_1x1~2|"


def _csv(tmp_path, text: str) -> str:
    path = tmp_path / "t.csv"
    path.write_text(text)
    return str(path)


def test_arch_column_anywhere_and_spelling_free(tmp_path):
    table = load_nb201_table(_csv(tmp_path, f"params,arch,acc\n1.5,{A},93.5\n\n0.1, {B} ,10\n"))
    assert table.columns == ("params", "acc")
    assert table.lookup(A) == {"params": 1.5, "acc": 93.5}
    assert table.lookup(B) == {"params": 0.1, "acc": 10.0}  # spaces around the string do not matter
    assert table.lookup(C) is None and table.lookup("not an arch") is None
    assert table.report is None


def test_skipped_rows_and_duplicates_are_reported_in_one_line(tmp_path):
    text = f"arch,acc\n{A},93\n|conv_9x9~0|+|none~0|none~1|+|none~0|none~1|none~2|,50\n{A},80\n{B},10\nhello,1\n"
    table = load_nb201_table(_csv(tmp_path, text))
    assert table.lookup(A) == {"acc": 93.0}  # the first row of a repeated architecture
    assert table.lookup(B) == {"acc": 10.0}
    assert "\n" not in table.report
    assert "2 architectures" in table.report
    assert "skipped 2 rows that are not NAS-Bench-201 architectures (lines 3, 6)" in table.report
    assert "1 repeated architectures kept their first row (line 4)" in table.report


@pytest.mark.parametrize(
    "text,needle",
    [
        (f"{A},93\n{B},10\n", "has no header row (line 1 holds an architecture)"),
        ("name,acc\nx,1\n", "has no 'arch' column (header: name,acc)"),
        (f"arch\n{A}\n", "no column besides 'arch'"),
        (f"arch,acc,acc\n{A},1,2\n", "names a column twice"),
        (f"arch,acc\n{A},93,1\n", "line 2: 3 fields, the header has 2"),
        (f"arch,acc\n{A},\n", "line 2: acc '' is not a number"),
        ("arch,acc\nhello,1\n", "holds no NAS-Bench-201 architecture"),
        ("\n\n", "is empty"),
    ],
)
def test_malformed_csv(tmp_path, text, needle):
    with pytest.raises(RunError, match="--nb201-table") as e:
        load_nb201_table(_csv(tmp_path, text))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_package(tmp_path, monkeypatch):
    with pytest.raises(RunError, match="does not exist"):
        load_nb201_table(str(tmp_path / "none.csv"))
    pth = tmp_path / "NAS-Bench-201-v1_1-096897.pth"
    pth.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "nas_201_api", None)  # import fails
    with pytest.raises(RunError, match="needs the nas_201_api package"):
        load_nb201_table(str(pth))
    nats = tmp_path / "NATS-tss-v1_0-3ffb9-simple"
    nats.mkdir()
    monkeypatch.setitem(sys.modules, "nats_bench", None)
    with pytest.raises(RunError, match="needs the nats_bench package"):
        load_nb201_table(str(nats))


class _FakeAPI:
    """The part of NASBench201API / NATS-Bench's topology API the table uses, with three cells."""

    archs = [A, B, C]
    made: list[tuple] = []

    def __init__(self, path, *args, **kwargs):
        _FakeAPI.made.append((path, args, kwargs))

    def query_index_by_arch(self, arch):
        return self.archs.index(arch) if arch in self.archs else -1

    def get_more_info(self, index, dataset, iepoch=None, hp="12", is_random=True):
        assert hp == "200" and is_random is False
        base = {"cifar10": 90.0, "cifar100": 70.0, "ImageNet16-120": 40.0}[dataset]
        return {"test-accuracy": base + index, "train-loss": 0.1}


def test_official_files_through_the_patched_apis(tmp_path, monkeypatch):
    pth = tmp_path / "NAS-Bench-201-v1_0-e61699.pth"
    pth.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "nas_201_api", types.SimpleNamespace(NASBench201API=_FakeAPI))
    table = load_nb201_table(str(pth))
    assert table.columns == API_COLUMNS
    assert table.lookup(C) == {"cifar10_test_acc": 92.0, "cifar100_test_acc": 72.0, "ImageNet16-120_test_acc": 42.0}
    assert table.lookup("|skip_connect~0|+|none~0|none~1|+|none~0|none~1|none~2|") is None
    assert _FakeAPI.made[-1] == (str(pth), (), {"verbose": False})

    nats = tmp_path / "NATS-tss-v1_0-3ffb9-simple"
    nats.mkdir()
    create = lambda path, space, fast_mode, verbose: _FakeAPI(path, space, fast_mode=fast_mode, verbose=verbose)
    monkeypatch.setitem(sys.modules, "nats_bench", types.SimpleNamespace(create=create))
    table = load_nb201_table(str(nats))
    assert table.lookup(A)["cifar10_test_acc"] == 90.0
    assert _FakeAPI.made[-1] == (str(nats), ("tss",), {"fast_mode": True, "verbose": False})


def test_api_that_cannot_read_the_file(tmp_path, monkeypatch):
    def broken(path, verbose):
        raise EOFError("Ran out of input")

    pth = tmp_path / "NAS-Bench-201-v1_0-e61699.pth"
    pth.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "nas_201_api", types.SimpleNamespace(NASBench201API=broken))
    with pytest.raises(RunError, match="nas_201_api cannot read it \\(EOFError: Ran out of input\\)"):
        load_nb201_table(str(pth))


def test_one_format_in_help(capsys):
    from fastnas.search.cli import main

    assert main(["--help"]) == 0
    assert " ".join(CSV_FORMAT.split()) in " ".join(capsys.readouterr().out.split())
