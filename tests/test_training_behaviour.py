"""Training itself, in process through ``cifar_pl.training.train`` with composed configs: it learns, and
an interrupted run resumes from ``last.ckpt`` at the right epoch, step and learning rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_pl.training import train
from tests.helpers import TINY_SYNTHETIC, compose_config, tensorboard_scalars

QUIET = ["trainer.enable_progress_bar=false"]  # as the README suggests for batch jobs


def test_a_few_epochs_on_synthetic_data_learn_well_above_chance(tmp_path):
    cfg = compose_config(
        tmp_path,
        # noise 0.5: every seed tried (0-3) reaches 0.67-0.83 test accuracy here, so the margin is not luck
        [
            "data=synthetic",
            "data.options.train_size=4000",
            "data.options.test_size=500",
            "data.val_size=500",
            "data.options.noise=0.5",
            "trainer.max_epochs=3",
            "trainer.accumulate_grad_batches=1",
            *QUIET,
        ],
    )
    metrics = train(cfg)
    assert metrics["status"] == "completed"
    # 10 classes: chance is 0.10
    assert metrics["test/acc"] > 0.5, metrics
    assert metrics["best_val/acc"] > 0.5


def _resume_config(tmp_path: Path, name: str, extra=()):
    cfg = compose_config(
        tmp_path,
        [*TINY_SYNTHETIC, "data.batch_size=16", "trainer.max_epochs=3", "trainer.log_every_n_steps=2", *QUIET, *extra],
    )
    cfg.paths.output_dir = str(tmp_path / name)
    return cfg


def test_resume_from_last_ckpt_continues_at_the_right_epoch(tmp_path):
    steps_per_epoch = 384 // 16 // 4  # 384 training images, batch 16, accumulation 4

    interrupted = _resume_config(
        tmp_path,
        "first",
        ["+callbacks.interrupt._target_=tests.helpers.InterruptAtEpoch", "+callbacks.interrupt.epoch=2"],
    )
    with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C handling exits
        train(interrupted)
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert first["status"] == "interrupted" and first["epochs"] == 2
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2 * steps_per_epoch

    resumed_cfg = _resume_config(tmp_path, "resumed")
    resumed_cfg.ckpt_path = str(last)
    resumed = train(resumed_cfg)
    assert resumed["status"] == "completed"
    assert resumed["epochs"] == 3
    assert len(resumed["epoch_seconds"]) == 1, "only the missing third epoch is trained"
    assert resumed["global_step"] == 3 * steps_per_epoch

    straight = train(_resume_config(tmp_path, "straight"))
    assert straight["global_step"] == resumed["global_step"]

    # the learning-rate schedule continued where it stopped: same position and value as a straight run
    def ckpt(run: str) -> dict:
        return torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)

    sched_resumed, sched_straight = ckpt("resumed")["lr_schedulers"][0], ckpt("straight")["lr_schedulers"][0]
    assert sched_resumed["last_epoch"] == sched_straight["last_epoch"] == 3 * steps_per_epoch
    assert sched_resumed["_last_lr"] == pytest.approx(sched_straight["_last_lr"])

    # the step loss is written every 2nd optimizer step (0-based steps 1, 3, 5, ...), before and after resuming
    def loss_steps(run: str) -> list[int]:
        return sorted(step for step, _ in tensorboard_scalars(tmp_path / run / "tensorboard")["train/loss_step"])

    assert loss_steps("straight") == list(range(1, 18, 2))
    assert loss_steps("first") == list(range(1, 12, 2))
    assert loss_steps("resumed") == list(range(13, 18, 2))
