"""ps-modes: the parameter server's sync, ssp and async modes on the same work, with a straggler.

Each contender trains the project's default model on the same synthetic CIFAR-shaped data for one epoch
(validation off) with ``P`` local workers, worker ``i`` slowed down ``--slowdown[i]`` times
(``strategy.worker_slowdown``: it sleeps so that each assignment takes that long); by default two workers,
the second 2x slower. Throughput is training samples per second from the end of the ``--warmup-steps``-th
optimizer step to the end of the epoch's last (worker start-up and first kernels excluded; the epoch's end,
where async and ssp wait for their last contributions, included). Every repeat runs every mode once, in a
balanced order; the ratios are paired within a repeat. The server runs on one CPU thread in every mode, and
each worker on cores / workers. With one worker 2x slower the ideal async speed-up
is 1.5 (the fast worker never waits: 3 shares in the time sync does 2); ssp's fast worker can be at most
``S`` rounds ahead, so once it is that far ahead it waits for the slow one, as in sync.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import open_dict

from cifar_pl.runtime import configure_threads, quiet_third_party_noise
from cifar_pl.training import build_trainer, instantiate_callbacks
from experiments.bench.common import default_config, spread, synthetic_data
from experiments.bench.stats import balanced_order, describe, paired_summary

MODES = ("sync", "ssp", "async")
RUN_SETTINGS = [
    "trainer.accelerator=cpu",
    "callbacks.model_checkpoint=null",
    "callbacks.last_checkpoint=null",
    "callbacks.recovery_checkpoint=null",
    "+trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "++trainer.limit_val_batches=0",
    "++trainer.num_sanity_val_steps=0",
    "trainer.max_epochs=1",
    "test_after_fit=false",
    # the server on one thread in every mode: with more, its intra-op threads spin on the cores the workers
    # compute on (async and ssp train on one anyway, see ParameterServerStrategy._server_threads), and sync
    # would be measured slowed down by that rather than by its round barrier
    "num_threads=1",
]


class SamplesMeter(L.Callback):
    """Training samples per second after ``warmup_steps`` optimizer steps, to the end of the epoch."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        mark = (time.perf_counter(), float(pl_module.train_sums[2]))  # type: ignore[index]
        if trainer.global_step == self.warmup_steps and self.start is None:
            self.start = mark
        self.end = mark

    @property
    def samples_per_s(self) -> float:
        if self.start is None or self.end is None or self.end[0] <= self.start[0]:
            raise RuntimeError("the epoch was shorter than the warm-up: raise --train-size")
        return (self.end[1] - self.start[1]) / (self.end[0] - self.start[0])


def time_mode(base: list[str], workdir: Path, mode: str, staleness: int, warmup: int) -> dict[str, Any]:
    cfg = default_config(workdir, [*base, f"strategy.mode={mode}", f"strategy.staleness={staleness}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir / mode)
    L.seed_everything(cfg.seed, verbose=False)
    configure_threads(cfg.get("num_threads"))
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    meter = SamplesMeter(warmup)
    trainer = build_trainer(cfg, [*instantiate_callbacks(cfg.callbacks), meter], False)
    trainer.fit(model, datamodule=datamodule)
    report = json.loads((workdir / mode / "parameter_server" / "report.json").read_text())
    every_once = all(e["every_sample_exactly_once"] for e in report["epochs"])
    if not every_once:
        raise RuntimeError(f"{mode}: the epoch did not use every sample exactly once: {report['epochs']}")
    return {
        "samples_per_s": meter.samples_per_s,
        "steps": trainer.global_step,
        "staleness_mean": report["staleness"]["mean"],
        "staleness_max": report["staleness"]["max"],
        "shares_per_worker": report["rounds_per_worker"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet_third_party_noise()
    slowdown = [float(x) for x in args.slowdown.split(",")]
    base = [
        *synthetic_data(args.train_size + 256, 256),
        *RUN_SETTINGS,
        f"data.batch_size={args.batch_size}",
        f"trainer.accumulate_grad_batches={args.micro_batches}",
        "strategy=parameter_server",
        f"strategy.workers={len(slowdown)}",
        f"strategy.worker_slowdown=[{','.join(map(str, slowdown))}]",
        *([f"++strategy.worker_threads={args.threads}"] if args.threads else []),
    ]
    print(
        f"ps-modes: {len(slowdown)} local workers slowed down {slowdown}, {args.train_size} samples in micro-batches "
        f"of {args.batch_size}, {args.micro_batches} per share; ssp staleness {args.staleness}; "
        f"{args.repeats} repeats",
        flush=True,
    )
    measured: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="ps-modes-") as tmp:
        for repeat in range(args.repeats):
            for index in balanced_order(len(MODES), repeat):
                mode = MODES[index]
                result = time_mode(base, Path(tmp) / f"r{repeat}", mode, args.staleness, args.warmup_steps)
                measured[mode].append(result)
                print(
                    f"  repeat {repeat + 1}, {mode}: {result['samples_per_s']:.1f} samples/s, {result['steps']} "
                    f"steps, staleness mean {result['staleness_mean']:.2f} max {result['staleness_max']}, shares "
                    f"per worker {result['shares_per_worker']}",
                    flush=True,
                )
    speeds = {mode: [r["samples_per_s"] for r in measured[mode]] for mode in MODES}
    for mode in MODES:
        print(f"{mode}: {spread(speeds[mode], ' samples/s')}")
    ratios = {}
    for mode in ("async", "ssp"):
        summary = paired_summary([a / s for a, s in zip(speeds[mode], speeds["sync"], strict=True)])
        ratios[f"{mode}_vs_sync"] = summary
        print(describe(f"{mode} / sync", summary))
    return {
        "samples_per_s": {mode: round(statistics.median(speeds[mode]), 2) for mode in MODES},
        "async_vs_sync": ratios["async_vs_sync"]["median"],
        "ssp_vs_sync": ratios["ssp_vs_sync"]["median"],
        "staleness_mean": {
            mode: round(statistics.median(r["staleness_mean"] for r in measured[mode]), 3) for mode in MODES
        },
        "paired_ratios": ratios,
    }
