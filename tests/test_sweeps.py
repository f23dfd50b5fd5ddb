"""Hydra multirun sweeps: per-job results, the sweep summary (tables and plots), failed jobs reported as
rows, and TensorBoard's HParams view."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from cifar_pl.sweeps import summarize_sweep
from tests.helpers import TINY_SYNTHETIC, compose_config, run_script, tensorboard_hparams, tensorboard_scalars

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "results.csv").open() as f:
        return list(csv.DictReader(f))


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


@pytest.fixture(scope="module")
def two_job_sweep(tmp_path_factory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("sweep")
    sweep = cwd / "multirun"
    result = run_script(
        "train.py",
        [
            "-m",
            *TINY_SYNTHETIC,
            "trainer.max_epochs=1,2",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=cwd,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep, result.stdout


def test_multirun_writes_one_directory_and_metrics_per_job(two_job_sweep):
    sweep, _ = two_job_sweep
    jobs = _job_dirs(sweep)
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    assert jobs[0].name.endswith("trainer.max_epochs=1") and jobs[1].name.endswith("trainer.max_epochs=2")
    epochs = [json.loads((job / "metrics.json").read_text())["epochs"] for job in jobs]
    assert epochs == [1, 2]


def test_multirun_summary_tables_and_plots(two_job_sweep):
    sweep, stdout = two_job_sweep
    rows = _rows(sweep)
    assert [(r["job"], r["trainer.max_epochs"], r["epochs"], r["status"]) for r in rows] == [
        ("0", "1", "1", "completed"),
        ("1", "2", "2", "completed"),
    ]
    assert all(float(r["train_seconds"]) > 0 and 0 <= float(r["test/acc"]) <= 1 for r in rows)
    markdown = (sweep / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| job | trainer.max_epochs | status | epochs") and len(markdown) == 4
    for name in ("time_vs_epochs.png", "accuracy_vs_epochs.png"):
        png = (sweep / name).read_bytes()
        assert png.startswith(PNG) and len(png) > 10_000
    assert "2 of 2 jobs completed" in stdout


def test_every_job_has_an_hparams_session_with_its_settings(two_job_sweep):
    sweep, _ = two_job_sweep
    for job, epochs in zip(_job_dirs(sweep), (1, 2), strict=True):
        sessions = tensorboard_hparams(job / "tensorboard")
        assert len(sessions) == 1, sessions
        hparams = sessions[0]
        assert hparams["trainer.max_epochs"] == epochs
        assert hparams["model.arch"] == "cnn" and hparams["data.dataset"] == "synthetic"
        assert hparams["tta"] == 0  # the test the run did, one view of each image (TensorBoard keeps bools as 0/1)
        scalars = tensorboard_scalars(job / "tensorboard")
        assert {"hparams/test_acc", "hparams/train_seconds", "hparams/best_val_acc"} <= set(scalars)


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    """data.val_size=100000 is larger than the training split: that job fails, the other completes."""
    sweep = tmp_path / "multirun"
    result = run_script(
        "train.py",
        [
            "-m",
            *TINY_SYNTHETIC,
            "data.val_size=128,100000",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1, "a sweep with a failed job must not report success"
    rows = _rows(sweep)
    assert [(r["data.val_size"], r["status"]) for r in rows] == [("128", "completed"), ("100000", "failed")]
    assert "val_size=100000" in rows[1]["error"] and "ConfigurationError" in rows[1]["error"]
    assert "1 of 2 jobs completed" in result.stdout and "Traceback" not in result.stdout + result.stderr


def _fixture_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None, log: str = "") -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if log:
        (job / "train.log").write_text(log)


def test_summary_of_a_sweep_with_failed_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    ok = {
        "status": "completed",
        "epochs": 1,
        "train_seconds": 30.0,
        "seconds_per_epoch": 28.0,
        "test/acc": 0.5,
        "best_val/acc": 0.52,
        "params": 104362,
    }
    _fixture_job(sweep, "0_model=cnn,trainer.max_epochs=1", ["model=cnn", "trainer.max_epochs=1"], ok)
    _fixture_job(
        sweep,
        "1_model=cnn,trainer.max_epochs=2",
        ["model=cnn", "trainer.max_epochs=2"],
        {**ok, "epochs": 2, "train_seconds": 58.0, "test/acc": 0.6},
    )
    _fixture_job(
        sweep,
        "2_model=legacy,trainer.max_epochs=1",
        ["model=legacy", "trainer.max_epochs=1"],
        {"status": "failed", "epochs": 0, "error": "DatasetError: CIFAR-10 is not available"},
    )
    _fixture_job(
        sweep,
        "3_model=legacy,trainer.max_epochs=2",
        ["model=legacy", "trainer.max_epochs=2"],
        None,
        log="[2026-11-21][cifar_pl.cli][ERROR] - job failed: RuntimeError: out of memory\n",
    )
    _fixture_job(
        sweep,
        "10_model=cnn,trainer.max_epochs=3",
        ["model=cnn", "trainer.max_epochs=3"],
        {**ok, "epochs": 3, "train_seconds": 86.0, "test/acc": 0.65},
    )
    summary = summarize_sweep(sweep)
    assert summary.swept == ["model", "trainer.max_epochs"]
    assert [job.number for job in summary.failed] == ["2", "3"]
    rows = _rows(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10"]  # numeric order, not text order
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "failed", "completed"]
    assert rows[2]["error"] == "DatasetError: CIFAR-10 is not available"
    assert "no metrics.json" in rows[3]["error"] and "out of memory" in rows[3]["error"]
    assert (sweep / "results.md").read_text().count("| failed |") == 2
    assert not (sweep / "results_by_setting.csv").exists()  # only a sweep over seeds gets one
    for name in ("time_vs_epochs.png", "accuracy_vs_epochs.png"):
        assert (sweep / name).read_bytes().startswith(PNG)


def test_a_sweep_over_seeds_gets_a_table_per_setting(tmp_path):
    sweep = tmp_path / "sweep"
    done = {"status": "completed", "epochs": 8, "seconds_per_epoch": 20.0, "best_val/acc": 0.9}
    results = {("baseline", "42"): 0.88, ("baseline", "43"): 0.90, ("aug_none", "42"): 0.91, ("aug_none", "43"): None}
    for number, ((setting, seed), acc) in enumerate(results.items()):
        metrics = {**done, "test/acc": acc} if acc is not None else {"status": "failed", "error": "killed"}
        _fixture_job(
            sweep, f"{number}_+ablation={setting},seed={seed}", [f"+ablation={setting}", f"seed={seed}"], metrics
        )
    summary = summarize_sweep(sweep)
    assert summary.swept == ["ablation", "seed"]
    with (sweep / "results_by_setting.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["ablation"], r["runs"], r["failed"]) for r in rows] == [("baseline", "2", "0"), ("aug_none", "1", "1")]
    assert float(rows[0]["test/acc mean"]) == pytest.approx(0.89)
    assert (float(rows[0]["test/acc min"]), float(rows[0]["test/acc max"])) == (0.88, 0.90)
    assert float(rows[1]["test/acc mean"]) == float(rows[1]["test/acc max"]) == 0.91
    markdown = (sweep / "results_by_setting.md").read_text().splitlines()
    assert markdown[0].startswith("| ablation | runs | failed | test/acc mean") and "| 0.8900 |" in markdown[2]
    assert sweep / "results_by_setting.md" in summary.files


def test_summarize_script_exit_codes(tmp_path):
    result = run_script("experiments/summarize.py", [str(tmp_path / "nowhere")], cwd=tmp_path)
    assert result.returncode == 2 and "nowhere" in result.stderr and "Traceback" not in result.stderr
    sweep = tmp_path / "sweep"
    _fixture_job(
        sweep,
        "0_trainer.max_epochs=1",
        ["trainer.max_epochs=1"],
        {"status": "completed", "epochs": 1, "train_seconds": 1.0, "test/acc": 0.3},
    )
    result = run_script("experiments/summarize.py", [str(sweep)], cwd=tmp_path)
    assert result.returncode == 0 and "1 of 1 jobs completed" in result.stdout


@pytest.mark.parametrize(
    "experiment, swept, tta",
    [
        ("epoch_sweep", {"trainer.max_epochs": "range(1,6)"}, None),
        ("compare_networks", {"model": "cnn,legacy", "trainer.max_epochs": "1,2,3"}, None),
        # the strategies are compared one view, as their committed results were measured
        ("ps_modes", {"strategy.mode": "sync,ssp,async"}, False),
        ("compression", {"+compression": "ps_none,ps_bf16,ps_topk,ddp_none,ddp_bf16,ddp_powersgd"}, False),
    ],
)
def test_named_experiments_set_their_sweep(tmp_path, experiment, swept, tta):
    from hydra import compose, initialize_config_dir

    from tests.helpers import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == swept
    assert compose_config(tmp_path, [f"experiment={experiment}"]).model.arch == "cnn"
    assert cfg.tta is tta


def test_a_parameter_server_sweep_gets_throughput_and_staleness_columns_and_accuracy_over_time(tmp_path):
    """What experiment=ps_modes writes: samples/s and mean staleness per job, and validation accuracy per epoch
    against wall-clock time (test accuracy at the end) for each mode."""
    sweep = tmp_path / "sweep"
    for i, (mode, speed, staleness) in enumerate([("sync", 400.0, 0.0), ("async", 580.0, 1.4)]):
        timeline = [[10.0 * (e + 1) * (1 if mode == "sync" else 0.7), 0.5 + 0.1 * e] for e in range(3)]
        metrics = {
            "status": "completed",
            "epochs": 3,
            "train_seconds": timeline[-1][0],
            "test/acc": 0.75,
            "samples_per_s": speed,
            "staleness_mean": staleness,
            "accuracy_timeline": timeline,
        }
        _fixture_job(sweep, f"{i}_strategy.mode={mode}", [f"strategy.mode={mode}"], metrics)
    summary = summarize_sweep(sweep)
    rows = _rows(sweep)
    assert [(r["strategy.mode"], r["samples_per_s"], r["staleness_mean"]) for r in rows] == [
        ("sync", "400.0", "0.0"),
        ("async", "580.0", "1.4"),
    ]
    assert list(rows[0])[-1] == "error"
    plot = sweep / "accuracy_vs_time.png"
    assert plot in summary.files and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a sweep without parameter-server jobs keeps its columns and gets no such plot
    other = tmp_path / "other"
    _fixture_job(other, "0_x", ["trainer.max_epochs=1"], {"status": "completed", "epochs": 1, "test/acc": 0.3})
    assert not summarize_sweep(other).files[-1].name.startswith("accuracy_vs_time")
    assert "samples_per_s" not in _rows(other)[0]


def test_a_sweep_of_runs_tested_with_mirror_images_keeps_their_single_view_accuracy(tmp_path):
    """Fashion-MNIST's test averages in mirror images (data.tta): the table shows the single view beside it."""
    sweep = tmp_path / "sweep"
    jobs = [(1, True, 0.8861, 0.8804), (2, True, 0.9051, 0.9003), (3, False, 0.9102, None)]  # tta=false on 3
    for i, (epochs, tta, acc, single) in enumerate(jobs):
        metrics = {"status": "completed", "epochs": epochs, "tta": tta, "test/acc": acc}
        if single is not None:
            metrics["test/acc_single_view"] = single
        _fixture_job(sweep, f"{i}_trainer.max_epochs={epochs}", [f"trainer.max_epochs={epochs}"], metrics)
    summarize_sweep(sweep)
    rows = _rows(sweep)
    assert [(r["tta"], r["test/acc"], r["test/acc_single_view"]) for r in rows] == [
        ("True", "0.8861", "0.8804"),
        ("True", "0.9051", "0.9003"),
        ("False", "0.9102", "0.9102"),  # tested one view: that is its single-view accuracy
    ]
    assert "| 0.8861 | " in (sweep / "results.md").read_text() and "0.9003" in (sweep / "results.md").read_text()
    # a sweep tested one view throughout keeps its columns as they were
    other = tmp_path / "other"
    _fixture_job(
        other, "0_x", ["trainer.max_epochs=1"], {"status": "completed", "epochs": 1, "tta": False, "test/acc": 0.3}
    )
    summarize_sweep(other)
    assert "tta" not in _rows(other)[0] and "test/acc_single_view" not in _rows(other)[0]
