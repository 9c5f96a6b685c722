"""ImageNet from an image folder (JPEGs written here with PIL): the folder read as torchvision's
ImageFolder reads it, streamed batches that depend neither on the workers nor on the rank's share,
``fastnas train`` / ``search`` on it end to end with resume, and its one-line errors."""

from __future__ import annotations

import builtins
import json
import os
import shutil

import pytest
import torch
from imagenet_helpers import write_image_folder
from search_helpers import assert_same_state, expect_one_line_error, load_checkpoint
from train_helpers import DARTS_ARCH, NB201_ARCH

from fastnas.__main__ import main as fastnas_main
from fastnas.runs import data
from fastnas.runs.batches import Normalizer, epoch_batches, eval_batches
from fastnas.runs.config import RunError
from fastnas.runs.imagefolder import LoaderOptions, parse_color_jitter

pytest.importorskip("torchvision", reason="the image-folder pipeline needs torchvision (fastnas[imagenet])")

# a 32x32 crop reaches NetworkImageNet's cells at 4x4; every run a few steps of a 4-channel network
TINY = ["--crop-size", "32", "--channels", "4", "--cells", "3", "--batch-size", "4", "--limit-batches", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_image_folder(str(tmp_path_factory.mktemp("imagenet") / "imagenet"))


def _load(folder: str, workers: int = 0, **options) -> data.ImageData:
    return data.load_dataset("imagenet", folder, options=LoaderOptions(crop_size=32, workers=workers, **options))


def test_the_folder_reads_as_torchvision_s_image_folder(folder):
    from torchvision.datasets import ImageFolder

    d = _load(folder)
    for split, labels, images in (("train", d.y_train, d.x_train), ("val", d.y_test, d.x_test)):
        reference = ImageFolder(os.path.join(folder, split))
        assert [os.path.relpath(p, images.root) for p, _ in reference.samples] == [f.decode() for f in images.files]
        assert labels.tolist() == [label for _, label in reference.samples]
    assert d.classes == tuple(reference.classes) and d.num_classes == 3 and d.in_channels == 3
    assert d.x_train.shape == (18, 3, 32, 32) and d.mean == (0.485, 0.456, 0.406) and d.augment
    assert d.to(torch.device("cpu")).x_train is d.x_train  # streamed: no copy to the device


def _epoch(d, workers: int, rank: int = 0, world: int = 1, gen_seed: int | None = 5, steps: int = 3):
    d = _load(d, workers) if isinstance(d, str) else d
    order = data.epoch_order(torch.arange(len(d.y_train)), 0, 0, stream=0)
    gen = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
    batches = epoch_batches(d, order, steps, 6, Normalizer(d, torch.device("cpu")), gen, rank=rank, world=world)
    return [batches[i][0] for i in range(len(batches))], order


def test_streamed_batches_depend_on_neither_workers_nor_ranks(folder):
    """The same seeds give the same augmented batches with 0 or 2 workers; the two ranks of a world of 2
    get the halves of the one-process batches; the labels follow the epoch's order."""
    one, order = _epoch(folder, workers=0)
    assert len(one) == 3 and one[0][0].shape == (6, 3, 32, 32) and one[0][0].dtype == torch.float32
    labels = _load(folder).y_train
    assert [y.tolist() for _, y in one] == [labels[order[i * 6 : (i + 1) * 6]].tolist() for i in range(3)]
    two, _ = _epoch(folder, workers=2)
    for (x1, y1), (x2, y2) in zip(one, two):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for rank in (0, 1):
        half, _ = _epoch(folder, workers=1, rank=rank, world=2)
        for (x1, y1), (xr, yr) in zip(one, half):
            assert torch.equal(x1[rank * 3 : (rank + 1) * 3], xr) and torch.equal(y1[rank * 3 : (rank + 1) * 3], yr)
    other, _ = _epoch(folder, workers=0, gen_seed=6)
    assert not torch.equal(one[0][0], other[0][0])  # other seeds, other crops
    plain, _ = _epoch(folder, workers=0, gen_seed=None)  # no generator: the evaluation transform
    again, _ = _epoch(folder, workers=0, gen_seed=None)
    assert torch.equal(plain[0][0], again[0][0]) and not torch.equal(plain[0][0], one[0][0])


def test_torch_s_generator_is_left_alone_and_batches_come_in_order(folder):
    d = _load(folder, workers=0, color_jitter=parse_color_jitter("0.4,0.4,0.4,0.2"))
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    order = torch.arange(len(d.y_train))
    batches = epoch_batches(d, order, 2, 6, Normalizer(d, torch.device("cpu")), torch.Generator().manual_seed(0))
    batches[0]
    assert torch.equal(torch.rand(3), expected)  # decoding in the main process drew nothing from it
    with pytest.raises(IndexError, match="read in order"):
        batches[0]
    with pytest.raises(IndexError, match="batch 2 of an epoch of 2"):
        batches[2]


def test_evaluation_batches(folder):
    d = _load(folder, workers=1)
    normalize = Normalizer(d, torch.device("cpu"))
    idx = torch.arange(1, 9, 2)
    parts = list(eval_batches(d.x_test, d.y_test, idx, normalize, chunk=3))
    assert [len(y) for _, y in parts] == [3, 1] and torch.cat([y for _, y in parts]).tolist() == d.y_test[idx].tolist()
    from torchvision.io import decode_image
    from torchvision.transforms import v2

    path = os.path.join(d.x_test.root, d.x_test.files[3].decode())
    expected = v2.CenterCrop(32)(v2.Resize(32 * 8 // 7, antialias=True)(decode_image(path, mode="RGB")))
    assert torch.equal(parts[0][0][1], normalize(expected[None])[0])  # Resize(crop * 8 / 7), CenterCrop(crop)


def test_loader_options_and_colour_jitter():
    class Cfg:
        crop_size, color_jitter, loader_workers = 64, "0.4,0.4,0.4,0.2", 3

    assert LoaderOptions.of(Cfg()) == LoaderOptions(64, (0.4, 0.4, 0.4, 0.2), 3)
    assert LoaderOptions.of(object()) == LoaderOptions() and LoaderOptions().eval_resize == 256
    assert parse_color_jitter("0") is None and parse_color_jitter("0,0,0,0") is None
    for bad in ("0.4,0.4", "a,b,c,d", "0.4,0.4,0.4,0.6", "-1,0,0,0"):
        with pytest.raises(ValueError, match="--color-jitter"):
            parse_color_jitter(bad)


def test_bad_folders_and_images(folder, tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="no folder .*train"):
        _load(str(tmp_path))
    (tmp_path / "empty" / "train" / "n01").mkdir(parents=True)
    with pytest.raises(data.DataError, match="no images in .*train: expected"):
        _load(str(tmp_path / "empty"))
    extra = tmp_path / "extra"
    shutil.copytree(folder, extra)
    (extra / "val" / "n99").mkdir()
    with pytest.raises(data.DataError, match="class folders the training folder lacks: n99"):
        _load(str(extra))
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    bad = broken / "train" / "n02" / "n02_0.JPEG"
    bad.write_bytes(b"not a JPEG at all")
    for workers in (0, 1):  # in the main process and in a worker: one line naming the file
        d = _load(str(broken), workers)
        batches = epoch_batches(d, torch.arange(18), 3, 6, Normalizer(d, torch.device("cpu")), None)
        batches[0]
        with pytest.raises(RunError, match=f"^unreadable image {bad}: ") as e:
            batches[1]
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(data.DataError, match=r"needs torchvision \(pip install torchvision"):
        _load(folder)


def test_train_two_batches_and_resume(folder, tmp_path, capsys):
    """``fastnas train --dataset imagenet --limit-batches 2``: NetworkImageNet, top-1 and top-5, and a
    run stopped after an epoch and resumed equal to the uninterrupted one, bit for bit."""
    args = [
        "--arch",
        DARTS_ARCH,
        "--dataset",
        "imagenet",
        "--data-dir",
        folder,
        *TINY,
        "--epochs",
        "2",
        "--no-progress",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert fastnas_main(["train", *args, "--loader-workers", "2", "--out", str(full)]) == 0
    stdout = capsys.readouterr().out
    assert "recipe darts-imagenet, imagenet" in stdout and "top-5 100.00%" in stdout  # 3 classes: top-5 holds all
    history = json.loads((full / "history.json").read_text())
    assert [h["lr"] for h in history] == [0.1, pytest.approx(0.1 * 0.97)]  # DARTS's ImageNet decay
    result = json.loads((full / "result.json").read_text())
    assert result["test_top5"] == 100.0 >= result["test_acc"] and result["dataset"] == "imagenet"
    config = json.loads((full / "config.json").read_text())
    assert (config["label_smoothing"], config["color_jitter"], config["crop_size"]) == (0.1, "0.4,0.4,0.4,0.2", 32)
    assert fastnas_main(["train", *args, "--loader-workers", "0", "--out", str(part), "--stop-after", "1"]) == 0
    assert fastnas_main(["train", "--out", str(part), "--resume", "--loader-workers", "1", "--no-progress"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert_same_state(load_checkpoint(str(full)), load_checkpoint(str(part)))


def test_search_with_class_balanced_subsets(folder, tmp_path, capsys):
    """PC-DARTS's direct ImageNet search: --subset, the supernet's ImageNet stem, an exported genotype."""
    out = tmp_path / "search"
    args = ["--space", "darts", "--algorithm", "pc-darts", "--dataset", "imagenet", "--data-dir", folder]
    rc = fastnas_main(["search", *args, *TINY, "--subset", "0.5,0.34", "--epochs", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "arch.txt").read_text().startswith("Genotype(")
    state = load_checkpoint(str(out))["model"]
    assert "stem0.0.weight" in state and "stem1.1.weight" in state and "stem.0.weight" not in state
    assert json.loads((out / "config.json").read_text())["subset"] == "0.5,0.34"


def test_one_line_errors(folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    train = ["--arch", DARTS_ARCH, "--dataset", "imagenet", "--out", out, *TINY]
    expect_one_line_error("train", [*train, "--data-dir", str(tmp_path)], capsys, "no folder")
    (tmp_path / "empty" / "train" / "n01").mkdir(parents=True)
    expect_one_line_error("train", [*train, "--data-dir", str(tmp_path / "empty")], capsys, "no images in")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for f in (broken / "train").rglob("*.JPEG"):
        f.write_bytes(b"\xff\xd8 truncated")
    expect_one_line_error(
        "train", [*train, "--data-dir", str(broken), "--loader-workers", "1"], capsys, "unreadable image"
    )
    shutil.rmtree(out, ignore_errors=True)  # a run that fails before its first checkpoint may leave nothing
    with_data = [*train, "--data-dir", folder]
    expect_one_line_error("train", [*with_data, "--cutout", "16"], capsys, "--cutout applies to the in-memory")
    expect_one_line_error("train", [*with_data, "--color-jitter", "1,2"], capsys, "--color-jitter must be four")
    expect_one_line_error("train", [*with_data, "--lr-decay", "0.9", "--lr-schedule", "linear"], capsys, "--lr-decay")
    expect_one_line_error(
        "train", ["--arch", NB201_ARCH, "--dataset", "imagenet", "--data-dir", folder], capsys, "NetworkImageNet"
    )
    expect_one_line_error("train", ["--arch", DARTS_ARCH, "--crop-size", "32"], capsys, "--crop-size applies to")
    search = ["--dataset", "imagenet", "--data-dir", folder, "--out", out]
    expect_one_line_error("search", search, capsys, "--dataset imagenet needs --space darts")
    expect_one_line_error("search", [*search, "--space", "darts", "--subset", "0.9,0.2"], capsys, "--subset must be")
    expect_one_line_error(
        "search", [*search, "--space", "darts", "--subset", "0.1,0.1", "--mode", "erm"], capsys, "--mode bilevel"
    )
    expect_one_line_error("search", ["--crop-size", "32", "--out", out], capsys, "--crop-size applies to")
    expect_one_line_error("rank", search, capsys, "an image folder (imagenet) is streamed")
