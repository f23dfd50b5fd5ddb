"""The LightningModule: cross-entropy classification with AdamW and a one-cycle learning-rate schedule.

Only primitives are saved as hyperparameters, so ``ImageClassifier.load_from_checkpoint(path)`` rebuilds
the network from the checkpoint alone, without this project's configs.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_pl.errors import ConfigurationError
from cifar_pl.models import DROPOUT_PLACEMENTS, build_network, count_parameters
from cifar_pl.trainer_state import log_every_n_steps, process_rank

log = logging.getLogger(__name__)


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """True on the micro-batch that closes an accumulation window: its optimizer step follows."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches


def one_cycle_warmup(pct_start: float, total_steps: int) -> float:
    """The warm-up fraction to give OneCycleLR. It divides by ``pct_start * total_steps - 1``, so a warm-up
    of exactly one step (a 4-step run at the default 0.25) would end in a ZeroDivisionError deep inside
    torch; such a run warms up for half a step instead, i.e. starts at its peak."""
    return pct_start / 2 if math.isclose(pct_start * total_steps, 1.0) else pct_start


def use_test_time_flip(
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    enabled: bool | None,
    trained_on_mirrors: bool | None = None,
) -> bool:
    """Switch test-time augmentation on or off and return which. ``enabled`` is ``tta=true|false``; ``None``
    leaves it to the data config (``data.tta``), which asks for it only where training flipped images
    (``trained_on_mirrors``; by default what ``datamodule`` trains with): a network that never saw mirror
    images lost 0.5-1.1 points when they were averaged in (docs/experiments.md), so that default is one view,
    and ``tta=true`` on such a network gets a warning. Asked for explicitly, it is refused for data whose
    config does not say that mirror images keep their class (``data.flip``): averaging would mix classes."""
    mirrors_keep_class = bool(getattr(datamodule, "flip", False))
    if trained_on_mirrors is None:
        trained_on_mirrors = bool(getattr(getattr(datamodule, "transform", None), "flip", False))
    if enabled is None:  # the data config's default: quietly one view wherever mirrors cannot help
        enabled = (
            bool(getattr(datamodule, "tta", False))
            and mirrors_keep_class
            and trained_on_mirrors
            and isinstance(model, ImageClassifier)
        )
    elif enabled and not isinstance(model, ImageClassifier):
        raise ConfigurationError(f"tta=true needs an ImageClassifier model, not {type(model).__name__}.")
    elif enabled and not mirrors_keep_class:
        raise ConfigurationError(
            f"tta=true averages each test image's logits with its mirror image's, but the data config of "
            f"{getattr(datamodule, 'dataset', type(datamodule).__name__)} says mirror images may not keep their "
            f"class (data.flip=false). Leave out tta=true, or set data.flip=true if horizontal flips are "
            f"label-preserving for this data."
        )
    elif enabled and not trained_on_mirrors:
        log.warning(
            "tta=true averages each test image's logits with its mirror image's, but this network was trained "
            "without flips (data.augment=false): it never saw mirror images, and averaging them in has cost "
            "0.5-1.1 points of test accuracy (docs/experiments.md)."
        )
    if isinstance(model, ImageClassifier):
        model.test_time_flip = enabled
    return enabled


class ImageClassifier(L.LightningModule):
    """Trains one of ``cifar_pl.models.NETWORKS``.

    ``lr`` is the peak learning rate of OneCycleLR, which is stepped after every optimizer step over
    ``trainer.estimated_stepping_batches`` steps (so gradient accumulation is accounted for).
    ``label_smoothing`` applies to the training loss only: validation and test losses are plain
    cross-entropy, comparable between runs whatever they trained with.

    ``test_time_flip`` (not a hyperparameter: a way of testing, set by ``tta=true`` in train.py and
    evaluate.py) makes the test average the logits of each image and its mirror image; the single-view
    accuracy is then logged too, as ``test/acc_single_view``.
    """

    train_sums: Tensor  # a buffer: summed loss, correct predictions and samples of the epoch so far

    def __init__(
        self,
        arch: str = "cnn",
        in_channels: int = 3,
        num_classes: int = 10,
        dropout: float = 0.5,
        dropout_placement: str = "both",
        label_smoothing: float = 0.0,
        lr: float = 0.01,
        weight_decay: float = 0.01,
        pct_start: float = 0.25,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ) -> None:
        super().__init__()
        # kept in checkpoints; the logger gets the whole run config instead (see training.log_hparams)
        self.save_hyperparameters(logger=False)
        self.arch, self.in_channels, self.num_classes = arch, in_channels, num_classes
        if dropout_placement not in DROPOUT_PLACEMENTS:
            raise ConfigurationError(
                f"model.dropout_placement={dropout_placement!r} is not one of {list(DROPOUT_PLACEMENTS)}: "
                f"dropout after both hidden layers of the head, the first (64-wide) or the last (32-wide) only."
            )
        for name, value in (("dropout", dropout), ("label_smoothing", label_smoothing)):
            if not 0.0 <= value < 1.0:
                raise ConfigurationError(f"model.{name}={value} must be at least 0 and below 1.")
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        self.pct_start, self.div_factor, self.final_div_factor = pct_start, div_factor, final_div_factor
        self.net = build_network(arch, in_channels, num_classes, dropout, dropout_placement)
        self.test_time_flip = False
        # lets the model summary show input/output shapes and FLOPs; every dataset is fed at 32x32
        self.example_input_array = torch.zeros(2, in_channels, 32, 32)
        # Training loss and accuracy are running sums (summed loss, correct predictions, samples), logged
        # once per epoch: logging a torchmetrics Metric every step costs Lightning ~0.5 ms per batch, ~5% of
        # a CPU step. The sums are also what parameter-server workers report (see ``training_batch_done``).
        self.register_buffer("train_sums", torch.zeros(3), persistent=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc_single_view = MulticlassAccuracy(num_classes, average="micro")
        # per-class results for evaluate.py; rows are true classes, columns predictions
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.net)

    def forward(self, x: Tensor) -> Tensor:
        # a no-op for batches from BatchTransform, which are already channels-last
        return self.net(x.contiguous(memory_format=torch.channels_last))

    def classification_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean training loss of a batch (cross-entropy, label-smoothed if set), and how many of its
        predictions are right (no gradient)."""
        return self.training_loss(self(x), y)

    def training_loss(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``classification_loss`` from logits computed elsewhere (a DDP wrapper's forward, in a benchmark)."""
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == y).sum()
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), correct

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, correct = self.classification_loss(x, y)
        self.training_batch_done(loss.detach() * len(y), correct, len(y), batch_idx)
        return loss

    def training_batch_done(self, loss_sum: Tensor | float, correct: Tensor | int, count: int, batch_idx: int) -> None:
        """Add a batch's summed loss, correct predictions and sample count to the epoch's totals, and log
        the step metrics when due. The parameter-server strategy calls this with its workers' totals."""
        sums = self.train_sums
        sums[0] += loss_sum
        sums[1] += correct
        sums[2] += count
        if self._writes_step_metrics(batch_idx):
            self.log("train/loss_step", float(loss_sum) / count, on_step=True, on_epoch=False, prog_bar=True)
            scheduler = self.lr_schedulers()
            assert isinstance(scheduler, LRScheduler)  # configure_optimizers returns exactly one
            self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)

    def _writes_step_metrics(self, batch_idx: int) -> bool:
        """True on the batches whose step metrics Lightning writes to the logger: the micro-batch that ends
        an accumulation window, every ``log_every_n_steps`` optimizer steps. Logging on other batches costs
        ~0.25 ms each and would show only in the progress bar."""
        trainer = self.trainer
        every = log_every_n_steps(trainer)
        return ends_optimizer_step(trainer, batch_idx) and (self.global_step + 1) % every == 0

    def on_train_epoch_end(self) -> None:
        loss_sum, correct, count = self.trainer.strategy.reduce(self.train_sums.clone(), reduce_op="sum").tolist()
        self.train_sums.zero_()
        if count:
            self.log("train/loss", loss_sum / count, sync_dist=True)
            self.log("train/acc", correct / count, prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the epoch's running sums, of every process (each rank takes part in saving), so that a run resumed
        # mid-epoch reports that whole epoch's training loss and accuracy
        checkpoint["train_sums"] = self.trainer.strategy.reduce(self.train_sums.clone(), reduce_op="sum").cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sums = checkpoint.get("train_sums")
        if sums is not None:  # kept by one process, so that the epoch-end reduction counts them once
            self.train_sums.copy_(sums if process_rank() == 0 else torch.zeros_like(sums))

    def on_train_start(self) -> None:
        """A resumed run must plan as many optimizer steps as the run it resumes: the one-cycle schedule is laid
        out over the whole run when it starts, and the checkpoint restores that length; it cannot stretch."""
        scheduler = self.lr_schedulers()
        planned = max(1, int(self.trainer.estimated_stepping_batches))
        if isinstance(scheduler, OneCycleLR) and scheduler.total_steps != planned:
            raise ConfigurationError(
                f"the checkpoint being resumed ({self.trainer.ckpt_path}) holds a one-cycle learning-rate schedule "
                f"laid out over {scheduler.total_steps} optimizer steps, but this run's settings make "
                f"{planned}. The schedule cannot be extended or shortened: resume with the settings of the run "
                f"that wrote the checkpoint (trainer.max_epochs, data.batch_size, trainer.accumulate_grad_batches, "
                f"devices), or start a new run to train for longer."
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        if self.test_time_flip:
            self.test_acc_single_view(logits, y)
            self.log("test/acc_single_view", self.test_acc_single_view)
            logits = (logits + self(x.flip(-1))) / 2  # the last dimension is the width: a mirror image
        self.test_acc(logits, y)
        self.test_confusion.update(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=self.lr,
            total_steps=total_steps,
            pct_start=one_cycle_warmup(self.pct_start, total_steps),
            div_factor=self.div_factor,
            final_div_factor=self.final_div_factor,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
