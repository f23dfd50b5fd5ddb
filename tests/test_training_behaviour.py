"""Training itself, in process through ``cifar_pl.training.train`` with composed configs: it learns, and
an interrupted run resumes from ``last.ckpt`` at the right epoch, step and learning rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_pl.errors import ConfigurationError
from cifar_pl.training import train
from tests.helpers import TINY_SYNTHETIC, compose_config, tensorboard_scalars

QUIET = ["trainer.enable_progress_bar=false"]  # as the README suggests for batch jobs


def test_a_few_epochs_on_synthetic_data_learn_well_above_chance(tmp_path):
    cfg = compose_config(
        tmp_path,
        # noise 0.5, 2 x 2000 images: every seed tried (0, 1, 3, 42) reaches 0.88-0.95 test accuracy here, so
        # the margin is not luck (1000 images stay at 0.25-0.36: too few steps for the one-cycle schedule)
        [
            "data=synthetic",
            "data.options.train_size=2000",
            "data.options.test_size=500",
            "data.val_size=500",
            "data.options.noise=0.5",
            "trainer.max_epochs=2",
            "trainer.accumulate_grad_batches=1",
            *QUIET,
        ],
    )
    metrics = train(cfg)
    assert metrics["status"] == "completed"
    # 10 classes: chance is 0.10
    assert metrics["test/acc"] > 0.5, metrics
    assert metrics["best_val/acc"] > 0.5


def test_a_run_of_exactly_four_optimizer_steps_trains_to_the_end(tmp_path):
    """OneCycleLR's default warm-up (0.25) of a 4-step run is exactly one step, which torch divides by zero
    for; such short runs (a smoke test, tiny data) must still train."""
    cfg = compose_config(tmp_path, [*TINY_SYNTHETIC, "data.batch_size=24", "trainer.max_epochs=1", *QUIET])
    metrics = train(cfg)  # 384 training images / 24 = 16 micro-batches, accumulation 4: 4 optimizer steps
    assert metrics["status"] == "completed" and metrics["global_step"] == 4, metrics
    assert 0.0 <= metrics["test/acc"] <= 1.0


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
    # the whole run's epoch times, carried over in the checkpoint (last.ckpt is written before an epoch's time
    # is recorded, so the second epoch's time is recorded by the resumed run, from the checkpoint's clock)
    assert len(resumed["epoch_seconds"]) == 3 and resumed["epoch_seconds"][0] == first["epoch_seconds"][0]
    assert resumed["global_step"] == 3 * steps_per_epoch

    straight = train(_resume_config(tmp_path, "straight"))
    assert straight["global_step"] == resumed["global_step"]

    # a finished run cannot be extended: its one-cycle schedule is laid out over its 3 epochs
    longer = _resume_config(tmp_path, "longer")
    longer.trainer.max_epochs = 4
    longer.ckpt_path = str(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigurationError, match=r"laid out over 18 optimizer steps, but this run's settings make 24"):
        train(longer)

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


# --- stopping: only ever at a consistent point, and only once announced ------------------------------


@pytest.fixture
def signal_handlers():
    """Lightning leaves SIGINT ignored after it handles a Ctrl-C; give the test session its handlers back."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _ckpt(tmp_path: Path, run: str, name: str = "last.ckpt") -> dict:
    return torch.load(tmp_path / run / "checkpoints" / name, weights_only=True)


@pytest.mark.parametrize(
    "chaos",
    [
        ["_target_=tests.helpers.RaiseAt"],
        # a real Ctrl-C, twice: the first asks for a stop at the step's end, the second stops at once
        ["_target_=tests.helpers.SignalSelfAt", "signal=SIGINT", "times=2"],
    ],
    ids=["crash", "ctrl-c-twice"],
)
def test_a_stop_inside_an_accumulation_window_keeps_the_last_consistent_checkpoint(tmp_path, signal_handlers, chaos):
    # batch 5 of epoch 1 is inside the window of batches 4-7: one step past the end of epoch 0 (6 steps)
    where = ["+callbacks.chaos.epoch=1", "+callbacks.chaos.batch=5"]
    cfg = _resume_config(tmp_path, "run", [*(f"+callbacks.chaos.{c}" for c in chaos), *where])
    with pytest.raises((RuntimeError, SystemExit)):
        train(cfg)
    last = _ckpt(tmp_path, "run")
    assert (last["epoch"], last["global_step"]) == (0, 6), "last.ckpt is still the end of epoch 0"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] in ("failed", "interrupted")


def test_one_ctrl_c_that_arrives_after_a_sigterm_still_stops_at_the_end_of_the_step(tmp_path, signal_handlers, capfd):
    """Under DDP the main process passes a Ctrl-C on to the ranks as SIGTERM, which can reach a rank before
    the terminal's own SIGINT does: that SIGINT is the first Ctrl-C, not a second one that stops at once."""
    where = ["+callbacks.chaos.epoch=1", "+callbacks.chaos.batch=5"]  # inside the window of batches 4-7
    chaos = ["+callbacks.chaos._target_=tests.helpers.SignalSelfAt", "+callbacks.chaos.signal=SIGTERM+SIGINT"]
    cfg = _resume_config(tmp_path, "run", [*chaos, *where])
    with pytest.raises(SystemExit):
        train(cfg)
    last = _ckpt(tmp_path, "run")
    assert (last["epoch"], last["global_step"]) == (1, 6 + 2), "stopped and saved where the window ends"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "interrupted"
    assert "SIGINT: already stopping at the end of this optimizer step (SIGTERM asked first)" in capfd.readouterr().err


def test_a_signal_during_the_final_validation_stops_the_run_as_announced(tmp_path, signal_handlers, capfd):
    chaos = ["+callbacks.chaos._target_=tests.helpers.SignalSelfDuring", "+callbacks.chaos.phase=validation"]
    cfg = _resume_config(tmp_path, "run", [*chaos, "+callbacks.chaos.signal=SIGTERM", "+callbacks.chaos.epoch=2"])
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == 1
    assert (
        "SIGTERM: stopping at the end of this optimizer step (after this epoch's validation" in capfd.readouterr().err
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and "test/acc" not in metrics, "stopped, as announced: no test"
    last = _ckpt(tmp_path, "run")
    assert last["global_step"] == 3 * 6, "the last epoch was trained and validated whole"
    validated = tensorboard_scalars(tmp_path / "run" / "tensorboard")["val/acc"]
    assert [step for step, _ in validated] == [5, 11, 17]


def test_a_sigterm_during_the_test_ends_the_run_as_interrupted_with_status_1(tmp_path, signal_handlers):
    from cifar_pl.cli import handle_errors

    chaos = ["+callbacks.chaos._target_=tests.helpers.SignalSelfDuring", "+callbacks.chaos.phase=test"]
    cfg = _resume_config(tmp_path, "run", [*chaos, "+callbacks.chaos.signal=SIGTERM"])
    cfg.trainer.max_epochs = 1
    with pytest.raises(SystemExit) as stopped:
        handle_errors(train)(cfg)
    assert stopped.value.code == 1, "Lightning's own SIGTERM exit is status 0, which a scheduler takes for success"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and "test/acc" not in metrics
