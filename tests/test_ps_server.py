"""The parameter server's rounds and admission, against fake workers that speak the real protocol over
real sockets on 127.0.0.1: averaging, reassignment when a worker dies, goes silent or sends a bad
gradient, and refusal of malformed, oversized, wrong-version, unauthenticated and mismatched peers."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.accounting import SampleAccounting
from cifar_pl.parameter_server.packing import FlatState
from cifar_pl.parameter_server.protocol import Message, MessageType
from cifar_pl.parameter_server.server import NoWorkersError, ParameterServer, ServerSettings

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
    """A gradient of ``value`` everywhere, BatchNorm means of ``value``, for the samples assigned."""

    def answer(assign: Message, flat: FlatState) -> Message:
        indices, _sizes = assign.tensors
        grads = torch.full((flat.num_params,), value)
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


class FakeWorker(threading.Thread):
    """Answers each ASSIGN with ``answer(message, flat)``: a Message to send, None to stay silent,
    "close" to hang up, "half" to send half a gradient frame and go silent, or raw bytes to send as
    they are. Records every assignment's sample indices."""

    def __init__(
        self,
        address: tuple[str, int],
        answer: Answer,
        module: nn.Module | None = None,
        secret: bytes | None = None,
        name: str = "fake",
        start_delay: float = 0.0,
    ) -> None:
        super().__init__(daemon=True)
        self.address, self.answer, self.secret, self.name_ = address, answer, secret, name
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
            hello = {"name": self.name_, "signature": wire.model_signature(self.module)}
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
                    if reply == "close":
                        self.sock.close()
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
        (struct.pack(">4sBBHQ", b"CFPS", 1, MessageType.GRADS, 0, 2**62), "above the cap"),
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


def test_unauthenticated_connections_are_capped(make_server):
    server = make_server(max_pending=2, handshake_timeout=1.0)
    idle = [socket.create_connection(server.address, timeout=5) for _ in range(4)]
    try:
        time.sleep(0.3)
        refused = [e for e in server.recent_refusals if e["event"] == "refused"]
        assert server.refusals["refused"] == len(refused) == 2 and "handshake" in refused[0]["detail"]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(1.2)  # the two admitted ones time out; the server has room again
    worker = FakeWorker(server.address, answer_with(1.0))
    join(server, worker)
