"""Data sets of the runs, held in memory as tensors, and their seeded batching.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, shipped
  with scikit-learn, no download), split once and for all into 1,497 training and 300 test images.
* ``distorted-digits`` (the default): the same digits, each drawn once at 16x16 with a random
  rotation, scale, shift and noise, split into 500 training and 1,297 test images.
* ``cifar10`` / ``cifar100``: the standard python-pickle releases read from a local directory
  (``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``; ``cifar-100-python/`` with
  ``train`` and ``test``), given either as that folder or as its parent. Training batches get the
  usual augmentation: 4-pixel zero-padded random crop and horizontal flip.

Every batch is drawn from generators seeded by ``(seed, epoch)``, so that an epoch's order and
augmentation do not depend on what ran before it: a resumed run sees the very same batches, and
the ranks of a distributed run agree on the global batch and each take their slice of it.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("distorted-digits", "digits", "cifar10", "cifar100")
EMBEDDED = ("distorted-digits", "digits")  # shipped inside an installed package: no --data-dir, no download


class DataError(ValueError):
    """A data set that is missing, incomplete or corrupt (the message says which file and why)."""


@dataclass
class ImageData:
    """Images as uint8 ``[N, C, H, W]`` (CPU) with int64 labels ``[N]``; ``scale`` maps the stored
    integers to [0, 1] before the per-channel ``mean``/``std`` normalisation."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    def to(self, device: torch.device) -> ImageData:
        """The same data set with its tensors on ``device`` (uint8 images stay compact there)."""
        return ImageData(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
            self.scale,
            self.mean,
            self.std,
            self.augment,
        )

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 images ``[B, C, H, W]`` to normalised float32."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / self.scale - mean) / std


def is_embedded(name: str) -> bool:
    """Whether data set ``name`` ships inside an installed package (tiny, no --data-dir)."""
    return name in EMBEDDED


def load_dataset(name: str, data_dir: str | None = None) -> ImageData:
    """Load ``name`` (one of :data:`DATASETS`); CIFAR needs ``data_dir``. Raises :class:`DataError`."""
    if name in EMBEDDED:
        if data_dir is not None:
            raise DataError(f"the {name} data set is built from scikit-learn's digits: it takes no --data-dir")
        return _load_digits() if name == "digits" else _load_distorted_digits()
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DataError(f"{name} needs --data-dir (a folder holding the python-pickle release)")
        return _load_cifar(name, data_dir)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


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


def _read_batch(path: str, label_key: str, classes: int) -> tuple[Tensor, Tensor]:
    if not os.path.isfile(path):
        raise DataError(f"missing data file {path}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # any unpickling failure means a corrupt file
        raise DataError(f"corrupt data file {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(d, dict):
        raise DataError(f"corrupt data file {path}: expected a pickled dict, got {type(d).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise DataError(f"corrupt data file {path}: it lacks the 'data' and '{label_key}' entries")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"corrupt data file {path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"corrupt data file {path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(
            f"corrupt data file {path}: labels must lie in [0, {classes}), got {labels.min()}..{labels.max()}"
        )
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_cifar(name: str, data_dir: str) -> ImageData:
    spec = _CIFAR[name]
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is not a directory")
    root = os.path.join(data_dir, spec["folder"])
    if not os.path.isdir(root):
        root = data_dir
    if not os.path.isfile(os.path.join(root, spec["train"][0])):
        raise DataError(
            f"no {name} data in {data_dir}: expected {spec['folder']}/{spec['train'][0]} (the python-pickle release)"
        )

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        parts = [_read_batch(os.path.join(root, f), spec["label_key"], spec["classes"]) for f in files]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    x_train, y_train = read(spec["train"])
    x_test, y_test = read(spec["test"])
    if len(y_train) == 0:
        raise DataError(f"no training images in {root}")
    return ImageData(
        name, x_train, y_train, x_test, y_test, spec["classes"], 255.0, spec["mean"], spec["std"], augment=True
    )


# --------------------------------------------------------------------------- splits and batches


def search_split(n_train: int, mode: str, train_portion: float = 0.5) -> tuple[Tensor, Tensor]:
    """Indices of the weight data and the architecture data of a search.

    ``erm``: both are the whole training set. ``bilevel``: the first ``train_portion`` of the
    training set trains the weights and the rest (held out) the architecture, as in DARTS.
    """
    idx = torch.arange(n_train)
    if mode == "erm":
        return idx, idx
    if mode != "bilevel":
        raise ValueError(f"mode must be 'erm' or 'bilevel', got {mode!r}")
    split = int(round(n_train * train_portion))
    return idx[:split], idx[split:]


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
