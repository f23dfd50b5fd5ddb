"""Lightning's DDP, arranged so that it works from train.py, in a Hydra multirun, and on many machines.

On one machine the training processes are spawned for the fit (never by re-running the script, which in
a multirun would relaunch the whole sweep), with the CPU cores shared between them, and the fit's
progress and callback states (epochs, steps, checkpoint paths, epoch times) come back to the main process,
so train.py reports a DDP run exactly like a single-process one. Under torchrun or SLURM, which start one
process per device themselves, it is plain Lightning DDP.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.call import _interrupt  # Lightning's own handling of an interrupted fit
from lightning.pytorch.trainer.states import TrainerStatus
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel

from cifar_pl.errors import ConfigurationError, UserFacingError
from cifar_pl.runtime import available_cores, quiet_third_party_noise
from cifar_pl.trainer_state import callbacks_of

log = logging.getLogger(__name__)


class _StateReturningLauncher(_MultiProcessingLauncher):
    """Brings the fit loop's and the callbacks' ``state_dict`` back from rank 0 (Lightning brings only the
    weights, the trainer state and the callback metrics), and leaves stopping to the ranks: on Ctrl-C or
    SIGTERM this process asks every rank to stop gracefully (SIGTERM: stop at an agreed step and save) and
    waits for them, instead of quitting under them. A user-facing error in a rank (a missing dataset, a
    configuration error found during the fit) is raised again here as itself, so it reaches the user as
    one paragraph; torch would wrap it in a ``ProcessRaisedException`` holding only its traceback's text."""

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        # the ranks put their user-facing errors here; it travels to them with this launcher when they spawn
        self._user_errors = multiprocessing.get_context("spawn").SimpleQueue()
        try:
            return self._launch(function, *args, trainer=trainer, **kwargs)
        except ProcessException as error:
            if not self._user_errors.empty():
                user_error: UserFacingError = self._user_errors.get()
                raise user_error from None
            raise error
        finally:
            self._user_errors.close()

    def _launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return super().launch(function, *args, trainer=trainer, **kwargs)
        received: list[str] = []

        def stop_ranks(signum: int, frame: Any) -> None:
            received.append(signal.Signals(signum).name)
            for process in self.procs:
                if process.is_alive() and process.pid is not None:  # a started process has a pid
                    os.kill(process.pid, signal.SIGTERM)

        previous = {sig: signal.signal(sig, stop_ranks) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = super().launch(function, *args, trainer=trainer, **kwargs)
        except ProcessException as error:
            if received:  # the ranks died after they were asked to stop: an interrupted run, not a crash
                log.warning("%s: the training processes did not stop cleanly: %s", received[0], error)
                raise KeyboardInterrupt(received[0]) from error
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if trainer is not None and trainer.interrupted:  # the ranks stopped and saved (state from rank 0)
            raise KeyboardInterrupt(received[0] if received else "interrupted")  # exit status 1, as one process
        return result

    def _wrapping_function(
        self, process_idx: int, trainer: L.Trainer | None, function: Callable, *args: Any, **kwargs: Any
    ) -> None:
        """In each rank, an interrupt takes the path Lightning gives it in a single process (callbacks'
        on_exception: last.ckpt; status interrupted), and rank 0's results still go back to this process."""

        def stop_gracefully(*fn_args: Any, **fn_kwargs: Any) -> Any:
            try:
                return function(*fn_args, **fn_kwargs)
            except KeyboardInterrupt as exception:
                if trainer is None:
                    raise
                for sig in (signal.SIGINT, signal.SIGTERM):  # saving now: a late signal must not cut it short
                    signal.signal(sig, signal.SIG_IGN)
                _interrupt(trainer, exception)
                trainer._teardown()
                return None
            except UserFacingError as error:
                self._user_errors.put(error)
                raise

        super()._wrapping_function(process_idx, trainer, stop_gracefully, *args, **kwargs)

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        state = {
            "fit_loop": trainer.fit_loop.state_dict(),
            "callbacks": {c.state_key: c.state_dict() for c in callbacks_of(trainer)},
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)  # as Lightning does for the metrics: bytes, read back weights_only
        extra["cifar_pl_state_bytes"] = buffer.getvalue()
        return extra

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        state = torch.load(io.BytesIO(extra["cifar_pl_state_bytes"]), weights_only=True)
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        for callback in callbacks_of(trainer):
            if callback.state_key in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][callback.state_key])


COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")


def register_comm_hook(model: DistributedDataParallel, compression: str, rank: int = 1, start_step: int = 100) -> None:
    """Register one of torch's DDP communication hooks on ``model``: ``fp16``/``bf16`` all-reduce the
    gradient buckets in half precision (then divide by the world size and cast back); ``powersgd`` sends a
    rank-``rank`` approximation of each matrix gradient with error feedback, after ``start_step`` steps of
    plain all-reduce. ``none`` leaves DDP's float32 all-reduce. All work with gloo on CPU (torch 2.x)."""
    if compression == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=start_step
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif compression != "none":
        raise ValueError(f"no DDP communication hook {compression!r}; one of {', '.join(COMM_HOOKS)}")


class SpawnDDPStrategy(DDPStrategy):
    """DDP (gloo on CPU, NCCL on GPU) with the launching described in the module docstring, and an
    optional gradient communication hook (``compression``)."""

    def __init__(
        self,
        threads_per_process: int | None = None,
        compression: str = "none",
        powersgd_rank: int = 1,
        powersgd_start_step: int = 100,
        **kwargs: Any,
    ) -> None:
        if compression not in COMM_HOOKS:
            raise ConfigurationError(
                f"strategy.compression={compression!r} is not a DDP communication hook: strategy=ddp takes "
                f"{', '.join(COMM_HOOKS)} (topk exists only on strategy=parameter_server)"
            )
        if powersgd_rank < 1 or powersgd_start_step < 2:
            raise ConfigurationError(
                f"strategy.powersgd_rank={powersgd_rank} must be at least 1 and strategy.powersgd_start_step="
                f"{powersgd_start_step} at least 2 (PowerSGD's error feedback needs steps of plain all-reduce first)"
            )
        kwargs["start_method"] = "spawn"
        super().__init__(**kwargs)
        self.threads_per_process = threads_per_process
        self.compression, self.powersgd_rank, self.powersgd_start_step = compression, powersgd_rank, powersgd_start_step
        self.comm_hook = compression  # the hook registered: fp16 falls back to bf16 without a loss scaler

    def _register_ddp_hooks(self) -> None:
        """Lightning registers ``ddp_comm_hook`` only on CUDA and ignores it silently on CPU; torch's hooks
        work with gloo on CPU too, so ours is registered on any device.

        torch's fp16 hook casts without scaling: a gradient entry above 65,504 becomes inf. Under
        ``16-mixed`` on a GPU, Lightning's GradScaler sees that and skips the step; without one (on CPU,
        where 16-mixed runs as bf16-mixed, or in 32-true) the inf would reach gradient clipping and turn
        into NaN weights. There, fp16 falls back to the bf16 hook (float32's range), with a warning."""
        super()._register_ddp_hooks()
        self.comm_hook = self.compression
        if self.compression == "fp16" and getattr(self.precision_plugin, "scaler", None) is None:
            self.comm_hook = "bf16"
            if self.global_rank == 0:
                log.warning(
                    "strategy.compression=fp16: DDP's fp16 hook does not scale, and without a loss scaler "
                    "(trainer.precision=16-mixed on a GPU) a gradient entry above 65,504 would silently become "
                    "inf, then NaN after gradient clipping; the gradients are all-reduced in bf16 instead "
                    "(the same bytes, float32's range). Set strategy.compression=bf16 to silence this."
                )
        if self.comm_hook != "none":
            assert isinstance(self.model, DistributedDataParallel)
            register_comm_hook(self.model, self.comm_hook, self.powersgd_rank, self.powersgd_start_step)

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:  # torchrun, SLURM: processes exist already
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _StateReturningLauncher(self, start_method="spawn")

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not torch.distributed.is_initialized():
            # the launching process holds no trained weights (its ranks do); when the fit fails or is
            # interrupted, its callbacks' save_on_exception must not overwrite rank 0's last.ckpt
            log.debug("not saving %s from the launching process", filepath)
            return
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def teardown(self) -> None:
        """Under torchrun or SLURM the processes outlive the fit: train.py goes on to test on rank 0 alone while
        the other ranks exit. So each rank leaves the process group here (after a barrier when the fit ended
        normally, so none leaves while another still needs it); otherwise the test's collectives (Lightning's
        ``prepare_data`` barrier, torchmetrics' sync) would wait forever for ranks that are gone."""
        # the module's _trainer, as Lightning's DDPStrategy.teardown reads it (None when a fit failed early)
        trainer = getattr(self.lightning_module, "_trainer", None)
        super().teardown()
        environment = self.cluster_environment
        if environment is None or not environment.creates_processes_externally:
            return  # spawned ranks exit after the fit; the launching process never joined the group
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if trainer is not None and trainer.state.status == TrainerStatus.RUNNING:  # not failing or interrupted
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def setup_environment(self) -> None:
        quiet_third_party_noise()  # in spawned processes too
        torch.set_num_threads(self.threads_per_process or max(1, available_cores() // max(1, self.num_processes)))
        super().setup_environment()
