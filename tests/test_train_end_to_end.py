"""train.py and evaluate.py through their real Hydra entry points, as subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_pl.evaluation import evaluate
from cifar_pl.training import train
from tests.helpers import TINY_SYNTHETIC, compose_config, run_script, tensorboard_scalars


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """One short synthetic training run through ``python train.py`` whose data config asks for test-time
    flips (``data.tta=true``, as Fashion-MNIST's does); returns (cwd, run_dir, stdout)."""
    cwd = tmp_path_factory.mktemp("e2e")
    run_dir = cwd / "run"
    result = run_script(
        "train.py",
        [
            *TINY_SYNTHETIC,
            "data.batch_size=8",
            "trainer.max_epochs=1",
            "trainer.log_every_n_steps=1",
            "data.tta=true",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=cwd,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, run_dir, result.stdout + result.stderr


def test_train_writes_metrics_json(trained_run):
    _, run_dir, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["epochs"] == 1
    assert metrics["params"] == 104_362
    assert metrics["global_step"] == 12  # 384 training images / batch 8 = 48 batches / 4 accumulated
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0
    assert metrics["tta"] is True and 0.0 <= metrics["test/acc_single_view"] <= 1.0
    assert metrics["train_seconds"] > 0 and metrics["seconds_per_epoch"] > 0
    assert Path(metrics["checkpoint"]).is_file() and Path(metrics["last_checkpoint"]).name == "last.ckpt"
    assert metrics["precision"] == "bf16-mixed"


def test_train_logs_scalars_to_tensorboard(trained_run):
    _, run_dir, _ = trained_run
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for tag in (
        "train/loss_step",
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "test/acc",
        "test/loss",
        "train/lr",
        "time/epoch_seconds",
    ):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    lr_by_step = dict(scalars["train/lr"])  # logged every batch, but it changes once per optimizer step
    assert sorted(lr_by_step) == list(range(12))
    lrs = [lr_by_step[step] for step in range(12)]
    # one cycle over 12 steps: from 0.01/25 up to the peak 0.01 at step 0.25*12-1 = 2, then down
    assert lrs[0] == pytest.approx(0.01 / 25, rel=1e-4)
    assert max(lrs) == pytest.approx(0.01, rel=1e-4) and lrs.index(max(lrs)) == 2
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] < lrs[0]


def test_train_tells_the_user_where_things_are(trained_run):
    _, run_dir, output = trained_run
    assert f"tensorboard --logdir {run_dir}" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"with mirror images (tta); one view: {metrics['test/acc_single_view']:.4f}" in output
    assert str(run_dir / "checkpoints") in output
    assert "Traceback" not in output and "16-mixed` but AMP with fp16 is not supported" not in output


def test_evaluate_the_checkpoint_train_wrote(trained_run):
    cwd, run_dir, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    eval_dir = cwd / "eval"
    result = run_script("evaluate.py", [f"ckpt_path={metrics['checkpoint']}", f"hydra.run.dir={eval_dir}"], cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluation = json.loads((eval_dir / "evaluation.json").read_text())
    assert evaluation["dataset"] == "synthetic" and evaluation["num_images"] == 256
    # same weights, same data, tested as the checkpoint's data config says: with mirror images
    assert evaluation["tta"] is True and "With each image's mirror averaged in (tta)" in result.stdout + result.stderr
    assert evaluation["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert evaluation["test/acc_single_view"] == pytest.approx(metrics["test/acc_single_view"], abs=1e-6)
    assert sum(map(sum, evaluation["confusion_matrix"])) == 256
    per_class = evaluation["per_class_accuracy"]
    assert len(per_class) == 10 and "class_0" in result.stdout and "overall" in result.stdout
    png = (eval_dir / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
    assert "test/acc" in tensorboard_scalars(eval_dir / "tensorboard")


def test_evaluate_with_tta_false_tests_one_view_of_each_image(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = compose_config(tmp_path, [f"ckpt_path={metrics['checkpoint']}", "tta=false"], config_name="evaluate")
    evaluation = evaluate(cfg)
    assert evaluation["tta"] is False and "test/acc_single_view" not in evaluation
    assert evaluation["test/acc"] == pytest.approx(metrics["test/acc_single_view"], abs=1e-6)
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["tta"] is False


def test_evaluate_tests_as_the_training_run_did_not_as_its_data_config_says(tmp_path, caplog):
    """A run's tta=false outweighs its data config's data.tta=true, in its own test and in evaluate.py's, also
    when evaluate.py is given a data config with tta; tta=true on a network trained without flips warns."""
    cfg = compose_config(tmp_path, [*TINY_SYNTHETIC, "data.tta=true", "tta=false", "trainer.max_epochs=1"])
    metrics = train(cfg)
    assert metrics["tta"] is False and "test/acc_single_view" not in metrics
    evaluation = evaluate(compose_config(tmp_path, [f"ckpt_path={metrics['checkpoint']}"], config_name="evaluate"))
    assert evaluation["tta"] is False and evaluation["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    # given a data config that asks for mirrors, evaluate.py still tests as the run did
    with_data = [f"ckpt_path={metrics['checkpoint']}", *TINY_SYNTHETIC, "data.tta=true"]
    assert evaluate(compose_config(tmp_path, with_data, config_name="evaluate"))["tta"] is False

    checkpoint = torch.load(metrics["checkpoint"], weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["augment"] = False  # as a run with data.augment=false writes it
    torch.save(checkpoint, tmp_path / "no_flips.ckpt")
    again = [f"ckpt_path={tmp_path / 'no_flips.ckpt'}", *TINY_SYNTHETIC, "tta=true"]  # the data config flips
    assert evaluate(compose_config(tmp_path, again, config_name="evaluate"))["tta"] is True
    assert "trained without flips (data.augment=false)" in caplog.text


def test_evaluate_with_a_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_script(
        "evaluate.py", [f"ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path}/eval"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert "nope.ckpt" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_missing_dataset_exits_non_zero_naming_the_path(tmp_path):
    result = run_script(
        "train.py",
        [f"data.root={tmp_path}/empty", "data.download=false", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert str(tmp_path / "empty" / "cifar-10-batches-bin") in result.stderr.replace("\n       ", " ")
    assert "Traceback" not in result.stderr + result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "DatasetError" in metrics["error"]
