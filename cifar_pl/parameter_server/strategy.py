"""``ParameterServerStrategy``: Lightning trains the central model on the server, and each optimizer step's
gradient comes from the workers.

Each training "batch" the server's fit loop sees is a round: ``workers x accumulate_grad_batches``
micro-batches of sample indices, taken in the same order a single-process run uses them. The strategy's
``training_step`` hands the round to the workers and collects their gradients; ``backward`` (which
Lightning calls after zeroing the gradients) writes their sample-weighted average into the central model;
Lightning's own optimizer step then clips it and steps AdamW and OneCycleLR. Validation, test, logging and
checkpoints are Lightning's, once, on the central model. The number of rounds per epoch is fixed by the
planned worker count, so the learning-rate schedule is the same however many workers come and go.

That is ``mode="sync"``. In ``async`` and ``ssp`` (``pipeline.py``) a training "batch" is one optimizer
step of a pipeline that keeps the workers busy across steps: in async one worker's share of a round, in
ssp a round whose shares may have been computed up to ``staleness`` steps earlier.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import os
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import Tensor

from cifar_pl.classifier import ImageClassifier
from cifar_pl.errors import ConfigurationError
from cifar_pl.files import write_json
from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.accounting import SampleAccounting
from cifar_pl.parameter_server.compression import METHODS, Compression
from cifar_pl.parameter_server.launch import LocalWorkers
from cifar_pl.parameter_server.pipeline import MODES, Pipeline, StalenessStats, TickPlan, async_ticks, tick_plans
from cifar_pl.parameter_server.server import (
    REJECTION_POLICIES,
    ParameterServer,
    RejectedMicroBatchError,
    RoundResult,
    ServerSettings,
    parse_address,
)
from cifar_pl.parameter_server.worker import data_fingerprint
from cifar_pl.runtime import available_cores
from cifar_pl.trainer_state import batches_processed, datamodule_of

log = logging.getLogger(__name__)

ROLES = ("local", "server", "worker")
STRAGGLER_POLICIES = ("drop", "wait")
DEFAULT_PORT = 29400


@dataclass
class RoundPlan:
    """One optimizer step's work: micro-batches of sample indices."""

    epoch: int
    index: int
    micro_batches: list[Tensor]


class RoundLoader:
    """What the server's fit loop iterates: an epoch's samples as rounds of micro-batches, grouped the way
    DDP with ``workers`` processes groups them.

    The epoch's permutation (the single-process order) is dealt into ``workers`` shares, sample ``i`` to
    share ``i % workers`` as DDP deals it to ranks (without DDP's padding: every sample once), and each share
    is cut into micro-batches; round ``j`` holds micro-batches ``j*K .. j*K+K-1`` of every share, in share
    order. With all planned workers up, worker ``w`` computes exactly what DDP rank ``w`` would; with one
    worker, a round is what a single process accumulates for one optimizer step.
    """

    def __init__(
        self,
        batches: Any,
        workers: int,
        micro_batches: int,
        position: Callable[[], tuple[int, int]],
        mode: str = "sync",
    ) -> None:
        self.batches, self.workers, self.micro_batches, self.position = batches, workers, micro_batches, position
        self.mode = mode
        self._resume: tuple[int, int] | None = None

    def rounds(self) -> int:
        longest_share = math.ceil(self.batches.dataset_size / self.workers)
        return math.ceil(math.ceil(longest_share / self.batches.batch_size) / self.micro_batches)

    def __len__(self) -> int:
        """Optimizer steps per epoch: rounds, or in async one per share of each round."""
        if self.mode == "async":
            return async_ticks(self.batches.dataset_size, self.workers, self.batches.batch_size, self.micro_batches)
        return self.rounds()

    def _shares(self, epoch: int) -> list[list[Tensor]]:
        order = self.batches.permutation(epoch)
        return [list(torch.split(order[w :: self.workers], self.batches.batch_size)) for w in range(self.workers)]

    def ticks(self, epoch: int) -> list[TickPlan]:
        """The epoch's optimizer steps' micro-batches, for the async and ssp pipelines."""
        return tick_plans(self._shares(epoch), self.micro_batches, self.rounds(), self.mode)

    def __iter__(self) -> Iterator[RoundPlan]:
        epoch = self.position()[0]
        start = 0
        if self._resume is not None and self._resume[0] == epoch:  # used up only by the epoch it is for
            start, self._resume = self._resume[1], None
        if self.mode != "sync":  # the pipeline hands out the epoch's ticks itself (RoundLoader.ticks)
            for index in range(start, len(self)):
                yield RoundPlan(epoch, index, [])
            return
        shares = self._shares(epoch)
        k = self.micro_batches
        for index in range(start, len(self)):
            yield RoundPlan(epoch, index, [mb for share in shares for mb in share[index * k : (index + 1) * k]])

    def layout(self) -> dict[str, int]:
        """What decides which samples each round of an epoch holds."""
        return {
            "workers": self.workers,
            "micro_batches": self.micro_batches,
            "batch_size": self.batches.batch_size,
            "samples": self.batches.dataset_size,
            "rounds": len(self),
            "async": int(self.mode == "async"),  # async steps are not a prefix of the epoch's ticks
        }

    # Lightning saves and restores these with the fit loop: a server resumed from a checkpoint written
    # mid-epoch continues with the next round, not the epoch's first.
    def state_dict(self) -> dict[str, int]:
        epoch, rounds_done = self.position()
        state = {"epoch": epoch, "rounds_done": rounds_done, **self.layout()}
        if rounds_done in (0, len(self)):
            # at an epoch boundary another strategy can go on from here: its loader reads batches_done
            state["batches_done"] = (
                0 if rounds_done == 0 else math.ceil(self.batches.dataset_size / self.batches.batch_size)
            )
        return state

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch = int(state_dict["epoch"])
        if "rounds_done" not in state_dict:
            # another strategy's loader, at an epoch boundary (ParameterServerStrategy.load_checkpoint refuses
            # its mid-epoch checkpoints): its epoch is either not begun or over
            self._resume = (epoch, 0 if int(state_dict.get("batches_done", 0)) == 0 else len(self))
            return
        rounds_done, ours = int(state_dict["rounds_done"]), self.layout()
        saved = {key: int(state_dict[key]) for key in ours if key in state_dict}
        if saved and 0 < rounds_done < saved.get("rounds", len(self)) and saved != {k: ours[k] for k in saved}:
            raise ConfigurationError(
                f"the checkpoint was written in the middle of epoch {epoch}, after round {rounds_done} of "
                f"{saved.get('rounds')}, by a run with {_layout_text(saved)}; this run has {_layout_text(ours)}. "
                f"The rest of that epoch cannot be dealt out in another layout without using some samples twice "
                f"and others not at all. Resume with the same strategy.workers, trainer.accumulate_grad_batches "
                f"and data.batch_size, or from a checkpoint written at the end of an epoch (last.ckpt)."
            )
        self._resume = (epoch, rounds_done)


def _written_mid_epoch(checkpoint: dict[str, Any]) -> bool:
    """Whether Lightning saved the checkpoint with part of an epoch's batches done."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    done = progress.get("current", {}).get("completed", 0)
    return bool(done) and not progress.get("is_last_batch", False)


def _layout_text(layout: dict[str, int]) -> str:
    names = {
        "workers": "strategy.workers",
        "micro_batches": "trainer.accumulate_grad_batches",
        "batch_size": "data.batch_size",
        "samples": "training samples",
    }
    text = ", ".join(f"{names[k]}={v}" for k, v in layout.items() if k in names)
    if "async" in layout:
        text += f", strategy.mode={'async' if layout['async'] else 'sync or ssp'}"
    return text


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ROUND_TIMINGS_KEPT = 10_000  # rounds whose timings the report's medians are taken over


def check_exposure(address: str, secret: bytes | None, allow_insecure: bool) -> None:
    """A server that workers started elsewhere can join must have a shared secret, unless told otherwise
    (then it says loudly what that means). On 127.0.0.1 too: every user of the machine can reach that, and
    a tunnel makes it reachable from other machines. (A local run makes its own secret.)"""
    host, port = parse_address(address)
    if secret is not None:
        return
    reach = "every user of this machine can reach" if is_loopback(host) else "other machines can reach"
    if not allow_insecure:
        raise ConfigurationError(
            f"strategy.role=server would listen on {host}:{port}, which {reach}, without a shared secret: "
            f"anyone who can connect could join as a worker, read the model's parameters every round and send "
            f"it gradients of their choosing. Put a secret in a file only you can read and give "
            f"strategy.secret_file=PATH to the server and every worker, or export {wire.SECRET_ENV}=<secret> "
            f"in the environment of each; where no one else can connect, strategy.allow_insecure=true starts "
            f"it without one."
        )
    log.warning(
        "INSECURE: strategy.allow_insecure=true: the parameter server listens on %s:%d, which %s, without a shared "
        "secret. Anyone who can reach that port can join as a worker, read the model's parameters every round "
        "and inject gradients. Set strategy.secret_file or %s unless no one else can connect.",
        host,
        port,
        reach,
        wire.SECRET_ENV,
    )


def _with_resume_advice(error: RejectedMicroBatchError, where: str) -> RejectedMicroBatchError:
    """The server's error, told where the round sits in the training run and how the run goes on."""
    return RejectedMicroBatchError(
        error.epoch,
        error.round,
        error.position,
        error.indices,
        error.reasons,
        f"({where}) last.ckpt is written as the run stops (callbacks.last_checkpoint), so it can go on from "
        f"there with ckpt_path=<run directory>/checkpoints/last.ckpt and the changed setting.",
    )


class ParameterServerStrategy(SingleDeviceStrategy):
    """A socket parameter server as a Lightning strategy (see the module docstring).

    ``role="local"`` starts ``workers`` worker processes on this machine; ``role="server"`` waits for
    workers started elsewhere with ``python train.py ... strategy.role=worker strategy.address=HOST:PORT``.
    """

    strategy_name = "parameter_server"

    def __init__(
        self,
        workers: int = 2,
        role: str = "local",
        address: str | None = None,
        min_workers: int | None = None,
        secret_file: str | None = None,
        round_timeout: float = 30.0,
        straggler: str = "drop",
        worker_timeout: float = 600.0,
        resume: bool = False,
        reconnect_timeout: float = 60.0,
        join_timeout: float = 120.0,
        worker_wait: float = 120.0,
        worker_threads: int | None = None,
        max_frame_mb: int = 256,
        max_pending_handshakes: int = 16,
        frame_timeout: float = 30.0,
        max_strikes: int = 3,
        rejection_policy: str = "stop",
        max_rejections: int = 3,
        allow_insecure: bool = False,
        mode: str = "sync",
        staleness: int = 2,
        worker_slowdown: list[float] | None = None,
        device: str | None = None,
        compression: str = "none",
        topk_ratio: float = 0.01,
    ) -> None:
        super().__init__(device=device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        if role not in ROLES:
            raise ConfigurationError(f"strategy.role={role!r} is not one of {', '.join(ROLES)}")
        if workers < 1 or (min_workers is not None and not 1 <= min_workers <= workers):
            raise ConfigurationError(
                f"strategy.workers={workers} and strategy.min_workers={min_workers}: need 1 <= min_workers <= workers"
            )
        self.workers, self.role, self.min_workers = workers, role, min_workers or workers
        self.address = address or ("127.0.0.1:0" if role == "local" else f"127.0.0.1:{DEFAULT_PORT}")
        if straggler not in STRAGGLER_POLICIES:
            raise ConfigurationError(f"strategy.straggler={straggler!r} is not one of {', '.join(STRAGGLER_POLICIES)}")
        if rejection_policy not in REJECTION_POLICIES:
            raise ConfigurationError(
                f"strategy.rejection_policy={rejection_policy!r} is not one of {', '.join(REJECTION_POLICIES)}"
            )
        if max_rejections < 1 or max_strikes < 1 or frame_timeout <= 0:
            raise ConfigurationError(
                f"strategy.max_rejections={max_rejections}, strategy.max_strikes={max_strikes} and "
                f"strategy.frame_timeout={frame_timeout} must all be positive"
            )
        if mode not in MODES:
            raise ConfigurationError(
                f"strategy.mode={mode!r} is not one of {', '.join(MODES)}: sync waits for every share of a round, "
                f"async applies each worker's contribution as it arrives, ssp lets workers run up to "
                f"strategy.staleness rounds ahead"
            )
        if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
            raise ConfigurationError(
                f"strategy.staleness={staleness!r} must be a whole number of rounds, 0 or more (0 is sync)"
            )
        slowdown = [float(x) for x in worker_slowdown or []]
        if worker_slowdown is not None and (
            role != "local" or len(slowdown) > workers or not all(math.isfinite(x) and x >= 1.0 for x in slowdown)
        ):
            raise ConfigurationError(
                f"strategy.worker_slowdown={list(worker_slowdown)!r}: an experiment tool for local workers "
                f"(strategy.role=local), one factor of at least 1.0 per worker (at most strategy.workers={workers} "
                f"of them): worker i sleeps so that each assignment takes that many times as long, e.g. "
                f"strategy.worker_slowdown=[1.0,2.0]"
            )
        self.mode, self.staleness, self.worker_slowdown = mode, staleness, slowdown
        self.pipeline: Pipeline | None = None
        self.staleness_stats = StalenessStats()
        self._loader: RoundLoader | None = None
        self._reassigned_total = 0  # samples reassigned in this process's steps (telemetry)
        self._threads_outside_training: int | None = None
        self._step_started = self._training_seconds = 0.0
        self._training_samples = 0
        self._fit_started: float | None = None
        self.accuracy_timeline: list[list[float]] = []  # [seconds since training started, val/acc] per epoch
        if compression not in METHODS:
            raise ConfigurationError(
                f"strategy.compression={compression!r} is not one the parameter server has: it takes "
                f"{', '.join(METHODS)} (powersgd is a DDP communication hook: strategy=ddp)"
            )
        if not 0 < topk_ratio <= 1:
            raise ConfigurationError(
                f"strategy.topk_ratio={topk_ratio!r} must be in (0, 1]: the share of gradient entries topk sends"
            )
        self.secret_file, self.worker_threads, self.allow_insecure = secret_file, worker_threads, allow_insecure
        self.join_timeout, self.resume, self.reconnect_timeout = join_timeout, resume, reconnect_timeout
        self.settings = ServerSettings(
            address=self.address,
            round_timeout=round_timeout,
            straggler=straggler,
            worker_timeout=worker_timeout,
            worker_wait=worker_wait,
            max_frame=max_frame_mb * 1024 * 1024,
            max_pending=max_pending_handshakes,
            frame_timeout=frame_timeout,
            max_strikes=max_strikes,
            rejection_policy=rejection_policy,
            max_rejections=max_rejections,
            compression=Compression(compression, topk_ratio),
        )
        self.micro_batches_per_worker = 1
        self.server: ParameterServer | None = None
        self.local_workers: LocalWorkers | None = None
        # the latest rounds' timings, for the report's medians: bounded, however long the run
        self.round_timings: collections.deque[dict[str, float]] = collections.deque(maxlen=ROUND_TIMINGS_KEPT)
        # bytes on the wire per round (to the workers, from them: all of them together), for the same medians
        self.round_bytes: collections.deque[tuple[int, int]] = collections.deque(maxlen=ROUND_TIMINGS_KEPT)
        self._bytes_counted = (0, 0)  # the server's byte counters when the last round's bytes were taken
        self._gradient: Tensor | None = None
        self._round_ended: float | None = None
        self._restored: dict[str, Any] | None = None  # the server's state from the checkpoint resumed from
        self.local_workers_restarts: dict[str, list[str]] = {}

    @property
    def classifier(self) -> ImageClassifier:
        """The module being trained: the server reports each round's loss and accuracy through
        ``ImageClassifier.training_batch_done``, and its workers compute ``classification_loss``."""
        module = self.lightning_module
        if not isinstance(module, ImageClassifier):
            raise ConfigurationError(
                f"the parameter-server strategy trains cifar_pl's ImageClassifier (model=cnn or model=legacy), "
                f"got {type(module).__name__}"
            )
        return module

    # --- Lightning hooks -----------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            # one round is one optimizer step; the workers accumulate the micro-batches instead
            self.micro_batches_per_worker = trainer.accumulate_grad_batches
            trainer.accumulate_grad_batches = 1
            self._drop_loss_scaling()
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._start(trainer)  # workers load while the server runs its sanity check

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.classifier.trainer
        if trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        batches = getattr(dataloader, "sampler", None)
        if not callable(getattr(batches, "permutation", None)) or getattr(batches, "num_replicas", 1) != 1:
            raise ConfigurationError(
                "the parameter-server strategy needs a training DataLoader whose sampler yields batches of sample "
                "indices (cifar_pl.data.ImageDataModule's): the server hands out indices, never images"
            )
        self._loader = RoundLoader(
            batches,
            self.workers,
            self.micro_batches_per_worker,
            lambda: (trainer.current_epoch, batches_processed(trainer)),
            self.mode,
        )
        return self._loader

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        return batch if isinstance(batch, RoundPlan) else super().batch_to_device(batch, device, dataloader_idx)

    def on_train_start(self) -> None:
        assert self.server is not None
        server, local = self.server, self.local_workers
        deadline = time.monotonic() + self.join_timeout
        while True:
            wait = max(0.0, deadline - time.monotonic())
            # local workers are this process's children: a glance at them every 0.2 s notices one that ended
            joined = server.wait_for_workers(self.min_workers, min(wait, 0.2) if local else wait)
            if joined >= self.min_workers or time.monotonic() >= deadline:
                break
            if local is not None:
                local.look_after({c.label for c in server.live_workers}, self.min_workers)
        if joined < self.min_workers:
            where = f"; their logs are in {local.log_dir}" if local else ""
            host, port = server.address
            raise ConfigurationError(
                f"only {joined} of the {self.min_workers} workers needed joined the parameter server at {host}:{port} "
                f"within {self.join_timeout:g} s{where}. Start them with: python train.py <same options> "
                f"strategy.role=worker strategy.address=<this host>:{port}; or lower strategy.min_workers, or raise "
                f"strategy.join_timeout."
            )
        log.info("parameter server: %d worker(s) joined; training starts", joined)
        self._server_threads(training=True)
        self._fit_started = time.perf_counter()

    def _server_threads(self, training: bool) -> None:
        """async and ssp: while training, the server steps and averages while its workers compute, on the same
        cores; with several intra-op threads (which spin while they wait) it takes the workers' CPU and its
        own work slows down many times (measured: 7 ms between steps with one thread, 310 ms with two, two
        local workers on 2 cores). So it trains on one thread, and validates on all of them (workers idle)."""
        if self.mode == "sync":
            return
        if training:
            if self._threads_outside_training is None:
                self._threads_outside_training = torch.get_num_threads()
            torch.set_num_threads(1)
        elif self._threads_outside_training is not None:
            torch.set_num_threads(self._threads_outside_training)
            self._threads_outside_training = None

    def on_validation_start(self) -> None:
        self._server_threads(training=False)
        super().on_validation_start()

    def on_validation_end(self) -> None:
        super().on_validation_end()
        trainer = self.classifier.trainer
        accuracy = trainer.callback_metrics.get("val/acc")
        if self._fit_started is not None and not trainer.sanity_checking and accuracy is not None:
            self.accuracy_timeline.append([round(time.perf_counter() - self._fit_started, 3), float(accuracy)])
        self._server_threads(training=trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking)

    def training_step(self, plan: RoundPlan, batch_idx: int) -> Tensor | None:
        assert self.server is not None
        self._step_started = time.perf_counter()
        if self.mode != "sync":
            return self._pipelined_step(plan, batch_idx)
        module = self.classifier
        started = time.perf_counter()
        if self._round_ended is not None and batch_idx > 0 and self.round_timings:
            # the server's own work between two rounds of an epoch: clip, AdamW, OneCycleLR, Lightning's loop
            self.round_timings[-1]["step"] = started - self._round_ended
        try:
            result = self.server.run_round(
                plan.epoch,
                plan.micro_batches,
                version=module.trainer.global_step,
                accumulation=self.micro_batches_per_worker,
                planned_workers=self.workers,
            )
        except RejectedMicroBatchError as error:
            where = f"Round {error.round} of the run is round {plan.index + 1} of epoch {plan.epoch}."
            raise _with_resume_advice(error, where) from None
        self.staleness_stats.add([0] * result.accepted)  # a sync round computes on the newest parameters only
        return self._apply(result, batch_idx)

    def _apply(self, result: RoundResult, batch_idx: int) -> Tensor | None:
        """Hand a complete step's gradient to Lightning's optimizer step, and its statistics to the module."""
        module = self.classifier
        self.round_timings.append(result.timings)
        now = time.perf_counter()
        # training time (not validation): from the previous step's end within an epoch, else this step's start
        since = self._round_ended if batch_idx > 0 and self._round_ended is not None else self._step_started
        self._training_seconds += now - since
        self._training_samples += result.samples
        self._round_ended = now
        self._reassigned_total += result.reassigned_samples
        round_bytes = self._count_round_bytes()
        if module._writes_step_metrics(batch_idx):
            self._log_telemetry(module, result, round_bytes)
        if not result.samples:  # every micro-batch of the round was skipped: no gradient, no optimizer step
            return None
        self._gradient = result.gradient
        module.training_batch_done(result.loss_sum, result.correct, result.samples, batch_idx)
        return torch.tensor(result.loss_sum / result.samples)

    def _pipelined_step(self, plan: RoundPlan, batch_idx: int) -> Tensor | None:
        """async and ssp: the pipeline keeps the workers busy across steps and gives back the next step."""
        assert self.server is not None and self._loader is not None
        module = self.classifier
        if self.pipeline is None:
            self.pipeline = Pipeline(
                self.server, self.mode, self.staleness, self.workers, self.micro_batches_per_worker
            )
        pipeline = self.pipeline
        started = time.perf_counter()
        if self._round_ended is not None and batch_idx > 0 and self.round_timings:
            self.round_timings[-1]["step"] = started - self._round_ended
        if pipeline.epoch != plan.epoch:
            restored = (self._restored or {}).get("applied") or {}
            if restored.get("epoch") == plan.epoch:
                applied = {int(t) for t in restored["ticks"]}
            else:  # a prefix: a fresh epoch, or one resumed from a sync or ssp checkpoint
                applied = set(range(batches_processed(module.trainer)))
            pipeline.start_epoch(plan.epoch, self._loader.ticks(plan.epoch), applied)
        try:
            tick = pipeline.step(version=module.trainer.global_step)
        except RejectedMicroBatchError as error:
            where = f"Here the round is step {error.round} of epoch {plan.epoch} in strategy.mode={self.mode}."
            raise _with_resume_advice(error, where) from None
        self.staleness_stats.add(tick.staleness)
        return self._apply(tick.result, batch_idx)

    def _log_telemetry(self, module: ImageClassifier, result: RoundResult, round_bytes: tuple[int, int]) -> None:
        """The server's state beside the training curves, on the steps whose metrics are written anyway."""
        assert self.server is not None
        server = self.server
        mean, worst = self.staleness_stats.recent()
        values = {
            "ps/live_workers": float(len(server.live_workers)),
            "ps/step_ms": result.timings.get("total", 0.0) * 1000,
            "ps/reassigned_samples": float(self._reassigned_total),
            "ps/refused_contributions": float(server.event_counts["rejected contribution"]),
            "ps/staleness_mean": mean,
            "ps/staleness_max": float(worst),
            "ps/bytes_to_workers": float(round_bytes[0]),
            "ps/bytes_from_workers": float(round_bytes[1]),
        }
        for name, value in values.items():
            module.log(name, value, on_step=True, on_epoch=False)

    def _count_round_bytes(self) -> tuple[int, int]:
        """The bytes the last step moved (to the workers, from them), from the server's counters (frames
        queued to the workers' sockets, bytes read from them), kept for the report's medians."""
        assert self.server is not None
        now = (self.server.bytes_to_workers, self.server.bytes_from_workers)
        moved = (now[0] - self._bytes_counted[0], now[1] - self._bytes_counted[1])
        self._bytes_counted = now
        self.round_bytes.append(moved)
        return moved

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """The round's gradient comes from the workers: write it into the central model."""
        assert self.server is not None and self._gradient is not None
        self.server.flat.set_grads(self._gradient)
        self._gradient = None
        return closure_loss

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Checkpoints also carry the sample accounting, so a resumed server proves the same epochs."""
        if self.server is not None:
            checkpoint["parameter_server"] = {
                "accounting": self.server.accounting.state_dict(),
                "round": self.server.round,
                "mode": self.mode,
                "staleness": self.staleness_stats.state_dict(),
            }
            if self.pipeline is not None and self.pipeline.epoch is not None:
                # async applies an epoch's steps out of order: which of them a resumed run must not repeat
                checkpoint["parameter_server"]["applied"] = {
                    "epoch": self.pipeline.epoch,
                    "ticks": sorted(self.pipeline.applied),
                }
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        if "parameter_server" not in checkpoint and _written_mid_epoch(checkpoint):
            raise ConfigurationError(
                f"{checkpoint_path} was written in the middle of an epoch by a run with another strategy (single "
                f"process or DDP), which takes an epoch's samples in another order than the parameter server "
                f"deals them: going on from there would use some samples twice and others not at all. Resume it "
                f"with the strategy that wrote it, or from a checkpoint written at the end of an epoch (last.ckpt)."
            )
        if "parameter_server" in checkpoint:
            self._restored = {
                **checkpoint["parameter_server"],
                "step": checkpoint.get("global_step"),
                "path": str(checkpoint_path),
            }
        return checkpoint

    def on_train_end(self) -> None:
        self._server_threads(training=False)
        self._shutdown("training finished")

    def on_exception(self, exception: BaseException) -> None:
        self._shutdown(f"the server stopped: {type(exception).__name__}")

    def teardown(self) -> None:
        self._shutdown("the server stopped")
        super().teardown()

    # --- the server and its workers ------------------------------------------------------------------

    def _drop_loss_scaling(self) -> None:
        """The server only applies averaged, unscaled gradients: fp16 loss scaling belongs on the workers."""
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            self.precision_plugin = MixedPrecision("bf16-mixed", plugin.device) if bf16 else Precision()
            log.info(
                "parameter server: evaluates in %s; workers train in 16-mixed", "bf16-mixed" if bf16 else "32-true"
            )

    def _start(self, trainer: L.Trainer) -> None:
        datamodule = datamodule_of(trainer)
        if datamodule is None or not hasattr(datamodule, "train_set"):
            raise ConfigurationError("the parameter-server strategy needs the run's DataModule (ImageDataModule)")
        datamodule.setup("fit")
        module = self.classifier
        signature, fingerprint = wire.model_signature(module), data_fingerprint(datamodule)

        def check_hello(hello: dict[str, Any]) -> str | None:
            mismatch = wire.signature_mismatch(signature, hello.get("signature"))
            if mismatch is None and hello.get("data") != fingerprint:
                mismatch = (
                    f"signature mismatch: the worker's training data {hello.get('data')} is not the server's "
                    f"{fingerprint}; give both the same data config and seed"
                )
            return mismatch

        secret = wire.load_secret(self.secret_file)
        generated = secret is None and self.role == "local"
        if generated:  # this run's own workers get it through their environment: no one else can join
            secret = secrets.token_hex(32).encode()
        check_exposure(self.address, secret, self.allow_insecure)
        self.settings.secret = secret
        accounting = SampleAccounting(len(datamodule.train_set))
        self.server = ParameterServer(module, self.settings, check_hello, accounting)
        if self._restored is not None:
            accounting.load_state_dict(self._restored["accounting"])
            self.server.round = int(self._restored["round"])
            self.staleness_stats.load_state_dict(self._restored.get("staleness", {}))
            self.server._event("resumed", step=self._restored["step"], checkpoint=self._restored["path"])
        host, port = self.server.start()
        log.info("parameter server listening on %s:%d, planned for %d worker(s)", host, port, self.workers)
        if self.role == "local":
            run_dir = Path(trainer.default_root_dir)
            threads = self.worker_threads or max(1, available_cores() // self.workers)
            spec = self._write_worker_spec(trainer, threads, run_dir / "parameter_server" / "worker_spec.json")
            self.local_workers = LocalWorkers(
                self.workers,
                spec,
                f"{host}:{port}",
                run_dir / "parameter_server",
                threads,
                secret=secret if generated else None,  # else the workers read the same file or variable
                slowdown=self.worker_slowdown,
            )
            self.local_workers.start()

    def _write_worker_spec(self, trainer: L.Trainer, threads: int, path: Path) -> Path:
        module, datamodule = self.classifier, datamodule_of(trainer)
        spec = {
            "seed": int(os.environ.get("PL_GLOBAL_SEED", "0")),  # set by seed_everything in train.py
            "precision": str(trainer.precision),
            "threads": threads,
            "secret_file": self.secret_file,
            "module": {
                "target": f"{type(module).__module__}.{type(module).__qualname__}",
                "hparams": dict(module.hparams),
            },
            "datamodule": {
                "target": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
                "hparams": dict(datamodule.hparams),
            },
            "timeouts": {
                "frame_timeout": self.settings.frame_timeout,
                "max_frame": self.settings.max_frame,
                "reconnect_timeout": self.reconnect_timeout,
            },
        }
        write_json(path, spec)
        return path

    def _shutdown(self, reason: str) -> None:
        self._server_threads(training=False)
        server, workers, pipeline = self.server, self.local_workers, self.pipeline
        self.server = self.local_workers = self.pipeline = None
        if server is not None and pipeline is not None:
            # a run stopped mid-epoch (Ctrl-C, an error) has work out: its answers are awaited, briefly, so that
            # the workers hear "done" between assignments rather than lose the server in the middle of one
            pipeline.drain(min(10.0, self.settings.round_timeout))
        if server is not None:
            server.stop(reason)
        exits = workers.stop() if workers is not None else {}
        self.local_workers_restarts = dict(workers.restarts) if workers is not None else {}
        if server is not None and self.lightning_module is not None:
            self._write_report(server, exits)

    def run_metrics(self) -> dict[str, Any]:
        """For metrics.json (and so a sweep's results table): the mode, training throughput (samples per
        second of training steps, validation excluded), the mean staleness, and validation accuracy against
        wall-clock time since training started."""
        seconds = self._training_seconds
        return {
            "ps_mode": self.mode,
            "samples_per_s": round(self._training_samples / seconds, 2) if seconds else None,
            "staleness_mean": self.staleness_stats.report()["mean"],
            "accuracy_timeline": self.accuracy_timeline,
        }

    def round_ms(self) -> dict[str, float]:
        """Median milliseconds per round, over the latest ``ROUND_TIMINGS_KEPT`` rounds: sending parameters
        and assignments, waiting for the workers' gradients (their compute and the transfer), averaging them,
        and the optimizer step between rounds."""
        names = {"send": "send", "wait": "receive", "aggregate": "average", "step": "step", "total": "round"}
        return {
            label: round(statistics.median(t[key] for t in self.round_timings if key in t) * 1000, 3)
            for key, label in names.items()
            if any(key in t for t in self.round_timings)
        }

    def bytes_per_round(self) -> dict[str, float] | None:
        """Median bytes on the wire per round over the latest ``ROUND_TIMINGS_KEPT`` steps, all workers
        together: parameters and assignments to the workers, gradients and statistics from them. In async a
        step is one worker's share, so a round is ``workers`` consecutive steps (as many shares as a sync
        or ssp round), summed, for figures comparable across modes."""
        steps = list(self.round_bytes)
        per_round = self.workers if self.mode == "async" else 1
        rounds = [
            (sum(b[0] for b in group), sum(b[1] for b in group))
            for group in (steps[i : i + per_round] for i in range(0, len(steps) - per_round + 1, per_round))
        ]
        if not rounds:
            return None
        return {
            "to_workers": statistics.median(b[0] for b in rounds),
            "from_workers": statistics.median(b[1] for b in rounds),
        }

    def _write_report(self, server: ParameterServer, exits: dict[str, int | None]) -> None:
        report = {
            "mode": self.mode,
            **({"staleness_bound": self.staleness} if self.mode == "ssp" else {}),
            "staleness": self.staleness_stats.report(),
            "address": f"{server.address[0]}:{server.address[1]}",
            "workers_planned": self.workers,
            "micro_batches_per_worker": self.micro_batches_per_worker,
            "rounds": server.round,
            "round_ms_median": self.round_ms(),
            "compression": self.settings.compression.to_meta(),
            "bytes_per_round": self.bytes_per_round(),
            "local_worker_exit_codes": exits,
            "local_worker_restarts": self.local_workers_restarts,
            "rounds_per_worker": dict(server.contributions),
            "epochs": server.accounting.report(),
            "events": list(server.events),  # the latest ParameterServer.EVENTS_KEPT
            "event_counts": dict(server.event_counts),
            "refused_connections": dict(server.refusals),
            "recent_refusals": server.recent_refusals,
        }
        path = Path(self.classifier.trainer.default_root_dir) / "parameter_server" / "report.json"
        write_json(path, report)
        log.info("parameter server report: %s", path)
