"""Which samples each training batch holds: a fresh permutation every epoch, a pure function of
(seed, epoch), cut into batches of sample indices.

The same batches feed every strategy: the single-process and DDP DataLoaders (each DDP rank takes its
share, as with ``DistributedSampler``) and the parameter server, which hands them out to its workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from cifar_pl.errors import ConfigurationError


class EpochBatches(DistributedSampler):
    """Yields int64 tensors of sample indices, one per batch; ``set_epoch`` picks the permutation.

    It is a ``DistributedSampler`` so that Lightning neither wraps it under DDP nor forgets to call
    ``set_epoch``; a DataLoader uses it with ``batch_size=None``, so a batch is fetched with one tensor
    index and no per-sample Python.
    """

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        # torch types the dataset as Dataset, which declares no __len__, yet the sampler needs one (torch's
        # own code ignores the same error): any Sized works
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.dataset_size = len(dataset)
        self.batch_size = batch_size
        self._resume: tuple[int, int] | None = None  # (epoch, batches already done) for the next iteration

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration over ``epoch`` start after its first ``batches_done`` batches."""
        self._resume = (epoch, batches_done)

    def permutation(self, epoch: int) -> Tensor:
        """This rank's samples for ``epoch``, in order (the same order ``DistributedSampler`` gives)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        if self.total_size > len(order):  # pad so that every rank gets as many samples, as DistributedSampler does
            order = torch.cat([order, order[: self.total_size - len(order)]])
        return order[self.rank : self.total_size : self.num_replicas]

    def batches(self, epoch: int) -> list[Tensor]:
        return list(torch.split(self.permutation(epoch), self.batch_size))

    def __iter__(self) -> Iterator[Tensor]:
        batches = self.batches(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            # consumed only by an iteration over the epoch it is for: Lightning also iterates once before
            # it sets the epoch, and that pass must not use it up
            batches = batches[self._resume[1] :]
            self._resume = None
        return iter(batches)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)


class ResumableLoader(DataLoader):
    """A training DataLoader whose place in the epoch survives a checkpoint.

    Lightning saves ``state_dict()`` with the fit loop and hands it back to ``load_state_dict`` before
    iterating again, so a run resumed from a checkpoint written mid-epoch (every N steps, on Ctrl-C or
    SIGTERM) continues with the next batch instead of replaying the epoch's start. ``position`` tells where
    training is: the epoch and how many of its batches are done.
    """

    def __init__(self, *args: Any, position: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        epoch, batches_done = self.position()
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochBatches):
            raise TypeError(f"a ResumableLoader needs an EpochBatches sampler, got {type(self.sampler).__name__}")
        if "batches_done" not in state_dict:  # the parameter server's rounds, saved mid-epoch
            raise ConfigurationError(
                f"the checkpoint was written in the middle of epoch {state_dict.get('epoch')} by a parameter-server "
                f"run, which deals an epoch's samples in another order than this strategy takes them: going on "
                f"from there would use some samples twice and others not at all. Resume it with "
                f"strategy=parameter_server, or from a checkpoint written at the end of an epoch (last.ckpt)."
            )
        self.sampler.resume_at(int(state_dict["epoch"]), int(state_dict["batches_done"]))
