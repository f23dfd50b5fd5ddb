"""Checkpoints that a stopped run can be resumed from as if it had never stopped.

``AtomicCheckpointIO`` writes them atomically: to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash at any moment leaves either the previous checkpoint or the new one,
never a torn file. (Lightning's default writes to a temporary file in the system's temp folder and moves it;
when that folder is on another file system, e.g. a tmpfs /tmp, the move is a copy and is not atomic.)

``RunCheckpoint`` decides when a checkpoint is written and what a resumed run remembers of the best ones."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifar_pl.errors import RaisedBetweenSteps
from cifar_pl.files import copy_atomically, write_atomically
from cifar_pl.trainer_state import process_rank

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` for local paths, with write-then-rename saves."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options; got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a failure here touches no file at all
        write_atomically(path, buffer.getbuffer())


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with what resuming needs on top:

    - ``save_on_exception`` saves only for an exception raised where the state is consistent
      (``RaisedBetweenSteps``: ``GracefulInterrupt``'s ``StopRequested``, or the parameter server stopping on a
      micro-batch no worker can compute, before its round). A crash, or a second Ctrl-C, can land inside an
      accumulation window or an optimizer step; a checkpoint from there would resume differently, so the last
      consistent one is kept instead.
    - ``every_n_train_steps`` skips an epoch's last step: Lightning resumes a checkpoint from there as a
      finished epoch and would skip its validation. The epoch-end checkpoint follows moments later.
    - Resumed into a new run directory (the default), the best checkpoints of the run being resumed are
      copied into this run's folder with their scores, so this run tests the one an uninterrupted run would.
      (Lightning keeps them only when the folder is unchanged.)
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, RaisedBetweenSteps):
            super().on_exception(trainer, pl_module, exception)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous_dir = state_dict.get("dirpath", self.dirpath)
        if self.dirpath is None or previous_dir == self.dirpath:
            super().load_state_dict(state_dict)
        elif self.monitor is not None:
            self._carry_best_over(state_dict)
        # last.ckpt and recovery.ckpt (no monitor) are simply written anew in this run's folder

    def _carry_best_over(self, state_dict: dict[str, Any]) -> None:
        assert self.dirpath is not None  # checked by the caller
        best = {str(path): score for path, score in state_dict.get("best_k_models", {}).items()}
        missing = [path for path in best if not Path(path).is_file()]
        if not best or missing:
            log.warning(
                "The run being resumed recorded its best checkpoints (%s) in %s, but %s no longer there: this "
                "run looks for its best checkpoint afresh, from its own validations only.",
                self.monitor,
                state_dict.get("dirpath"),
                f"{missing[0]} is" if missing else "none is",
            )
            return
        moved = {path: str(Path(self.dirpath) / Path(path).name) for path in best}
        if process_rank() == 0:  # the process that writes checkpoints; the others only keep the record
            for old, new in moved.items():
                copy_atomically(old, new)
        self.best_k_models = {moved[path]: score for path, score in best.items()}
        self.best_model_path = moved.get(str(state_dict.get("best_model_path")), "")
        self.best_model_score = state_dict.get("best_model_score")
        self.kth_best_model_path = moved.get(str(state_dict.get("kth_best_model_path")), "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.current_score = state_dict.get("current_score")
        log.info("Carried the best checkpoint of the resumed run over: %s", self.best_model_path)
