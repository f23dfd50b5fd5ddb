"""Machine-dependent settings: precision that works on this device, and the CPU thread count."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Literal, get_args

import torch

from cifar_pl.errors import ConfigurationError

log = logging.getLogger(__name__)


def uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


PrecisionName = Literal["64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed"]
# Lightning's short forms, as Lightning reads them
_PRECISIONS: dict[str, PrecisionName] = {
    **{name: name for name in get_args(PrecisionName)},
    "64": "64-true",
    "32": "32-true",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
}


def resolve_precision(precision: str | int, accelerator: str = "auto") -> PrecisionName:
    """The precision by its full name. ``16-mixed`` on a machine without CUDA becomes ``bf16-mixed``: fp16
    autocast is GPU-only, and choosing bf16 here (instead of letting Lightning swap it with a warning) says
    so once, plainly."""
    resolved = _PRECISIONS.get(str(precision))
    if resolved is None:
        raise ConfigurationError(
            f"trainer.precision={precision!r} is not a precision Lightning knows here; use one of "
            f"{', '.join(get_args(PrecisionName))} (16-mixed is the default)."
        )
    if resolved == "16-mixed" and not uses_cuda(accelerator):
        log.info("precision=16-mixed asked for on CPU, where fp16 autocast does not exist: using bf16-mixed")
        return "bf16-mixed"
    return resolved


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(num_threads: int | None = None, processes: int = 1) -> int:
    """Use all cores this process may run on (shared evenly when ``processes`` run on one machine)."""
    threads = num_threads or max(1, available_cores() // max(1, processes))
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    return threads


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_third_party_noise() -> None:
    """Silence messages from our dependencies that tell the user nothing actionable: a deprecation inside
    Lightning's own pytree helper, the model summary's note that it sizes mixed-precision models as fp32,
    and Lightning's advertisement for a cloud logger."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropLightningTip())
