"""Lightning's DDP, arranged so that it works from train.py, in a Hydra multirun, and on many machines.

On one machine the training processes are spawned for the fit (never by re-running the script, which in
a multirun would relaunch the whole sweep), with the CPU cores shared between them, and the fit's
progress and callback states (epochs, steps, checkpoint paths, epoch times) come back to the main process,
so train.py reports a DDP run exactly like a single-process one. Under torchrun or SLURM, which start one
process per device themselves, it is plain Lightning DDP.
"""

from __future__ import annotations

import io
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from cifar_pl.runtime import available_cores, quiet_third_party_noise


class _StateReturningLauncher(_MultiProcessingLauncher):
    """Brings the fit loop's and the callbacks' ``state_dict`` back from rank 0 (Lightning brings only the
    weights, the trainer state and the callback metrics)."""

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        state = {"fit_loop": trainer.fit_loop.state_dict(), "callbacks": {c.state_key: c.state_dict() for c in trainer.callbacks}}
        buffer = io.BytesIO()
        torch.save(state, buffer)  # as Lightning does for the metrics: bytes, read back weights_only
        extra["cifar_pl_state_bytes"] = buffer.getvalue()
        return extra

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        state = torch.load(io.BytesIO(extra["cifar_pl_state_bytes"]), weights_only=True)
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        for callback in trainer.callbacks:
            if callback.state_key in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][callback.state_key])


class SpawnDDPStrategy(DDPStrategy):
    """DDP (gloo on CPU, NCCL on GPU) with the launching described in the module docstring."""

    def __init__(self, threads_per_process: int | None = None, **kwargs: Any) -> None:
        kwargs["start_method"] = "spawn"
        super().__init__(**kwargs)
        self.threads_per_process = threads_per_process

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:  # torchrun, SLURM: processes exist already
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _StateReturningLauncher(self, start_method="spawn")

    def setup_environment(self) -> None:
        quiet_third_party_noise()  # in spawned processes too
        torch.set_num_threads(self.threads_per_process or max(1, available_cores() // max(1, self.num_processes)))
        super().setup_environment()
