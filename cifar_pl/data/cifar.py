"""CIFAR-10 and CIFAR-100 from their official *binary* distributions.

The binary archives are fixed-length records (label byte(s) then 3072 pixel bytes, channel-major), so
parsing is a plain array read: nothing is ever unpickled, unlike the "python version" archives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_pl.data.arrays import ImageArrays
from cifar_pl.data.download import fetch_archive
from cifar_pl.errors import DatasetError

IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",  # noqa: E501 (ten classes a row)
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


@dataclass(frozen=True)
class CifarVariant:
    """Where a CIFAR binary distribution comes from and how its records are laid out."""

    title: str
    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_bytes: int  # CIFAR-10: <label>; CIFAR-100: <coarse label><fine label>
    label_offset: int  # which of the label bytes is the class (CIFAR-100 uses the fine label)
    classes: tuple[str, ...]

    @property
    def record_size(self) -> int:
        return self.label_bytes + PIXELS

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


CIFAR10 = CifarVariant(
    title="CIFAR-10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5="c32a1d4ab5d03f1284b67883e8d87530",
    folder="cifar-10-batches-bin",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_file="test_batch.bin",
    label_bytes=1,
    label_offset=0,
    classes=CIFAR10_CLASSES,
)
CIFAR100 = CifarVariant(
    title="CIFAR-100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    md5="03b5dce01913d631647c71ecec9e9cb8",
    folder="cifar-100-binary",
    train_files=("train.bin",),
    test_file="test.bin",
    label_bytes=2,
    label_offset=1,
    classes=CIFAR100_CLASSES,
)


def parse_cifar_binary(path: Path, variant: CifarVariant) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse one CIFAR binary batch file into uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``."""
    raw = path.read_bytes()
    if not raw or len(raw) % variant.record_size:
        raise DatasetError(
            f"{variant.title} file {path} is {len(raw):,} bytes, which is not a whole number of "
            f"{variant.record_size}-byte records: it is truncated or corrupt. Delete the folder {path.parent} "
            f"(and {variant.archive_name} beside it if present) and run again to download and extract a fresh copy."
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, variant.record_size)
    labels = records[:, variant.label_offset].astype(np.int64)
    if labels.max() >= len(variant.classes):
        raise DatasetError(
            f"{variant.title} file {path} holds label {int(labels.max())}, but the dataset has only "
            f"{len(variant.classes)} classes: the file is corrupt or is not a {variant.title} binary batch. "
            f"Delete {path.parent} and run again to download a fresh copy."
        )
    images = records[:, variant.label_bytes :].reshape(-1, *IMAGE_SHAPE)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


class CifarSource:
    """CIFAR-10/100 under ``root``: downloaded (with MD5 check) and extracted when missing."""

    def __init__(self, variant: CifarVariant) -> None:
        self.variant = variant

    def _files(self, root: Path) -> list[Path]:
        folder = root / self.variant.folder
        return [folder / name for name in (*self.variant.train_files, self.variant.test_file)]

    def prepare(self, root: Path, download: bool) -> None:
        """Make the binary batch files available under ``root``, downloading them if allowed."""
        if all(f.is_file() for f in self._files(root)):
            return
        v = self.variant
        fetch_archive(
            title=v.title,
            url=v.url,
            md5=v.md5,
            root=root,
            expected=self._files(root),
            download=download,
        )

    def load(self, root: Path) -> ImageArrays:
        self.prepare(root, download=False)
        folder = root / self.variant.folder
        parts = [parse_cifar_binary(folder / name, self.variant) for name in self.variant.train_files]
        test_images, test_labels = parse_cifar_binary(folder / self.variant.test_file, self.variant)
        return ImageArrays(
            train_images=torch.cat([p[0] for p in parts]),
            train_labels=torch.cat([p[1] for p in parts]),
            test_images=test_images,
            test_labels=test_labels,
            classes=self.variant.classes,
        )
