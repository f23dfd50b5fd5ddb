"""The parameter server's rounds and admission, against fake workers that speak the real protocol over
real sockets on 127.0.0.1: averaging, reassignment when a worker dies, goes silent or sends a bad
gradient, and refusal of malformed, oversized, wrong-version, unauthenticated and mismatched peers."""

from __future__ import annotations

import gc
import itertools
import logging
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.accounting import SampleAccounting
from cifar_pl.parameter_server.packing import FlatState
from cifar_pl.parameter_server.protocol import Message, MessageType
from cifar_pl.parameter_server.server import NoWorkersError, ParameterServer, RejectedMicroBatchError, ServerSettings
from cifar_pl.parameter_server.worker import Worker, WorkerSettings
from tests.helpers import boundary_frames, malformed_frames

SECRET = b"a shared secret"


def tiny_model(width: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width))


def wide_model() -> nn.Module:
    """8 MB of parameters: more than the socket buffers take from a peer that does not read."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 2048), nn.BatchNorm1d(2048))


def signature_check(module: nn.Module) -> Callable[[dict], str | None]:
    ours = wire.model_signature(module)
    return lambda hello: wire.signature_mismatch(ours, hello.get("signature"))


Answer = Callable[[Message, FlatState], "Message | str | None"]


def answer_with(value: float) -> Answer:
    """As a worker whose every micro-batch has a gradient of ``value`` everywhere: their sum over the
    server's divisor (as Lightning accumulates), BatchNorm means of ``value``, for the samples assigned."""

    def answer(assign: Message, flat: FlatState) -> Message:
        indices, sizes = assign.tensors
        grads = torch.full((flat.num_params,), value * len(sizes) / assign.meta["divisor"])
        floats = torch.full((flat.num_float_buffers,), value)
        ints = torch.full((flat.num_int_buffers,), 7, dtype=torch.int64)
        meta = {
            "round": assign.meta["round"],
            "assignment": assign.meta["assignment"],
            "samples": len(indices),
            "loss_sum": 2.0 * len(indices),
            "correct": len(indices) // 2,
        }
        return Message(MessageType.GRADS, meta, [grads, floats, ints])

    return answer


def hang_up(sock: socket.socket, how: str) -> None:
    """ "close": an orderly close (FIN); "reset": an abortive one (RST), as a crashed host's kernel sends."""
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FakeWorker(threading.Thread):
    """Answers each ASSIGN with ``answer(message, flat)``: a Message to send, None to stay silent,
    "close" or "reset" to hang up, "half" to send half a gradient frame and go silent, raw bytes to send
    as they are, or (Message, "close" | "reset") to answer and then hang up. Records every assignment's
    sample indices. ``hello`` adds to or replaces what it says about itself in JOIN."""

    def __init__(
        self,
        address: tuple[str, int],
        answer: Answer,
        module: nn.Module | None = None,
        secret: bytes | None = None,
        name: str = "fake",
        start_delay: float = 0.0,
        hello: dict | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.address, self.answer, self.secret, self.name_ = address, answer, secret, name
        self.hello_extra = hello or {}
        self.start_delay = start_delay  # seconds between joining and reading its first frame
        self.module = module or tiny_model()
        self.flat = FlatState(self.module)
        self.assigned: list[torch.Tensor] = []
        self.assigned_at: list[float] = []  # time.monotonic() of each ASSIGN's arrival
        self.params: list[torch.Tensor] = []
        self.errors: list[str] = []
        self.joined = threading.Event()
        self.failure: BaseException | None = None
        self.sock = socket.create_connection(address, timeout=5)

    def run(self) -> None:
        try:
            hello = {"name": self.name_, "signature": wire.model_signature(self.module), **self.hello_extra}
            wire.client_handshake(self.sock, hello, self.secret, timeout=5, max_frame=2**25)
            self.joined.set()
            time.sleep(self.start_delay)
            while True:
                message = wire.recv_message(self.sock, 2**25, timeout=5, idle_timeout=30)
                if message.type == MessageType.PARAMS:
                    self.params.append(message.tensors[0].clone())
                elif message.type == MessageType.ASSIGN:
                    self.assigned_at.append(time.monotonic())
                    self.assigned.append(message.tensors[0].clone())
                    reply = self.answer(message, self.flat)
                    if reply in ("close", "reset"):
                        hang_up(self.sock, reply)
                        return
                    if isinstance(reply, tuple):  # answer, then hang up
                        wire.send_message(self.sock, reply[0], timeout=5)
                        hang_up(self.sock, reply[1])
                        return
                    if isinstance(reply, bytes):  # raw bytes in place of a frame
                        self.sock.sendall(reply)
                        continue
                    if reply == "half":  # half of a real gradient frame, then silence
                        frame = b"".join(bytes(p) for p in wire.encode(answer_with(1.0)(message, self.flat)))
                        self.sock.sendall(frame[: len(frame) // 2])
                        time.sleep(5.0)
                        return
                    if isinstance(reply, Message):
                        wire.send_message(self.sock, reply, timeout=5)
                elif message.type == MessageType.ERROR:
                    self.errors.append(message.meta["reason"])
                elif message.type == MessageType.DONE:
                    return
        except BaseException as error:
            self.failure = error
        finally:
            self.sock.close()


@pytest.fixture
def make_server():
    servers: list[ParameterServer] = []

    def make(module: nn.Module | None = None, samples: int = 64, **settings) -> ParameterServer:
        module = module or tiny_model()
        defaults = dict(
            address="127.0.0.1:0",
            round_timeout=5.0,
            worker_wait=2.0,
            handshake_timeout=2.0,
            frame_timeout=2.0,
            max_frame=2**20,
        )
        server = ParameterServer(
            module, ServerSettings(**{**defaults, **settings}), signature_check(module), SampleAccounting(samples)
        )
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop("test over")


def join(server: ParameterServer, *workers: FakeWorker) -> None:
    for worker in workers:
        worker.start()
        assert worker.joined.wait(5), worker.failure
    assert server.wait_for_workers(len(workers), 5) >= len(workers)


def micro_batches(count: int = 8, size: int = 8) -> list[torch.Tensor]:
    return list(torch.randperm(count * size, generator=torch.Generator().manual_seed(1)).split(size))


def test_round_averages_gradients_weighted_by_samples(make_server):
    server = make_server()
    a, b = FakeWorker(server.address, answer_with(1.0)), FakeWorker(server.address, answer_with(3.0))
    join(server, a, b)
    result = server.run_round(epoch=0, micro_batches=micro_batches(8), version=0)
    assert result.samples == 64 and result.loss_sum == 128.0 and result.correct == 32
    # 4 micro-batches each: (1.0 * 32 + 3.0 * 32) / 64 = 2.0
    torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, 2.0))
    torch.testing.assert_close(server.flat.buffers_flat()[0], torch.full((server.flat.num_float_buffers,), 2.0))
    assert sorted(torch.cat(a.assigned + b.assigned).tolist()) == list(range(64))
    assert server.accounting.report()[0]["every_sample_exactly_once"]


def test_uneven_shares_are_weighted_by_sample_count(make_server):
    server = make_server()
    a, b = FakeWorker(server.address, answer_with(0.0)), FakeWorker(server.address, answer_with(6.0))
    join(server, a, b)
    result = server.run_round(0, micro_batches(3), version=0)  # 3 micro-batches: 2 to one worker, 1 to the other
    shares = {len(torch.cat(w.assigned)): w for w in (a, b)}
    expected = 6.0 * (len(torch.cat(b.assigned)) / 24)
    assert set(shares) == {8, 16}
    torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, expected))


def test_a_worker_that_hangs_up_mid_round_has_its_samples_reassigned(make_server):
    server = make_server()
    good, quitter = (
        FakeWorker(server.address, answer_with(1.0), name="good"),
        FakeWorker(server.address, lambda m, f: "close", name="quitter"),
    )
    join(server, good, quitter)
    result = server.run_round(0, micro_batches(8), version=0)
    torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, 1.0))  # only the good worker's
    assert result.reassigned_samples == 32 and result.samples == 64
    report = server.accounting.report()[0]
    assert report["every_sample_exactly_once"] and report["reassigned_samples"] == 32
    events = [e["event"] for e in server.events]
    assert "left" in events and "reassigned" in events
    assert sorted(torch.cat(good.assigned).tolist()) == list(range(64))  # it computed everything in the end


def slow_once(delay: float, value: float = 1.0) -> Answer:
    """Answers its first assignment ``delay`` seconds late, the others at once."""
    calls = []

    def answer(assign: Message, flat: FlatState) -> Message:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(delay)
        return answer_with(value)(assign, flat)

    return answer


def test_a_straggler_is_dropped_for_the_round_and_takes_part_again(make_server):
    server = make_server(round_timeout=0.3)
    good, slow = (
        FakeWorker(server.address, answer_with(1.0), name="good"),
        FakeWorker(server.address, slow_once(1.5, 3.0), name="slow"),
    )
    join(server, good, slow)
    started = time.monotonic()
    first = server.run_round(0, micro_batches(8), version=0)
    assert time.monotonic() - started < 1.2, "the round must not wait for the straggler"
    assert first.samples == 64 and first.reassigned_samples == 32
    torch.testing.assert_close(
        first.gradient, torch.full_like(first.gradient, 1.0)
    )  # the straggler's late answer is not in it
    assert len(server.live_workers) == 2 and any(e["event"] == "straggler" for e in server.events)
    time.sleep(1.5)  # the straggler finishes its stale share (discarded) and is ready again
    second = server.run_round(1, micro_batches(8), version=1)  # the next epoch: the same samples again
    torch.testing.assert_close(second.gradient, torch.full_like(second.gradient, 2.0))  # both contributed
    assert second.reassigned_samples == 0
    assert all(r["every_sample_exactly_once"] for r in server.accounting.report())


def test_a_worker_that_never_answers_is_disconnected_after_repeated_late_rounds(make_server):
    server = make_server(round_timeout=0.2, max_strikes=2)
    good, silent = (
        FakeWorker(server.address, answer_with(1.0)),
        FakeWorker(server.address, lambda m, f: None, name="silent"),
    )
    join(server, good, silent)
    for step in range(2):
        assert server.run_round(0, micro_batches(8), version=step).samples == 64
    assert len(server.live_workers) == 1
    assert any(e["event"] == "left" and "2 rounds in a row" in e["reason"] for e in server.events)


def half_a_frame(assign: Message, flat: FlatState) -> str:
    return "half"


def test_a_worker_stalling_mid_frame_is_cut_off_at_the_frame_timeout(make_server):
    """Half a gradient, then silence: the frame deadline ends it long before the round timeout would."""
    server = make_server(round_timeout=30.0, frame_timeout=0.3)
    good, stalled = (
        FakeWorker(server.address, answer_with(1.0), name="good"),
        FakeWorker(server.address, half_a_frame, name="stalled"),
    )
    join(server, good, stalled)
    started = time.monotonic()
    result = server.run_round(0, micro_batches(8), version=0)
    assert time.monotonic() - started < 3.0
    assert result.samples == 64 and result.reassigned_samples == 32
    torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, 1.0))
    assert any(e["event"] == "left" and "part of a message" in e["reason"] for e in server.events)


def test_a_worker_that_stops_reading_neither_blocks_the_others_nor_the_round(make_server):
    """8 MB of parameters: more than the socket buffers take from a peer that does not read. The server
    sends to everyone at once, so the reading worker gets its share, and the deaf one is cut off."""
    server = make_server(wide_model(), frame_timeout=1.0, max_frame=2**25)
    deaf = FakeWorker(
        server.address, answer_with(1.0), wide_model(), name="deaf", start_delay=5.0
    )  # joins, then does not read
    good = FakeWorker(server.address, answer_with(1.0), wide_model(), name="good")
    join(server, deaf, good)
    started = time.monotonic()
    result = server.run_round(0, micro_batches(8), version=0)
    assert time.monotonic() - started < 4.0
    assert good.assigned_at[0] - started < 0.8, "the reading worker must not wait for the deaf one's timeout"
    assert result.samples == 64 and result.reassigned_samples == 32
    assert "good" in result.workers[0] and len(result.workers) == 1
    assert any(e["event"] == "left" and "stopped reading" in e["reason"] for e in server.events)


@pytest.mark.parametrize(
    "reply, reason",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic"),
        (struct.pack(">4sBBHQ", b"CFPS", wire.PROTOCOL_VERSION, MessageType.GRADS, 0, 2**62), "above the cap"),
        (b"".join(bytes(p) for p in wire.encode(Message(MessageType.HELLO, {"name": "again"}))), "unexpected HELLO"),
    ],
)
def test_a_joined_worker_that_breaks_the_protocol_is_cut_off_and_its_share_reassigned(
    make_server, reply: bytes, reason: str
):
    """Past the handshake the frames are read by the round loop: they get the same checks, and a
    lying length prefix is refused before anything is allocated for it."""
    server = make_server()
    good, broken = (
        FakeWorker(server.address, answer_with(1.0), name="good"),
        FakeWorker(server.address, lambda m, f: reply, name="broken"),
    )
    join(server, good, broken)
    result = server.run_round(0, micro_batches(8), version=0)
    assert result.samples == 64 and result.reassigned_samples == 32
    torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, 1.0))
    assert len(server.live_workers) == 1
    assert any(e["event"] == "left" and "broken" in e["worker"] and reason in e["reason"] for e in server.events)


def test_time_between_rounds_does_not_count_against_a_frame_in_flight(make_server):
    """A late starter misses round 1, leaving 8 MB of parameters half sent to it. The server does not send
    between rounds, so a pause longer than the frame timeout before round 2 is not held against the worker."""
    server = make_server(wide_model(), round_timeout=0.5, frame_timeout=1.0, max_frame=2**25)
    good = FakeWorker(server.address, answer_with(1.0), wide_model(), name="good")
    late = FakeWorker(server.address, answer_with(1.0), wide_model(), name="late", start_delay=3.0)
    join(server, good, late)
    assert server.run_round(0, micro_batches(8), version=0).reassigned_samples == 32
    time.sleep(1.5)  # validation, a checkpoint...: longer than the frame timeout
    result = server.run_round(0, micro_batches(1), version=0)  # one micro-batch: only the good worker gets work
    assert result.samples == 8 and len(server.live_workers) == 2
    assert not any(e["event"] == "left" for e in server.events)
    time.sleep(1.5)  # the late worker wakes up (3 s after joining)
    third = server.run_round(1, micro_batches(8), version=1)
    assert third.samples == 64 and len(server.live_workers) == 2
    assert not any(e["event"] == "left" for e in server.events)


def test_the_wait_policy_waits_for_a_slow_worker(make_server):
    server = make_server(round_timeout=0.2, straggler="wait", worker_timeout=5.0)
    good, slow = FakeWorker(server.address, answer_with(1.0)), FakeWorker(server.address, slow_once(0.8, 3.0))
    join(server, good, slow)
    result = server.run_round(0, micro_batches(8), version=0)
    assert result.reassigned_samples == 0
    torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, 2.0))


def test_a_lone_straggler_is_waited_for_up_to_the_worker_timeout(make_server):
    server = make_server(round_timeout=0.2, worker_timeout=5.0)
    slow = FakeWorker(server.address, slow_once(0.8, 3.0))
    join(server, slow)
    result = server.run_round(0, micro_batches(4), version=0)  # nobody can stand in: wait rather than fail
    assert result.samples == 32 and result.reassigned_samples == 0 and len(server.live_workers) == 1


def test_a_dead_silent_worker_is_disconnected_at_the_worker_timeout(make_server):
    server = make_server(round_timeout=0.2, worker_timeout=0.6, worker_wait=0.5)
    silent = FakeWorker(server.address, lambda m, f: None)
    join(server, silent)
    with pytest.raises(NoWorkersError):
        server.run_round(0, micro_batches(2), version=0)
    assert any(e["event"] == "left" and "worker timeout" in e["reason"] for e in server.events)


def test_nan_gradients_are_rejected_the_model_stays_finite_and_the_sender_is_cut_off(make_server):
    server = make_server(max_strikes=2)
    good = FakeWorker(server.address, answer_with(1.0), name="good")
    bad = FakeWorker(server.address, answer_with(float("nan")), name="bad")
    join(server, good, bad)
    optimizer = torch.optim.AdamW(server.module.parameters(), lr=0.1)
    for step in range(2):
        result = server.run_round(step, micro_batches(8), version=step)
        assert torch.isfinite(result.gradient).all()
        torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, 1.0))
        server.flat.set_grads(result.gradient)
        optimizer.step()  # the central model takes the step and stays finite
        assert all(torch.isfinite(p).all() for p in server.module.parameters())
    assert [e["event"] for e in server.events].count("rejected contribution") == 2
    assert any("NaN or Inf" in reason for reason in bad.errors)
    assert [w.name for w in server.live_workers] == [c.name for c in server.live_workers if "good" in c.name]
    assert all(r["every_sample_exactly_once"] for r in server.accounting.report())


def test_wrongly_shaped_gradients_are_rejected(make_server):
    server = make_server()

    def wrong_shape(assign: Message, flat: FlatState) -> Message:
        reply = answer_with(1.0)(assign, flat)
        reply.tensors[0] = torch.zeros(flat.num_params + 1)
        return reply

    good, bad = FakeWorker(server.address, answer_with(1.0)), FakeWorker(server.address, wrong_shape)
    join(server, good, bad)
    result = server.run_round(0, micro_batches(8), version=0)
    assert result.samples == 64 and result.gradient.shape == (server.flat.num_params,)
    assert any("shapes" in e.get("reason", "") for e in server.events)


def test_no_workers_is_a_clear_error(make_server):
    server = make_server(worker_wait=0.3)
    with pytest.raises(NoWorkersError, match=r"no worker is connected.*strategy\.role=worker"):
        server.run_round(0, micro_batches(2), version=0)


def test_parameters_travel_to_workers_before_their_assignment(make_server):
    module = tiny_model()
    server = make_server(module)
    worker = FakeWorker(server.address, answer_with(1.0))
    join(server, worker)
    server.run_round(0, micro_batches(2), version=0)
    with torch.no_grad():
        module[0].weight.add_(1.0)
    server.run_round(0, micro_batches(2), version=1)
    server.run_round(0, micro_batches(2), version=1)  # same version: nothing resent
    assert len(worker.params) == 2
    torch.testing.assert_close(worker.params[1], FlatState(module).params_flat())
    assert not torch.equal(worker.params[0], worker.params[1])


# --- admission: bad peers never stop the server -------------------------------------------------------


def _raw(server: ParameterServer, payload: bytes, linger: float = 0.0) -> bytes:
    """Send raw bytes, then read what the server answers before it closes the connection."""
    chunks = []
    with socket.create_connection(server.address, timeout=5) as sock:
        try:  # the server may close (even reset, with our garbage unread) at any point of this
            sock.sendall(payload)
            time.sleep(linger)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


def test_malformed_oversized_and_wrong_version_frames_are_refused_and_the_server_keeps_serving(make_server):
    server = make_server()
    garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4
    oversized = wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, MessageType.HELLO, 0, 10 * 2**30)
    wrong_version = wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION + 1, MessageType.HELLO, 0, 4) + struct.pack(
        ">I", 0
    )
    truncated = wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, MessageType.HELLO, 0, 1000) + b"{" * 10
    for payload in (garbage, oversized, wrong_version, truncated, b""):
        _raw(server, payload)
    answer = _raw(server, wrong_version[: wire.HEADER.size])  # no unread bytes: a clean close, the reply arrives
    assert b"protocol" in answer  # the refusal says why
    deadline = time.monotonic() + 5
    while server.refusals["rejected"] < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    reasons = [e["detail"] for e in server.recent_refusals if e["event"] == "rejected"]
    assert server.refusals["rejected"] == len(reasons) == 6 and not server.live_workers
    assert any("too large" in r or "cap" in r for r in reasons) and any("protocol" in r for r in reasons)
    worker = FakeWorker(server.address, answer_with(1.0))
    join(server, worker)
    assert server.run_round(0, micro_batches(2), version=0).samples == 16


def test_a_slow_handshake_is_cut_off_by_its_timeout(make_server):
    server = make_server(handshake_timeout=0.5)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, MessageType.HELLO, 0, 100)[:7])
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < 3.0


def test_wrong_secret_is_refused(make_server):
    server = make_server(secret=SECRET)
    impostor = FakeWorker(server.address, answer_with(1.0), secret=b"guessed")
    impostor.start()
    impostor.join(5)
    assert isinstance(impostor.failure, wire.AuthenticationError)
    deadline = time.monotonic() + 5  # the server records the refusal after sending it
    while not server.refusals["rejected"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.live_workers and server.refusals["rejected"] == 1
    assert "does not know the shared secret" in server.recent_refusals[0]["detail"]
    honest = FakeWorker(server.address, answer_with(1.0), secret=SECRET)
    join(server, honest)
    assert server.run_round(0, micro_batches(2), version=0).samples == 16


def test_a_worker_with_another_model_is_refused_with_the_reason(make_server):
    server = make_server(tiny_model(width=3))
    other = FakeWorker(server.address, answer_with(1.0), module=tiny_model(width=5))
    other.start()
    other.join(5)
    assert isinstance(other.failure, wire.SignatureMismatch)
    assert "signature mismatch" in str(other.failure) and "0.weight" in str(other.failure)


def test_connections_that_hold_every_handshake_slot_cannot_keep_a_real_worker_out(make_server):
    """max_pending connections that say nothing hold every handshake slot for up to handshake_timeout; a
    newcomer cuts off the oldest instead of being turned away, so a real worker still joins at once."""
    server = make_server(max_pending=2, handshake_timeout=30.0)
    idle = [socket.create_connection(server.address, timeout=5) for _ in range(4)]
    try:
        for sock in idle[:2]:  # the two oldest were cut off for the two newer ones: the server hung up
            assert sock.recv(1) == b""
        cut_off = [e for e in server.recent_refusals if e["event"] == "refused"]
        assert server.refusals["refused"] == len(cut_off) == 2 and "cut off" in cut_off[0]["detail"]
        assert server.refusals["rejected"] == 0  # the cut-off ones are not counted twice
        started = time.monotonic()
        worker = FakeWorker(server.address, answer_with(1.0))
        join(server, worker)  # while two idle connections still hold both slots
        assert time.monotonic() - started < 5  # long before any idle handshake's 30 s timeout
        assert server.run_round(0, micro_batches(2), version=0).samples == 16
    finally:
        for sock in idle:
            sock.close()


# --- hardening (issue 11): memory, liveness and what a worker may claim ------------------------------------

MIB = 2**20


def resident_kib() -> int:
    """This process's resident memory, as the kernel counts it (the servers in these tests run in it)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_a_flood_of_header_only_handshakes_costs_the_server_process_almost_no_memory(make_server):
    """Seen from the kernel, with the default caps: max_pending connections each send a HELLO header
    announcing exactly 256 MiB (the cap handshakes were read with) and 4 kB of it, then as many announce
    exactly the handshake cap and stay pending. The process's resident memory barely moves (it used to
    zero-fill the announced 256 MiB per connection: 4 GiB for 16)."""
    server = make_server(max_frame=wire.DEFAULT_MAX_FRAME)
    socks: list[socket.socket] = []
    try:
        before = resident_kib()
        growth = []
        for announced in (wire.DEFAULT_MAX_FRAME, wire.HANDSHAKE_MAX_FRAME):
            for _ in range(server.settings.max_pending):
                sock = socket.create_connection(server.address, timeout=5)
                sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, MessageType.HELLO, 0, announced))
                sock.sendall(bytes(4096))
                socks.append(sock)
            time.sleep(0.5)
            growth.append(resident_kib() - before)
            print(f"resident memory growth after {len(socks)} header-only handshakes: {growth[-1]} KiB")
        assert max(growth) < 8 * 1024, growth
        assert server.refusals["rejected"] == 16  # the 256 MiB announcements, refused on their header
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["just-below", "at", "just-above"])
def test_a_joined_worker_announcing_lengths_around_the_cap_gets_nothing_allocated(make_server, offset: int):
    """The round loop's reader, 256 MiB cap: an announced length at or just below the cap waits for bytes
    that never come (cut off at the frame timeout), just above is refused at once; neither allocates."""
    cap = 256 * MIB
    server = make_server(max_frame=cap, frame_timeout=0.3)
    header = wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, MessageType.GRADS, 0, cap + offset)
    good = FakeWorker(server.address, answer_with(1.0), name="good")
    liar = FakeWorker(server.address, lambda m, f: header + bytes(1000), name="liar")
    join(server, good, liar)
    tracemalloc.start()
    try:
        result = server.run_round(0, micro_batches(8), version=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"traced peak while a joined worker announced {cap + offset} bytes: {peak / 1024:.0f} KiB")
    assert result.samples == 64 and peak < 4 * MIB, peak
    reason = "above the cap" if offset > 0 else "part of a message"
    assert any(e["event"] == "left" and "liar" in e["worker"] and reason in e["reason"] for e in server.events)


def test_the_fuzz_corpus_sent_by_joined_workers_cuts_each_off_and_every_round_completes(make_server):
    """The round loop's side of the fuzz corpus: every boundary frame (lengths around each cap) and a
    sample of the rest, each from a worker that joined properly; the good worker's rounds always finish."""
    cap = 64 * MIB
    server = make_server(max_frame=cap, frame_timeout=0.15, round_timeout=1.0)
    good = FakeWorker(server.address, answer_with(1.0), name="good")
    join(server, good)
    boundaries = len(boundary_frames(cap))
    frames = malformed_frames(boundaries + 6, seed=3, max_frame=cap)
    tracemalloc.start()
    try:
        for i, frame in enumerate(frames):
            broken = FakeWorker(server.address, lambda m, f, frame=frame: frame, name=f"broken-{i}")
            broken.start()
            assert broken.joined.wait(5) and server.wait_for_workers(2, 5) >= 2
            result = server.run_round(0, micro_batches(2), version=0)
            assert result.samples == 16 and len(result.workers) == 1 and "good" in result.workers[0], i
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, peak
    cut_off = {e["worker"].split()[1] for e in server.events if e["event"] == "left"}
    assert {f"broken-{i}" for i in range(boundaries)} <= cut_off  # every boundary frame ended its sender


def test_hundreds_of_join_leave_cycles_keep_the_server_memory_bounded(make_server, monkeypatch):
    """One worker after another, each under a new name: join, take the 2 MB parameters, send a 2 MB
    gradient, hang up. The dead connections go with their buffers, and the event log and per-worker
    counts stay within their bounds."""
    monkeypatch.setattr(ParameterServer, "EVENTS_KEPT", 100)
    monkeypatch.setattr(ParameterServer, "NAMED_CONTRIBUTORS", 20)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(1024, 512), nn.BatchNorm1d(512))  # 525 k parameters: 2 MB frames
    server = make_server(module, max_frame=2**25)
    signature, flat = wire.model_signature(module), FlatState(module)
    gradient = [torch.zeros(flat.num_params), torch.zeros(flat.num_float_buffers), torch.zeros(1, dtype=torch.int64)]
    stop, failures = threading.Event(), []

    def churn() -> None:
        cycle, reader = 0, wire.FrameReader(2**25)  # one receive buffer for all its connections
        try:
            while not stop.is_set():
                with socket.create_connection(server.address, timeout=5) as sock:
                    wire.client_handshake(sock, {"name": f"churn-{cycle}", "signature": signature}, None, 5)
                    while (message := reader.recv(sock, 5, idle_timeout=5)).type != MessageType.ASSIGN:
                        if message.type == MessageType.DONE:
                            return
                    meta = {k: message.meta[k] for k in ("round", "assignment")}
                    meta.update(samples=len(message.tensors[0]), loss_sum=1.0, correct=0)
                    wire.send_message(sock, Message(MessageType.GRADS, meta, gradient), 5)
                cycle += 1
        except (wire.ProtocolError, OSError) as error:
            if not stop.is_set():
                failures.append(error)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    rounds = 0

    def run(count: int) -> None:
        nonlocal rounds
        for _ in range(count):  # the same parameters throughout: each new worker gets them once
            assert server.run_round(0, micro_batches(1), version=0).samples == 8
            rounds += 1

    run(10)
    tracemalloc.start()
    try:
        # what stays reachable, not garbage the cyclic collector has yet to visit (that varied 0-24 MiB
        # from run to run; the collector frees it on its own schedule)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        run(200)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        stop.set()
    server.stop("test over")
    thread.join(10)
    assert not failures, failures
    print(f"Python heap growth over 200 join/leave cycles with 2 MB frames: {grown / MIB:.2f} MiB")
    assert grown < 8 * MIB, grown
    assert len(server.live_workers) <= 2 and len(server.events) == 100
    assert server.event_counts["joined"] >= 210 and server.event_counts["left"] >= 200
    assert len(server.contributions) == 21 and sum(server.contributions.values()) == 210


def test_a_worker_lost_while_shares_are_handed_out_has_its_other_shares_reassigned_at_once(make_server, caplog):
    """b's host reset its connection before the round; a breaks just after its first share is sent (as the
    server logs that b left). So a gets b's share as well, and that send fails: a's first share must go to
    the next worker at once, not wait out the round timeout as if a were a straggler."""
    server = make_server(round_timeout=3.0, worker_wait=5.0)
    a = FakeWorker(server.address, answer_with(1.0), name="a", start_delay=3.0)  # joined, not reading yet
    b = FakeWorker(server.address, answer_with(1.0), name="b", start_delay=3.0)
    join(server, a, b)
    hang_up(b.sock, "reset")
    time.sleep(0.1)

    class BreakAWhenBLeaves(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "left worker-" in record.getMessage() and " b (" in record.getMessage():
                hang_up(a.sock, "reset")
                time.sleep(0.05)  # the reset has reached the server's socket

    handler = BreakAWhenBLeaves()
    caplog.set_level(logging.INFO, logger="cifar_pl.parameter_server.server")
    logging.getLogger("cifar_pl.parameter_server.server").addHandler(handler)
    late = FakeWorker(server.address, answer_with(2.0), name="late")
    timer = threading.Timer(0.3, late.start)  # joins while the round waits for a worker
    timer.start()
    try:
        started = time.monotonic()
        result = server.run_round(1, micro_batches(8), version=1)
        elapsed = time.monotonic() - started
    finally:
        logging.getLogger("cifar_pl.parameter_server.server").removeHandler(handler)
        timer.join()
    assert elapsed < 2.0 and result.samples == 64 and len(result.workers) == 1 and "late" in result.workers[0]
    torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, 2.0))
    assert not any(e["event"] == "straggler" for e in server.events)
    left = {e["worker"].split()[1]: e["reason"] for e in server.events if e["event"] == "left"}
    assert set(left) == {"a", "b"} and all("send failed" in reason for reason in left.values()), left


def slow_every(delay: float, value: float = 1.0) -> Answer:
    def answer(assign: Message, flat: FlatState) -> Message:
        time.sleep(delay)
        return answer_with(value)(assign, flat)

    return answer


def test_late_strikes_count_rounds_not_overdue_shares(make_server):
    """Each round a new worker joins and hangs up on its share, which goes to the silent worker while
    the other one is still busy: two overdue shares a round are one late round, not two, so the silent
    worker is cut off after max_strikes rounds."""
    server = make_server(round_timeout=0.5, max_strikes=3)

    def busy_until_the_quitter_left(assign: Message, flat: FlatState) -> Message:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            e["event"] == "reassigned" and f"quitter-{assign.meta['round'] - 1}" in e["worker"] for e in server.events
        ):
            time.sleep(0.01)
        return answer_with(1.0)(assign, flat)

    silent = FakeWorker(server.address, lambda m, f: None, name="silent")
    busy = FakeWorker(server.address, busy_until_the_quitter_left, name="busy")
    join(server, silent, busy)
    for step in range(3):
        quitter = FakeWorker(server.address, lambda m, f: "close", name=f"quitter-{step}")
        quitter.start()
        assert server.wait_for_workers(3, 5) == 3
        assert server.run_round(0, micro_batches(3), version=step).samples == 24
        assert len(silent.assigned) == 2 * (step + 1)  # its own share and the quitter's, each round
        cut = [e for e in server.events if e["event"] == "left" and "silent" in e["worker"]]
        assert bool(cut) == (step == 2), f"round {step + 1}: {cut}"
    assert "late past the round timeout 3 rounds in a row" in cut[0]["reason"]


BAD = 21  # a sample whose gradient is NaN on every worker


def poisoned(value: float = 1.0) -> Answer:
    """NaN in the gradient of any share that holds sample BAD, else as ``answer_with(value)``."""

    def answer(assign: Message, flat: FlatState) -> Message:
        reply = answer_with(value)(assign, flat)
        if BAD in assign.tensors[0].tolist():
            reply.tensors[0][0] = float("nan")
        return reply

    return answer


def test_a_micro_batch_rejected_on_every_worker_stops_the_run_and_names_it(make_server):
    server = make_server()
    a, b = FakeWorker(server.address, poisoned(), name="a"), FakeWorker(server.address, poisoned(), name="b")
    join(server, a, b)
    batches = micro_batches(8)
    position = next(i for i, mb in enumerate(batches) if BAD in mb.tolist())
    started = time.monotonic()
    with pytest.raises(RejectedMicroBatchError) as caught:
        server.run_round(3, batches, version=0)
    assert time.monotonic() - started < 3.0  # no livelock, no wait for a timeout
    error = caught.value
    assert (error.epoch, error.round, error.position, error.indices) == (3, 1, position, batches[position].tolist())
    assert len(error.reasons) == 3 and all("NaN" in reason for reason in error.reasons)
    text = str(error)
    assert f"micro-batch {position} of round 1 (epoch 3)" in text and f"{BAD}" in text
    assert "strategy.rejection_policy=skip" in text and "\n" not in text
    # its first share (4 micro-batches) once, then the micro-batch alone three times
    assert server.event_counts["rejected contribution"] == 4


def test_the_skip_policy_leaves_the_micro_batch_out_and_records_its_samples(make_server):
    server = make_server(rejection_policy="skip", max_rejections=2)
    a, b = FakeWorker(server.address, poisoned(), name="a"), FakeWorker(server.address, poisoned(), name="b")
    join(server, a, b)
    batches = micro_batches(8)
    position = next(i for i, mb in enumerate(batches) if BAD in mb.tolist())
    result = server.run_round(0, batches, version=0)
    assert (result.samples, result.skipped_samples) == (56, 8)
    # every micro-batch weighs 1/8: the skipped one adds nothing
    torch.testing.assert_close(result.gradient, torch.full_like(result.gradient, 7 / 8))
    report = server.accounting.report()[0]
    assert report["skipped_samples"] == 8 and report["skipped_indices"] == sorted(batches[position].tolist())
    assert report["used_once"] == 56 and not report["every_sample_exactly_once"]
    skipped = [e for e in server.events if e["event"] == "skipped micro-batch"]
    assert len(skipped) == 1 and skipped[0]["samples"] == batches[position].tolist()
    assert server.run_round(1, micro_batches(8), version=1).skipped_samples == 8  # and in the next epoch again


def test_the_short_last_window_of_an_epoch_is_divided_like_lightning_and_ddp(make_server):
    """Accumulation 4, 2 planned workers: a full round has 8 micro-batches, each weighing 1/8. The
    epoch's last round has 3: still 1/8 each (Lightning divides by accumulate_grad_batches, DDP by its
    ranks), not 1/3, however the 3 are spread over the workers."""
    server = make_server()
    a, b = (
        FakeWorker(server.address, answer_with(1.0), name="a"),
        FakeWorker(server.address, answer_with(1.0), name="b"),
    )
    join(server, a, b)
    full = server.run_round(0, micro_batches(8), version=0, accumulation=4, planned_workers=2)
    torch.testing.assert_close(full.gradient, torch.full_like(full.gradient, 1.0))
    short = server.run_round(0, micro_batches(3), version=1, accumulation=4, planned_workers=2)
    torch.testing.assert_close(short.gradient, torch.full_like(short.gradient, 3 / 8))


def test_out_of_range_statistics_are_rejected_and_what_a_worker_says_about_itself_is_bounded(make_server):
    server = make_server()

    def huge_correct(assign: Message, flat: FlatState) -> Message:
        reply = answer_with(1.0)(assign, flat)
        reply.meta["correct"] = 10**18  # within 64 bits (beyond is a malformed frame), far beyond its 32 samples
        return reply

    noisy = {"name": "evil\n\x1b[31m" + "x" * 40000, "host": "h\r\n" * 2000, "pid": "not a pid"}
    good = FakeWorker(server.address, answer_with(1.0), name="good")
    liar = FakeWorker(server.address, huge_correct, hello=noisy)
    join(server, good, liar)
    result = server.run_round(0, micro_batches(8), version=0)
    assert result.samples == 64 and result.correct == 32  # the good worker's count, for every sample
    assert any("claims 1000000000000000000 correct" in e.get("reason", "") for e in server.events)
    for event in (e for e in server.events if e["event"] == "joined"):
        assert event["worker"].isprintable() and len(event["worker"]) < 80, event["worker"]
        assert event["host"].isprintable() and len(event["host"]) <= 43
        assert event["pid"] is None or isinstance(event["pid"], int)


def test_a_worker_turned_away_again_and_again_backs_off_exponentially_with_jitter():
    """A server that hangs up on every connection (full, or cutting the worker off): the worker tries
    again after growing, jittered waits, and gives up at its deadline, instead of reconnecting at once."""
    attempts: list[float] = []
    done = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.1)

        def turn_away() -> None:
            while not done.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                attempts.append(time.monotonic())
                conn.close()

        refuser = threading.Thread(target=turn_away, daemon=True)
        refuser.start()
        datamodule = SimpleNamespace(
            dataset="synthetic", train_set=SimpleNamespace(labels=torch.zeros(4, dtype=torch.int64))
        )
        settings = WorkerSettings(
            address=f"127.0.0.1:{listener.getsockname()[1]}",
            name="w",
            connect_timeout=3.0,
            backoff_base=0.1,
            backoff_max=1.0,
            handshake_timeout=1.0,
        )
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                Worker(tiny_model(), datamodule, "32-true", settings).run()
            except BaseException as error:
                outcome.append(error)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(6)
        done.set()
        refuser.join(2)
    assert not worker.is_alive() and isinstance(outcome[0], ConnectionError), outcome
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    print(f"{len(attempts)} connections in 3 s, waits between them: {', '.join(f'{gap:.2f}' for gap in gaps)} s")
    assert 4 <= len(attempts) <= 10, len(attempts)
    for n, gap in enumerate(gaps):  # each wait at least half its exponential ceiling
        assert gap >= min(1.0, 0.1 * 2**n) / 2 - 0.01, (n, gaps)
    assert len({round(gap, 3) for gap in gaps}) == len(gaps)  # jittered, not a fixed schedule
