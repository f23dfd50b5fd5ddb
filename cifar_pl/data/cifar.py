"""CIFAR-10 and CIFAR-100 from their official *binary* distributions.

The binary archives are fixed-length records (label byte(s) then 3072 pixel bytes, channel-major), so
parsing is a plain array read: nothing is ever unpickled, unlike the "python version" archives.

Every file is checked on every load: no larger than the genuine file (read no further), a whole number of
records, labels in range, and its MD5. The dataset's authors publish the archives' MD5s only, so the
extracted files' MD5s are recorded when cifar-pl extracts a verified archive (``cifar_pl.md5`` in the
dataset folder, in ``md5sum -c`` format), or read from the archive when it lies beside a folder extracted
by hand.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.utils import check_integrity

from cifar_pl.data.arrays import ImageArrays
from cifar_pl.data.download import fetch_archive, file_md5
from cifar_pl.errors import DatasetError
from cifar_pl.files import write_atomically

log = logging.getLogger(__name__)

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
    train_file_records: int  # images in each genuine training file, and in the test file
    test_records: int

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
    train_file_records=10_000,
    test_records=10_000,
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
    train_file_records=50_000,
    test_records=10_000,
)
CHECKSUMS_FILE = "cifar_pl.md5"


def parse_cifar_binary(
    path: Path, variant: CifarVariant, max_records: int | None = None, md5: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse one CIFAR binary batch file into uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``,
    reading at most ``max_records`` records (plus one byte, to tell a larger file) and checking ``md5``."""
    limit = None if max_records is None else max_records * variant.record_size
    with open(path, "rb") as f:
        raw = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(raw) > limit:
        raise DatasetError(
            f"{variant.title} file {path} is larger than the {limit:,} bytes ({max_records:,} images) of the "
            f"genuine file: it is corrupt or not a {variant.title} binary batch. Delete the folder {path.parent} "
            f"(and {variant.archive_name} beside it if present) and run again to download and extract a fresh copy."
        )
    if not raw or len(raw) % variant.record_size:
        raise DatasetError(
            f"{variant.title} file {path} is {len(raw):,} bytes, which is not a whole number of "
            f"{variant.record_size}-byte records: it is truncated or corrupt. Delete the folder {path.parent} "
            f"(and {variant.archive_name} beside it if present) and run again to download and extract a fresh copy."
        )
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise DatasetError(
            f"{variant.title} file {path} differs from the file extracted from the verified archive (its MD5 is "
            f"{hashlib.md5(raw).hexdigest()}, {path.parent / CHECKSUMS_FILE} records {md5}): an image or label "
            f"was changed or damaged on disk. Delete the folder {path.parent} and run again to extract a fresh copy."
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

    def _names(self) -> tuple[str, ...]:
        return (*self.variant.train_files, self.variant.test_file)

    def _files(self, root: Path) -> list[Path]:
        folder = root / self.variant.folder
        return [folder / name for name in self._names()]

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
        # just extracted from an archive whose published MD5 matched: these are the genuine files
        self._record_checksums(root, {path.name: file_md5(path) for path in self._files(root)})

    def _record_checksums(self, root: Path, checksums: dict[str, str]) -> None:
        lines = "".join(f"{md5}  {name}\n" for name, md5 in checksums.items())
        write_atomically(root / self.variant.folder / CHECKSUMS_FILE, lines.encode())

    def checksums(self, root: Path) -> dict[str, str] | None:
        """The genuine files' MD5s: as recorded at extraction, else from the verified archive beside the
        folder (then recorded); None, with a warning, when neither is there."""
        v = self.variant
        recorded = root / v.folder / CHECKSUMS_FILE
        if recorded.is_file():
            pairs = (line.split(maxsplit=1) for line in recorded.read_text().splitlines() if line.strip())
            return {name.strip(): md5 for md5, name in pairs}
        archive = root / v.archive_name
        if archive.is_file() and check_integrity(str(archive), v.md5):
            checksums = {}
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    name = member.name.rsplit("/", 1)[-1]
                    stream = tar.extractfile(member) if name in self._names() else None
                    if stream is not None:
                        digest = hashlib.md5()
                        while chunk := stream.read(2**20):
                            digest.update(chunk)
                        checksums[name] = digest.hexdigest()
            self._record_checksums(root, checksums)
            return checksums
        log.warning(
            "%s files in %s cannot be checked against the genuine ones: they were not extracted by cifar-pl and "
            "%s is not beside them. A damaged image or label would go unnoticed; delete the folder to have a "
            "fresh, checked copy downloaded and extracted.",
            v.title,
            root / v.folder,
            v.archive_name,
        )
        return None

    def load(self, root: Path) -> ImageArrays:
        self.prepare(root, download=False)
        v, folder = self.variant, root / self.variant.folder
        checksums = self.checksums(root) or {}
        parts = [
            parse_cifar_binary(folder / name, v, v.train_file_records, checksums.get(name)) for name in v.train_files
        ]
        test_images, test_labels = parse_cifar_binary(
            folder / v.test_file, v, v.test_records, checksums.get(v.test_file)
        )
        return ImageArrays(
            train_images=torch.cat([p[0] for p in parts]),
            train_labels=torch.cat([p[1] for p in parts]),
            test_images=test_images,
            test_labels=test_labels,
            classes=self.variant.classes,
        )
