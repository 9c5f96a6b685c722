"""ImageNet from an image folder, streamed: decoded and augmented by loader workers, a batch ahead of the step.

The layout is torchvision ``ImageFolder``'s: ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``
(:data:`EXTENSIONS`, any case, in sub-folders too); the class folders of ``train/`` sorted by name give the
labels 0..K-1, and ``val/`` may not hold a class ``train/`` lacks. Images are decoded by
``torchvision.io.decode_image`` (libjpeg-turbo for JPEG; grey and CMYK images to RGB) and transformed as
uint8 tensors by ``torchvision.transforms.v2``:

* training: random-resized crop to ``crop_size`` (scale 0.08-1, aspect ratio 3/4-4/3), horizontal flip,
  and with ``color_jitter`` brightness, contrast, saturation and hue jitter (DARTS: 0.4, 0.4, 0.4, 0.2);
* evaluation: the shorter side resized to ``crop_size * 8 // 7`` (256 for 224), then a centre crop.

Batches stay uint8 until the device, where they are normalised with ImageNet's mean and standard
deviation as the in-memory data sets are. A ``DataLoader`` of ``workers`` processes decodes an epoch's
images in the epoch's order; each image's random draws are seeded by a number the epoch's generator
drew, so batches depend neither on the number of workers nor on their timing (and a resumed run sees
the same ones). Batches arrive in pinned memory and are copied to the GPU on a side stream while the
previous step computes (:func:`device_batches`).

torchvision is an optional dependency (``pip install "fastnas[imagenet]"``): it is imported when this
data set is loaded, and its absence is a one-line error then.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from fastnas.runs.config import RunError
from fastnas.runs.image_data import DataError, ImageData

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def default_workers() -> int:
    """Loader processes when ``--workers`` is not given: the CPUs this process may use less one, 1 to 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cpus - 1))


def parse_color_jitter(text: str | None) -> tuple[float, float, float, float] | None:
    """``"B,C,S,H"`` (brightness, contrast, saturation >= 0; hue in [0, 0.5]) as a tuple; ``"0"`` or
    None: no jitter. ValueError naming ``--color-jitter`` otherwise."""
    if text is None or text.strip() in ("", "0"):
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(v >= 0 for v in values) or values[3] > 0.5:
        raise ValueError(
            f"--color-jitter must be four numbers B,C,S,H (brightness, contrast, saturation >= 0, hue in "
            f"[0, 0.5]) or 0, got {text!r}"
        )
    return values if any(values) else None


@dataclass(frozen=True)
class LoaderOptions:
    """How images are cropped, jittered and loaded (see the module docstring)."""

    crop_size: int = 224
    color_jitter: tuple[float, float, float, float] | None = None
    workers: int | None = None  # None: default_workers()

    @property
    def eval_resize(self) -> int:
        return self.crop_size * 8 // 7

    @classmethod
    def of(cls, cfg: Any) -> LoaderOptions:
        """The options in a run's settings: its fields ``crop_size``, ``color_jitter`` (``"B,C,S,H"``) and
        ``loader_workers`` where it has them and they are set; the defaults otherwise (``cfg`` itself when it
        is a LoaderOptions)."""
        if isinstance(cfg, LoaderOptions):
            return cfg
        names = {"workers": "loader_workers"}  # a run's --loader-workers (its --workers are Ray's)
        found = {f.name: getattr(cfg, names.get(f.name, f.name), None) for f in dataclasses.fields(cls)}
        found["color_jitter"] = parse_color_jitter(found["color_jitter"])
        return cls(**{k: v for k, v in found.items() if v is not None})

    def loader_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers


def require_torchvision() -> None:
    """DataError (one line) unless torchvision, with its tensor transforms, can be imported."""
    try:
        import torchvision.io  # noqa: F401
        import torchvision.transforms.v2  # noqa: F401
    except ImportError as e:
        raise DataError(
            f"--dataset imagenet needs torchvision (pip install torchvision, or fastnas[imagenet]): {e}"
        ) from None


def decode(path: str) -> Tensor:
    """The image at ``path`` as uint8 RGB ``[3, H, W]``; DataError naming it when it cannot be decoded."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"unreadable image {path}: {reason}") from None


def train_transform(options: LoaderOptions) -> Callable[[Tensor], Tensor]:
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(options.crop_size, antialias=True), v2.RandomHorizontalFlip()]
    if options.color_jitter is not None:
        steps.append(v2.ColorJitter(*options.color_jitter))
    return v2.Compose(steps)


def eval_transform(options: LoaderOptions) -> Callable[[Tensor], Tensor]:
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(options.eval_resize, antialias=True), v2.CenterCrop(options.crop_size)])


class DecodedImages(torch.utils.data.Dataset):
    """Images ``root/files[k]`` decoded and transformed; with ``seeds``, image ``k``'s transform draws
    its random numbers from torch's generator seeded by ``seeds[k]`` (the caller's generator state is
    left as it was, so that decoding in the main process disturbs nothing)."""

    def __init__(self, root: str, files: np.ndarray, transform: Callable[[Tensor], Tensor], seeds: Tensor | None):
        self.root, self.files, self.transform, self.seeds = root, files, transform, seeds

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k: int) -> Tensor:
        image = decode(os.path.join(self.root, self.files[k].decode()))
        if self.seeds is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seeds[k]))
            return self.transform(image)


class FolderImages:
    """The images of one split of an image folder, decoded when they are read: ``len`` and ``shape``
    (``[N, 3, crop_size, crop_size]``, the decoded batches') as a uint8 image tensor would have them;
    ``images[idx]`` (an index tensor) is the lazy selection of those images; ``to(device)`` is itself
    (images reach the device batch by batch)."""

    def __init__(self, root: str, files: np.ndarray, options: LoaderOptions) -> None:
        self.root, self.files, self.options = root, files, options

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.options.crop_size, self.options.crop_size))

    def __getitem__(self, idx: Tensor) -> FolderImages:
        return FolderImages(self.root, self.files[idx.cpu().numpy()], self.options)

    def to(self, device: torch.device) -> FolderImages:
        return self

    def loader(self, batch_size: int, train: bool, seeds: Tensor | None, pin: bool) -> torch.utils.data.DataLoader:
        """Batches of these images in order (uint8 ``[B, 3, S, S]``, the last one possibly smaller),
        decoded by the options' workers, with the training or the evaluation transform."""
        transform = train_transform(self.options) if train else eval_transform(self.options)
        workers = self.options.loader_workers()
        return torch.utils.data.DataLoader(
            DecodedImages(self.root, self.files, transform, seeds),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin,
            prefetch_factor=4 if workers else None,
            generator=torch.Generator().manual_seed(0),  # its workers' base seed, not drawn from torch's generator
        )

    def eval_batches(
        self, idx: Tensor, labels: Tensor, normalize: Callable[[Tensor], Tensor], chunk: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised images ``idx`` (evaluation transform), ``chunk`` at a time, with their ``labels``,
        on the labels' device."""
        device = labels.device
        loader = self[idx].loader(chunk, train=False, seeds=None, pin=device.type == "cuda")
        for x, part in zip(device_batches(loader, device), idx.split(chunk)):
            yield normalize(x), labels[part]


@dataclass
class ImageFolderData(ImageData):
    """An image folder as the runs see a data set: ``x_train`` / ``x_test`` are :class:`FolderImages`
    (streamed), the labels int64 tensors; ``classes`` the class folder names in label order."""

    classes: tuple[str, ...] = ()


def scan(root: str, classes: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], np.ndarray, Tensor]:
    """The class folders of ``root`` (sorted; or the given ``classes``, of which ``root`` may hold a part),
    the image files under them (paths relative to ``root``, in ``ImageFolder``'s order) and their labels."""
    if not os.path.isdir(root):
        raise DataError(f"no folder {root}: expected {root}/<class>/<image> (ImageFolder's layout)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if classes is None:
        classes = tuple(found)
    elif set(found) - set(classes):
        extra = sorted(set(found) - set(classes))
        raise DataError(f"{root} holds class folders the training folder lacks: {', '.join(extra[:5])}")
    files: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for where, _, names in sorted(os.walk(folder, followlinks=True)):
            for f in sorted(names):
                if f.lower().endswith(EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(where, f), root).encode())
                    labels.append(label)
    if not files:
        raise DataError(f"no images in {root}: expected {root}/<class>/<image> files ({', '.join(EXTENSIONS)})")
    return classes, np.array(files, dtype=np.bytes_), torch.tensor(labels, dtype=torch.int64)


def load_image_folder(data_dir: str, options: LoaderOptions) -> ImageFolderData:
    """The image folder ``data_dir`` (``train/`` and ``val/``); DataError for a missing torchvision, a
    missing or empty folder, or class folders that do not match."""
    require_torchvision()
    classes, train_files, y_train = scan(os.path.join(data_dir, "train"))
    _, val_files, y_test = scan(os.path.join(data_dir, "val"), classes)
    return ImageFolderData(
        name="imagenet",
        x_train=FolderImages(os.path.join(data_dir, "train"), train_files, options),
        y_train=y_train,
        x_test=FolderImages(os.path.join(data_dir, "val"), val_files, options),
        y_test=y_test,
        num_classes=len(classes),
        scale=255.0,
        mean=MEAN,
        std=STD,
        augment=True,
        classes=classes,
    )


def _next_batch(batches: Iterator[Tensor]) -> Tensor:
    """The loader's next batch; an image a worker could not decode becomes a RunError of one line."""
    try:
        return next(batches)
    except DataError as e:  # from a worker: the message holds the worker's traceback, then the error
        raise RunError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def device_batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[Tensor]:
    """The loader's batches on ``device``. On CUDA each batch is copied from pinned memory on a side
    stream and the next copy is issued before a batch is handed over, so that the copy of batch
    ``i + 1`` runs while step ``i`` computes; the consuming stream waits for its batch's copy alone."""
    batches = iter(loader)
    if device.type != "cuda":
        while True:
            try:
                batch = _next_batch(batches)
            except StopIteration:
                return
            yield batch.to(device)
    stream = torch.cuda.Stream(device)

    def copy() -> tuple[Tensor, torch.cuda.Event] | None:
        try:
            batch = _next_batch(batches)
        except StopIteration:
            return None
        with torch.cuda.stream(stream):
            on_device = batch.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return on_device, done

    ahead = copy()
    while ahead is not None:
        batch, done = ahead
        consumer = torch.cuda.current_stream(device)
        consumer.wait_event(done)
        batch.record_stream(consumer)  # its memory is not reused before the consumer is done with it
        ahead = copy()
        yield batch


class StreamedBatches:
    """An epoch's batches from an image folder, as :class:`~fastnas.runs.batches.EpochBatches` gives
    them from memory: ``batches[i]`` is this rank's micro-batches ``(normalised images, labels)`` of
    global batch ``i`` of ``order`` (the training indices, CPU). Read in order ``0, 1, ...``: the
    workers decode ahead. With ``gen``, the training transform, each image seeded by a number drawn
    from ``gen`` for the whole global batch (every rank draws the same); else the evaluation one."""

    def __init__(
        self,
        images: FolderImages,
        labels: Tensor,
        order: Tensor,
        steps: int,
        batch_size: int,
        normalize: Callable[[Tensor], Tensor],
        gen: torch.Generator | None,
        rank: int = 0,
        world: int = 1,
        accum_steps: int = 1,
    ) -> None:
        per_rank = batch_size // world
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        idx = order[: steps * batch_size].view(steps, batch_size)[:, mine].reshape(-1)
        seeds = None
        if gen is not None:
            drawn = torch.randint(0, 2**62, (steps * batch_size,), generator=gen)
            seeds = drawn.view(steps, batch_size)[:, mine].reshape(-1)
        device = labels.device
        self.labels = labels[idx.to(device)]
        self.normalize, self.per_rank, self.accum_steps, self.steps = normalize, per_rank, accum_steps, steps
        loader = images[idx].loader(per_rank, train=gen is not None, seeds=seeds, pin=device.type == "cuda")
        self._batches = device_batches(loader, device)
        self._next = 0

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> list[tuple[Tensor, Tensor]]:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of an epoch of {len(self)}")
        if i != self._next:
            raise IndexError(f"streamed batches are read in order: batch {i} asked for, batch {self._next} next")
        self._next += 1
        x = self.normalize(next(self._batches))
        if self._next == self.steps:
            self._batches.close()  # the workers end with the epoch's last batch
        y = self.labels[i * self.per_rank : (i + 1) * self.per_rank]
        return list(zip(x.chunk(self.accum_steps), y.chunk(self.accum_steps)))
