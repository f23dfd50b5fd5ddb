"""Faults and bad input: a single-process run interrupted by SIGINT or SIGTERM resumes exactly; a
parameter server killed outright mid-epoch and restarted with strategy.resume finishes with every sample
of every epoch used once; thousands of malformed frames against a live server do not disturb a real
worker's training."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import cifar_pl.training as training
from cifar_pl.training import train
from tests.helpers import REPO, TINY_SYNTHETIC, compose_config, free_port, tensorboard_scalars, worker_processes

RUN = [*TINY_SYNTHETIC, "data.batch_size=16", "trainer.enable_progress_bar=false"]  # 24 batches = 6 steps per epoch


def _train_py(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if os.getpgid(process.pid) == process.pid:  # started in a session of its own: kill what it started too
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        output, _ = process.communicate()
    return process.returncode, output


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# seed 2 gives validation accuracies (.078, .133, .070): the best epoch is the middle one, so a resumed run
# that forgot it would test another checkpoint
SEEDED = [*RUN, "trainer.max_epochs=3", "seed=2"]
TIMINGS = ("train_seconds", "seconds_per_epoch", "epoch_seconds")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must match."""
    cwd = tmp_path_factory.mktemp("straight")
    code, output = _finish(_train_py([*SEEDED, f"hydra.run.dir={cwd / 'run'}"], cwd))
    assert code == 0, output[-3000:]
    return cwd / "run"


def _comparable(run_dir: Path) -> dict:
    """metrics.json apart from timings, with paths relative to the run directory and the overrides that
    only say how the run was started (resumed from, stopped by) left out."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = {}
    for key, value in metrics.items():
        if key in TIMINGS or key == "run_dir":
            continue
        if key == "overrides":
            out[key] = [o for o in value if not o.startswith(("ckpt_path=", "+callbacks.chaos"))]
        elif isinstance(value, str) and value.startswith(str(run_dir)):
            out[key] = os.path.relpath(value, run_dir)
        else:
            out[key] = value
    return out


def _epoch_scalars(run_dirs: list[Path], tag: str) -> dict[int, float]:
    """A per-epoch TensorBoard scalar by step, over the halves of a run (the later half wins a step both wrote)."""
    values = {}
    for run_dir in run_dirs:
        values.update(dict(tensorboard_scalars(run_dir / "tensorboard")[tag]))
    return values


@pytest.mark.parametrize(
    ("signal_name", "epoch", "batch", "stopped_at"),
    [
        # mid-epoch: the signal arrives as batch 9 of epoch 2 starts; training stops after batch 11, where the
        # optimizer steps (accumulation 4), so the checkpoint holds step 12 + 3 = 15 and nothing half-accumulated
        ("SIGINT", 2, 9, (2, 15)),
        # in the last accumulation window of epoch 1 (batches 20-23): its validation and checkpoints still run,
        # then training stops; last.ckpt is the end of epoch 1
        ("SIGTERM", 1, 21, (1, 12)),
    ],
)
def test_a_signal_stops_at_a_consistent_point_and_the_resumed_run_reports_an_uninterrupted_one(
    tmp_path, straight_run, signal_name, epoch, batch, stopped_at
):
    chaos = [
        "+callbacks.chaos._target_=tests.helpers.SignalSelfAt",
        f"+callbacks.chaos.epoch={epoch}",
        f"+callbacks.chaos.batch={batch}",
        f"+callbacks.chaos.signal={signal_name}",
    ]
    started = time.monotonic()
    first = _train_py([*SEEDED, *chaos, f"hydra.run.dir={tmp_path / 'first'}"], tmp_path)
    code, output = _finish(first)
    assert code == 1, "an interrupted run must not report success"
    assert f"{signal_name}: stopping at the end of this optimizer step" in output
    interrupted = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert interrupted["status"] == "interrupted" and "test/acc" not in interrupted
    last = _ckpt(tmp_path / "first" / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == stopped_at
    # every epoch trained so far was validated, the one the signal arrived in too when it had finished
    validated = sorted(step for step, _ in tensorboard_scalars(tmp_path / "first" / "tensorboard")["val/acc"])
    assert validated == [6 * e - 1 for e in range(1, stopped_at[1] // 6 + 1)]

    # a run killed outright while writing left a temporary file; the next run cleans it up
    leftover = tmp_path / "first" / "checkpoints" / f".last.ckpt.{first.pid}.tmp"
    leftover.write_bytes(b"half a checkpoint")
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))

    code, output = _finish(
        _train_py(
            [
                *SEEDED,
                f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
                f"hydra.run.dir={tmp_path / 'resumed'}",
            ],
            tmp_path,
        )
    )
    assert code == 0, output[-3000:]
    assert not leftover.exists()
    # the same best score, the same tested checkpoint, the same test result: metrics.json as if never stopped
    assert _comparable(tmp_path / "resumed") == _comparable(straight_run)
    # the same epoch, step, learning rate, data order and random state: the same model as the straight run
    final, straight = (
        _ckpt(tmp_path / "resumed" / "checkpoints" / "last.ckpt"),
        _ckpt(straight_run / "checkpoints" / "last.ckpt"),
    )
    assert final["lr_schedulers"][0]["_last_lr"] == straight["lr_schedulers"][0]["_last_lr"]
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    # each epoch's training loss and accuracy cover the whole epoch, also the one that was resumed
    halves = [tmp_path / "first", tmp_path / "resumed"]
    for tag in ("train/loss", "train/acc", "val/acc"):
        assert _epoch_scalars(halves, tag) == pytest.approx(_epoch_scalars([straight_run], tag), abs=1e-6), tag
    # epoch times add up to the wall time the two halves took, not to seconds since boot
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert len(resumed["epoch_seconds"]) == 3
    assert 0 < sum(resumed["epoch_seconds"]) < time.monotonic() - started


def test_a_parameter_server_killed_mid_epoch_resumes_and_uses_every_sample_once(tmp_path):
    port = free_port()
    (tmp_path / "secret").write_text("the server and its workers share this")
    common = [
        *RUN,
        f"strategy.secret_file={tmp_path / 'secret'}",
        "data.options.train_size=1152",
        "trainer.max_epochs=3",
        "strategy=parameter_server",
        f"strategy.address=127.0.0.1:{port}",
        "strategy.workers=2",
    ]
    # 1024 training images / 16 = 64 micro-batches = 8 rounds of 2 workers x 4 per epoch; a recovery
    # checkpoint every 2 rounds; the server SIGKILLs itself as round 5 of epoch 1 starts (after step 12)
    server_args = [
        *common,
        "strategy.role=server",
        "callbacks.recovery_checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    chaos = [
        "+callbacks.chaos._target_=tests.helpers.SignalSelfAt",
        "+callbacks.chaos.epoch=1",
        "+callbacks.chaos.batch=5",
        "+callbacks.chaos.signal=SIGKILL",
    ]
    server = _train_py([*server_args, *chaos], tmp_path)
    workers = [
        _train_py(
            [*common, "strategy.role=worker", "strategy.reconnect_timeout=120", f"hydra.run.dir={tmp_path / f'w{i}'}"],
            tmp_path,
        )
        for i in range(2)
    ]
    try:
        code, output = _finish(server)
        assert code == -signal.SIGKILL, output[-3000:]
        recovery = _ckpt(tmp_path / "run" / "checkpoints" / "recovery.ckpt")
        assert recovery["global_step"] == 12  # the newest checkpoint: steps 13 and 14 were lost with the server
        assert all(w.poll() is None for w in workers), "workers wait for the server to come back"

        code, output = _finish(_train_py([*server_args, "strategy.resume=true"], tmp_path))
        assert code == 0, output[-3000:]
        worker_codes = [_finish(w, timeout=60)[0] for w in workers]
    finally:
        for process in [server, *workers]:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert worker_codes == [0, 0], "the workers reconnected, finished the run and stopped cleanly"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 3 * 8
    report = json.loads((tmp_path / "run" / "parameter_server" / "report.json").read_text())
    resumed = [e for e in report["events"] if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 12 and resumed[0]["checkpoint"].endswith("recovery.ckpt")
    assert [e["samples"] for e in report["epochs"]] == [1024, 1024, 1024]
    assert [e["every_sample_exactly_once"] for e in report["epochs"]] == [True, True, True]
    assert report["rounds"] == 3 * 8  # the round count continued from the checkpoint's


class Fuzzer(L.Callback):
    """As training starts, a separate process fires a seeded corpus of malformed frames at the server, one
    connection each; training goes on, epoch after epoch, until it has finished (however loaded the machine
    is), then stops at the end of that epoch."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed, self.process = count, seed, None
        self.finished_during_training, self.output = False, ""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        host, port = trainer.strategy.server.address
        code = (
            f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.helpers import fire_frames; "
            f"print(fire_frames({host!r}, {port}, {self.count}, {self.seed}))"
        )
        self.process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.process is not None and self.process.poll() is not None:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finished_during_training = self.process.poll() is not None
        self.output, _ = self.process.communicate(timeout=120)


def test_fuzzing_a_live_server_does_not_disturb_a_training_worker(tmp_path, monkeypatch):
    fuzzer = Fuzzer(count=3000, seed=7)
    original = training.instantiate_callbacks
    monkeypatch.setattr(training, "instantiate_callbacks", lambda c: [*original(c), fuzzer])
    cfg = compose_config(
        tmp_path,
        [
            *RUN,
            "data.options.train_size=2176",
            "trainer.max_epochs=100",  # stopped by the fuzzer's callback at the end of the epoch it finished in
            "test_after_fit=false",
            "strategy=parameter_server",
            "strategy.workers=1",
        ],
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics = train(cfg)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    epochs = metrics["global_step"] // 32
    assert metrics["status"] == "completed" and metrics["global_step"] == epochs * 32 and 1 <= epochs < 100
    assert fuzzer.output.strip() == "3000" and fuzzer.finished_during_training, (
        "every frame arrived while the worker trained"
    )
    report = json.loads((tmp_path / "run" / "parameter_server" / "report.json").read_text())
    assert report["local_worker_exit_codes"] == {"local-0": 0}
    assert all(epoch["every_sample_exactly_once"] for epoch in report["epochs"])
    turned_away = sum(report["refused_connections"].values())
    assert turned_away >= 2900, report["refused_connections"]  # a few may have closed before the server read them
    assert len(report["recent_refusals"]) <= 50 and grown_mib < 300, grown_mib
    assert [e["event"] for e in report["events"]].count("joined") == 1  # no fuzz frame became a worker
    assert not worker_processes()


def test_ctrl_c_on_a_local_parameter_server_run_stops_it_cleanly(tmp_path):
    """Ctrl-C reaches the whole process group, local workers included: the server finishes its round, saves
    last.ckpt and tells the workers to stop; nothing hangs or is left running."""
    run = tmp_path / "run"
    chaos = [
        "+callbacks.chaos._target_=tests.helpers.SignalSelfAt",
        "+callbacks.chaos.epoch=1",
        "+callbacks.chaos.batch=1",
        "+callbacks.chaos.signal=SIGINT",
        "+callbacks.chaos.group=true",
    ]
    started = time.monotonic()
    process = _train_py(
        [
            *RUN,
            "trainer.max_epochs=3",
            "strategy=parameter_server",
            "strategy.workers=2",
            *chaos,
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        start_new_session=True,
    )
    code, output = _finish(process, timeout=120)
    assert code == 1 and time.monotonic() - started < 90, output[-3000:]
    assert "SIGINT: stopping at the end of this optimizer step" in output
    last = _ckpt(run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 3 + 2)  # 3 rounds per epoch; stopped after round 1 of epoch 1
    report = json.loads((run / "parameter_server" / "report.json").read_text())
    assert report["local_worker_exit_codes"] == {"local-0": 0, "local-1": 0}
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert not worker_processes()


def test_ctrl_c_on_a_ddp_run_stops_every_rank_at_the_same_step(tmp_path):
    """Ctrl-C reaches the main process and both spawned ranks: the ranks agree on a step, stop there and
    rank 0 saves last.ckpt from the trained model; the main process waits for them instead of saving its
    own (untrained) copy; nothing hangs in an all-reduce or is left running."""
    run = tmp_path / "run"
    chaos = [
        "+callbacks.chaos._target_=tests.helpers.SignalSelfAt",
        "+callbacks.chaos.epoch=1",
        "+callbacks.chaos.batch=1",
        "+callbacks.chaos.signal=SIGINT",
        "+callbacks.chaos.group=true",
    ]
    started = time.monotonic()
    process = _train_py(
        [
            *RUN,
            "trainer.max_epochs=3",
            "strategy=ddp",
            "trainer.devices=2",
            "callbacks.graceful_interrupt.sync_every_n_steps=1",
            *chaos,
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        start_new_session=True,
    )
    code, output = _finish(process, timeout=120)
    assert code == 1 and time.monotonic() - started < 90, output[-3000:]
    assert "SIGINT: stopping at the end of this optimizer step" in output
    last = _ckpt(run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 3 + 1), output[-4000:]  # 12 batches per rank = 3 steps per epoch
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
