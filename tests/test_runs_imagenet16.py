"""ImageNet16-120/150/200 read from pickles written here in the release's format: the same images,
labels and order as xautodl's ``ImageNet16``, the classes kept, corrupt files, NAS-Bench-201's search
split, and the class-balanced subsets of PC-DARTS's ImageNet search."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from imagenet_helpers import TRAIN_FILES, write_imagenet16

from fastnas.runs import data


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_imagenet16(str(tmp_path_factory.mktemp("imagenet16") / "ImageNet16"))


def _raw(folder: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            parts.append(pickle.load(f, encoding="latin1"))
    return np.vstack([p["data"] for p in parts]), np.concatenate([p["labels"] for p in parts])


@pytest.mark.parametrize("classes", [120, 150, 200])
def test_same_images_labels_and_order_as_xautodl(folder, classes):
    """fastnas's tensors against xautodl's ImageNet16 (its md5 check skipped: the sums are the real files')."""
    downsampled = pytest.importorskip("xautodl.datasets.DownsampledImageNet", reason="xautodl is not installed")
    reference = downsampled.ImageNet16
    loaded = data.load_dataset(f"imagenet16-{classes}", folder)
    assert loaded.num_classes == classes and loaded.x_train.dtype == torch.uint8
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "_check_integrity", lambda self: True)
        for train, x, y in ((True, loaded.x_train, loaded.y_train), (False, loaded.x_test, loaded.y_test)):
            ref = reference(folder, train, None, classes)
            assert len(ref) == len(y) > 0
            images = np.stack([np.asarray(ref[i][0]) for i in range(len(ref))])  # PIL images, HWC
            labels = [ref[i][1] for i in range(len(ref))]
            assert np.array_equal(images, x.permute(0, 2, 3, 1).numpy())
            assert labels == y.tolist()


def test_labels_above_the_classes_are_dropped(folder):
    """Of labels 1..1000 only 1..K stay, shifted to 0..K-1, in file order; the parent folder works too."""
    x_raw, y_raw = _raw(folder, TRAIN_FILES)
    for classes in (120, 200):
        loaded = data.load_dataset(f"imagenet16-{classes}", os.path.dirname(folder))  # the parent of ImageNet16/
        keep = y_raw <= classes
        assert 0 < keep.sum() < len(y_raw)  # the synthetic labels include 121 and 999
        assert loaded.y_train.tolist() == (y_raw[keep] - 1).tolist()
        assert torch.equal(loaded.x_train, torch.from_numpy(x_raw[keep].reshape(-1, 3, 16, 16)))
        assert loaded.y_train.max() < classes and loaded.y_train.min() >= 0


def test_normalisation_and_augmentation_are_xautodl_s(folder):
    loaded = data.load_dataset("imagenet16-120", folder)
    assert loaded.scale == 255.0 and loaded.augment and loaded.crop_padding == 2
    assert loaded.mean == pytest.approx([122.68 / 255, 116.66 / 255, 104.01 / 255], abs=0)
    assert loaded.std == pytest.approx([63.22 / 255, 61.26 / 255, 65.09 / 255], abs=0)
    x = loaded.x_train[:64]
    out = data.augment_batch(x, torch.Generator().manual_seed(0), pad=loaded.crop_padding)
    assert out.shape == x.shape
    # every output is a crop of the 2-pixel padded image, possibly flipped: its centre 12x12 lies in the input
    for a, b in zip(x, out):
        padded = torch.nn.functional.pad(a, (2, 2, 2, 2))
        crops = [padded[:, i : i + 16, j : j + 16] for i in range(5) for j in range(5)]
        assert any(torch.equal(b, c) or torch.equal(b, c.flip(-1)) for c in crops)


def test_missing_truncated_and_corrupt_files(folder, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken)
    with pytest.raises(data.DataError, match="needs --data-dir"):
        data.load_dataset("imagenet16-120")
    with pytest.raises(data.DataError, match="no imagenet16-120 data in .*train_data_batch_1"):
        data.load_dataset("imagenet16-120", str(tmp_path))
    path = os.path.join(broken, "train_data_batch_7")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])  # truncated
    with pytest.raises(data.DataError, match=f"^corrupt data file {path}: ") as e:
        data.load_dataset("imagenet16-120", broken)
    assert "\n" not in str(e.value)
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((3, 3072), np.uint8), "labels": [1, 2, 3]}, f)  # CIFAR-sized rows
    with pytest.raises(data.DataError, match=r"'data' must be uint8 \[N, 768\]"):
        data.load_dataset("imagenet16-120", broken)
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 768), np.uint8), "labels": [0, 5]}, f)  # labels start at 1
    with pytest.raises(data.DataError, match=r"labels must lie in \[1, 1001\)"):
        data.load_dataset("imagenet16-120", broken)
    os.remove(path)
    with pytest.raises(data.DataError, match=f"missing data file {path}"):
        data.load_dataset("imagenet16-120", broken)


def test_search_split_is_nas_bench_201_s(folder, tmp_path):
    """Bilevel: weights on the whole training set, the architecture on x-valid (the split file's when it
    lies beside the pickles, else a fixed half), tests on x-test; ERM: the training set alone."""
    loaded = data.load_dataset("imagenet16-120", folder)
    n, n_test = len(loaded.y_train), len(loaded.y_test)
    assert len(loaded.valid_split) == n_test // 2
    assert torch.equal(loaded.valid_split, data.load_dataset("imagenet16-120", folder).valid_split)  # fixed
    merged, w_idx, a_idx = data.search_split(loaded, "bilevel", train_portion=0.3)  # the portion does not apply
    assert torch.equal(w_idx, torch.arange(n)) and torch.equal(a_idx, torch.arange(n, n + n_test // 2))
    arch = torch.zeros(n_test, dtype=torch.bool)
    arch[loaded.valid_split] = True
    assert torch.equal(merged.x_train[a_idx], loaded.x_test[arch]) and torch.equal(merged.y_train[:n], loaded.y_train)
    assert torch.equal(merged.x_test, loaded.x_test[~arch]) and torch.equal(merged.y_test, loaded.y_test[~arch])
    same, w_erm, a_erm = data.search_split(loaded, "erm")
    assert same is loaded and torch.equal(w_erm, a_erm) and len(w_erm) == n

    # NAS-Bench-201's file (configs/nas-benchmark/imagenet-16-120-test-split.txt): xautodl's config format
    xvalid = [1, 4, 5, 9, 20]
    split = tmp_path / "imagenet-16-120-test-split.txt"
    split.write_text(json.dumps({"xvalid": ["int", [str(i) for i in xvalid]], "xtest": ["int", ["0"]]}))
    import shutil

    shutil.copytree(folder, tmp_path / "ImageNet16")
    assert data.load_dataset("imagenet16-120", str(tmp_path)).valid_split.tolist() == xvalid
    assert data.load_dataset("imagenet16-200", str(tmp_path)).valid_split.tolist() != xvalid  # 120 classes only
    split.write_text(json.dumps({"xvalid": ["int", ["3", "3"]]}))
    with pytest.raises(data.DataError, match="corrupt split file .*distinct indices"):
        data.load_dataset("imagenet16-120", str(tmp_path))
    split.write_text("{")
    with pytest.raises(data.DataError, match="corrupt split file"):
        data.load_dataset("imagenet16-120", str(tmp_path))


def test_class_balanced_subsets():
    labels = torch.tensor([0] * 40 + [1] * 80 + [2] * 20 + [3] * 4)[torch.randperm(144, generator=torch.Generator())]
    w, a = data.class_balanced_subsets(labels, (0.1, 0.25), seed=3)
    assert not set(w.tolist()) & set(a.tolist())
    assert torch.bincount(labels[w], minlength=4).tolist() == [4, 8, 2, 0]
    assert torch.bincount(labels[a], minlength=4).tolist() == [10, 20, 5, 1]
    again = data.class_balanced_subsets(labels, (0.1, 0.25), seed=3)
    assert torch.equal(again[0], w) and torch.equal(again[1], a)  # deterministic for a seed
    other = data.class_balanced_subsets(labels, (0.1, 0.25), seed=4)
    assert not torch.equal(other[0], w)
    d = data.ImageData("x", torch.zeros(144, 1, 2, 2, dtype=torch.uint8), labels, labels[:1], labels[:1], 4, 1.0,
                       (0.0,), (1.0,), False)  # fmt: skip
    _, w2, a2 = data.search_split(d, "bilevel", subset=(0.1, 0.25), seed=3)
    assert torch.equal(w2, w) and torch.equal(a2, a)
