"""The LightningDataModule: loads a dataset as uint8 tensors, holds out a fixed-seed validation split, and
augments + normalises whole batches on the device in ``on_after_batch_transfer``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from cifar_pl.data.arrays import ImageArrays, IndexedImages, keep_batch
from cifar_pl.data.augment import BatchTransform
from cifar_pl.data.cifar import CIFAR10, CIFAR100, CifarSource
from cifar_pl.data.fashion_mnist import FashionMNISTSource
from cifar_pl.data.sampling import EpochBatches, ResumableLoader
from cifar_pl.data.synthetic import SyntheticSource
from cifar_pl.errors import ConfigurationError
from cifar_pl.trainer_state import batches_processed

SOURCES: dict[str, Callable[..., Any]] = {
    "cifar10": lambda: CifarSource(CIFAR10),
    "cifar100": lambda: CifarSource(CIFAR100),
    "fashion_mnist": FashionMNISTSource,
    "synthetic": SyntheticSource,
}


class ImageDataModule(L.LightningDataModule):
    """Any of the supported datasets (``SOURCES``), with a validation hold-out of ``val_size`` training
    images chosen by ``seed``; the official test split is the test set.

    ``tta`` is how this data is tested when ``tta`` is not given to train.py or evaluate.py: with each image's
    logits averaged with its mirror image's (for data whose flips keep the class, ``flip``), or one view.

    ``num_classes`` and ``channels`` are declared in the data config (the model config reads them) and are
    checked against the files when they are loaded.
    """

    def __init__(
        self,
        dataset: str,
        root: str = "data",
        num_classes: int = 10,
        channels: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        batch_size: int = 32,
        eval_batch_size: int = 512,
        val_size: int = 5000,
        seed: int = 0,
        download: bool = True,
        augment: bool = True,
        crop_padding: int = 4,
        flip: bool = True,
        tta: bool = False,
        num_workers: int = 0,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dataset not in SOURCES:
            raise ConfigurationError(f"unknown dataset {dataset!r}: data.dataset must be one of {sorted(SOURCES)}")
        mean, std, options = [float(m) for m in mean], [float(s) for s in std], dict(options or {})
        # kept in checkpoints; the logger gets the whole run config instead (see training.log_hparams)
        self.save_hyperparameters(logger=False)
        self.dataset, self.num_classes, self.channels = dataset, num_classes, channels
        self.batch_size, self.eval_batch_size, self.val_size = batch_size, eval_batch_size, val_size
        self.seed, self.download, self.num_workers = seed, download, num_workers
        # the data config's word that mirror images keep their class: training flips half the images when
        # augmenting, and a test may average each image's logits with its mirror's (``tta=true``)
        self.flip = flip
        # whether the final test averages each image's logits with its mirror's unless told (top-level tta)
        self.tta = tta
        self.root = Path(root).expanduser()
        self.source = SOURCES[dataset](**options)
        self.transform = BatchTransform(
            mean, std, padding=crop_padding if augment else 0, flip=flip and augment, seed=seed
        )
        self.classes: tuple[str, ...] = ()
        self.train_set: IndexedImages | None = None
        self.val_set: IndexedImages | None = None
        self.test_set: IndexedImages | None = None

    def prepare_data(self) -> None:
        """Download when missing (Lightning calls this on one process per node)."""
        self.source.prepare(self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        arrays = self.source.load(self.root)
        self._check_matches_config(arrays)
        n, val_size = len(arrays.train_labels), self.val_size
        if not 0 < val_size < n:
            raise ConfigurationError(
                f"data.val_size={val_size} must be between 1 and {n - 1}: the {self.dataset} training "
                f"split has {n} images and the validation hold-out is taken from it."
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
        self.train_set = IndexedImages(arrays.train_images[train_idx], arrays.train_labels[train_idx])
        self.val_set = IndexedImages(arrays.train_images[val_idx], arrays.train_labels[val_idx])
        self.test_set = IndexedImages(arrays.test_images, arrays.test_labels)
        self.classes = arrays.classes

    def _check_matches_config(self, arrays: ImageArrays) -> None:
        declared = (self.num_classes, self.channels)
        if declared != (arrays.num_classes, arrays.channels):
            raise ConfigurationError(
                f"the data config declares num_classes={declared[0]} and channels={declared[1]}, but the "
                f"{self.dataset} files under {self.root} have {arrays.num_classes} classes and "
                f"{arrays.channels} channels; fix data.num_classes / data.channels in the data config."
            )

    def _loader(
        self, dataset: IndexedImages | None, loader: type[DataLoader] = DataLoader, **kwargs: Any
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError("ImageDataModule.setup() must run before asking for a DataLoader")
        workers = self.num_workers
        return loader(
            dataset,
            # torch types collate_fn as taking a list of samples; with __getitems__ it gets the whole batch
            collate_fn=keep_batch,  # type: ignore[arg-type]
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # an explicit generator: creating an iterator then draws nothing from the global RNG, which
            # stays reserved for the model (dropout), as in a parameter-server worker
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_batches(self, num_replicas: int = 1, rank: int = 0) -> EpochBatches:
        """The training batches of every epoch, as sample indices (see ``EpochBatches``)."""
        if self.train_set is None:
            raise RuntimeError("ImageDataModule.setup() must run before asking for the training batches")
        return EpochBatches(self.train_set, self.batch_size, num_replicas, rank, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        # The order is a pure function of (seed, epoch): a resumed run replays it, and under DDP each rank
        # takes its own share of every epoch.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        return self._loader(
            self.train_set,
            ResumableLoader,
            batch_size=None,
            sampler=self.train_batches(world, rank),
            position=self._position,
        )

    def _position(self) -> tuple[int, int]:
        """The current epoch and how many of its training batches have been processed (for checkpoints)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, batches_processed(trainer)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, batch_size=self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
            return batch  # not one of our loaders' batches (e.g. the model summary's example input)
        images, labels, indices = batch
        trainer = self.trainer
        training = trainer is not None and trainer.training
        epoch = trainer.current_epoch if trainer is not None else 0
        return self.transform(images, indices, epoch, train=training), labels
