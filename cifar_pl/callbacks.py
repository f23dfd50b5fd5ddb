"""Callbacks of our own; everything else (checkpointing, progress bar, learning-rate monitor) is Lightning's."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

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


class Throughput(Callback):
    """Optimizer steps per second after the first ``warmup_steps`` (start-up, first kernels and worker
    connections excluded), for benchmarks that compare training strategies."""

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.steps, self.seconds = 0, 0.0
        self._start: float | None = None
        self._start_step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int) -> None:
        if self._start is None and trainer.global_step >= self.warmup_steps:
            self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start
            self.steps = trainer.global_step - self._start_step

    def state_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.steps, self.seconds = int(state_dict["steps"]), float(state_dict["seconds"])

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else float("nan")


class GracefulInterrupt(Callback):
    """Ctrl-C stops training at the end of the current batch instead of in the middle of it, so the
    checkpoint written on the way out (``last.ckpt``, see ``save_on_exception``) holds a consistent step:
    resuming from it continues at the same epoch, step and learning rate. A second Ctrl-C stops at once.
    (SIGTERM, e.g. from a cluster scheduler, takes the same path through Lightning's own handler.)
    """

    def __init__(self) -> None:
        self._requested = False
        self._previous: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._requested = False
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._requested:  # pressed twice: stop now
            raise KeyboardInterrupt
        self._requested = True
        print("\nStopping after this batch and saving a checkpoint (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._requested:
            raise KeyboardInterrupt  # Lightning's graceful path: on_exception callbacks (checkpoint), then exit

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
