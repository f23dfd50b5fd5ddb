"""Which training samples each epoch has used: the evidence that reassignment after a worker failure
neither drops nor repeats a sample, and the record of any sample left out under
``rejection_policy="skip"``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SKIPPED_LISTED = 1000  # skipped sample indices listed per epoch in the report; all are counted


@dataclass
class EpochUsage:
    counts: Tensor  # per sample: how many accepted gradients included it this epoch
    reassigned: int = 0  # samples whose micro-batch was handed to another worker
    rounds: int = 0
    skipped: Tensor | None = None  # per sample: whether its micro-batch was left out (rejected every time)

    def report(self, epoch: int) -> dict[str, Any]:
        counts = self.counts
        skipped = torch.zeros(0, dtype=torch.int64) if self.skipped is None else self.skipped.nonzero().flatten()
        return {
            "epoch": epoch,
            "samples": int(counts.numel()),
            "used_once": int((counts == 1).sum()),
            "unused": int((counts == 0).sum()),
            "used_more_than_once": int((counts > 1).sum()),
            "every_sample_exactly_once": bool((counts == 1).all()),
            "reassigned_samples": self.reassigned,
            "rounds": self.rounds,
            "skipped_samples": int(skipped.numel()),
            "skipped_indices": skipped[:SKIPPED_LISTED].tolist(),
        }


@dataclass
class SampleAccounting:
    """Per epoch, counts how often each training sample went into an accepted gradient."""

    num_samples: int
    epochs: dict[int, EpochUsage] = field(default_factory=dict)

    def _epoch(self, epoch: int) -> EpochUsage:
        if epoch not in self.epochs:
            self.epochs[epoch] = EpochUsage(torch.zeros(self.num_samples, dtype=torch.int32))
        return self.epochs[epoch]

    def used(self, epoch: int, indices: Tensor) -> None:
        self._epoch(epoch).counts.index_add_(0, indices.to(torch.int64), torch.ones(len(indices), dtype=torch.int32))

    def reassigned(self, epoch: int, count: int) -> None:
        self._epoch(epoch).reassigned += count

    def skipped(self, epoch: int, indices: Tensor) -> None:
        usage = self._epoch(epoch)
        if usage.skipped is None:
            usage.skipped = torch.zeros(self.num_samples, dtype=torch.bool)
        usage.skipped[indices.to(torch.int64)] = True

    def round_done(self, epoch: int) -> None:
        self._epoch(epoch).rounds += 1

    def report(self) -> list[dict[str, Any]]:
        return [usage.report(epoch) for epoch, usage in sorted(self.epochs.items())]

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "epochs": {
                e: {
                    "counts": u.counts.clone(),
                    "reassigned": u.reassigned,
                    "rounds": u.rounds,
                    **({"skipped": u.skipped.clone()} if u.skipped is not None else {}),
                }
                for e, u in self.epochs.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_samples = int(state["num_samples"])
        self.epochs = {
            int(e): EpochUsage(
                u["counts"].clone(),
                int(u["reassigned"]),
                int(u["rounds"]),
                u["skipped"].clone() if "skipped" in u else None,
            )
            for e, u in state["epochs"].items()
        }
