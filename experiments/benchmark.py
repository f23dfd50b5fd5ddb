"""Benchmarks. Each prints human-readable lines, then its figures as JSON on the last line.

    python experiments/benchmark.py pipeline [--batches N] [--repeats R]
    python experiments/benchmark.py strategies [--steps N] [--repeats R] [--threads T]

pipeline: one training epoch's worth of steps of the real pipeline (this project's DataModule,
LightningModule, Trainer and callbacks from the default config, on CIFAR-sized synthetic data) against a
minimal hand-written PyTorch loop doing the same work (same model, batch size, accumulation, precision,
augmentation, clipping, optimizer and schedule, thread count), alternating in one process. The ratio
project / baseline is what the framework costs; the goal is at most 1.10.

strategies: the same number of optimizer steps (after a warm-up) with a single process, Lightning DDP
with 2 processes and the parameter server with 2 workers, through the project's Trainer set-up, the
same threads per process; throughput in samples/s, the ratio parameter server / DDP (goal: at least
0.95), and the server's median time per round: send, receive (the workers' compute included), average,
and its optimizer step between rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from cifar_pl.data import ImageDataModule  # noqa: E402
from cifar_pl.callbacks import Throughput  # noqa: E402
from cifar_pl.models import build_network  # noqa: E402
from cifar_pl.runtime import configure_threads, quiet_third_party_noise, resolve_precision  # noqa: E402
from cifar_pl.training import build_trainer, instantiate_callbacks  # noqa: E402

CIFAR_SIZED = ["data=synthetic", "data.options.train_size=50000", "data.options.test_size=10000", "data.val_size=5000"]


def default_config(workdir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(workdir)
        cfg.paths.data_dir = str(workdir / "data")
        cfg.paths.output_dir = str(workdir / "run")
    return cfg


class _TrainEpochClock(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def time_project(cfg, datamodule: ImageDataModule, batches: int | None, run: int) -> float:
    """Seconds for one training epoch (or ``batches`` batches) of the real Trainer pipeline."""
    L.seed_everything(cfg.seed, verbose=False)
    model = instantiate(cfg.model, _convert_="all")
    clock = _TrainEpochClock()
    with open_dict(cfg):
        cfg.trainer.max_epochs = 1
        cfg.trainer.limit_val_batches = 0  # training steps only, like the baseline
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.limit_train_batches = batches or 1.0
        cfg.callbacks.model_summary = None
        cfg.paths.output_dir = str(Path(cfg.paths.root_dir) / f"run{run}")
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = build_trainer(cfg, [*instantiate_callbacks(cfg.callbacks), clock], logger)
    trainer.fit(model, datamodule=datamodule)
    return clock.seconds


def time_baseline(cfg, datamodule: ImageDataModule, batches: int | None, seed: int) -> float:
    """The same work as a minimal loop: uint8 data, batched crop/flip, bf16 autocast, accumulation,
    clipping, AdamW + OneCycleLR. No framework, no logging, no DataLoader."""
    torch.manual_seed(seed)
    hp, data = cfg.model, cfg.data
    model = build_network(hp.arch, hp.in_channels, hp.num_classes, hp.dropout).train()
    images, labels = datamodule.train_set.images, datamodule.train_set.labels
    n, batch, accumulate = len(labels), data.batch_size, cfg.trainer.accumulate_grad_batches
    total_batches = batches or math.ceil(n / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=hp.lr, total_steps=math.ceil(total_batches / accumulate), pct_start=hp.pct_start
    )
    precision = resolve_precision(cfg.trainer.precision, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    order = torch.randperm(n)
    start = time.perf_counter()
    for i in range(total_batches):
        idx = order[i * batch : (i + 1) * batch]
        x = datamodule.transform(images[idx], idx, epoch=0, train=True)
        with autocast:
            loss = F.cross_entropy(model(x), labels[idx]) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0 or i + 1 == total_batches:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    return time.perf_counter() - start


def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    quiet_third_party_noise()
    threads = configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = default_config(workdir, CIFAR_SIZED + ["trainer.accelerator=cpu"])
        datamodule: ImageDataModule = instantiate(cfg.data, _convert_="all")
        datamodule.setup()
        batches = args.batches or math.ceil(len(datamodule.train_set) / cfg.data.batch_size)
        print(f"{batches} batches of {cfg.data.batch_size} per measurement, {threads} threads, "
              f"precision {resolve_precision(cfg.trainer.precision, 'cpu')}, {args.repeats} alternating repeats")
        # warm up both contenders (oneDNN kernels, first-run code paths) before anything is timed
        time_baseline(cfg, datamodule, 40, seed=0)
        time_project(cfg.copy(), datamodule, 40, run=-1)
        project, baseline = [], []
        for r in range(args.repeats):  # ABBA order: neither contender always runs first
            if r % 2 == 0:
                project.append(time_project(cfg.copy(), datamodule, args.batches, r))
            baseline.append(time_baseline(cfg, datamodule, args.batches, seed=r))
            if r % 2 == 1:
                project.append(time_project(cfg.copy(), datamodule, args.batches, r))
            print(f"  repeat {r + 1}: project {project[-1]:.2f} s, baseline {baseline[-1]:.2f} s, "
                  f"ratio {project[-1] / baseline[-1]:.3f}")
    scale = math.ceil(len(datamodule.train_set) / cfg.data.batch_size) / batches
    project_s, baseline_s = statistics.median(project) * scale, statistics.median(baseline) * scale
    # each project run against the baseline run beside it: cancels the machine's drift between repeats
    ratio = statistics.median(p / b for p, b in zip(project, baseline))
    result = {
        "pipeline_ratio": round(ratio, 4),
        "project_s_per_epoch": round(project_s, 3),
        "baseline_s_per_epoch": round(baseline_s, 3),
        "batches_per_measurement": batches,
        "repeats": args.repeats,
        "threads": threads,
    }
    print(f"project {project_s:.2f} s/epoch, minimal loop {baseline_s:.2f} s/epoch (medians); "
          f"median paired ratio {result['pipeline_ratio']:.3f}")
    return result


def time_strategy(workdir: Path, name: str, overrides: list[str], steps: int, threads: int) -> dict[str, Any]:
    """Train ``steps`` optimizer steps with one strategy through the project's own Trainer set-up and
    return its steady-state throughput (and, for the parameter server, the server's per-round times)."""
    cfg = default_config(workdir, STRATEGY_DATA + [f"num_threads={threads}", *overrides])
    with open_dict(cfg):
        cfg.trainer.max_steps = steps + WARMUP_STEPS
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_progress_bar = False
        cfg.paths.output_dir = str(workdir / name)
    L.seed_everything(cfg.seed, verbose=False)
    configure_threads(threads)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    meter = Throughput(warmup_steps=WARMUP_STEPS)
    trainer = build_trainer(cfg, [*instantiate_callbacks(cfg.callbacks), meter], False)
    trainer.fit(model, datamodule=datamodule)
    processes = trainer.world_size if trainer.world_size > 1 else getattr(trainer.strategy, "workers", 1)
    samples_per_step = processes * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    result = {"samples_per_s": meter.steps_per_second * samples_per_step, "steps": meter.steps,
              "samples_per_step": samples_per_step}
    if hasattr(trainer.strategy, "round_ms"):
        result["round_ms"] = trainer.strategy.round_ms()
    print(f"  {name:16s} {result['samples_per_s']:8.1f} samples/s ({meter.steps} steps in {meter.seconds:.1f} s, "
          f"{samples_per_step} samples per step)", flush=True)
    return result


STRATEGY_DATA = ["data=synthetic", "data.options.train_size=20000", "data.options.test_size=1000", "data.val_size=1000",
                 "trainer.accelerator=cpu", "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
                 "+trainer.enable_checkpointing=false", "test_after_fit=false"]
WARMUP_STEPS = 5


def strategies(args: argparse.Namespace) -> dict[str, Any]:
    quiet_third_party_noise()
    threads = args.threads
    contenders = {
        "single": [],
        "ddp_2": ["strategy=ddp", "trainer.devices=2", f"strategy.threads_per_process={threads}"],
        "ps_2_workers": ["strategy=parameter_server", "strategy.workers=2", f"strategy.worker_threads={threads}"],
    }
    print(f"{args.steps} optimizer steps each after {WARMUP_STEPS} warm-up steps, {threads} thread(s) per process, "
          f"{args.repeats} alternating repeats")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
            for name in order:
                runs[name].append(time_strategy(Path(tmp), f"{name}_{repeat}", contenders[name], args.steps, threads))
    throughput = {name: statistics.median(r["samples_per_s"] for r in results) for name, results in runs.items()}
    round_ms = {
        key: round(statistics.median(r["round_ms"][key] for r in runs["ps_2_workers"]), 3)
        for key in runs["ps_2_workers"][0]["round_ms"]
    }
    result = {
        "ps_vs_ddp": round(throughput["ps_2_workers"] / throughput["ddp_2"], 4),
        "ps_round_ms": round_ms,
        "samples_per_s": {name: round(v, 1) for name, v in throughput.items()},
        "ddp_vs_single": round(throughput["ddp_2"] / throughput["single"], 4),
        "steps": args.steps,
        "threads_per_process": threads,
        "repeats": args.repeats,
    }
    print(f"parameter server / DDP throughput: {result['ps_vs_ddp']:.3f}; server per round (ms, median): {round_ms}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser("pipeline", help="the project's training pipeline against a minimal PyTorch loop")
    p.add_argument("--batches", type=int, default=None, help="batches per measurement (default: one epoch)")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements of each (medians are kept)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(run=pipeline)
    s = sub.add_parser("strategies", help="single process, DDP with 2 processes and the parameter server with 2 workers")
    s.add_argument("--steps", type=int, default=60, help="timed optimizer steps per strategy (after the warm-up)")
    s.add_argument("--repeats", type=int, default=3, help="alternating runs of each (medians are kept)")
    s.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1: 2 processes on 2 cores)")
    s.set_defaults(run=strategies)
    args = parser.parse_args(argv)
    print(json.dumps(args.run(args)))


if __name__ == "__main__":
    main()
