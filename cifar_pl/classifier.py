"""The LightningModule: cross-entropy classification with AdamW and a one-cycle learning-rate schedule.

Only primitives are saved as hyperparameters, so ``ImageClassifier.load_from_checkpoint(path)`` rebuilds
the network from the checkpoint alone, without this project's configs.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_pl.models import build_network, count_parameters


class ImageClassifier(L.LightningModule):
    """Trains one of ``cifar_pl.models.NETWORKS``.

    ``lr`` is the peak learning rate of OneCycleLR, which is stepped after every optimizer step over
    ``trainer.estimated_stepping_batches`` steps (so gradient accumulation is accounted for).
    """

    def __init__(
        self,
        arch: str = "cnn",
        in_channels: int = 3,
        num_classes: int = 10,
        dropout: float = 0.5,
        lr: float = 0.01,
        weight_decay: float = 0.01,
        pct_start: float = 0.25,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(arch, in_channels, num_classes, dropout=dropout)
        # lets the model summary show input/output shapes and FLOPs; every dataset is fed at 32x32
        self.example_input_array = torch.zeros(2, in_channels, 32, 32)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # per-class results for evaluate.py; rows are true classes, columns predictions
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.net)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.test_confusion.update(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=hp.lr,
            total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            pct_start=hp.pct_start,
            div_factor=hp.div_factor,
            final_div_factor=hp.final_div_factor,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }
