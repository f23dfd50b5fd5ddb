"""strategies: the parameter server against data-parallel training done several ways, on one machine.

Contenders, each training the same model on the same data (the project's default config, synthetic
CIFAR-shaped images) with the same micro-batches, accumulation, precision, clipping and optimizer:

- ``parameter_server``: the project's parameter server (``strategy=parameter_server``), ``P`` workers. Its
  workers run a bare forward/backward loop (``Worker.compute``); the server steps AdamW between rounds.
- ``ddp_bare``: torch ``DistributedDataParallel`` around the same bare compute body, ``no_sync`` while
  accumulating (so one all-reduce per optimizer step, overlapped with the last backward), AdamW on every rank.
  The fair DDP baseline: only the communication design differs from the parameter server.
- ``allreduce``: the parameter-server worker's own ``compute`` and one flat gloo all-reduce of the gradients
  and BatchNorm statistics per step, AdamW on every rank.
- ``compute_only``: the same as ``allreduce`` without the all-reduce: no communication at all, each rank
  steps on its own gradient. Not a training method: the ceiling the others are paying communication from.
- ``ddp_lightning``: the project's Lightning DDP (``strategy=ddp``): ``ddp_bare`` plus what Lightning does
  around each micro-batch and step. Its gap to ``ddp_bare`` is framework cost, not design.
- ``single``: the project's single process (Lightning) on all the cores the distributed contenders share.

``ddp_bare``, ``allreduce`` and ``compute_only`` run in ``P`` long-lived processes (spawned once, gloo set up
once) that build the model and data exactly as a parameter-server worker does (``build_from_spec``); the
Lightning contenders start their processes for each run, as a user's run does. Each contender trains
``--warmup-steps`` untimed steps then ``--steps`` timed ones, all within one epoch (the data holds just
enough samples), with the same threads per process. Every repeat runs every contender once, in a balanced
order; ratios are paired within a repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import multiprocessing as mp
import queue
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import open_dict
from torch.nn.parallel import DistributedDataParallel

from cifar_pl.callbacks import Throughput
from cifar_pl.classifier import ImageClassifier
from cifar_pl.parameter_server.protocol import Message, MessageType
from cifar_pl.parameter_server.worker import Worker, WorkerSettings, autocast_for, build_from_spec
from cifar_pl.runtime import available_cores, configure_threads, quiet_third_party_noise, resolve_precision
from cifar_pl.training import build_trainer, instantiate_callbacks
from experiments.bench.common import default_config, spread, synthetic_data
from experiments.bench.stats import balanced_order, describe, paired_summary

CONTENDERS = ("parameter_server", "ddp_bare", "allreduce", "compute_only", "ddp_lightning", "single")
BARE = ("ddp_bare", "allreduce", "compute_only")
# (name in paired_ratios, numerator, denominator)
RATIOS = (
    ("ps_vs_ddp_bare", "parameter_server", "ddp_bare"),
    ("ps_vs_allreduce", "parameter_server", "allreduce"),
    ("ps_vs_ddp_lightning", "parameter_server", "ddp_lightning"),
    ("ps_vs_compute_only", "parameter_server", "compute_only"),
    ("ddp_lightning_vs_ddp_bare", "ddp_lightning", "ddp_bare"),
    ("ps_vs_single", "parameter_server", "single"),
)
RUN_SETTINGS = [
    "trainer.accelerator=cpu",
    "callbacks.model_checkpoint=null",
    "callbacks.last_checkpoint=null",
    "callbacks.recovery_checkpoint=null",
    "+trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "test_after_fit=false",
]


# --- the Lightning contenders: the project's own Trainer set-up -----------------------------------------


def time_lightning(cfg: Any, name: str, steps: int, warmup: int) -> dict[str, Any]:
    """Train ``warmup + steps`` optimizer steps through the project's Trainer set-up and return the
    throughput of the last ``steps`` (and, for the parameter server, its median time per round)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.max_steps = steps + warmup
        cfg.trainer.max_epochs = 1
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.paths.output_dir = str(Path(cfg.paths.root_dir) / name)
    L.seed_everything(cfg.seed, verbose=False)
    configure_threads(cfg.get("num_threads"))
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    meter = Throughput(warmup_steps=warmup)
    trainer = build_trainer(cfg, [*instantiate_callbacks(cfg.callbacks), meter], False)
    trainer.fit(model, datamodule=datamodule)
    if meter.steps != steps:
        raise RuntimeError(f"{name}: timed {meter.steps} optimizer steps, expected {steps}")
    processes = trainer.world_size if trainer.world_size > 1 else getattr(trainer.strategy, "workers", 1)
    samples_per_step = processes * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    result: dict[str, Any] = {"samples_per_s": meter.steps_per_second * samples_per_step, "seconds": meter.seconds}
    if hasattr(trainer.strategy, "round_ms"):
        result["round_ms"] = trainer.strategy.round_ms()
    return result


# --- the bare contenders: long-lived ranks with one gloo group ------------------------------------------


def _rounds(datamodule: Any, world: int, rank: int, accumulate: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """This rank's micro-batches, ``accumulate`` per optimizer step, as DDP's sampler deals them (and as the
    parameter server deals them to its workers)."""
    batches, epoch = datamodule.train_batches(world, rank), 0
    while True:
        micro_batches = batches.batches(epoch)
        for start in range(0, len(micro_batches), accumulate):
            yield epoch, micro_batches[start : start + accumulate]
        epoch += 1


def _ddp_compute(ddp: DistributedDataParallel, worker: Worker, epoch: int, micro_batches: list[torch.Tensor]) -> None:
    """``Worker.compute``'s body with the forward through the DDP wrapper: the same data access, augmentation,
    autocast, loss and per-micro-batch statistics; gradients synchronised on the last micro-batch only."""
    module, datamodule, device = worker.module, worker.datamodule, worker.device
    module.train()
    samples, loss_sum, correct = 0, 0.0, 0
    for i, batch_indices in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else ddp.no_sync():
            images, labels, idx = datamodule.train_set[batch_indices]
            x = datamodule.transform(images.to(device), idx.to(device), epoch, train=True)
            y = labels.to(device)
            with autocast_for(worker.precision, device):
                # the classifier's own loss, called with the DDP wrapper as ``self``: its ``self(x)`` is then DDP's
                # forward, which is what arms the gradient synchronisation
                loss, hits = ImageClassifier.classification_loss(ddp, x, y)
            (loss / len(micro_batches)).backward()
        # the statistics a worker reports, read per micro-batch as it reads them (unused here)
        samples += len(y)
        loss_sum += float(loss.detach()) * len(y)
        correct += int(hits)


def _bare_run(kind: str, worker: Worker, hp: dict[str, Any], run: dict[str, Any], world: int, rank: int) -> float:
    """Train ``warmup + steps`` steps the ``kind`` way; seconds for the last ``steps`` (between barriers)."""
    module = worker.module
    optimizer = torch.optim.AdamW(module.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=hp["lr"],
        total_steps=run["warmup"] + run["steps"],
        pct_start=hp["pct_start"],
        div_factor=hp["div_factor"],
        final_div_factor=hp["final_div_factor"],
    )
    ddp = DistributedDataParallel(module) if kind == "ddp_bare" else None
    flat, num_params = worker.flat, worker.flat.num_params
    rounds = _rounds(worker.datamodule, world, rank, run["accumulate"])

    def step(number: int) -> None:
        epoch, micro_batches = next(rounds)
        if ddp is not None:
            _ddp_compute(ddp, worker, epoch, micro_batches)
        else:
            indices, sizes = torch.cat(micro_batches), torch.tensor([len(m) for m in micro_batches])
            # what the server puts in an ASSIGN (divisor: each micro-batch's loss is divided by it, as Lightning does)
            meta = {"epoch": epoch, "round": number, "assignment": number, "divisor": run["accumulate"]}
            assign = Message(MessageType.ASSIGN, meta, [indices, sizes])
            grads, floats, ints = worker.compute(assign).tensors
            both = torch.cat([grads, floats])
            if kind == "allreduce":
                dist.all_reduce(both)
                both.div_(world)
            flat.set_grads(both[:num_params])
            flat.load_buffers(both[num_params:], ints)
        torch.nn.utils.clip_grad_norm_(module.parameters(), run["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    for number in range(run["warmup"]):
        step(number)
    dist.barrier()
    started = time.perf_counter()
    for number in range(run["warmup"], run["warmup"] + run["steps"]):
        step(number)
    dist.barrier()
    return time.perf_counter() - started


def _bare_rank(rank: int, world: int, port: int, spec: dict[str, Any], commands: Any, results: Any) -> None:
    """One long-lived rank: set up gloo, the model and the data once, then run what ``commands`` asks."""
    try:
        quiet_third_party_noise()
        torch.set_num_threads(spec["threads"])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        pristine, datamodule = build_from_spec(spec)  # exactly as a parameter-server worker builds them
        results.put(("ready", rank, None))
        while (run := commands.get()) is not None:
            # every run starts from the same weights, on a module no earlier DDP wrapper has hooked into
            module = copy.deepcopy(pristine)
            torch.manual_seed(spec["seed"] + rank)
            worker = Worker(module, datamodule, spec["precision"], WorkerSettings(address="127.0.0.1:0"))
            seconds = _bare_run(run["kind"], worker, spec["module"]["hparams"], run, world, rank)
            # after the clock: how far apart the ranks' weights ended (0 when their gradients were combined)
            weights = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
            gathered = [torch.empty_like(weights) for _ in range(world)]
            dist.all_gather(gathered, weights)
            apart = max(float((other - weights).abs().max()) for other in gathered)
            results.put(("done", rank, (seconds, apart, weights if rank == 0 else None)))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class BareRanks:
    """``world`` spawned processes that run the bare contenders on request."""

    def __init__(self, spec: dict[str, Any], world: int) -> None:
        self.world = world
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        with socket.socket() as probe:  # a free port for the gloo rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.processes = [
            ctx.Process(target=_bare_rank, args=(r, world, port, spec, self.commands[r], self.results), daemon=True)
            for r in range(world)
        ]
        for process in self.processes:
            process.start()
        self._collect("ready", timeout=600)

    def _collect(self, expected: str, timeout: float) -> list[Any]:
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world:
            try:
                kind, rank, value = self.results.get(timeout=2)
            except queue.Empty:
                dead = [p.exitcode for p in self.processes if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"the bare ranks stopped answering (exit codes {dead})") from None
                continue
            if kind == "error":
                raise RuntimeError(f"bare rank {rank} failed:\n{value}")
            assert kind == expected, (kind, expected)
            answers[rank] = value
        return [answers[r] for r in range(self.world)]

    def run(
        self, kind: str, steps: int, warmup: int, accumulate: int, clip: float, samples_per_step: int
    ) -> tuple[float, torch.Tensor]:
        """Samples/s of ``kind`` over ``steps`` steps after ``warmup``, and rank 0's weights at the end. A
        contender that combines gradients must leave every rank with the same weights: checked here."""
        for commands in self.commands:
            commands.put({"kind": kind, "steps": steps, "warmup": warmup, "accumulate": accumulate, "clip": clip})
        answers = self._collect("done", timeout=600 + 10 * (steps + warmup))
        seconds, apart, weights = max(a[0] for a in answers), answers[0][1], answers[0][2]
        if kind != "compute_only" and apart != 0:
            raise RuntimeError(f"{kind}: the ranks ended {apart:g} apart in their weights; gradients were not combined")
        return steps * samples_per_step / seconds, weights

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)


# --- the benchmark ---------------------------------------------------------------------------------------


def _refuse(reason: str) -> NoReturn:
    print(f"strategies: {reason}", file=sys.stderr)
    raise SystemExit(2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.steps < 1 or args.warmup_steps < 0 or args.processes < 1:
        _refuse("--steps and --processes must be at least 1, --warmup-steps at least 0")
    if args.steps + args.warmup_steps == 4:  # torch's OneCycleLR divides by zero for 4 steps at pct_start 0.25
        _refuse(
            "the default one-cycle schedule cannot be built for exactly 4 steps in all (torch divides by zero); "
            "change --steps or --warmup-steps"
        )
    quiet_third_party_noise()
    world, cores = args.processes, available_cores()
    threads = args.threads or max(1, cores // world)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = default_config(workdir, ["trainer.accelerator=cpu"])
        per_step = base.data.batch_size * base.trainer.accumulate_grad_batches  # samples per process per step
        # enough samples for every step of the widest contender within one epoch: no epoch ends in a window
        needed = (args.warmup_steps + args.steps) * per_step * world
        val_size = max(64, needed // 50)
        data = synthetic_data(needed + val_size, val_size)
        overrides = {
            "single": [f"num_threads={threads * world if args.threads else 'null'}"],
            "ddp_lightning": ["strategy=ddp", f"trainer.devices={world}", f"strategy.threads_per_process={threads}"],
            "parameter_server": [
                "strategy=parameter_server",
                f"strategy.workers={world}",
                f"strategy.worker_threads={threads}",
            ],
        }
        configs = {name: default_config(workdir, [*data, *RUN_SETTINGS, *extra]) for name, extra in overrides.items()}
        cfg = configs["single"]
        precision = resolve_precision(cfg.trainer.precision, "cpu")
        print(
            f"{len(CONTENDERS)} contenders x {args.repeats} repeats in a balanced order; each {args.steps} timed "
            f"optimizer steps after {args.warmup_steps} warm-up steps; a step is {cfg.trainer.accumulate_grad_batches}"
            f" micro-batches of {cfg.data.batch_size} per process; {world} processes x {threads} thread(s) "
            f"(single: {threads * world if args.threads else cores} threads), {cores} cores, {precision}",
            flush=True,
        )
        L.seed_everything(cfg.seed, verbose=False)
        module = instantiate(cfg.model, _convert_="all")
        datamodule = instantiate(cfg.data, _convert_="all")
        spec = {  # what a parameter-server worker is built from (see ParameterServerStrategy._write_worker_spec)
            "seed": int(cfg.seed),
            "precision": precision,
            "threads": threads,
            "module": {"target": "cifar_pl.classifier.ImageClassifier", "hparams": dict(module.hparams)},
            "datamodule": {"target": "cifar_pl.data.ImageDataModule", "hparams": dict(datamodule.hparams)},
        }
        bare = BareRanks(spec, world)
        samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        round_ms: list[dict[str, float]] = []
        try:
            for repeat in range(args.repeats):
                order = [CONTENDERS[i] for i in balanced_order(len(CONTENDERS), repeat)]
                weights: dict[str, torch.Tensor] = {}
                for name in order:
                    if name in BARE:
                        value, weights[name] = bare.run(
                            name,
                            args.steps,
                            args.warmup_steps,
                            cfg.trainer.accumulate_grad_batches,
                            cfg.trainer.gradient_clip_val,
                            per_step * world,
                        )
                    else:
                        timed = time_lightning(configs[name], f"{name}_{repeat}", args.steps, args.warmup_steps)
                        value = timed["samples_per_s"]
                        if "round_ms" in timed:
                            round_ms.append(timed["round_ms"])
                    samples[name].append(value)
                print(
                    f"  repeat {repeat + 1} ({' > '.join(order)}): "
                    + ", ".join(f"{n} {samples[n][-1]:,.0f}" for n in CONTENDERS)
                    + " samples/s; ddp_bare and allreduce ended with weights "
                    + f"{float((weights['ddp_bare'] - weights['allreduce']).abs().max()):g} apart (same work: 0)",
                    flush=True,
                )
        finally:
            bare.close()

    paired = {
        key: paired_summary([a / b for a, b in zip(samples[num], samples[den], strict=True)])
        for key, num, den in RATIOS
    }
    print("samples/s, median (range) over the repeats:")
    for name in CONTENDERS:
        print(f"  {name:17s} {spread(samples[name])}")
    print("paired ratios (each repeat's contenders against each other):")
    for key in paired:
        print("  " + describe(key, paired[key]))
    if round_ms:
        medians = {k: round(statistics.median(r[k] for r in round_ms if k in r), 2) for k in round_ms[0]}
        print(f"parameter server, ms per round (median over repeats of each run's median): {medians}")
    return {
        "samples_per_s": {name: round(statistics.median(values), 1) for name, values in samples.items()},
        "ps_vs_ddp_bare": paired["ps_vs_ddp_bare"]["median"],
        "ps_vs_ddp_lightning": paired["ps_vs_ddp_lightning"]["median"],
        "ps_vs_allreduce": paired["ps_vs_allreduce"]["median"],
        "paired_ratios": paired,
    }
