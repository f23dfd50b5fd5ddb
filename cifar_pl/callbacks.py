"""Callbacks of our own; everything else (checkpointing, progress bar, learning-rate monitor) is Lightning's."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class EpochTimer(Callback):
    """Logs each epoch's wall time (training plus validation) as ``time/epoch_seconds`` and keeps the
    times of this process's epochs for ``metrics.json``."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._epoch_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self.epoch_seconds.append(seconds)
        pl_module.log("time/epoch_seconds", seconds, on_epoch=True, on_step=False, sync_dist=True)

    def state_dict(self) -> dict[str, list[float]]:
        return {"epoch_seconds": list(self.epoch_seconds)}

    def load_state_dict(self, state_dict: dict[str, list[float]]) -> None:
        self.epoch_seconds = [float(s) for s in state_dict.get("epoch_seconds", [])]

    @property
    def mean_epoch_seconds(self) -> float | None:
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None
