"""The parameter-server strategy through train.py: it reproduces single-process training with one worker and
DDP with two, survives a worker killed mid-epoch, takes in a worker that joins mid-run, works in a Hydra
multirun, and leaves no process behind."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

import cifar_pl.training as training
from cifar_pl.data.sampling import EpochBatches, ResumableLoader
from cifar_pl.errors import ConfigurationError
from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.launch import LocalWorkers
from cifar_pl.parameter_server.server import RejectedMicroBatchError
from cifar_pl.parameter_server.strategy import RoundLoader, check_exposure
from cifar_pl.parameter_server.worker import Worker, WorkerSettings
from cifar_pl.training import train
from tests.helpers import TINY_SYNTHETIC, compose_config, free_port, run_script, worker_processes

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


# 384 training images in batches of 18 divide evenly into nothing: 21 full micro-batches and one of 6, so with
# accumulation 4 an epoch ends on a short window of 2 micro-batches (of 3 per DDP rank), which Lightning (and
# so DDP) still divides by 4
UNEVEN = [*TINY_SYNTHETIC, "data.batch_size=18", "trainer.enable_progress_bar=false"]


def test_one_worker_reproduces_single_process_training_bit_for_bit(tmp_path):
    """float32, dropout on, same seed and thread count, sizes that do not divide evenly: the same
    parameters, bit for bit, after every epoch's short last step too."""
    common = [
        *UNEVEN,
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
    assert results["single"]["global_step"] == results["ps"]["global_step"] == 2 * 6  # 22 micro-batches: 5 x 4 + 2
    single, ps = _state(tmp_path / "single"), _state(tmp_path / "ps")
    assert single.keys() == ps.keys()
    for key in single:
        assert torch.equal(ps[key], single[key]), key
    report = _report(tmp_path / "ps")
    assert list(report["rounds_per_worker"].values()) == [2 * 6]
    assert all(epoch["every_sample_exactly_once"] for epoch in report["epochs"])


def test_two_workers_match_ddp_with_two_processes(tmp_path):
    """Worker w computes what DDP rank w computes, so without dropout (DDP reseeds its ranks, which
    changes dropout masks) the parameters agree exactly; BatchNorm statistics differ by design (the server
    averages the workers', DDP keeps rank 0's). Uneven sizes: each epoch ends on a short window."""
    common = [*UNEVEN, "trainer.max_epochs=2", "trainer.precision=32-true", "model.dropout=0.0"]
    runs = {"ps": ["strategy=parameter_server", "strategy.workers=2"], "ddp": ["strategy=ddp", "trainer.devices=2"]}
    metrics = {}
    for name, extra in runs.items():
        result = run_script("train.py", [*common, *extra, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    # 384 images: DDP gives each rank 192 = 11 batches of 18 (the last of 12) = 3 steps, the last of 3 batches;
    # the server plans 2 x 4 micro-batches a round
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


class KillBeforeJoining(L.Callback):
    """SIGKILLs local worker ``name`` as the fit starts: launched a moment ago, it cannot have joined."""

    def __init__(self, name: str = "local-1") -> None:
        self.name = name

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.local_workers.kill(self.name)


class Outsider(L.Callback):
    """As training starts: what another local user sees of the run's secret, and whether they can join."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        secret = strategy.settings.secret
        processes = [p for p in strategy.local_workers.processes.values() if p.poll() is None]
        self.secret_in_argv = any(secret in Path(f"/proc/{p.pid}/cmdline").read_bytes() for p in processes)
        variable = f"{wire.SECRET_ENV}=".encode() + secret
        self.secret_in_environ = all(
            variable in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0") for p in processes
        )
        with socket.create_connection(strategy.server.address, timeout=5) as sock:
            try:
                wire.client_handshake(sock, {"name": "outsider"}, None, 5)
                self.outsider = "joined"
            except wire.ProtocolError as error:
                self.outsider = str(error)


class StartWorkerAt(L.Callback):
    """Starts one more worker process at the beginning of epoch ``epoch`` and waits until it has joined."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.process = epoch, None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        server, workers = trainer.strategy.server, trainer.strategy.local_workers
        # as one of the run's own workers: the same command line and environment (which holds the run's secret)
        self.process = subprocess.Popen(
            workers.command("late"), env=workers.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert server.wait_for_workers(2, timeout=60) == 2


def test_a_worker_joining_mid_run_takes_part_in_later_rounds(tmp_path, monkeypatch):
    """Also: the local worker, SIGKILLed before it could join, is started again at once; and the run has
    a secret of its own, in its workers' environment but not on their command line, that an outsider
    lacks."""
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    late, outsider = StartWorkerAt(epoch=1), Outsider()
    cfg = compose_config(
        tmp_path,
        [*PS_TINY, "trainer.max_epochs=3", "strategy=parameter_server", "strategy.workers=1", "test_after_fit=false"],
    )
    original = training.instantiate_callbacks
    monkeypatch.setattr(
        training, "instantiate_callbacks", lambda c: [*original(c), KillBeforeJoining("local-0"), outsider, late]
    )
    try:
        metrics = train(cfg)
    finally:
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
    assert report["local_worker_restarts"] == {"local-0": ["killed by SIGKILL"]}
    assert report["local_worker_exit_codes"] == {"local-0": 0}
    assert not outsider.secret_in_argv and outsider.secret_in_environ
    assert "requires a shared secret" in outsider.outsider


@pytest.mark.slow
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


# --- hardening (issue 11) ----------------------------------------------------------------------------


def test_local_workers_that_keep_dying_before_joining_fail_the_run_at_once_with_their_log(tmp_path):
    """Restarted at most MAX_RESTARTS times each; once too few are left, a one-paragraph error with the
    end of the worker's log (here: workers that cannot start at all)."""
    workers = LocalWorkers(2, tmp_path / "spec.json", "127.0.0.1:9", tmp_path, threads=1)
    workers.command = lambda name: [sys.executable, "-c", f"print('cannot load the data for {name}'); exit(3)"]
    workers.start()
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as caught:
        while time.monotonic() - started < 20:
            workers.look_after(joined=set(), needed=2)
            time.sleep(0.05)
    message = str(caught.value)
    assert "ended before joining the parameter server 3 times (exit status 3, exit status 3, exit status 3)" in message
    assert "cannot load the data for local-" in message and "\n" not in message
    assert max(len(ended) for ended in workers.restarts.values()) == 3
    workers.stop()


def test_a_server_workers_can_join_from_elsewhere_needs_a_secret_even_on_loopback(caplog):
    for address, reach in [
        ("0.0.0.0:29400", "other machines can reach"),
        ("127.0.0.1:29400", "every user of this machine can reach"),  # and whatever tunnels to it
        ("[::1]:29400", "every user of this machine can reach"),
    ]:
        with pytest.raises(ConfigurationError) as caught:
            check_exposure(address, None, allow_insecure=False)
        message = str(caught.value)
        assert reach in message and "strategy.secret_file" in message and wire.SECRET_ENV in message
        assert "allow_insecure=true" in message
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cifar_pl.parameter_server.strategy"):
            check_exposure(address, None, allow_insecure=True)
        assert "INSECURE" in caplog.text and reach in caplog.text
    for address in ("127.0.0.1:29400", "10.0.0.5:29400"):
        check_exposure(address, b"a secret", allow_insecure=False)


def test_role_server_on_an_open_address_without_a_secret_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    cfg = compose_config(
        tmp_path, [*PS_TINY, "strategy=parameter_server", "strategy.role=server", "strategy.address=0.0.0.0:0"]
    )
    with pytest.raises(ConfigurationError, match="without a shared secret"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def _round_loader(workers: int, micro_batches: int, batch_size: int, position: tuple[int, int]) -> RoundLoader:
    return RoundLoader(EpochBatches(list(range(100)), batch_size, seed=3), workers, micro_batches, lambda: position)


def test_resuming_mid_epoch_with_another_layout_is_refused_and_the_same_layout_goes_on():
    saved = _round_loader(2, 4, 5, (1, 1)).state_dict()  # epoch 1, after round 1 of 3
    for other in (_round_loader(3, 4, 5, (1, 0)), _round_loader(2, 2, 5, (1, 0)), _round_loader(2, 4, 8, (1, 0))):
        with pytest.raises(ConfigurationError) as caught:
            other.load_state_dict(saved)
        assert "middle of epoch 1, after round 1 of 3" in str(caught.value)
        assert "strategy.workers=2, trainer.accumulate_grad_batches=4, data.batch_size=5" in str(caught.value)
    same = _round_loader(2, 4, 5, (1, 0))
    same.load_state_dict(saved)
    rest, whole = list(same), list(_round_loader(2, 4, 5, (1, 0)))
    assert [p.index for p in rest] == [1, 2]
    assert [torch.cat(p.micro_batches).tolist() for p in rest] == [
        torch.cat(p.micro_batches).tolist() for p in whole[1:]
    ]
    # at an epoch boundary the layout may change
    _round_loader(3, 1, 7, (1, 0)).load_state_dict(_round_loader(2, 4, 5, (1, 3)).state_dict())


def test_a_parameter_server_checkpoint_from_mid_epoch_is_refused_by_the_other_strategies_loader():
    mid_epoch = _round_loader(2, 4, 5, (1, 1)).state_dict()
    loader = ResumableLoader(
        list(range(100)), sampler=EpochBatches(list(range(100)), 5), batch_size=None, position=lambda: (0, 0)
    )
    with pytest.raises(ConfigurationError, match="middle of epoch 1 by a parameter-server run"):
        loader.load_state_dict(mid_epoch)
    loader.load_state_dict(_round_loader(2, 4, 5, (1, 3)).state_dict())  # its end: fine


def test_resuming_a_single_process_checkpoint_from_mid_epoch_on_the_parameter_server_is_refused(tmp_path):
    first = compose_config(
        tmp_path,
        [
            *PS_TINY,
            "+trainer.max_steps=3",
            "callbacks.recovery_checkpoint.every_n_train_steps=2",
            "test_after_fit=false",
        ],
    )
    train(first)
    recovery = tmp_path / "run" / "checkpoints" / "recovery.ckpt"
    assert torch.load(recovery, weights_only=True)["global_step"] == 2  # 6 steps per epoch: mid-epoch
    resumed = compose_config(
        tmp_path, [*PS_TINY, "strategy=parameter_server", "strategy.workers=1", f"ckpt_path={recovery}"]
    )
    resumed.paths.output_dir = str(tmp_path / "resumed")
    with pytest.raises(ConfigurationError, match="middle of an epoch by a run with another strategy"):
        train(resumed)
    assert not worker_processes()


BAD_SAMPLE = 5


class PoisonedWorker(Worker):
    """A real worker whose gradient for any share holding sample BAD_SAMPLE is NaN (as a sample whose loss
    overflows on every worker would be)."""

    def compute(self, message: wire.Message) -> wire.Message:
        reply = super().compute(message)
        if BAD_SAMPLE in message.tensors[0].tolist():
            reply.tensors[0][0] = float("nan")
        return reply


def _poisoned_worker(cfg, port: int) -> threading.Thread:
    L.seed_everything(cfg.seed)
    datamodule, model = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    # struck out after 3 rejections (strategy.max_strikes), it comes back, as a real worker does
    secret = wire.load_secret(cfg.strategy.secret_file)
    settings = WorkerSettings(address=f"127.0.0.1:{port}", name="poisoned", secret=secret, reconnect_timeout=30)
    thread = threading.Thread(target=PoisonedWorker(model, datamodule, "32-true", settings).run, daemon=True)
    thread.start()
    return thread


def test_a_micro_batch_no_worker_can_compute_stops_the_run_and_the_skip_policy_goes_on_from_last_ckpt(tmp_path):
    port = free_port()
    (tmp_path / "secret").write_text("shared with the poisoned worker")
    common = [
        *PS_TINY,
        f"strategy.secret_file={tmp_path / 'secret'}",
        "trainer.max_epochs=2",
        "trainer.precision=32-true",
        "test_after_fit=false",
        "strategy=parameter_server",
        "strategy.role=server",
        f"strategy.address=127.0.0.1:{port}",
        "strategy.workers=1",
    ]
    cfg = compose_config(tmp_path, common)
    worker = _poisoned_worker(cfg, port)
    with pytest.raises(RejectedMicroBatchError) as caught:
        train(cfg)
    worker.join(10)
    error = caught.value
    assert BAD_SAMPLE in error.indices and error.epoch == 0
    text = str(error)
    assert f"of round {error.round} (epoch 0)" in text and "rejection_policy=skip" in text and "last.ckpt" in text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "RejectedMicroBatchError" in metrics["error"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == error.round - 1  # the rounds before it

    resumed = compose_config(tmp_path, [*common, "strategy.rejection_policy=skip", f"ckpt_path={last}"])
    resumed.paths.output_dir = str(tmp_path / "resumed")
    worker = _poisoned_worker(resumed, port)
    metrics = train(resumed)
    worker.join(10)
    assert metrics["status"] == "completed" and metrics["global_step"] == 2 * ROUNDS_PER_EPOCH
    report = _report(tmp_path / "resumed")
    assert [e["skipped_samples"] for e in report["epochs"]] == [16, 16]
    assert all(BAD_SAMPLE in e["skipped_indices"] and e["used_once"] == 384 - 16 for e in report["epochs"])
    assert report["event_counts"]["skipped micro-batch"] == 2
