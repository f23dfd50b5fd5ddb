"""Benchmarks. Each prints human-readable lines, then its figures as JSON on the last line.

    python experiments/benchmark.py pipeline [--batches N] [--repeats R]

pipeline: one training epoch's worth of steps of the real pipeline (this project's DataModule,
LightningModule, Trainer and callbacks from the default config, on CIFAR-sized synthetic data) against a
minimal hand-written PyTorch loop doing the same work (same model, batch size, accumulation, precision,
augmentation, clipping, optimizer and schedule, thread count), alternating in one process. The ratio
project / baseline is what the framework costs; the goal is at most 1.10.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser("pipeline", help="the project's training pipeline against a minimal PyTorch loop")
    p.add_argument("--batches", type=int, default=None, help="batches per measurement (default: one epoch)")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements of each (medians are kept)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(run=pipeline)
    args = parser.parse_args(argv)
    print(json.dumps(args.run(args)))


if __name__ == "__main__":
    main()
