"""The parameter server's async and ssp modes against workers on 127.0.0.1 (real sockets, threads standing in
for worker processes): ssp with staleness 0 and async with one worker apply exactly the steps sync does,
ssp bounds staleness by making a worker that is too far ahead wait, and every mode keeps sync's guarantees
(each sample used once per epoch whoever leaves or joins, bad gradients refused). The strategy end to end,
with real worker processes, is tested at the bottom."""

from __future__ import annotations

import json
import math
import re
import threading
import time

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.accounting import SampleAccounting
from cifar_pl.parameter_server.pipeline import Pipeline, tick_plans
from cifar_pl.parameter_server.protocol import Message, MessageType
from cifar_pl.parameter_server.server import ParameterServer, ServerSettings
from cifar_pl.parameter_server.worker import Worker, WorkerSettings
from cifar_pl.training import train
from tests.helpers import TINY_SYNTHETIC, compose_config, free_port, tensorboard_scalars
from tests.test_ps_server import FakeWorker, answer_with, join, signature_check, tiny_model

LR = 0.5


@pytest.fixture
def make_server():
    """Servers on 127.0.0.1 (as tests/test_ps_server.py makes them), stopped after the test."""
    servers: list[ParameterServer] = []

    def make(samples: int, **settings) -> ParameterServer:
        module = tiny_model()
        defaults = dict(address="127.0.0.1:0", round_timeout=5.0, worker_wait=2.0, frame_timeout=2.0, max_frame=2**20)
        server = ParameterServer(
            module, ServerSettings(**{**defaults, **settings}), signature_check(module), SampleAccounting(samples)
        )
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop("test over")


def model_answer(cell: list[FakeWorker], first_delay: float = 0.0, nan_first: int = 0):
    """A gradient that depends on the parameters the worker holds and on its samples, so a step computed on
    other parameters, weighed differently or applied in another order changes the model. ``first_delay``:
    seconds its first answer takes; ``nan_first``: that many first answers carry a NaN."""
    answered = []

    def answer(assign: Message, flat) -> Message:
        if not answered:
            time.sleep(first_delay)
        params = cell[0].params[-1]
        indices, sizes = assign.tensors
        grads = sum(params * 0.1 + float(mb.float().mean()) / 64 for mb in indices.split(sizes.tolist()))
        grads = grads / assign.meta["divisor"]
        answered.append(time.monotonic())
        if len(answered) <= nan_first:
            grads = grads.clone()
            grads[0] = float("nan")
        floats = torch.full((flat.num_float_buffers,), float(indices.float().mean()))
        ints = torch.full((flat.num_int_buffers,), len(answered), dtype=torch.int64)
        meta = {
            "round": assign.meta["round"],
            "assignment": assign.meta["assignment"],
            "samples": len(indices),
            "loss_sum": 1.0 * len(indices),
            "correct": 0,
        }
        return Message(MessageType.GRADS, meta, [grads, floats, ints])

    answer.answered = answered  # type: ignore[attr-defined]
    return answer


def model_worker(server: ParameterServer, name: str, **kwargs) -> FakeWorker:
    cell: list[FakeWorker] = []
    worker = FakeWorker(server.address, model_answer(cell, **kwargs), name=name)
    cell.append(worker)
    return worker


def epoch_plans(epoch: int, mode: str, workers: int, samples: int = 48, batch: int = 4, k: int = 2):
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(epoch))
    shares = [list(order[w::workers].split(batch)) for w in range(workers)]
    rounds = math.ceil(math.ceil(math.ceil(samples / workers) / batch) / k)
    return tick_plans(shares, k, rounds, mode), k


def train_steps(
    server: ParameterServer, mode: str, workers: int, staleness: int = 0, epochs: int = 2, between=None, samples=48
):
    """What ParameterServerStrategy does, with plain SGD for Lightning's optimizer step: every step's
    gradient applied to the server's parameters, the version counting the steps. Returns the staleness
    of every applied contribution."""
    version, stale = 0, []
    pipeline = None if mode == "sync" else Pipeline(server, mode, staleness, workers, accumulation=2)
    for epoch in range(epochs):
        plans, k = epoch_plans(epoch, mode, workers, samples)
        if pipeline is not None:
            pipeline.start_epoch(epoch, plans, set())
        for step in range(len(plans)):
            if between is not None:
                between(epoch, step)
            if pipeline is None:
                result = server.run_round(epoch, plans[step].micro_batches, version, k, planned_workers=workers)
            else:
                tick = pipeline.step(version)
                result, _ = tick.result, stale.extend(tick.staleness)
            if result.samples:
                server.flat.load_params(server.flat.params_flat() - LR * result.gradient)
                version += 1
    return stale


@pytest.mark.parametrize(("mode", "workers"), [("ssp", 2), ("async", 1)], ids=["ssp-S0-vs-sync", "async-vs-sync-1w"])
def test_ssp_with_staleness_0_and_async_with_one_worker_take_the_steps_sync_takes(make_server, mode, workers):
    models = {}
    for name in ("sync", mode):
        server = make_server(samples=48)
        join(server, *[model_worker(server, f"w{i}") for i in range(workers)])
        stale = train_steps(server, name, workers, staleness=0)
        models[name] = server.flat.params_flat().clone(), server.flat.buffers_flat()[0].clone()
        assert all(epoch["every_sample_exactly_once"] for epoch in server.accounting.report())
        if name != "sync":
            assert stale and set(stale) == {0}
    assert torch.equal(models["sync"][0], models[mode][0])  # bit for bit: the same steps in the same order
    assert torch.equal(models["sync"][1], models[mode][1])  # and the same BatchNorm statistics


def test_ssp_makes_a_worker_too_far_ahead_wait_and_bounds_staleness(make_server):
    """S=2, 6 rounds, one worker answering at once and one whose first answer takes 0.4 s: the fast one
    computes its shares of rounds 0, 1 and 2, then waits for the slow one; no contribution is more than S
    steps stale, and some are S."""
    server = make_server(samples=96)
    slow, fast = model_worker(server, "slow", first_delay=0.4), model_worker(server, "fast")
    join(server, slow, fast)
    stale = train_steps(server, "ssp", 2, staleness=2, epochs=1, samples=96)
    first_slow_answer = slow.answer.answered[0]
    assert sum(t < first_slow_answer for t in fast.assigned_at) == 3  # ticks 0, 1, 2 = S + 1, then it waited
    assert max(stale) == 2 and min(stale) == 0
    assert len(stale) == 2 * 6  # 6 ticks of 2 shares, each applied once
    assert server.accounting.report()[0]["every_sample_exactly_once"]
    # async with the same workers does not wait: the fast one does the epoch's other 11 shares meanwhile,
    # and the slow one's gradient, computed on the first parameters, is applied 11 steps later
    server = make_server(samples=96)
    slow, fast = model_worker(server, "slow", first_delay=0.4), model_worker(server, "fast")
    join(server, slow, fast)
    stale = train_steps(server, "async", 2, epochs=1, samples=96)
    assert (len(fast.assigned), len(slow.assigned)) == (11, 1) and max(stale) == 11
    assert server.accounting.report()[0]["every_sample_exactly_once"]


def test_an_async_epoch_resumed_with_steps_applied_out_of_order_computes_exactly_the_others(make_server):
    """async applies an epoch's ticks in the order they complete, so a checkpoint lists the ticks applied
    (here 0, 2 and 3, as a slow worker leaves gaps); the resumed epoch hands out exactly the rest."""
    server = make_server(samples=48)
    a, b = model_worker(server, "a"), model_worker(server, "b")
    join(server, a, b)
    plans, _ = epoch_plans(0, "async", 2)
    assert len(plans) == 6
    pipeline = Pipeline(server, "async", 0, 2, accumulation=2)
    pipeline.start_epoch(0, plans, {0, 2, 3})
    done = [pipeline.step(version).number for version in range(3)]
    assert sorted(done) == [1, 4, 5] and pipeline.applied == set(range(6))
    handed_out = sorted(int(i) for assigned in a.assigned + b.assigned for i in assigned)
    expected = sorted(int(i) for tick in (1, 4, 5) for mb in plans[tick].micro_batches for i in mb)
    assert handed_out == expected  # the samples of ticks 1, 4 and 5, each once: none of 0, 2, 3 again


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_answers_that_arrive_while_the_server_is_busy_between_steps_are_not_late(make_server, mode):
    """Shares stay out across steps in these modes; a pause between steps (a validation, a checkpoint)
    longer than the round timeout must not turn the answers that came in meanwhile into late ones."""
    server = make_server(samples=48, round_timeout=0.3)
    join(server, model_worker(server, "a"), model_worker(server, "b"))
    train_steps(server, mode, 2, staleness=2, epochs=1, between=lambda epoch, step: step in (1, 2) and time.sleep(0.5))
    assert not [e for e in server.events if e["event"] in ("straggler", "left")], server.events
    report = server.accounting.report()[0]
    assert report["every_sample_exactly_once"] and report["reassigned_samples"] == 0, report


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_every_sample_is_used_once_per_epoch_when_a_worker_dies_mid_epoch_and_another_joins(make_server, mode):
    server = make_server(samples=48)
    answers = answer_with(1.0)

    def dies_on_its_third(assign: Message, flat):
        doomed.answered += 1
        return "reset" if doomed.answered == 3 else answers(assign, flat)

    doomed = FakeWorker(server.address, dies_on_its_third, name="doomed")
    doomed.answered = 0  # type: ignore[attr-defined]
    steady = FakeWorker(server.address, answer_with(1.0), name="steady")
    join(server, doomed, steady)
    late = FakeWorker(server.address, answer_with(1.0), name="late")

    def join_late(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):
            join(server, late)

    train_steps(server, mode, 2, staleness=1, epochs=3, between=join_late)
    report = server.accounting.report()
    assert [e["every_sample_exactly_once"] for e in report] == [True, True, True]
    # the dead worker's piece went to another, in whichever epoch its third share fell (async: order of arrival)
    assert sum(e["reassigned_samples"] for e in report) > 0
    assert doomed.failure is None and late.assigned and len(late.assigned) >= 2
    assert [e["event"] for e in server.events].count("left") == 1
    ticks = len(epoch_plans(0, mode, 2)[0])
    assert server.round == 3 * ticks


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_nan_gradients_are_refused_in_every_mode_and_their_micro_batches_computed_again(make_server, mode):
    server = make_server(samples=48, max_strikes=5)
    bad, good = model_worker(server, "bad", nan_first=2), model_worker(server, "good")
    join(server, bad, good)
    train_steps(server, mode, 2, staleness=1, epochs=1)
    assert torch.isfinite(server.flat.params_flat()).all()
    assert server.event_counts["rejected contribution"] == 2
    assert server.accounting.report()[0]["every_sample_exactly_once"]


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"mode": "fastest"}, "not one of sync, async, ssp"),
        ({"mode": "ssp", "staleness": -1}, "0 or more (0 is sync)"),
        ({"worker_slowdown": [1.0, 0.5]}, "factor of at least 1.0"),
        ({"worker_slowdown": [1.0, 2.0, 2.0]}, "at most strategy.workers=2"),
        ({"worker_slowdown": [2.0], "role": "server", "allow_insecure": True}, "strategy.role=local"),
    ],
)
def test_mode_settings_that_cannot_work_are_refused_with_the_fix(settings, says):
    from cifar_pl.errors import ConfigurationError
    from cifar_pl.parameter_server.strategy import ParameterServerStrategy

    with pytest.raises(ConfigurationError, match=re.escape(says)):
        ParameterServerStrategy(workers=2, **settings)


# --- the strategy end to end: real worker processes, Lightning's optimizer step and schedule ------------


def worker_thread(cfg, port: int, name: str) -> threading.Thread:
    """A real worker (model, data, gradients) in a thread of this process, for a ``strategy.role=server`` run."""
    L.seed_everything(cfg.seed)
    datamodule, model = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    secret = wire.load_secret(cfg.strategy.secret_file)
    settings = WorkerSettings(address=f"127.0.0.1:{port}", name=name, secret=secret, reconnect_timeout=0)
    thread = threading.Thread(target=Worker(model, datamodule, "32-true", settings).run, daemon=True)
    thread.start()
    return thread


PS_TINY = [*TINY_SYNTHETIC, "data.batch_size=16", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=2"]


def test_async_training_is_interrupted_mid_epoch_resumes_and_completes_its_exact_schedule(tmp_path):
    """Two local worker processes, one 2x slower; Ctrl-C in epoch 1 (a real SIGINT), then the run resumed
    from its last.ckpt (by two real workers in threads of this process, which start in no time): every sample
    once per epoch, as many optimizer steps as planned (the one-cycle schedule ends where it was laid out
    to), staleness in report.json and the server's telemetry in TensorBoard."""
    common = [
        *PS_TINY,
        "trainer.max_epochs=2",
        "test_after_fit=false",
        "strategy=parameter_server",
        "strategy.workers=2",
        "strategy.mode=async",
        "strategy.worker_slowdown=[1.0,2.0]",
    ]
    chaos = ["+callbacks.chaos._target_=tests.helpers.SignalSelfAt", "+callbacks.chaos.epoch=1"]
    cfg = compose_config(tmp_path, [*common, *chaos, "+callbacks.chaos.batch=3", "+callbacks.chaos.signal=SIGINT"])
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C, after last.ckpt is saved
        train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "interrupted"
    stopped = json.loads((tmp_path / "run" / "parameter_server" / "report.json").read_text())
    # the shares still out were awaited, so both workers heard "done" and exited cleanly
    assert stopped["local_worker_exit_codes"] == {"local-0": 0, "local-1": 0}
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    applied = saved["parameter_server"]["applied"]
    # 384 training images, 2 shares of 12 micro-batches, 4 a step: 6 async steps an epoch
    assert saved["global_step"] == 6 + 4 and applied["epoch"] == 1 and len(applied["ticks"]) == 4
    port = free_port()
    (tmp_path / "secret").write_text("shared with the worker threads")
    secret = f"strategy.secret_file={tmp_path / 'secret'}"
    server = [f"strategy.address=127.0.0.1:{port}", "strategy.role=server", secret]
    resumed = compose_config(tmp_path, [*common[:-1], *server, f"ckpt_path={last}"])
    resumed.paths.output_dir = str(tmp_path / "resumed")
    threads = [worker_thread(resumed, port, f"thread-{i}") for i in range(2)]
    metrics = train(resumed)
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert metrics["status"] == "completed" and metrics["global_step"] == 2 * 6
    assert metrics["ps_mode"] == "async" and metrics["samples_per_s"] > 0 and metrics["staleness_mean"] > 0
    assert len(metrics["accuracy_timeline"]) == 1  # the resumed epoch's validation
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    scheduler = final["lr_schedulers"][0]
    assert scheduler["total_steps"] == scheduler["last_epoch"] == 2 * 6  # the schedule ran exactly to its end
    report = json.loads((tmp_path / "resumed" / "parameter_server" / "report.json").read_text())
    assert report["mode"] == "async"
    assert [e["every_sample_exactly_once"] for e in report["epochs"]] == [True, True]
    staleness = report["staleness"]
    assert staleness["contributions"] == 2 * 6 and sum(staleness["histogram"].values()) == 2 * 6
    assert staleness["max"] >= 1 and 0 < staleness["mean"] <= staleness["max"]
    scalars = tensorboard_scalars(tmp_path / "resumed")
    for tag in ("ps/live_workers", "ps/step_ms", "ps/staleness_mean", "ps/reassigned_samples"):
        assert scalars.get(tag), tag
    assert {value for _, value in scalars["ps/live_workers"]} == {2.0}


def test_a_worker_given_two_shares_at_one_version_starts_each_from_the_statistics_it_was_sent(tmp_path):
    """ssp hands a worker that is ahead, and any mode a survivor taking over a share, a second share without
    new parameters: its BatchNorm running statistics must start from those the server sent, not from those
    the first share moved (the server averages them as one update each). A real worker, over a socket."""
    import socket

    cfg = compose_config(tmp_path, PS_TINY)
    datamodule, model = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    worker = Worker(model, datamodule, "32-true", WorkerSettings(address="127.0.0.1:9", name="w"))
    floats, ints = worker.flat.buffers_flat()
    params = Message(MessageType.PARAMS, {"version": 0}, [worker.flat.params_flat(), floats, ints])
    indices = torch.arange(32, dtype=torch.int64)
    server_end, worker_end = socket.socketpair()
    thread = threading.Thread(target=worker.serve, args=(worker_end,), daemon=True)
    thread.start()
    try:
        wire.send_message(server_end, params, timeout=5)
        replies = []
        for assignment in (1, 2):  # the same samples twice, at the same version
            meta = {"round": 0, "assignment": assignment, "epoch": 0, "divisor": 1}
            sizes = torch.tensor([16, 16], dtype=torch.int64)
            wire.send_message(server_end, Message(MessageType.ASSIGN, meta, [indices, sizes]), timeout=5)
            reply = wire.recv_message(server_end, 2**25, timeout=30)
            replies.append([t.clone() for t in reply.tensors])
        wire.send_message(server_end, Message(MessageType.DONE, {"reason": "test over"}, []), timeout=5)
        thread.join(10)
    finally:
        server_end.close()
        worker_end.close()
    assert not thread.is_alive()
    first, second = replies
    assert not torch.equal(first[1], floats)  # the share moved the statistics...
    assert torch.equal(second[1], first[1]) and torch.equal(second[0], first[0])  # ...from the same start
