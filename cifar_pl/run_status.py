"""``metrics.json`` from a run's first moment: ``"status": "running"`` as soon as it starts, so that a job
killed without warning (SIGKILL, out of memory) is visible as such, and ``"failed"`` with the error for a
run that stops before training does (a bad setting, a missing checkpoint, a component that cannot be built).
Once training has started, ``cifar_pl.training.train`` writes the full record itself, whatever the outcome."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from cifar_pl.files import write_json

F = TypeVar("F", bound=Callable[..., Any])


def is_first_process() -> bool:
    """Rank 0 as the launcher set it in the environment (torchrun, SLURM), before any Trainer exists."""
    return getattr(rank_zero_only, "rank", 0) == 0


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """What is known about a run before anything is built: its choices and where it is."""
    from cifar_pl.training import hydra_overrides  # imported here: training applies ``records_status``

    def chosen(key: str) -> Any:
        node = cfg.get(key.split(".")[0])
        return node.get(key.split(".")[1]) if node is not None and hasattr(node, "get") else None

    return {
        "status": "running",
        "dataset": chosen("data.dataset"),
        "model": chosen("model.arch"),
        "seed": cfg.get("seed"),
        "overrides": hydra_overrides(),
        "run_dir": str(cfg.paths.output_dir),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def recorded_status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def records_status(train: F) -> F:
    """Wrap ``train(cfg)``: write ``"status": "running"`` before it starts, and ``"failed"`` (or
    ``"interrupted"``) with the error if it raises before writing a record of its own."""

    @functools.wraps(train)
    def wrapper(cfg: DictConfig, *args: Any, **kwargs: Any) -> Any:
        is_worker = cfg.get("strategy") is not None and cfg.strategy.get("role") == "worker"
        if is_worker or not is_first_process():  # a worker's record is the server's; rank 0 writes for DDP
            return train(cfg, *args, **kwargs)
        from cifar_pl.training import METRICS_FILE

        path = Path(cfg.paths.output_dir) / METRICS_FILE
        record = run_record(cfg)
        write_json(path, record)
        try:
            return train(cfg, *args, **kwargs)
        except BaseException as error:
            if recorded_status(path) == "running":  # stopped before training wrote its own record
                record["status"] = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
                record["error"] = f"{type(error).__name__}: {error}"
                write_json(path, record)
            raise

    return wrapper  # type: ignore[return-value]
