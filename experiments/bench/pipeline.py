"""pipeline: what this project's training pipeline costs over a minimal hand-written PyTorch loop doing the
same work.

One training epoch (or ``--batches`` batches) through this project's DataModule, LightningModule, Trainer and
default callbacks, on CIFAR-sized synthetic data, against a minimal loop with the same network, batch size,
accumulation, precision, augmentation, clipping, optimizer and schedule and thread count, alternating in one
process (AB, BA, AB, ...). Both clocks include the epoch's end: Lightning's epoch-end hooks and its
``last.ckpt`` save, and for the loop an equivalent checkpoint (weights, optimizer and schedule state)
written the same way (``cifar_pl.files.write_atomically``: temporary file, fsync, rename). The ratio
project / loop of each repeat is paired with the loop run beside it; the result is the median paired ratio,
its range, and a distribution-free confidence interval for the median. The goal is at most 1.10.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from cifar_pl.data import ImageDataModule
from cifar_pl.files import write_atomically
from cifar_pl.models import build_network
from cifar_pl.runtime import configure_threads, quiet_third_party_noise, resolve_precision
from cifar_pl.training import build_trainer, instantiate_callbacks
from experiments.bench.common import default_config, spread, synthetic_data
from experiments.bench.stats import balanced_order, describe, paired_summary

GOAL = 1.10  # project / minimal loop, at most


class TrainClock(L.Callback):
    """From the start of the training epoch to the end of training: every batch, then the epoch-end hooks
    and the checkpoints written at the epoch's end (Lightning calls checkpoint callbacks' ``on_train_epoch_end``
    after everyone else's; ``on_train_end`` comes after all of them)."""

    started = stopped = math.nan

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stopped = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.stopped - self.started


def time_project(
    cfg: DictConfig, datamodule: ImageDataModule, batches: int | None, run: str, clock: TrainClock | None = None
) -> float:
    """Seconds for one training epoch (or ``batches`` batches) of the real Trainer pipeline, its end included."""
    cfg = cfg.copy()
    L.seed_everything(cfg.seed, verbose=False)
    model = instantiate(cfg.model, _convert_="all")
    clock = clock or TrainClock()
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
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():  # the epoch-end save this benchmark claims to time
        raise RuntimeError(f"the project run wrote no {checkpoint}: the epoch's end was not what was timed")
    return clock.seconds


def time_baseline(cfg: DictConfig, datamodule: ImageDataModule, batches: int | None, seed: int, out: Path) -> float:
    """The same work as a minimal loop: uint8 data, batched crop/flip, bf16 autocast, accumulation, clipping,
    AdamW + OneCycleLR, and a checkpoint at the end. No framework, no logging, no DataLoader."""
    torch.manual_seed(seed)
    hp, data = cfg.model, cfg.data
    model = build_network(hp.arch, hp.in_channels, hp.num_classes, hp.dropout).train()
    assert datamodule.train_set is not None
    images, labels = datamodule.train_set.images, datamodule.train_set.labels
    n, batch, accumulate = len(labels), data.batch_size, cfg.trainer.accumulate_grad_batches
    total_batches = batches or math.ceil(n / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=hp.lr,
        total_steps=math.ceil(total_batches / accumulate),
        pct_start=hp.pct_start,
        div_factor=hp.div_factor,
        final_div_factor=hp.final_div_factor,
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
    buffer = io.BytesIO()
    state = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save({**state, "epoch": 0, "global_step": math.ceil(total_batches / accumulate)}, buffer)
    write_atomically(out / "last.ckpt", buffer.getbuffer())
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet_third_party_noise()
    threads = configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        val_size = min(5000, max(1, args.train_size // 10))
        cfg = default_config(workdir, [*synthetic_data(args.train_size, val_size), "trainer.accelerator=cpu"])
        datamodule: ImageDataModule = instantiate(cfg.data, _convert_="all")
        datamodule.setup()
        assert datamodule.train_set is not None
        epoch_batches = math.ceil(len(datamodule.train_set) / cfg.data.batch_size)
        batches = min(args.batches or epoch_batches, epoch_batches)
        span = "one epoch" if batches == epoch_batches else f"part of an epoch of {epoch_batches}"
        print(
            f"{batches} batches of {cfg.data.batch_size} per measurement ({span}), "
            f"{threads} threads, precision {resolve_precision(cfg.trainer.precision, 'cpu')}, "
            f"{args.repeats} alternating repeats",
            flush=True,
        )
        # warm up both contenders (oneDNN kernels, first-run code paths) before anything is timed
        warmup = min(args.warmup_batches, epoch_batches)
        if warmup > 0:  # (0 batches would mean a whole epoch to both)
            time_baseline(cfg, datamodule, warmup, seed=0, out=workdir / "warmup")
            time_project(cfg, datamodule, warmup, run="warmup")
        project: list[float] = []
        baseline: list[float] = []
        for r in range(args.repeats):
            for contender in balanced_order(2, r):  # AB, BA, AB, ...: neither always runs first
                if contender == 0:
                    project.append(time_project(cfg, datamodule, batches, run=str(r)))
                else:
                    baseline.append(time_baseline(cfg, datamodule, batches, seed=r, out=workdir / f"loop{r}"))
            print(
                f"  repeat {r + 1}: project {project[-1]:.3f} s, minimal loop {baseline[-1]:.3f} s, "
                f"ratio {project[-1] / baseline[-1]:.4f}",
                flush=True,
            )
    # each project run against the loop run beside it: cancels the machine's drift between repeats
    ratios = paired_summary([p / b for p, b in zip(project, baseline, strict=True)])
    low, high = ratios["ci"]
    verdict = "met" if high <= GOAL else "not met" if low > GOAL else "undecided at this precision"
    result = {
        "pipeline_ratio": ratios["median"],
        "paired_ratios": ratios,
        "goal": GOAL,
        "goal_verdict": verdict,
        "project_s": round(statistics.median(project), 3),
        "baseline_s": round(statistics.median(baseline), 3),
        "batches_per_measurement": batches,
        "full_epoch": batches == epoch_batches,
        "repeats": args.repeats,
        "threads": threads,
    }
    unit = " s per epoch" if result["full_epoch"] else f" s per {batches} batches"
    print(f"project: {spread(project, unit)}; minimal loop: {spread(baseline, unit)} (median, range)")
    print(describe("project / minimal loop", ratios))
    print(f"goal: at most {GOAL:.2f}: {verdict} (judged by the confidence interval, not the median alone)")
    return result
