"""In-memory image datasets: each split is one uint8 tensor, indexed a whole batch at a time.

Holding a split as a single ``[N, C, H, W]`` uint8 tensor (like airbench) keeps memory small (CIFAR-10 is
150 MB) and makes a batch one ``index_select``: no per-sample Python objects, no PIL, no collation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass(frozen=True)
class ImageArrays:
    """The train and test splits of a dataset as uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{name} images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(f"{name} labels must be int64 [N] matching the images, got {tuple(labels.shape)}")

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class IndexedImages(Dataset):
    """A split as a map-style dataset whose batches are ``(images uint8, labels, sample indices)``.

    ``__getitems__`` lets the DataLoader fetch a whole batch with one tensor index (the DataLoader must
    use ``collate_fn=keep_batch``). The sample indices travel with the batch so augmentation can be keyed
    to (seed, epoch, sample), which makes it independent of batch order, worker count and strategy.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, indices: Tensor | Sequence[int] | int) -> tuple[Tensor, Tensor, Tensor]:
        """A batch for an int64 tensor (or sequence) of sample indices; a batch of one for an int."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return self.images.index_select(0, idx), self.labels.index_select(0, idx), idx

    __getitems__ = __getitem__  # the DataLoader's batched fetch (evaluation loaders)


def keep_batch(batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Collate function for ``IndexedImages``: the batch is already collated."""
    return batch
