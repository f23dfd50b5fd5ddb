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
from cifar_pl.errors import RaisedBetweenSteps
from cifar_pl.trainer_state import epochs_processed


class EpochTimer(Callback):
    """Logs each epoch's wall time (training plus validation) as ``time/epoch_seconds`` and keeps the times of
    every epoch of the run for ``metrics.json``. The times travel in checkpoints, the running epoch's elapsed
    time included, so a resumed run reports the whole run and times its resumed epoch from where it stopped."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._epoch_start: float | None = None
        self._carried = 0.0  # seconds the current epoch ran before the checkpoint it was resumed from

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed mid-epoch gets no on_train_epoch_start for that epoch: its clock starts here
        self._epoch_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start, self._carried = time.perf_counter(), 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._running_seconds()
        self._epoch_start, self._carried = time.perf_counter(), 0.0
        self.epoch_seconds.append(seconds)
        pl_module.log("time/epoch_seconds", seconds, on_epoch=True, on_step=False, sync_dist=True)

    def _running_seconds(self) -> float:
        started = self._epoch_start
        return self._carried + (time.perf_counter() - started if started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_seconds": list(self.epoch_seconds), "running_epoch_seconds": self._running_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_seconds = [float(s) for s in state_dict.get("epoch_seconds", [])]
        self._carried = float(state_dict.get("running_epoch_seconds", 0.0))

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


class StopRequested(KeyboardInterrupt, RaisedBetweenSteps):
    """Raised by ``GracefulInterrupt`` where the training state is consistent: after an optimizer step (never
    inside an accumulation window), or after an epoch's validation and checkpoints. It is the one interruption
    ``RunCheckpoint`` saves ``last.ckpt`` for; Lightning treats it as Ctrl-C (status interrupted, exit 1)."""


class GracefulInterrupt(Callback):
    """Ctrl-C or SIGTERM (a cluster's pre-emption) during training stops it where its state is consistent,
    so the ``last.ckpt`` saved on the way out resumes exactly (the same epoch, step, learning rate, and no
    gradient half-accumulated and lost):

    - during an epoch: at the end of the current optimizer step;
    - on an epoch's last optimizer step or during its validation: once that validation and the epoch's
      checkpoints are done, so no epoch, the final one included, goes unvalidated.

    A second Ctrl-C (SIGINT) stops at once and saves nothing (``last.ckpt`` keeps the last consistent state). Before
    training starts (data loading, sanity check) and during the final test, signals are not announced: Ctrl-C
    stops at once; a SIGTERM that arrived during the sanity check stops the run as training starts. With
    several DDP processes, they agree to stop every ``sync_every_n_steps`` optimizer steps and at every
    epoch's end, so they stop at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, sync_every_n_steps: int = 10) -> None:
        self.sync_every_n_steps = sync_every_n_steps
        self._requested: str | None = None
        self._interrupted = False  # a SIGINT (Ctrl-C) came: the next one stops at once
        self._stop_after_epoch = False
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requested, self._interrupted, self._stop_after_epoch = None, False, False
        # after Lightning's own SIGTERM handler is in place, which would stop after any batch, mid-window too
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        if trainer.received_sigterm:  # noted by Lightning's handler during the sanity check
            self._requested = "SIGTERM"
        if self._agreed(trainer):  # before the first step, where Lightning's own handler would stop mid-window
            raise StopRequested(self._requested)

    def _on_signal(self, signum: int, frame: Any) -> None:
        pressed_twice = signum == signal.SIGINT and self._interrupted
        self._interrupted = self._interrupted or signum == signal.SIGINT
        if self._requested:
            if pressed_twice:  # stop now
                raise KeyboardInterrupt
            # a SIGTERM on top asks for nothing new, nor does the terminal's SIGINT after the SIGTERM that a
            # DDP launcher made of the same Ctrl-C and that got here first
            if signum == signal.SIGINT:
                print(
                    f"\nSIGINT: already stopping at the end of this optimizer step ({self._requested} asked first); "
                    f"Ctrl-C again to stop at once, without saving.",
                    file=sys.stderr,
                    flush=True,
                )
            return
        self._requested = signal.Signals(signum).name
        print(
            f"\n{self._requested}: stopping at the end of this optimizer step (after this epoch's validation if it "
            f"is the epoch's last) and saving last.ckpt (Ctrl-C again to stop at once, without saving)...",
            file=sys.stderr,
            flush=True,
        )

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether to stop; with several processes, whether any of them was asked to (a collective: every rank
        calls this at the same points)."""
        stop = bool(self._requested)
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if stop and not self._requested:
                self._requested = "another process's signal"
        return stop

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not ends_optimizer_step(trainer, batch_idx) or batch_idx + 1 >= trainer.num_training_batches:
            return  # mid-window; or the epoch's last step, whose validation comes first (on_train_epoch_end)
        # DDP ranks must stop at the same step, or the next all-reduce hangs: they agree every few steps (a
        # collective with a host sync: not on every step of a fast GPU run)
        if trainer.world_size > 1 and trainer.global_step % self.sync_every_n_steps:
            return
        if self._agreed(trainer):
            raise StopRequested(self._requested)  # Lightning's Ctrl-C path: on_exception (last.ckpt), exit 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the epoch's validation and its checkpoints (last.ckpt included) are done: end the fit here
        if self._agreed(trainer):
            trainer.should_stop = True
            self._stop_after_epoch = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_after_epoch:  # should_stop was overruled (trainer.min_epochs): stop before this epoch
            raise StopRequested(self._requested)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # also a signal after the last epoch's agreement: acted on, as it was announced
        stop = self._stop_after_epoch or self._agreed(trainer)
        self._restore()
        if stop:  # the last epoch's checkpoints are saved: nothing is lost by stopping before the test
            raise StopRequested(self._requested)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                if signal.getsignal(sig) == self._on_signal:  # not one installed after ours, on purpose
                    signal.signal(sig, handler)
        self._previous = {}


class ExactResume(Callback):
    """A run resumed from a checkpoint, written mid-epoch or at an epoch's end, continues exactly as if it had
    never stopped: the same next batch, and the same random state (dropout masks).

    Lightning restores weights, optimizer, schedule and loop counters; it also restores the position of a
    stateful training loader (``ResumableLoader``, ``RoundLoader``), except when ``configure_optimizers``
    asks for ``trainer.estimated_stepping_batches`` (OneCycleLR does): the loader is then built, and its
    first batch prefetched, before the checkpoint is read, and its saved position is never applied
    (Lightning issue #20550, open; fixed by the pending PR #21765 the same way as here). That early iterator
    is also built before the epoch is known, and Lightning keeps it for the first epoch a resumed fit runs
    (it makes a new one per epoch only in a fresh fit): resumed from an epoch's end, the next epoch would
    replay epoch 0's order. So as a resumed fit starts training, this sets the sampler's epoch, applies the
    saved position and recreates the loader's iterator. It uses Lightning's internal ``fit_loop`` fields;
    ``tests/test_reliability.py`` checks the result against a run that never stopped.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            # this process's device only, as Lightning's DDP gives each process one: a checkpoint must load
            # on a machine with fewer GPUs
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        saved = state_dict.get("cuda")
        if saved is None or not torch.cuda.is_available():
            return
        if isinstance(saved, (list, tuple)):  # checkpoints written before: every visible GPU's state
            if not saved:
                return
            device = torch.cuda.current_device()
            saved = saved[device] if device < len(saved) else saved[0]
        torch.cuda.set_rng_state(saved)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if not fit_loop.is_resuming or fit_loop._combined_loader is None or fit_loop._data_fetcher is None:
            return  # a fresh fit: Lightning makes each epoch's iterator when the epoch starts
        for loader in fit_loop._combined_loader.flattened:
            _set_sampler_epoch(loader, epochs_processed(trainer))  # the epoch training goes on with
        fit_loop._load_combined_loader_states()  # the position within it, if resumed mid-epoch
        iter(fit_loop._data_fetcher)  # a new iterator, for that epoch, from that position
