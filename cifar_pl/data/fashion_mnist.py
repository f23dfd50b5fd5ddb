"""Fashion-MNIST from its original IDX files (optionally gzipped), padded from 28x28 to 32x32.

Search order: ``<data.root>/fashion-mnist``, then Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), then a download into ``<data.root>/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cifar_pl.data.arrays import ImageArrays
from cifar_pl.data.download import download_verified
from cifar_pl.errors import DatasetError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# The gzipped files as published (same MD5s as torchvision's FashionMNIST).
FILES = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (optionally gzipped) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:  # gzip raises these on truncated or non-gzip data
        raise DatasetError(
            f"Fashion-MNIST file {path} cannot be read ({error}): it is truncated or corrupt. "
            f"Delete it and run again to fetch a fresh copy."
        ) from None
    if len(raw) < 4:
        raise DatasetError(
            f"Fashion-MNIST file {path} is only {len(raw)} bytes: it is truncated. Delete it and run again."
        )
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != IDX_UBYTE or ndim not in (1, 3) or len(raw) < 4 + 4 * ndim:
        raise DatasetError(
            f"Fashion-MNIST file {path} does not start with an IDX header for unsigned bytes "
            f"(got magic {raw[:4].hex()}): it is corrupt or not an IDX file. Delete it and run again."
        )
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = int(np.prod(shape)) + 4 + 4 * ndim
    if len(raw) != expected:
        raise DatasetError(
            f"Fashion-MNIST file {path} declares shape {shape} ({expected:,} bytes) but holds {len(raw):,} bytes: "
            f"it is truncated or corrupt. Delete it and run again to fetch a fresh copy."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


class FashionMNISTSource:
    """Fashion-MNIST IDX files, found locally or downloaded; images padded by 2 to 32x32."""

    def __init__(self, system_dir: str | Path = SYSTEM_DIR) -> None:
        self.system_dir = Path(system_dir)

    def _locate(self, root: Path) -> dict[str, Path] | None:
        for folder in (root / "fashion-mnist", self.system_dir):
            found = {stem: _find(folder, stem) for stem in FILES}
            if all(found.values()):
                return found  # type: ignore[return-value]
        return None

    def prepare(self, root: Path, download: bool) -> None:
        if self._locate(root) is not None:
            return
        target = root / "fashion-mnist"
        looked_in = [target, self.system_dir]
        if not download:
            raise DatasetError(
                f"Fashion-MNIST is not available: looked in {target} and {self.system_dir}, and downloading is "
                f"switched off (data.download=false). To fix it, install Debian's package "
                f"(apt-get install dataset-fashion-mnist), put the four IDX files in {target}, or allow downloading."
            )
        for stem, md5 in FILES.items():
            if _find(target, stem) is None:
                download_verified("Fashion-MNIST", f"{MIRROR}{stem}.gz", md5, target, looked_in)

    def load(self, root: Path) -> ImageArrays:
        self.prepare(root, download=False)
        files = self._locate(root)
        assert files is not None  # prepare() raised otherwise
        splits = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = read_idx(files[f"{prefix}-images-idx3-ubyte"])
            labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DatasetError(
                    f"Fashion-MNIST {split} files in {files[f'{prefix}-images-idx3-ubyte'].parent} do not match: "
                    f"images {images.shape}, labels {labels.shape}. Delete them and run again."
                )
            if labels.size and labels.max() >= len(CLASSES):
                raise DatasetError(
                    f"Fashion-MNIST labels in {files[f'{prefix}-labels-idx1-ubyte']} go up to {labels.max()}, "
                    f"but there are {len(CLASSES)} classes: the file is corrupt. Delete it and run again."
                )
            # pad 28x28 -> 32x32 once, here, so every network sees CIFAR-sized input
            padded = F.pad(torch.from_numpy(images.copy()).unsqueeze(1), (2, 2, 2, 2))
            splits[split] = (padded, torch.from_numpy(labels.astype(np.int64)))
        return ImageArrays(*splits["train"], *splits["test"], classes=CLASSES)
