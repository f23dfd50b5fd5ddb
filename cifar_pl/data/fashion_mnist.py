"""Fashion-MNIST from its original IDX files (optionally gzipped), padded from 28x28 to 32x32.

Search order: ``<data.root>/fashion-mnist``, then Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), then a download into ``<data.root>/fashion-mnist``.

Every file is checked on every load: its header must declare the genuine layout (28x28 images, at most
60,000 items), no more than the declared bytes are read (a gzip bomb cannot exhaust memory), and the MD5 of
the uncompressed content must be the published dataset's (``+data.options.verify_checksums=false`` for your
own files in this format).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
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
# The uncompressed files' MD5s. Computed from Debian's dataset-fashion-mnist 0.0~git20200523 (recompressed,
# so its .gz MD5s differ from the above, but the content is the same): they match the raw-file checksums
# published beside the gzipped ones above in several independent loaders.
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
IMAGE_SIZE = (28, 28)
MAX_ITEMS = 60_000  # the training split; no genuine file holds more
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_UBYTE = 0x08


def read_idx(path: Path, item_shape: tuple[int, ...], max_items: int = MAX_ITEMS, md5: str | None = None) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (optionally gzipped) holding at most ``max_items`` items of
    ``item_shape`` into an array of its declared shape. Reads no more than the header declares plus one
    byte, and checks the MD5 of the uncompressed content when ``md5`` is given."""

    def corrupt(problem: str) -> DatasetError:
        return DatasetError(
            f"Fashion-MNIST file {path} {problem}: it is truncated, corrupt or not a Fashion-MNIST IDX file. "
            f"Delete it and run again to fetch a fresh copy."
        )

    opener = gzip.open if path.suffix == ".gz" else open
    ndim = 1 + len(item_shape)
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise corrupt(f"is only {len(magic)} bytes")
            zero, dtype, declared_ndim = struct.unpack(">HBB", magic)
            if zero != 0 or dtype != IDX_UBYTE or declared_ndim != ndim:
                raise corrupt(
                    f"does not start with an IDX header for {ndim}-dimensional unsigned bytes (got magic {magic.hex()})"
                )
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise corrupt("ends inside its header")
            shape = struct.unpack(f">{ndim}I", dims)
            if shape[1:] != item_shape or shape[0] > max_items:
                raise corrupt(
                    f"declares shape {shape}, but a Fashion-MNIST file holds at most {max_items:,} items of shape "
                    f"{item_shape}"
                )
            size = math.prod(shape)  # Python integers: no overflow
            data = f.read(size + 1)  # one byte more tells a file longer than it declares
    except (OSError, EOFError, zlib.error) as error:  # gzip raises these on truncated, non-gzip or corrupt data
        raise corrupt(f"cannot be read ({type(error).__name__}: {error})") from None
    if len(data) != size:
        held = "more than" if len(data) > size else f"only {len(data):,} bytes, not"
        raise corrupt(f"declares shape {shape} ({size:,} bytes of data) but holds {held} that")
    if md5 is not None:
        digest = hashlib.md5(magic + dims + data).hexdigest()
        if digest != md5:
            raise DatasetError(
                f"Fashion-MNIST file {path} is not the published file: the MD5 of its content is {digest}, not "
                f"{md5}, so an image or label differs (a damaged file, or one that only follows the format). "
                f"Delete it and run again to fetch a fresh copy, or run with +data.options.verify_checksums=false "
                f"to train on your own files in this format."
            )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


class FashionMNISTSource:
    """Fashion-MNIST IDX files, found locally or downloaded; images padded by 2 to 32x32."""

    def __init__(
        self, system_dir: str | Path = SYSTEM_DIR, mirror: str = MIRROR, verify_checksums: bool = True
    ) -> None:
        self.system_dir = Path(system_dir)
        self.mirror = mirror
        self.verify_checksums = verify_checksums

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
                download_verified("Fashion-MNIST", f"{self.mirror}{stem}.gz", md5, target, looked_in)

    def _md5(self, kind: str) -> str | None:
        """The published MD5 of ``<split>-<images|labels>``, or None with verify_checksums=false."""
        stem = f"{kind}-idx{3 if kind.endswith('images') else 1}-ubyte"
        return RAW_MD5[stem] if self.verify_checksums else None

    def load(self, root: Path) -> ImageArrays:
        self.prepare(root, download=False)
        files = self._locate(root)
        assert files is not None  # prepare() raised otherwise
        splits = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = read_idx(files[f"{prefix}-images-idx3-ubyte"], IMAGE_SIZE, md5=self._md5(f"{prefix}-images"))
            labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"], (), md5=self._md5(f"{prefix}-labels"))
            if len(images) != len(labels):
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
