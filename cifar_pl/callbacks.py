"""Callbacks of our own; everything else (checkpointing, progress bar, learning-rate monitor) is Lightning's."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.data_connector import _set_sampler_epoch

from cifar_pl.classifier import ends_optimizer_step
from cifar_pl.trainer_state import epochs_processed


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

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
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
    """Ctrl-C or SIGTERM (a cluster's pre-emption) stops training at the next optimizer-step boundary, not
    in the middle of a step or an accumulation window, so the checkpoint written on the way out
    (``last.ckpt``: ``save_on_exception``) holds a consistent step and resuming from it continues at the
    same epoch, step and learning rate, with no gradient half-accumulated and lost. A second Ctrl-C stops
    at once. With several DDP processes, they stop together at the next multiple of ``sync_every_n_steps``.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, sync_every_n_steps: int = 10) -> None:
        self.sync_every_n_steps = sync_every_n_steps
        self._requested: str | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's own SIGTERM handler is in place, which stops after any batch, mid-window too
        if threading.current_thread() is threading.main_thread():
            self._requested = None
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._requested:
            if signum == signal.SIGINT:  # pressed twice: stop now
                raise KeyboardInterrupt
            return  # a SIGTERM on top (e.g. passed on by a DDP launcher) asks for nothing new
        self._requested = signal.Signals(signum).name
        print(
            f"\n{self._requested}: stopping at the end of this optimizer step and saving last.ckpt "
            f"(Ctrl-C again to stop at once)...",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not ends_optimizer_step(trainer, batch_idx):
            return
        stop = bool(self._requested)
        if trainer.world_size > 1:
            # DDP ranks must stop at the same step, or the next all-reduce hangs: they agree every few
            # steps (a collective with a host sync: not on every step of a fast GPU run)
            if trainer.global_step % self.sync_every_n_steps:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise KeyboardInterrupt(self._requested or "stop")  # Lightning's graceful path: on_exception, exit

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                if signal.getsignal(sig) == self._on_signal:  # not one installed after ours, on purpose
                    signal.signal(sig, handler)
        self._previous = {}


class ExactResume(Callback):
    """A run resumed from a checkpoint, even one written mid-epoch, continues exactly as if it had never
    stopped: the same next batch, and the same random state (dropout masks).

    Lightning restores weights, optimizer, schedule and loop counters; it also restores the position of a
    stateful training loader (``ResumableLoader``, ``RoundLoader``), except when ``configure_optimizers``
    asks for ``trainer.estimated_stepping_batches`` (OneCycleLR does): the loader is then built, and its
    first batch prefetched, before the checkpoint is read, and its saved position is never applied
    (Lightning issue #20550, open; fixed by the pending PR #21765 the same way as here). So as training
    starts, this applies the saved position and recreates the loader's iterator. It uses Lightning's
    internal ``fit_loop`` fields; ``tests/test_reliability.py`` checks the result against a run that never
    stopped.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if not (
            fit_loop.restarting and fit_loop._combined_loader_states_to_load and fit_loop._combined_loader is not None
        ):
            return  # a fresh run, or Lightning applied the position itself
        for loader in fit_loop._combined_loader.flattened:
            _set_sampler_epoch(loader, epochs_processed(trainer))
        fit_loop._load_combined_loader_states()
        assert fit_loop._data_fetcher is not None  # set up with the combined loader
        iter(fit_loop._data_fetcher)  # a new iterator, from the restored position
