"""Batched on-device augmentation, the validation hold-out, and the synthetic dataset."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from cifar_pl.data import BatchTransform, ImageArrays, ImageDataModule
from cifar_pl.data.augment import augmentation_keys, random_crop_flip
from cifar_pl.data.synthetic import SyntheticSource


def _batch(n=64, c=3, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


def test_crop_flip_keeps_shape_and_dtype():
    x = _batch()
    out = random_crop_flip(x, augmentation_keys(torch.arange(64), epoch=0, seed=0), padding=4)
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_each_sample_gets_its_own_crop_and_flip():
    """Recover each sample's transform by brute force: offsets and flips must vary across the batch."""
    x = _batch(n=64)
    out = random_crop_flip(x, augmentation_keys(torch.arange(64), epoch=0, seed=0), padding=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = []
    for i in range(64):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert len(matches) == 1, f"sample {i} is not a single crop/flip of its input"
        found.append(matches[0])
    assert len({(dy, dx) for dy, dx, _ in found}) > 20, "crop offsets do not vary per sample"
    flips = sum(f for _, _, f in found)
    assert 16 < flips < 48, f"{flips} of 64 flipped: flips are not per-sample coin tosses"


def test_augmentation_depends_on_epoch_and_sample_not_on_batch_position():
    x = _batch(n=8)
    idx = torch.arange(100, 108)
    t = BatchTransform([0.5] * 3, [0.25] * 3, padding=4, flip=True, seed=1)
    whole = t(x, idx, epoch=3, train=True)
    reversed_order = t(x.flip(0), idx.flip(0), epoch=3, train=True).flip(0)
    assert torch.equal(whole, reversed_order)
    assert not torch.equal(whole, t(x, idx, epoch=4, train=True))


def test_eval_batches_are_only_normalised():
    x = _batch(n=4)
    t = BatchTransform([0.5, 0.4, 0.3], [0.2, 0.2, 0.2], padding=4, flip=True)
    out = t(x, torch.arange(4), epoch=0, train=False)
    expected = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_keys_are_identical_on_cpu_and_independent_of_dtype():
    idx = torch.arange(0, 50_000, 997)
    assert torch.equal(augmentation_keys(idx, 2, 7), augmentation_keys(idx.to(torch.int32), 2, 7))
    assert augmentation_keys(idx, 2, 7).max() < 2**32


def _datamodule(**overrides):
    kwargs = dict(
        dataset="synthetic",
        val_size=100,
        seed=5,
        batch_size=16,
        mean=[0.5] * 3,
        std=[0.4] * 3,
        options=dict(train_size=400, test_size=50),
    )
    kwargs.update(overrides)
    return ImageDataModule(**kwargs)


def test_validation_holdout_is_fixed_by_seed_and_disjoint():
    a, b, c = _datamodule(), _datamodule(), _datamodule(seed=6)
    for dm in (a, b, c):
        dm.setup()
    assert len(a.train_set) == 300 and len(a.val_set) == 100 and len(a.test_set) == 50
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    train_rows = {bytes(img.numpy()) for img in a.train_set.images}
    assert not any(bytes(img.numpy()) in train_rows for img in a.val_set.images)


def test_train_batches_augmented_and_val_batches_not_through_a_trainer():
    """Run a real Trainer and capture what the model receives."""
    seen = {}

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            seen.setdefault("train", batch)
            return self.layer(batch[0].mean().view(1, 1)).sum()

        def validation_step(self, batch, batch_idx):
            seen.setdefault("val", batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class GreySource:  # uniformly grey images: black pixels can only come from crop padding
        def prepare(self, root, download):
            pass

        def load(self, root):
            grey = torch.full((400, 3, 32, 32), 128, dtype=torch.uint8)
            return ImageArrays(grey, torch.arange(400) % 10, grey[:50], torch.arange(50) % 10, tuple("abcdefghij"))

    dm = _datamodule(batch_size=300)  # one batch = the whole (shuffled) training split
    dm.source = GreySource()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=1,
    )
    trainer.fit(Probe(), dm)
    x_train, _ = seen["train"]
    x_val, _ = seen["val"]
    assert x_train.dtype == torch.float32 and x_train.shape[1:] == (3, 32, 32)
    grey, black = (128 / 255 - 0.5) / 0.4, (0 - 0.5) / 0.4
    torch.testing.assert_close(x_val, torch.full_like(x_val, grey))  # validation: normalised, never augmented
    # training: crops shifted by up to 4 px bring in the zero padding, in most but not all samples
    black_per_sample = (x_train == black).float().mean(dim=(1, 2, 3))
    assert 0.5 < (black_per_sample > 0).float().mean() < 1.0
    assert 0.02 < black_per_sample.mean() < 0.4


def test_synthetic_is_deterministic_balanced_and_uint8():
    a = SyntheticSource(train_size=300, test_size=100, seed=3).load()
    b = SyntheticSource(train_size=300, test_size=100, seed=3).load()
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.dtype == torch.uint8 and a.train_images.shape == (300, 3, 32, 32)
    assert torch.bincount(a.train_labels).tolist() == [30] * 10
    assert not torch.equal(a.train_images, SyntheticSource(train_size=300, test_size=100, seed=4).load().train_images)


def test_declared_classes_must_match_the_files():
    from cifar_pl.errors import ConfigurationError

    dm = _datamodule(num_classes=100)
    with pytest.raises(ConfigurationError, match=r"num_classes=100.*10 classes"):
        dm.setup()


def test_val_size_larger_than_the_training_split_is_refused():
    from cifar_pl.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="val_size=500"):
        _datamodule(val_size=500).setup()


def test_epoch_batches_follow_distributed_sampler_order():
    from torch.utils.data import DistributedSampler

    from cifar_pl.data.sampling import EpochBatches

    data = list(range(103))
    batches = EpochBatches(data, batch_size=10, seed=7)
    reference = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
    for epoch in (0, 3):
        batches.set_epoch(epoch)
        reference.set_epoch(epoch)
        got = list(batches)
        assert [len(b) for b in got] == [10] * 10 + [3] and all(b.dtype == torch.int64 for b in got)
        assert torch.cat(got).tolist() == list(reference)
    batches.set_epoch(0)
    first = torch.cat(list(batches))
    batches.set_epoch(1)
    assert not torch.equal(first, torch.cat(list(batches)))


def test_epoch_batches_split_an_epoch_between_ranks():
    from cifar_pl.data.sampling import EpochBatches

    data = list(range(100))
    shares = [torch.cat(list(EpochBatches(data, batch_size=8, num_replicas=4, rank=r, seed=1))) for r in range(4)]
    assert all(len(s) == 25 for s in shares)
    assert sorted(torch.cat(shares).tolist()) == data  # disjoint, and together every sample once
