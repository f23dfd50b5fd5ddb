"""The parameter-server strategy through train.py: it reproduces single-process training with one worker and
DDP with two, survives a worker killed mid-epoch, takes in a worker that joins mid-run, works in a Hydra
multirun, and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from cifar_pl.training import train
from tests.helpers import TINY_SYNTHETIC, compose_config, run_script, worker_processes

PS_TINY = [*TINY_SYNTHETIC, "data.batch_size=16", "trainer.enable_progress_bar=false"]
ROUNDS_PER_EPOCH = 6  # with one worker: 384 training images / batch 16 = 24 micro-batches, 4 per round


@pytest.fixture(autouse=True)
def no_worker_left_behind():
    yield
    deadline = time.monotonic() + 15
    while worker_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = worker_processes()
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"parameter-server worker processes were left running: {leftover}"


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "parameter_server" / "report.json").read_text())


def test_one_worker_reproduces_single_process_training(tmp_path):
    """float32, dropout on, same seed and thread count: the same parameters after every step."""
    common = [
        *PS_TINY,
        "trainer.max_epochs=2",
        "trainer.precision=32-true",
        "model.dropout=0.5",  # on: the default is off since issue 14, and this test checks the masks agree too
        "test_after_fit=false",
        "num_threads=2",
        "++strategy.worker_threads=2",
    ]
    results = {}
    for name, extra in (("single", []), ("ps", ["strategy=parameter_server", "strategy.workers=1"])):
        cfg = compose_config(tmp_path, [*common, *extra])
        cfg.paths.output_dir = str(tmp_path / name)
        results[name] = train(cfg)
    assert results["single"]["global_step"] == results["ps"]["global_step"] == 2 * ROUNDS_PER_EPOCH
    single, ps = _state(tmp_path / "single"), _state(tmp_path / "ps")
    assert single.keys() == ps.keys()
    for key in single:
        torch.testing.assert_close(ps[key], single[key], rtol=0, atol=1e-6, msg=key)
    report = _report(tmp_path / "ps")
    assert list(report["rounds_per_worker"].values()) == [2 * ROUNDS_PER_EPOCH]
    assert all(epoch["every_sample_exactly_once"] for epoch in report["epochs"])


def test_two_workers_match_ddp_with_two_processes(tmp_path):
    """Worker w computes what DDP rank w computes, so without dropout (DDP reseeds its ranks, which
    changes dropout masks) the parameters agree exactly; BatchNorm statistics differ by design (the server
    averages the workers', DDP keeps rank 0's)."""
    common = [*PS_TINY, "trainer.max_epochs=2", "trainer.precision=32-true", "model.dropout=0.0"]
    runs = {"ps": ["strategy=parameter_server", "strategy.workers=2"], "ddp": ["strategy=ddp", "trainer.devices=2"]}
    metrics = {}
    for name, extra in runs.items():
        result = run_script("train.py", [*common, *extra, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    # 384 images: DDP gives each rank 192 = 12 batches of 16 = 3 steps; the server plans 2 x 4 micro-batches a round
    assert metrics["ps"]["global_step"] == metrics["ddp"]["global_step"] == 2 * 3
    ps, ddp = _state(tmp_path / "ps"), _state(tmp_path / "ddp")
    for key in (k for k in ps if "running" not in k and "num_batches" not in k):
        torch.testing.assert_close(ps[key], ddp[key], rtol=0, atol=1e-6, msg=key)
    assert abs(metrics["ps"]["test/loss"] - metrics["ddp"]["test/loss"]) < 0.1
    assert abs(metrics["ps"]["test/acc"] - metrics["ddp"]["test/acc"]) < 0.1


def test_a_worker_killed_mid_epoch_does_not_stop_training(tmp_path):
    run_dir = tmp_path / "run"
    env_secret = {"CIFAR_PL_PS_SECRET": "loopback test secret"}  # authenticated, end to end
    result = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[1] / "train.py"),
            *PS_TINY,
            "trainer.max_epochs=3",
            "strategy=parameter_server",
            "strategy.workers=2",
            "+callbacks.chaos._target_=tests.helpers.KillWorkerAt",
            "+callbacks.chaos.epoch=1",
            "+callbacks.chaos.round=1",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, **env_secret},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,  # the status is asserted next, with the output
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 3
    assert metrics["global_step"] == 3 * 3  # rounds per epoch are planned for 2 workers and stay so
    report = _report(run_dir)
    assert report["local_worker_exit_codes"]["local-1"] == -signal.SIGKILL
    assert [epoch["every_sample_exactly_once"] for epoch in report["epochs"]] == [True, True, True]
    # killed 20 ms into round 1 of epoch 1: its share of that round (or, if it had just answered, of the
    # next one, still in epoch 1), 4 micro-batches of 16, went to the other worker
    assert [epoch["reassigned_samples"] for epoch in report["epochs"]] == [0, 64, 0]
    left = [e for e in report["events"] if e["event"] == "left"]
    assert len(left) == 1 and "local-1" in left[0]["worker"]
    assert len(report["rounds_per_worker"]) == 2


class StartWorkerAt(L.Callback):
    """Starts one more worker process at the beginning of epoch ``epoch`` and waits until it has joined."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.process = epoch, None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        server = trainer.strategy.server
        spec = Path(trainer.default_root_dir) / "parameter_server" / "worker_spec.json"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cifar_pl.parameter_server.worker",
                "--spec",
                str(spec),
                "--address",
                f"{server.address[0]}:{server.address[1]}",
                "--name",
                "late",
                "--parent-pid",
                str(os.getpid()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert server.wait_for_workers(2, timeout=60) == 2


def test_a_worker_joining_mid_run_takes_part_in_later_rounds(tmp_path):
    late = StartWorkerAt(epoch=1)
    cfg = compose_config(
        tmp_path,
        [*PS_TINY, "trainer.max_epochs=3", "strategy=parameter_server", "strategy.workers=1", "test_after_fit=false"],
    )
    original = __import__("cifar_pl.training", fromlist=["instantiate_callbacks"]).instantiate_callbacks
    try:
        import cifar_pl.training as training

        training.instantiate_callbacks = lambda c: [*original(c), late]
        metrics = train(cfg)
    finally:
        training.instantiate_callbacks = original
        if late.process is not None:
            late.process.wait(timeout=15)
    assert metrics["status"] == "completed"
    report = _report(tmp_path / "run")
    joined = [e for e in report["events"] if e["event"] == "joined"]
    assert len(joined) == 2 and "late" in joined[1]["worker"] and joined[1]["round"] >= ROUNDS_PER_EPOCH
    late_rounds = [n for worker, n in report["rounds_per_worker"].items() if "late" in worker]
    assert late_rounds and late_rounds[0] > 0
    assert late.process.returncode == 0  # told training was done, it finished cleanly
    assert all(epoch["every_sample_exactly_once"] for epoch in report["epochs"])


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=parameter_server", "strategy.workers=1,2"],
        ["strategy=ddp", "trainer.devices=2", "trainer.max_epochs=1,2"],
    ],
)
def test_distributed_strategies_inside_a_multirun(tmp_path, strategy):
    sweep = tmp_path / "multirun"
    result = run_script(
        "train.py", ["-m", *PS_TINY, "trainer.max_epochs=1", *strategy, f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 2, "each job runs once: nothing relaunched the sweep"
    assert all(json.loads((job / "metrics.json").read_text())["status"] == "completed" for job in jobs)
    assert "2 of 2 jobs completed" in result.stdout


def test_a_worker_that_cannot_reach_its_server_says_so(tmp_path):
    result = run_script(
        "train.py",
        [
            *PS_TINY,
            "strategy=parameter_server",
            "strategy.role=worker",
            "strategy.address=127.0.0.1:9",
            "strategy.join_timeout=1",
            f"hydra.run.dir={tmp_path / 'worker'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    message = result.stderr.replace("\n       ", " ")
    assert "cannot reach the parameter server at 127.0.0.1:9" in message and "Traceback" not in message
