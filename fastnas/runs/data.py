"""Data sets of the runs, held in memory as tensors, and their seeded batching.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, shipped
  with scikit-learn, no download), split once and for all into 1,497 training and 300 test images.
* ``distorted-digits`` (the default): the same digits, each drawn once at 16x16 with a random
  rotation, scale, shift and noise, split into 500 training and 1,297 test images.
* ``cifar10`` / ``cifar100``: the standard python-pickle releases read from a local directory
  (``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``; ``cifar-100-python/`` with
  ``train`` and ``test``), given either as that folder or as its parent. Training batches get the
  usual augmentation: 4-pixel zero-padded random crop and horizontal flip.
* ``imagenet16-120`` / ``imagenet16-150`` / ``imagenet16-200``: NAS-Bench-201's downsampled ImageNet
  (16x16), read from the pickles as xautodl's ``ImageNet16`` reads them: ``train_data_batch_1..10``
  and ``val_data`` (each a dict pickled with ``data``, uint8 ``[N, 768]`` in planar channels, and
  ``labels`` 1..1000), the images of labels 1..K kept in file order, labels shifted to 0..K-1;
  2-pixel padded random crop and flip. A bilevel search steps the weights on the training set and
  the architecture on half the validation images (NAS-Bench-201's ``x-valid``), testing on the
  other half (:func:`search_split`).
* ``imagenet``: an image folder, streamed rather than held in memory (:mod:`fastnas.runs.imagefolder`).

Every batch is drawn from generators seeded by ``(seed, epoch)``, so that an epoch's order and
augmentation do not depend on what ran before it: a resumed run sees the very same batches, and
the ranks of a distributed run agree on the global batch and each take their slice of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastnas.runs.image_data import DataError, ImageData

IMAGENET16 = ("imagenet16-120", "imagenet16-150", "imagenet16-200")
DATASETS = ("distorted-digits", "digits", "cifar10", "cifar100", *IMAGENET16, "imagenet")
EMBEDDED = ("distorted-digits", "digits")  # shipped inside an installed package: no --data-dir, no download


def is_embedded(name: str) -> bool:
    """Whether data set ``name`` ships inside an installed package (tiny, no --data-dir)."""
    return name in EMBEDDED


def load_dataset(name: str, data_dir: str | None = None, options: Any = None) -> ImageData:
    """Load ``name`` (one of :data:`DATASETS`); all but the embedded ones need ``data_dir``. ``options``:
    the run's settings, read by the image-folder loader only
    (:class:`~fastnas.runs.imagefolder.LoaderOptions`). Raises :class:`DataError`."""
    if name in EMBEDDED:
        if data_dir is not None:
            raise DataError(f"the {name} data set is built from scikit-learn's digits: it takes no --data-dir")
        return _load_digits() if name == "digits" else _load_distorted_digits()
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        what = {"imagenet": "train/ and val/ image folders"}.get(name, "the python-pickle release")
        raise DataError(f"{name} needs --data-dir (a folder holding {what})")
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is not a directory")
    if name in IMAGENET16:
        return _load_imagenet16(name, data_dir)
    if name == "imagenet":
        from fastnas.runs import imagefolder  # imports torchvision, an optional dependency

        return imagefolder.load_image_folder(data_dir, imagefolder.LoaderOptions.of(options))
    return _load_cifar(name, data_dir)


def _digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 digits as uint8 ``[N, 1, 8, 8]`` (values 0..16) in one fixed shuffled order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))  # one fixed split
    return x[perm], y[perm]


def _split(name: str, x: Tensor, y: Tensor, n_train: int, scale: float, classes: int) -> ImageData:
    """The first ``n_train`` images for training, the rest for testing, normalised by the training
    images. Their mean and standard deviation come from exact integer sums of the pixels, the same
    for any thread count (a float reduction's rounding depends on how the threads split it)."""
    pixels = x[:n_train].to(torch.int64)
    n, total, squares = pixels.numel(), int(pixels.sum()), int((pixels * pixels).sum())
    variance = (n * squares - total * total) / (n * (n - 1))  # unbiased, from exact integers
    return ImageData(
        name,
        x[:n_train].contiguous(),
        y[:n_train].contiguous(),
        x[n_train:].contiguous(),
        y[n_train:].contiguous(),
        num_classes=classes,
        scale=scale,
        mean=(total / n / scale,),
        std=(math.sqrt(variance) / scale,),
        augment=False,
    )


def _load_digits() -> ImageData:
    x, y = _digits()
    return _split("digits", x, y, len(y) - 300, 16.0, 10)


# distorted-digits: each digit drawn once, for good, at 16x16 with a random rotation, scale and shift
# and Gaussian noise; few training images (where cells differ most), many test images (a steady
# accuracy to rank by)
DISTORTED = dict(size=16, degrees=30.0, scale=0.2, shift=0.2, noise=0.3, n_train=500, seed=0)


def _load_distorted_digits() -> ImageData:
    x, y = _digits()
    d = DISTORTED
    gen = torch.Generator().manual_seed(d["seed"])
    n = len(y)
    img = F.interpolate(x.float() / 16.0, size=(d["size"], d["size"]), mode="bilinear", align_corners=False)
    angle = (2 * torch.rand(n, generator=gen) - 1) * math.radians(d["degrees"])
    zoom = 1 + (2 * torch.rand(n, generator=gen) - 1) * d["scale"]
    shift = (2 * torch.rand(n, 2, generator=gen) - 1) * d["shift"]
    theta = torch.stack(
        [
            torch.stack([angle.cos() / zoom, -angle.sin() / zoom, shift[:, 0]], -1),
            torch.stack([angle.sin() / zoom, angle.cos() / zoom, shift[:, 1]], -1),
        ],
        1,
    )  # [N, 2, 3]: output pixel -> input pixel, in [-1, 1] coordinates
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, align_corners=False, padding_mode="zeros")
    img = img + d["noise"] * torch.randn(img.shape, generator=gen)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return _split("distorted-digits", x, y, d["n_train"], 255.0, 10)


_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key="labels",
        classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        label_key="fine_labels",
        classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _read_batch(
    path: str, label_key: str, labels: range, size: int, encoding: str = "bytes"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``data`` (uint8 ``[N, 3 * size * size]``) and labels (int64, each in ``labels``) of one
    pickled batch; DataError naming ``path`` when it is missing, truncated or malformed."""
    if not os.path.isfile(path):
        raise DataError(f"missing data file {path}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding=encoding)
    except Exception as e:  # any unpickling failure (EOFError for a truncated file) means a corrupt file
        raise DataError(f"corrupt data file {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(d, dict):
        raise DataError(f"corrupt data file {path}: expected a pickled dict, got {type(d).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise DataError(f"corrupt data file {path}: it lacks the 'data' and '{label_key}' entries")
    data = np.asarray(d["data"])
    y = np.asarray(d[label_key])
    pixels = 3 * size * size
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DataError(f"corrupt data file {path}: 'data' must be uint8 [N, {pixels}], got {data.dtype} {data.shape}")
    if y.ndim != 1 or len(y) != len(data):
        raise DataError(f"corrupt data file {path}: {len(y)} labels for {len(data)} images")
    if len(y) and (y.min() < labels.start or y.max() >= labels.stop):
        raise DataError(
            f"corrupt data file {path}: labels must lie in [{labels.start}, {labels.stop}), got {y.min()}..{y.max()}"
        )
    return data, y.astype(np.int64)


def _read_batches(root: str, files: list[str], label_key: str, labels: range, size: int, **kw) -> tuple[Tensor, Tensor]:
    """The batches ``files`` of ``root``, concatenated in order: uint8 ``[N, 3, size, size]``, int64 ``[N]``."""
    parts = [_read_batch(os.path.join(root, f), label_key, labels, size, **kw) for f in files]
    x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, size, size)
    return torch.from_numpy(x), torch.from_numpy(np.concatenate([p[1] for p in parts]))


def _data_folder(data_dir: str, folder: str, first_file: str, name: str, release: str) -> str:
    """``data_dir`` or its subfolder ``folder``, whichever holds ``first_file``."""
    root = os.path.join(data_dir, folder)
    if not os.path.isdir(root):
        root = data_dir
    if not os.path.isfile(os.path.join(root, first_file)):
        raise DataError(f"no {name} data in {data_dir}: expected {folder}/{first_file} ({release})")
    return root


def _load_cifar(name: str, data_dir: str) -> ImageData:
    spec = _CIFAR[name]
    root = _data_folder(data_dir, spec["folder"], spec["train"][0], name, "the python-pickle release")
    read = lambda files: _read_batches(root, files, spec["label_key"], range(spec["classes"]), 32)
    x_train, y_train = read(spec["train"])
    x_test, y_test = read(spec["test"])
    if len(y_train) == 0:
        raise DataError(f"no training images in {root}")
    return ImageData(
        name, x_train, y_train, x_test, y_test, spec["classes"], 255.0, spec["mean"], spec["std"], augment=True
    )


# NAS-Bench-201's downsampled ImageNet: the files and normalisation of xautodl's ImageNet16
_IMAGENET16 = dict(
    folder="ImageNet16",
    train=[f"train_data_batch_{i}" for i in range(1, 11)],
    test=["val_data"],
    mean=tuple(v / 255 for v in (122.68, 116.66, 104.01)),
    std=tuple(v / 255 for v in (63.22, 61.26, 65.09)),
    split_file="imagenet-16-120-test-split.txt",  # NAS-Bench-201's x-valid / x-test halves of the 120 classes
)


def _load_imagenet16(name: str, data_dir: str) -> ImageData:
    spec = _IMAGENET16
    classes = int(name.rsplit("-", 1)[1])
    root = _data_folder(data_dir, spec["folder"], spec["train"][0], name, "the downsampled-ImageNet 16x16 pickles")

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        x, y = [], []
        for f in files:  # one file at a time: the 1000-class files hold 8 times what is kept
            xf, yf = _read_batches(root, [f], "labels", range(1, 1001), 16, encoding="latin1")
            keep = yf <= classes
            x.append(xf[keep])
            y.append(yf[keep] - 1)
        return torch.cat(x), torch.cat(y)

    x_train, y_train = read(spec["train"])
    x_test, y_test = read(spec["test"])
    if len(y_train) == 0:
        raise DataError(f"no training images of labels 1..{classes} in {root}")
    split = _imagenet16_split(root, len(y_test)) if classes == 120 else None
    if split is None:  # no published split: a fixed random half, the same for every run
        split = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(0))[: len(y_test) // 2].sort()[0]
    return ImageData(
        name, x_train, y_train, x_test, y_test, classes, 255.0, spec["mean"], spec["std"], augment=True,
        crop_padding=2, valid_split=split,
    )  # fmt: skip


def _imagenet16_split(root: str, n_test: int) -> Tensor | None:
    """The ``xvalid`` indices of NAS-Bench-201's split file in ``root`` (or its parent), None without one."""
    for folder in (root, os.path.dirname(os.path.abspath(root))):
        path = os.path.join(folder, _IMAGENET16["split_file"])
        if os.path.isfile(path):
            break
    else:
        return None
    try:
        with open(path) as f:
            kind, values = json.load(f)["xvalid"]
        idx = torch.tensor([int(v) for v in values], dtype=torch.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"corrupt split file {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if kind != "int" or len(idx) == 0 or idx.min() < 0 or idx.max() >= n_test or len(idx.unique()) != len(idx):
        raise DataError(f"corrupt split file {path}: 'xvalid' must list distinct indices of the {n_test} test images")
    return idx.sort()[0]


# --------------------------------------------------------------------------- splits and batches


def search_split(
    data: ImageData, mode: str, train_portion: float = 0.5, subset: tuple[float, float] | None = None, seed: int = 0
) -> tuple[ImageData, Tensor, Tensor]:
    """The data of a search with the indices of its weight data and its architecture data in them.

    ``erm``: both are the whole training set. ``bilevel``: with ``subset = (w, a)``, class-balanced
    disjoint parts of the training set: a fraction ``w`` of every class for the weights and ``a``
    for the architecture, drawn for ``seed`` (PC-DARTS's ImageNet search: 0.1 and 0.025); else, when
    the data set has a ``valid_split`` (ImageNet16, as NAS-Bench-201 searches it), the whole
    training set for the weights and those test images for the architecture, the other test images
    testing (the returned data set holds them so); else the first ``train_portion`` of the training
    set for the weights and the rest for the architecture, as in DARTS.
    """
    if mode not in ("erm", "bilevel"):
        raise ValueError(f"mode must be 'erm' or 'bilevel', got {mode!r}")
    n = len(data.y_train)
    idx = torch.arange(n)
    if mode == "erm":
        return data, idx, idx
    if subset is not None:
        return data, *class_balanced_subsets(data.y_train, subset, seed)
    if data.valid_split is not None:
        arch = torch.zeros(len(data.y_test), dtype=torch.bool)
        arch[data.valid_split] = True
        merged = dataclasses.replace(
            data,
            x_train=torch.cat([data.x_train, data.x_test[arch]]),
            y_train=torch.cat([data.y_train, data.y_test[arch]]),
            x_test=data.x_test[~arch],
            y_test=data.y_test[~arch],
            valid_split=None,
        )
        return merged, idx, torch.arange(n, len(merged.y_train))
    split = int(round(n * train_portion))
    return data, idx[:split], idx[split:]


def class_balanced_subsets(labels: Tensor, fractions: tuple[float, float], seed: int) -> tuple[Tensor, Tensor]:
    """Two disjoint index sets of ``labels`` (CPU int64): of every class's ``n`` images, a random
    ``round(fractions[0] * n)`` in the first and the next ``round(fractions[1] * n)`` in the second,
    drawn from a generator of ``seed`` alone; each set sorted."""
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    by_class = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels).tolist()
    first, second = [], []
    start = 0
    for n in counts:
        members = by_class[start : start + n][torch.randperm(n, generator=gen)]
        k0, k1 = (int(math.floor(f * n + 0.5)) for f in fractions)
        first.append(members[:k0])
        second.append(members[k0 : k0 + k1])
        start += n
    return torch.cat(first).sort()[0], torch.cat(second).sort()[0]


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, stream) alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**63 - 1))


def epoch_order(indices: Tensor, seed: int, epoch: int, stream: int) -> Tensor:
    """``indices`` shuffled by the generator of (seed, epoch, stream)."""
    return indices[torch.randperm(len(indices), generator=epoch_generator(seed, epoch, stream))]


def augment_batch(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random ``pad``-pixel zero-padded crops and horizontal flips of uint8 images ``[B, C, H, W]``,
    the random draws taken from the CPU generator ``gen`` (so results do not depend on the device)."""
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)[:, None, None, :]  # [B, 1, 1, W]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def cutout(x: Tensor, length: int, gen: torch.Generator) -> Tensor:
    """Cutout (DeVries & Taylor, as DARTS applies it): in each image of ``x`` ``[B, C, H, W]`` one
    ``length`` x ``length`` square, centred on a random pixel and clipped at the border, set to 0.
    The centres come from the CPU generator ``gen``."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen).to(x.device)
    cx = torch.randint(0, w, (b,), generator=gen).to(x.device)
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= (cy - length // 2)[:, None]) & (rows < (cy + length - length // 2)[:, None])  # [B, H]
    in_cols = (cols >= (cx - length // 2)[:, None]) & (cols < (cx + length - length // 2)[:, None])  # [B, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)
