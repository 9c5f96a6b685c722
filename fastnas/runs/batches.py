"""An epoch's batches on the device: gathered and augmented when the epoch starts, sliced by each step.

When an epoch starts, :func:`epoch_batches` moves the epoch's order to the device (the epoch's
only transfer of host data), gathers the images its steps use and augments them batch by batch
(random numbers from the epoch's CPU generator, in the order a step-by-step draw takes them). A
step then slices its batch, normalises it and splits it into this rank's micro-batches, all on the
device: no host data and no host read per step, which a CUDA graph needs and a GPU run gains from.

An image folder (ImageNet) does not fit in memory: its batches are streamed instead, decoded by
loader workers ahead of the steps (:class:`~fastnas.runs.imagefolder.StreamedBatches`), and handed
out in the same form. :func:`epoch_batches` and :func:`eval_batches` pick the path by the data set.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from fastnas.runs.data import ImageData
from fastnas.runs.imagefolder import FolderImages, StreamedBatches

Batch = list[tuple[Tensor, Tensor]]  # this rank's micro-batches: (normalised images, labels)


class Normalizer:
    """``ImageData.normalize`` with its per-channel constants built once, on ``device``."""

    def __init__(self, data: ImageData, device: torch.device) -> None:
        self.scale = data.scale
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        """uint8 images ``[B, C, H, W]`` to normalised float32 (the formula of ``ImageData.normalize``)."""
        return (x.float() / self.scale - self.mean) / self.std


class EpochBatches:
    """The ``len(labels) // batch_size`` global batches of an epoch, images ``[N, C, H, W]`` uint8 on
    the device in the epoch's order; ``mask`` (bool ``[N, 1, H, W]``, optional) multiplies the
    normalised images (cutout). ``batches[i]`` is this rank's micro-batches of global batch ``i``."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        normalize: Normalizer,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        accum_steps: int = 1,
        mask: Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.mask = images, labels, mask
        self.normalize = normalize
        self.batch_size, self.accum_steps = batch_size, accum_steps
        per_rank = batch_size // world
        self.mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of an epoch of {len(self)}")
        start = i * self.batch_size
        rows = slice(start + self.mine.start, start + self.mine.stop)
        x = self.normalize(self.images[rows])
        if self.mask is not None:
            x = x * self.mask[rows]
        return list(zip(x.chunk(self.accum_steps), self.labels[rows].chunk(self.accum_steps)))


def epoch_batches(
    data: ImageData,
    order: Tensor,
    steps: int,
    batch_size: int,
    normalize: Normalizer,
    gen: torch.Generator | None = None,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    cutout_mask: Callable[[Tensor, torch.Generator], Tensor | None] | None = None,
    rank: int = 0,
    world: int = 1,
    accum_steps: int = 1,
) -> EpochBatches | StreamedBatches:
    """The first ``steps`` global batches of training indices ``order`` (CPU) of ``data`` (on its
    device). With ``gen``, each global batch is augmented by ``augment(images, gen)`` (uint8) and
    gets the mask ``cutout_mask(images, gen)``, batch after batch, so every rank draws the same numbers.
    An image folder's batches are streamed, augmented by its own transforms (``gen`` seeds them)."""
    if isinstance(data.x_train, FolderImages):
        return StreamedBatches(
            data.x_train, data.y_train, order, steps, batch_size, normalize, gen, rank, world, accum_steps
        )
    device = data.x_train.device
    idx = order[: steps * batch_size].to(device)
    images, labels = data.x_train[idx], data.y_train[idx]
    masks: list[Tensor] = []
    if gen is not None and (augment is not None or cutout_mask is not None):
        parts = []
        for part in images.split(batch_size):
            if augment is not None:
                part = augment(part, gen)
            mask = cutout_mask(part, gen) if cutout_mask is not None else None
            if mask is not None:
                masks.append(mask)
            parts.append(part)
        images = torch.cat(parts)
    mask = torch.cat(masks) if masks else None
    return EpochBatches(images, labels, normalize, batch_size, rank, world, accum_steps, mask)


def eval_batches(
    images: Tensor | FolderImages, labels: Tensor, idx: Tensor, normalize: Normalizer, chunk: int = 256
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised images ``idx`` (on the labels' device) of ``images`` (uint8 on the device, or an
    image folder's, streamed with its evaluation transform) with their ``labels``, ``chunk`` at a time."""
    if isinstance(images, FolderImages):
        yield from images.eval_batches(idx, labels, normalize, chunk)
        return
    for part in idx.split(chunk):
        yield normalize(images[part]), labels[part]
