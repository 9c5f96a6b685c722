"""Data sets of the runs, held in memory as tensors, and their seeded batching.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, shipped
  with scikit-learn, no download), split once and for all into 1,497 training and 300 test images.
* ``cifar10`` / ``cifar100``: the standard python-pickle releases read from a local directory
  (``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``; ``cifar-100-python/`` with
  ``train`` and ``test``), given either as that folder or as its parent. Training batches get the
  usual augmentation: 4-pixel zero-padded random crop and horizontal flip.

Every batch is drawn from generators seeded by ``(seed, epoch)``, so that an epoch's order and
augmentation do not depend on what ran before it: a resumed run sees the very same batches, and
the ranks of a distributed run agree on the global batch and each take their slice of it.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("digits", "cifar10", "cifar100")
EMBEDDED = ("digits",)  # shipped inside an installed package: no --data-dir, no download


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
    if name == "digits":
        if data_dir is not None:
            raise DataError("the digits data set ships with scikit-learn: it takes no --data-dir")
        return _load_digits()
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DataError(f"{name} needs --data-dir (a folder holding the python-pickle release)")
        return _load_cifar(name, data_dir)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def _load_digits() -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))  # one fixed split
    x, y = x[perm], y[perm]
    n_test = 300
    xf = x[:-n_test].float() / 16.0
    return ImageData(
        "digits",
        x[:-n_test].contiguous(),
        y[:-n_test].contiguous(),
        x[-n_test:].contiguous(),
        y[-n_test:].contiguous(),
        num_classes=10,
        scale=16.0,
        mean=(float(xf.mean()),),
        std=(float(xf.std()),),
        augment=False,
    )


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
