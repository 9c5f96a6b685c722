"""What a data set is to the runs (:class:`ImageData`) and how reading one fails (:class:`DataError`):
the leaf that :mod:`fastnas.runs.data` and :mod:`fastnas.runs.imagefolder` both build on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


class DataError(ValueError):
    """A data set that is missing, incomplete or corrupt (the message says which file and why)."""


@dataclass
class ImageData:
    """Images as uint8 ``[N, C, H, W]`` (CPU) with int64 labels ``[N]``; ``scale`` maps the stored
    integers to [0, 1] before the per-channel ``mean``/``std`` normalisation. With ``augment``,
    training batches get random crops of the images zero-padded by ``crop_padding`` pixels, and
    flips. ``valid_split``: the indices of the test images a bilevel search steps its architecture
    on (the others are its test images), or None (the architecture data come from the training set)."""

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
    crop_padding: int = 4
    valid_split: Tensor | None = None

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    def to(self, device: torch.device) -> ImageData:
        """The same data set with its tensors on ``device`` (uint8 images stay compact there)."""
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return dataclasses.replace(self, **moved)

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 images ``[B, C, H, W]`` to normalised float32."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / self.scale - mean) / std
