"""Typed access to the parts of Lightning's Trainer that its own annotations miss: ``callbacks``,
``datamodule`` and ``log_every_n_steps`` are set by its connectors without being declared on the class, and
the batch progress's ``current`` tracker is declared as the base class, without the ``processed`` count it
always has in a fit. One place for these, so the rest of the code is checked by mypy as written."""

from __future__ import annotations

from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

C = TypeVar("C", bound=Callback)


def callbacks_of(trainer: L.Trainer) -> list[Callback]:
    """The trainer's callbacks (set by Lightning's callback connector; not declared on ``Trainer``)."""
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    return callbacks


def find_callback(trainer: L.Trainer, kind: type[C]) -> C | None:
    """The trainer's first callback of type ``kind``, or None."""
    return next((c for c in callbacks_of(trainer) if isinstance(c, kind)), None)


def datamodule_of(trainer: L.Trainer) -> Any:
    """The fit's DataModule, or None (set by Lightning's data connector; not declared on ``Trainer``)."""
    return getattr(trainer, "datamodule", None)


def log_every_n_steps(trainer: L.Trainer) -> int:
    """How often step metrics are written (set by Lightning's logger connector; not declared on ``Trainer``)."""
    every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]
    return every


def batches_processed(trainer: L.Trainer) -> int:
    """Training batches processed so far in the current epoch. Lightning declares the progress's ``current``
    as ``_ReadyCompletedTracker``; in the training epoch loop it is a ``_ProcessedTracker``."""
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(current.processed)  # type: ignore[attr-defined]


def epochs_processed(trainer: L.Trainer) -> int:
    """Training epochs processed so far (see ``batches_processed`` for why this is typed here)."""
    current = trainer.fit_loop.epoch_progress.current
    return int(current.processed)  # type: ignore[attr-defined]


def process_rank() -> int:
    """This process's global rank as Lightning records it (0 outside distributed training), where no Trainer
    is at hand (``load_state_dict``, ``on_load_checkpoint``). Lightning keeps it as an attribute of its
    ``rank_zero_only`` function, which its types do not declare."""
    rank: int = rank_zero_only.rank  # type: ignore[attr-defined]
    return rank
