"""Batched augmentation on the device: random crop (zero padding) and horizontal flip, then normalisation.

The whole batch is transformed with a few tensor ops after it reaches the device (no per-sample PIL work).
Each sample's crop offset and flip come from a hash of (seed, epoch, sample index), not from a global RNG:
a sample is augmented the same way whichever process, batch or worker handles it, so single-process, DDP
and parameter-server runs see identical inputs and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK32 = 0xFFFFFFFF
Hashed = TypeVar("Hashed", Tensor, int)  # the hash works on Python ints and on int64 tensors alike


def _mix32(h: Hashed) -> Hashed:
    """A 32-bit integer hash (xorshift-multiply). Multipliers stay below 2**31 and values below 2**32, so
    int64 arithmetic never overflows and CPU and GPU give the same bits."""
    h = h & _MASK32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x6C8E9CF5) & _MASK32
    return h ^ (h >> 16)


def augmentation_keys(indices: Tensor, epoch: int, seed: int) -> Tensor:
    """One pseudo-random 32-bit key per sample, a pure function of (seed, epoch, sample index)."""
    base = _mix32(_mix32(seed) * 31 + epoch + 1)
    return _mix32(_mix32(indices.to(torch.int64) + base))


def random_crop_flip(images: Tensor, keys: Tensor, padding: int = 4, flip: bool = True) -> Tensor:
    """Crop each image at a key-chosen offset from its zero-padded copy and mirror it when the key says so.

    ``images`` is ``[B, C, H, W]`` of any dtype; the result has the same shape and dtype.
    """
    b, c, h, w = images.shape
    span = 2 * padding + 1
    keys = keys.to(images.device)
    dy = keys % span
    dx = (keys // span) % span
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols_base = torch.arange(w, device=images.device)
    if flip:
        mirrored = ((keys >> 20) & 1).bool()
        cols_base = torch.where(mirrored[:, None], cols_base.flip(0), cols_base)
    cols = dx[:, None] + cols_base
    batch_idx = torch.arange(b, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


class BatchTransform:
    """Turns a uint8 batch into normalised float input, augmenting it for training.

    Shared by the DataModule (via ``on_after_batch_transfer``) and the parameter-server workers, so every
    strategy feeds the model exactly the same tensors.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], padding: int = 4, flip: bool = True, seed: int = 0
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean {list(mean)} and std {list(std)} must have one entry per channel")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.padding, self.flip, self.seed = padding, flip, seed
        self._scale_shift: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [0, 255] -> float32 ``(x / 255 - mean) / std`` in channels-last memory order (what the
        convolution and pooling kernels are fastest on), converted and scaled in one pass."""
        if images.shape[1] != self.mean.shape[0]:
            raise ValueError(f"batch has {images.shape[1]} channels but mean/std have {self.mean.shape[0]}")
        if images.device not in self._scale_shift:
            scale = (1.0 / (255.0 * self.std)).to(images.device)
            shift = (self.mean / self.std).to(images.device)
            self._scale_shift[images.device] = (scale, shift)
        scale, shift = self._scale_shift[images.device]
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=torch.channels_last)
        return out.copy_(images).mul_(scale).sub_(shift)

    def __call__(self, images: Tensor, indices: Tensor, epoch: int, train: bool) -> Tensor:
        if train and (self.padding or self.flip):
            images = random_crop_flip(images, augmentation_keys(indices, epoch, self.seed), self.padding, self.flip)
        return self.normalize(images)
