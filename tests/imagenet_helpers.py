"""Helpers of the ImageNet tests: NAS-Bench-201's downsampled-ImageNet pickles and an image folder of
JPEGs, both written here in the real formats (no real ImageNet is needed)."""

from __future__ import annotations

import os
import pickle

import numpy as np

TRAIN_FILES = [f"train_data_batch_{i}" for i in range(1, 11)]


def write_imagenet16(root: str, per_file: int = 24, val: int = 40, seed: int = 0, labels=(1, 2, 3, 120, 121, 999)):
    """The ten ``train_data_batch_*`` files and ``val_data`` as the downsampled-ImageNet release holds
    them (dicts pickled with ``data`` uint8 ``[N, 768]``, planar channels, ``labels`` a list of 1..1000,
    and the training files' ``mean``), each image's label drawn from ``labels``; returns ``root``."""
    rng = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)

    def dump(name: str, n: int, with_mean: bool) -> None:
        entry = {
            "data": rng.randint(0, 256, size=(n, 768)).astype(np.uint8),
            "labels": [int(v) for v in rng.choice(labels, size=n)],
        }
        if with_mean:
            entry["mean"] = entry["data"].mean(0)
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)

    for name in TRAIN_FILES:
        dump(name, per_file, True)
    dump("val_data", val, False)
    return root


def write_image_folder(root: str, classes=("n01", "n02", "n03"), train: int = 6, val: int = 3, size=(40, 52)):
    """``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` of random colour blocks (PIL JPEGs
    of ``size`` (width, height), one a PNG and one greyscale, as ImageNet has odd ones); returns ``root``."""
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (("train", train), ("val", val)):
        for label, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for k in range(n):
                block = rng.randint(0, 64, size=(size[1] // 4, size[0] // 4, 3)) + 64 * label
                pixels = np.kron(block, np.ones((4, 4, 1))).astype(np.uint8)
                image = Image.fromarray(pixels)
                if k == 1:
                    image = image.convert("L")
                ext = "png" if k == 2 else "JPEG"
                image.save(os.path.join(folder, f"{name}_{k}.{ext}"))
    return root
