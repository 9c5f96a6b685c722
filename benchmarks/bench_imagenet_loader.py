"""Images per second of fastnas's image-folder loader against torchvision's standard ImageFolder +
DataLoader pipeline, with the same training transforms, decoding on the CPU.

Providers, each with ``--workers`` loader processes and batches of ``--batch-size``:

* ``fastnas``: :func:`fastnas.runs.batches.epoch_batches` on the folder (``--dataset imagenet``'s path):
  ``torchvision.io.decode_image`` and ``transforms.v2`` on uint8 tensors in the workers (random-resized
  crop, flip, colour jitter), each image seeded from the epoch's generator; the uint8 batch
  normalised to float32 in the main process (on the device in a run; here the CPU);
* ``torchvision``: ``torchvision.datasets.ImageFolder`` (PIL decode) with ``RandomResizedCrop``,
  ``RandomHorizontalFlip``, ``ColorJitter``, ``ToTensor``, ``Normalize`` on PIL images, in a
  ``DataLoader`` shuffling the folder, as DARTS's and PC-DARTS's ``train_imagenet.py`` load ImageNet.

Each round reads ``--warmup`` batches (worker start-up and the first decodes, not counted), then times
``--batches`` batches; rounds alternate the providers, and the median of ``--rounds`` is reported with
the spread. ``--data-dir`` names a folder with ``train/<class>/*.JPEG`` (ImageNet's); without it, a
synthetic folder of ``--synthetic`` JPEGs is written first (PIL, quality 90, ImageNet's mean size
500x375 by default).

Run:  python benchmarks/bench_imagenet_loader.py --data-dir ~/imagenet --workers 4 8
      python benchmarks/bench_imagenet_loader.py --synthetic 2000 --workers 1 2 --json loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
import torch

from fastnas.runs import data as data_mod
from fastnas.runs.batches import Normalizer, epoch_batches
from fastnas.runs.imagefolder import MEAN, STD, LoaderOptions, parse_color_jitter

PROVIDERS = ("fastnas", "torchvision")


def write_synthetic_folder(root: str, images: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> str:
    """``root/train/<class>/*.JPEG``: ``images`` JPEGs of smooth random colour fields (JPEG-sized like
    photographs, not like noise) of ``size`` (width, height); returns ``root``."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    w, h = size
    for k in range(images):
        folder = os.path.join(root, "train", f"n{k % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.randint(0, 256, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        image.save(os.path.join(folder, f"img_{k:06d}.JPEG"), quality=90)
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    for name in os.listdir(os.path.join(root, "train")):  # the loader wants val/ too; it is not read here
        os.makedirs(os.path.join(root, "val", name), exist_ok=True)
        first = sorted(os.listdir(os.path.join(root, "train", name)))[0]
        os.link(os.path.join(root, "train", name, first), os.path.join(root, "val", name, first))
    return root


def fastnas_batches(root: str, batch_size: int, workers: int, crop: int, jitter: str, count: int) -> Iterator:
    options = LoaderOptions(crop_size=crop, color_jitter=parse_color_jitter(jitter), workers=workers)
    d = data_mod.load_dataset("imagenet", root, options=options)
    order = data_mod.epoch_order(torch.arange(len(d.y_train)), seed=0, epoch=0, stream=0)
    steps = min(count, len(order) // batch_size)
    gen = data_mod.epoch_generator(0, 0, stream=2)
    batches = epoch_batches(d, order, steps, batch_size, Normalizer(d, torch.device("cpu")), gen)
    return (batches[i][0] for i in range(steps))


def torchvision_batches(root: str, batch_size: int, workers: int, crop: int, jitter: str, count: int) -> Iterator:
    from torchvision import datasets, transforms

    steps = [transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip()]
    values = parse_color_jitter(jitter)
    if values is not None:
        steps.append(transforms.ColorJitter(*values))
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    folder = datasets.ImageFolder(os.path.join(root, "train"), transforms.Compose(steps))
    loader = torch.utils.data.DataLoader(
        folder, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    return (batch for _, batch in zip(range(count), loader))


MAKERS: dict[str, Callable[..., Iterator]] = {"fastnas": fastnas_batches, "torchvision": torchvision_batches}


def images_per_second(provider: str, args: argparse.Namespace, workers: int) -> float:
    """One round: ``args.warmup`` batches read and not counted, then ``args.batches`` timed."""
    batches = MAKERS[provider](args.root, args.batch_size, workers, args.crop, args.jitter, args.warmup + args.batches)
    seen = 0
    for _ in range(args.warmup):
        next(batches)
    t0 = time.perf_counter()
    for x, _ in batches:
        assert x.shape[1:] == (3, args.crop, args.crop) and x.dtype == torch.float32
        seen += len(x)
    seconds = time.perf_counter() - t0
    if seen < args.batches * args.batch_size:
        raise SystemExit(f"{provider}: the folder holds too few images for {args.warmup + args.batches} batches")
    return seen / seconds


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for workers in args.workers:
        rates: dict[str, list[float]] = {p: [] for p in PROVIDERS}
        for r in range(args.rounds):
            for provider in PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]:  # alternated rounds
                rates[provider].append(images_per_second(provider, args, workers))
        for provider in PROVIDERS:
            values = rates[provider]
            rows.append(dict(provider=provider, workers=workers, batch_size=args.batch_size, crop=args.crop,
                             color_jitter=args.jitter, images_per_sec=statistics.median(values),
                             min=min(values), max=max(values), rounds=values))  # fmt: skip
    return rows


def table(rows: list[dict]) -> list[str]:
    """A markdown table: per worker count, each provider's median images/s (min-max) and their ratio."""
    cell = lambda r: f"{r['images_per_sec']:.0f} ({r['min']:.0f}-{r['max']:.0f})"
    lines = ["| workers | fastnas images/s | torchvision images/s | fastnas / torchvision |", "|---|---|---|---|"]
    for workers in sorted({r["workers"] for r in rows}):
        fast, tv = (next(r for r in rows if r["workers"] == workers and r["provider"] == p) for p in PROVIDERS)
        ratio = fast["images_per_sec"] / tv["images_per_sec"]
        lines.append(f"| {workers} | {cell(fast)} | {cell(tv)} | {ratio:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="an image folder with train/<class>/*.JPEG (default: a synthetic one)")
    p.add_argument("--synthetic", type=int, default=2000, help="images of the synthetic folder (default 2000)")
    p.add_argument("--image-size", type=int, nargs=2, default=(500, 375), help="synthetic images' width and height")
    p.add_argument("--workers", type=int, nargs="+", default=[max(1, (os.cpu_count() or 2) - 1)])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=10, help="timed batches per round")
    p.add_argument("--warmup", type=int, default=2, help="batches per round before the timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--jitter", default="0.4,0.4,0.4,0.2", help="colour jitter B,C,S,H (0: none)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the main process only normalises; the workers do the work
    with tempfile.TemporaryDirectory() as tmp:
        args.root = args.data_dir or write_synthetic_folder(tmp, args.synthetic, tuple(args.image_size))
        rows = run(args)
    print(f"image-folder loader, CPU decode, batch {args.batch_size}, crop {args.crop}, jitter {args.jitter}:")
    print("\n".join(table(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
