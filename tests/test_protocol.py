"""The parameter server's wire protocol over real sockets: round trips, refusal of malformed, oversized,
truncated and stalled frames, the authenticated handshake, and model signatures."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import pickle
import random
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import torch

from cifar_pl.errors import ConfigurationError
from cifar_pl.parameter_server.protocol import (
    ALLOWED_DTYPES,
    DEFAULT_MAX_FRAME,
    HANDSHAKE_MAX_FRAME,
    HEADER,
    MAGIC,
    MAX_META,
    PROTOCOL_VERSION,
    AuthenticationError,
    BadFrame,
    FrameReader,
    FrameTooLarge,
    FrameWriter,
    Message,
    MessageType,
    PeerClosed,
    ProtocolError,
    ReadTimeout,
    SignatureMismatch,
    VersionMismatch,
    WriteTimeout,
    auth_tag,
    check_tag,
    client_handshake,
    decode,
    encode,
    load_secret,
    model_signature,
    new_nonce,
    recv_message,
    send_message,
    server_handshake,
    signature_mismatch,
)

TIMEOUT = 2.0
MIB = 1024 * 1024


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    low, high = (0, 256) if dtype == torch.uint8 else (-(2**30), 2**30)
    return torch.randint(low, high, shape, generator=g, dtype=dtype)


def sample_tensors() -> list[torch.Tensor]:
    """For every allowed dtype: a 3-d tensor, a zero-element one, a scalar and a non-contiguous view."""
    g = torch.Generator().manual_seed(0)
    tensors = []
    for dtype in ALLOWED_DTYPES.values():
        strided = random_tensor(dtype, (4, 6), g)[:, ::2].t()
        assert not strided.is_contiguous()
        tensors += [
            random_tensor(dtype, (2, 3, 4), g),
            random_tensor(dtype, (0, 5), g),
            random_tensor(dtype, (), g),
            strided,
        ]
    tensors.append(torch.randn(3, generator=g, requires_grad=True))
    return tensors


def assert_same_tensors(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b.detach())


def frame_bytes(message: Message) -> bytes:
    return b"".join(bytes(part) for part in encode(message))


def decode_bytes(blob: bytes) -> Message:
    return decode(blob[: HEADER.size], bytearray(blob[HEADER.size :]))


META = {"step": 7, "lr": 0.05, "name": "wörker", "nested": {"ok": [1, 2.5, None, True]}}


@pytest.mark.parametrize("kind", list(MessageType))
def test_every_message_type_round_trips_through_encode_and_decode(kind: MessageType) -> None:
    tensors = sample_tensors()
    got = decode_bytes(frame_bytes(Message(kind, dict(META), tensors)))
    assert got.type is kind
    assert got.meta == META
    assert_same_tensors(got.tensors, tensors)


@pytest.mark.parametrize("kind", list(MessageType))
def test_every_message_type_round_trips_over_a_socket(pair, kind: MessageType) -> None:
    a, b = pair
    tensors = sample_tensors()
    send_message(a, Message(kind, dict(META), tensors), TIMEOUT)
    got = recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT)
    assert (got.type, got.meta) == (kind, META)
    assert_same_tensors(got.tensors, tensors)


def test_a_message_larger_than_the_socket_buffers_arrives_whole(pair) -> None:
    a, b = pair
    big = torch.arange(3 * MIB, dtype=torch.float32)
    sender = threading.Thread(
        target=send_message, args=(a, Message(MessageType.GRADS, {"n": 1}, [big]), TIMEOUT), daemon=True
    )
    sender.start()
    got = recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT)
    sender.join(timeout=TIMEOUT)
    assert not sender.is_alive()
    assert_same_tensors(got.tensors, [big])


def test_encode_sends_cpu_contiguous_tensors_without_copying() -> None:
    tensor = torch.zeros(4)
    parts = encode(Message(MessageType.PARAMS, {}, [tensor]))
    tensor[1] = 1.5
    assert bytes(parts[1]) == struct.pack("<4f", 0.0, 1.5, 0.0, 0.0)


@pytest.mark.parametrize("meta", [{}, {"a": 1}, {"abc": "x" * 13}, {"k": list(range(50))}])
def test_tensor_data_starts_eight_byte_aligned_in_the_payload(meta: dict) -> None:
    first = encode(Message(MessageType.PARAMS, meta, [torch.ones(2)]))[0]
    assert (len(first) - HEADER.size) % 8 == 0
    assert decode_bytes(frame_bytes(Message(MessageType.PARAMS, meta, [torch.ones(2)]))).meta == meta


@pytest.mark.parametrize(
    "message, words",
    [
        (Message(MessageType.PARAMS, {"tensors": []}), '"tensors"'),
        (Message(MessageType.PARAMS, {}, [torch.zeros(2, dtype=torch.float64)]), "float64"),
        (Message(MessageType.PARAMS, {}, [torch.zeros(1)] * 65), "65 tensors"),
        (Message(MessageType.PARAMS, {}, [torch.zeros([1] * 9)]), "9 dimensions"),
        (Message(MessageType.PARAMS, {"x": "y" * MAX_META}), "at most"),
    ],
)
def test_encode_refuses_what_the_peer_would_refuse(message: Message, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        encode(message)


def raw_frame(
    meta: Any = None,
    data: bytes = b"",
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    kind: int = MessageType.PARAMS,
    flags: int = 0,
    meta_len: int | None = None,
) -> bytes:
    """A hand-made frame; ``meta`` is JSON-encoded unless given as bytes."""
    meta = {"tensors": []} if meta is None else meta
    body = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    payload = struct.pack(">I", len(body) if meta_len is None else meta_len) + body + data
    return HEADER.pack(magic, version, kind, flags, len(payload)) + payload


def tensors_meta(*descriptors: Any) -> dict:
    return {"tensors": list(descriptors)}


F32 = {"dtype": "float32", "shape": [4]}
MALFORMED = {
    "bad magic": raw_frame(magic=b"HTTP"),
    "nonzero flags": raw_frame(flags=1),
    "type 0": raw_frame(kind=0),
    "type 13": raw_frame(kind=13),
    "type 255": raw_frame(kind=255),
    "meta_len above MAX_META": raw_frame(meta_len=MAX_META + 1, data=b"\0" * (MAX_META + 10)),
    "meta_len beyond the payload": raw_frame(meta_len=1000),
    "payload under 4 bytes": HEADER.pack(MAGIC, PROTOCOL_VERSION, 6, 0, 2) + b"\0\0",
    "meta not JSON": raw_frame(b"{not json"),
    "meta not UTF-8": raw_frame(b'{"a": "\xff\xfe"}'),
    "meta a list": raw_frame([1, 2]),
    "meta a string": raw_frame("tensors"),
    "deeply nested meta": raw_frame(b"[" * 60000),
    "no tensors key": raw_frame({"a": 1}),
    "tensors not a list": raw_frame({"tensors": F32}),
    "descriptor not an object": raw_frame(tensors_meta([4])),
    "descriptor with an extra key": raw_frame(tensors_meta({**F32, "offset": 0}), b"\0" * 16),
    "dtype float64": raw_frame(tensors_meta({"dtype": "float64", "shape": [2]}), b"\0" * 16),
    "dtype object": raw_frame(tensors_meta({"dtype": "object", "shape": [2]}), b"\0" * 16),
    "dtype a number": raw_frame(tensors_meta({"dtype": 6, "shape": [2]}), b"\0" * 8),
    "dtype a list": raw_frame(tensors_meta({"dtype": ["float32"], "shape": [2]}), b"\0" * 8),
    "negative dim": raw_frame(tensors_meta({"dtype": "uint8", "shape": [-4]})),
    "float dim": raw_frame(tensors_meta({"dtype": "uint8", "shape": [2.0]}), b"\0\0"),
    "bool dim": raw_frame(tensors_meta({"dtype": "uint8", "shape": [True]}), b"\0"),
    "string dim": raw_frame(tensors_meta({"dtype": "uint8", "shape": ["2"]}), b"\0\0"),
    "shape not a list": raw_frame(tensors_meta({"dtype": "uint8", "shape": 2}), b"\0\0"),
    "nine dims": raw_frame(tensors_meta({"dtype": "uint8", "shape": [1] * 9}), b"\0"),
    "huge empty shape": raw_frame(tensors_meta({"dtype": "uint8", "shape": [0, 2**62, 2**62]})),
    "65 tensors": raw_frame(tensors_meta(*[{"dtype": "uint8", "shape": [0]}] * 65)),
    "too few tensor bytes": raw_frame(tensors_meta(F32), b"\0" * 12),
    "too many tensor bytes": raw_frame(tensors_meta(F32), b"\0" * 20),
    "bytes without tensors": raw_frame(tensors_meta(), b"\0"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frames_are_refused_by_decode_and_by_the_socket_reader(pair, name: str) -> None:
    blob = MALFORMED[name]
    with pytest.raises(BadFrame):
        decode_bytes(blob)
    a, b = pair
    a.sendall(blob)
    with pytest.raises(BadFrame):
        recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT)


def test_the_same_frames_decode_once_repaired() -> None:
    """The malformed cases differ from valid frames only in the one thing they test."""
    assert decode_bytes(raw_frame(tensors_meta(F32), b"\0" * 16)).tensors[0].shape == (4,)
    empty = decode_bytes(raw_frame(tensors_meta(*[{"dtype": "uint8", "shape": [0, 3]}] * 64)))
    assert [t.shape for t in empty.tensors] == [(0, 3)] * 64


def test_decode_refuses_a_payload_of_another_length_than_announced() -> None:
    blob = frame_bytes(Message(MessageType.DONE, {}, [torch.ones(3)]))
    with pytest.raises(BadFrame, match="announced"):
        decode_bytes(blob[:-1])
    with pytest.raises(BadFrame, match="16 bytes"):
        decode(blob[:15], bytearray(blob[16:]))


def test_another_protocol_version_is_a_version_mismatch(pair) -> None:
    a, b = pair
    a.sendall(raw_frame(version=1, kind=MessageType.HELLO))
    with pytest.raises(VersionMismatch) as caught:
        recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT)
    assert (caught.value.peer_version, caught.value.our_version) == (1, PROTOCOL_VERSION)
    assert str(caught.value) == "peer speaks protocol 1, this side speaks 2"
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)


def test_a_ten_gib_announcement_is_refused_before_anything_is_allocated(pair) -> None:
    a, b = pair
    a.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType.GRADS, 0, 10 * 1024**3))  # the header alone
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(FrameTooLarge, match="10737418240"):
            recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 0.5  # no wait for a payload that never comes
    assert peak < MIB


def test_the_frame_cap_is_inclusive(pair) -> None:
    a, b = pair
    blob = frame_bytes(Message(MessageType.GRADS, {}, [torch.ones(8)]))
    payload_length = len(blob) - HEADER.size
    a.sendall(blob)
    assert recv_message(b, payload_length, TIMEOUT).tensors[0].sum().item() == 8
    a.sendall(blob)
    with pytest.raises(FrameTooLarge):
        recv_message(b, payload_length - 1, TIMEOUT)


def test_a_peer_closing_mid_frame_says_how_much_was_missing(pair) -> None:
    a, b = pair
    blob = frame_bytes(Message(MessageType.GRADS, {}, [torch.ones(100)]))
    payload = len(blob) - HEADER.size
    a.sendall(blob[: HEADER.size + payload // 2])
    a.close()
    with pytest.raises(PeerClosed, match=f"{payload - payload // 2} of {payload} bytes of the payload missing"):
        recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT)


def test_a_peer_closing_between_frames_or_inside_the_header_is_peer_closed(pair) -> None:
    a, b = pair
    a.sendall(MAGIC)
    a.close()
    with pytest.raises(PeerClosed, match="12 of 16 bytes of the header missing"):
        recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT)
    with pytest.raises(PeerClosed, match="closed the connection"):
        recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT)


def test_a_peer_going_silent_mid_frame_is_cut_off_after_the_timeout(pair) -> None:
    a, b = pair
    blob = frame_bytes(Message(MessageType.GRADS, {}, [torch.ones(100)]))
    a.sendall(blob[: len(blob) // 2])
    start = time.monotonic()
    with pytest.raises(ReadTimeout, match="bytes of the payload missing"):
        recv_message(b, DEFAULT_MAX_FRAME, timeout=0.3, idle_timeout=5.0)
    assert 0.25 <= time.monotonic() - start < 1.5


def test_idle_timeout_bounds_the_wait_for_the_first_byte(pair) -> None:
    _, b = pair
    start = time.monotonic()
    with pytest.raises(ReadTimeout, match=r"no message arrived within 0\.2 s"):
        recv_message(b, DEFAULT_MAX_FRAME, timeout=5.0, idle_timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 1.5


def test_the_frame_timeout_starts_at_the_first_byte(pair) -> None:
    """A long idle wait is fine; only the frame itself must arrive within ``timeout``."""
    a, b = pair
    blob = frame_bytes(Message(MessageType.ASSIGN, {"batch": 3}))
    timer = threading.Timer(0.4, a.sendall, args=(blob,))
    timer.start()
    try:
        assert recv_message(b, DEFAULT_MAX_FRAME, timeout=0.2, idle_timeout=TIMEOUT).meta == {"batch": 3}
    finally:
        timer.join(timeout=TIMEOUT)
    assert not timer.is_alive()


def test_a_peer_that_stops_reading_makes_the_send_time_out(pair) -> None:
    a, _ = pair
    start = time.monotonic()
    with pytest.raises(WriteTimeout, match="stopped reading"):
        send_message(a, Message(MessageType.PARAMS, {}, [torch.zeros(16 * MIB, dtype=torch.uint8)]), 0.3)
    assert 0.25 <= time.monotonic() - start < 1.5


def test_sending_to_a_closed_peer_is_peer_closed(pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises(PeerClosed):
        send_message(a, Message(MessageType.DONE), TIMEOUT)


# --- FrameReader and FrameWriter: the non-blocking, buffer-reusing path of long-lived connections ----------


def test_a_reader_pops_every_frame_that_arrived_in_one_read(pair) -> None:
    a, b = pair
    b.setblocking(False)
    reader = FrameReader(DEFAULT_MAX_FRAME)
    assert reader.read(b) is False  # nothing there yet: no error, no message
    a.sendall(
        b"".join(frame_bytes(Message(MessageType.GRADS, {"i": i}, [torch.full((4,), float(i))])) for i in range(3))
    )
    time.sleep(0.05)
    assert reader.read(b) is True
    got = [reader.pop(), reader.pop(), reader.pop()]
    assert reader.pop() is None and not reader.partial
    assert [m.meta for m in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [m.tensors[0].tolist() for m in got] == [[0.0] * 4, [1.0] * 4, [2.0] * 4]


def test_a_reader_assembles_a_frame_larger_than_its_buffer_from_many_reads(pair) -> None:
    a, b = pair
    b.setblocking(False)
    reader = FrameReader(DEFAULT_MAX_FRAME, capacity=1024)
    big = torch.arange(300_000, dtype=torch.float32)
    blob = frame_bytes(Message(MessageType.PARAMS, {"v": 1}, [big])) + frame_bytes(Message(MessageType.DONE))
    sender = threading.Thread(target=a.sendall, args=(blob,))
    sender.start()
    messages, deadline = [], time.monotonic() + TIMEOUT
    while len(messages) < 2 and time.monotonic() < deadline:
        if reader.read(b):
            while (message := reader.pop()) is not None:
                messages.append((message.type, message.meta, [t.clone() for t in message.tensors]))
        else:
            time.sleep(0.001)
    sender.join(TIMEOUT)
    assert [(kind, meta) for kind, meta, _ in messages] == [(MessageType.PARAMS, {"v": 1}), (MessageType.DONE, {})]
    assert torch.equal(messages[0][2][0], big)


def test_a_reader_keeps_the_unread_start_of_the_next_frame_across_reads(pair) -> None:
    """A small frame and the first half of a big one arrive together: after popping the small one, the
    half is moved to the front of the buffer (over itself) and the big frame completes intact."""
    a, b = pair
    b.setblocking(False)
    reader = FrameReader(DEFAULT_MAX_FRAME, capacity=1 << 20)
    big = torch.arange(100_000, dtype=torch.float32)
    small, large = (
        frame_bytes(Message(MessageType.ERROR, {"reason": "x"})),
        frame_bytes(Message(MessageType.PARAMS, {}, [big])),
    )
    a.sendall(small + large[: len(large) // 2])
    time.sleep(0.05)
    assert reader.read(b) and reader.pop().meta == {"reason": "x"} and reader.pop() is None and reader.partial
    a.sendall(large[len(large) // 2 :])
    time.sleep(0.05)
    got = None
    while got is None and reader.read(b):
        got = reader.pop()
    assert got is not None and torch.equal(got.tensors[0], big)


def test_a_reader_checks_the_cap_and_says_what_is_missing(pair) -> None:
    a, b = pair
    reader = FrameReader(max_frame=64)
    a.sendall(frame_bytes(Message(MessageType.GRADS, {}, [torch.ones(100)])))
    with pytest.raises(FrameTooLarge, match="above the cap of 64 bytes"):
        reader.recv(b, TIMEOUT)
    blob = frame_bytes(Message(MessageType.GRADS, {}, [torch.ones(10)]))
    a2, b2 = socket.socketpair()
    with a2, b2:
        a2.sendall(blob[:-8])
        with pytest.raises(ReadTimeout, match=r"8 of .* bytes of the payload missing"):
            FrameReader(DEFAULT_MAX_FRAME).recv(b2, timeout=0.2)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_reader_grows_its_buffer_with_the_bytes_that_arrive_not_with_the_announced_length(pair, greedy) -> None:
    """A header announcing the whole 256 MiB cap, then 100 kB: the buffer holds about what arrived."""
    a, b = pair
    b.setblocking(False)
    a.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType.GRADS, 0, DEFAULT_MAX_FRAME) + bytes(100_000))
    time.sleep(0.05)
    reader = FrameReader(DEFAULT_MAX_FRAME, capacity=HEADER.size if not greedy else 64 * 1024, greedy=greedy)
    tracemalloc.start()
    try:
        while reader.read(b):
            assert reader.pop() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.partial and "of 268435456 bytes of the payload missing" in reader.missing()
    assert reader.capacity <= 2 * (HEADER.size + 100_000) + FrameReader.MIN_GROWTH and peak < 2 * MIB, (
        reader.capacity,
        peak,
    )


@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["just-below", "at", "just-above"])
def test_frames_just_below_at_and_just_above_the_cap_are_read_read_and_refused(pair, offset: int) -> None:
    a, b = pair
    blob = frame_bytes(Message(MessageType.GRADS, {"x": 1}, [torch.arange(1000, dtype=torch.float32)]))
    cap = len(blob) - HEADER.size - offset  # the frame is `offset` bytes above the cap
    reader = FrameReader(cap, capacity=1024)
    a.sendall(blob)
    if offset > 0:
        with pytest.raises(FrameTooLarge, match=f"above the cap of {cap} bytes"):
            reader.recv(b, TIMEOUT)
    else:
        assert torch.equal(reader.recv(b, TIMEOUT).tensors[0], torch.arange(1000, dtype=torch.float32))


def test_a_one_shot_read_leaves_the_next_frame_on_the_socket(pair) -> None:
    """The handshake reads with recv_message, then hands the socket to a FrameReader: nothing may be lost."""
    a, b = pair
    a.sendall(frame_bytes(Message(MessageType.WELCOME, {"n": 1})) + frame_bytes(Message(MessageType.PARAMS, {"n": 2})))
    assert recv_message(b, DEFAULT_MAX_FRAME, TIMEOUT).meta == {"n": 1}
    assert FrameReader(DEFAULT_MAX_FRAME).recv(b, TIMEOUT).meta == {"n": 2}


def test_a_writer_sends_what_the_socket_takes_and_the_rest_later(pair) -> None:
    a, b = pair
    a.setblocking(False)
    writer = FrameWriter()
    big = torch.arange(4 * MIB, dtype=torch.float32)  # 16 MiB: more than the socket buffers hold
    writer.queue(encode(Message(MessageType.PARAMS, {"v": 3}, [big])))
    assert writer.flush(a) is False and writer.pending and writer.started is not None  # no blocking
    received: list[Message] = []
    reader = threading.Thread(target=lambda: received.append(recv_message(b, 64 * MIB, TIMEOUT)))
    reader.start()
    deadline = time.monotonic() + TIMEOUT
    while not writer.flush(a) and time.monotonic() < deadline:
        time.sleep(0.001)
    reader.join(TIMEOUT)
    assert not writer.pending and writer.started is None
    assert received[0].meta == {"v": 3} and torch.equal(received[0].tensors[0], big)


def test_a_writer_to_a_closed_peer_is_peer_closed(pair) -> None:
    a, b = pair
    a.setblocking(False)
    b.close()
    writer = FrameWriter()
    writer.queue(encode(Message(MessageType.DONE)))
    with pytest.raises(PeerClosed):
        writer.flush(a)


def _mutated_frames(rng: random.Random, count: int) -> list[bytes]:
    """Valid frames with flipped, cut or added bytes (length field kept consistent half of the time),
    hand-made metas with random descriptors, and garbage."""
    bases = [
        frame_bytes(Message(kind, {"i": i}, sample_tensors()[i % 20 : i % 20 + 5]))
        for i, kind in enumerate(MessageType)
    ]
    atoms = ["float32", "bfloat16", "uint8", "float64", "", 0, -1, 2**70, 1.5, True, None, [], {}, [2], [0, 3]]
    frames = []
    for i in range(count):
        choice = i % 4
        if choice == 0:
            blob = bytearray(rng.choice(bases))
            for _ in range(rng.randint(1, 6)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        elif choice == 1:
            blob = bytearray(rng.choice(bases))
            blob = blob[: rng.randrange(len(blob) + 1)] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 9)))
        elif choice == 2:
            descriptors = [
                {"dtype": rng.choice(atoms), "shape": rng.choice([rng.choice(atoms), [rng.randint(-1, 4)]])}
                for _ in range(rng.randint(0, 3))
            ]
            blob = bytearray(raw_frame(tensors_meta(*descriptors), bytes(rng.randint(0, 40))))
        else:
            blob = bytearray(rng.randbytes(rng.randint(0, 80)))
            if rng.random() < 0.5:
                blob[:5] = MAGIC + bytes([PROTOCOL_VERSION])
        if len(blob) >= HEADER.size and rng.random() < 0.5:
            blob[8:16] = struct.pack(">Q", len(blob) - HEADER.size)
        frames.append(bytes(blob))
    return frames


def test_fuzzed_frames_give_a_message_or_a_protocol_error_and_nothing_else() -> None:
    frames = _mutated_frames(random.Random(1234), 2000)
    outcomes: dict[str, int] = {}
    start = time.monotonic()
    for blob in frames:
        try:
            message = decode_bytes(blob)
            assert isinstance(message.type, MessageType) and "tensors" not in message.meta
            outcome = "Message"
        except ProtocolError as error:
            outcome = type(error).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert time.monotonic() - start < 10
    assert sum(outcomes.values()) == 2000
    assert outcomes.get("Message", 0) >= 50 and outcomes.get("BadFrame", 0) >= 500, outcomes


Peer = Callable[[socket.socket], Any]


def run_pair(server: Peer, client: Peer) -> dict[str, Any]:
    """Run ``server`` on an accepted TCP connection in a thread and ``client`` on the connecting socket;
    returns each side's result or exception."""
    results: dict[str, Any] = {}

    def call(side: str, peer: Peer, sock: socket.socket) -> None:
        try:
            results[side] = peer(sock)
        except Exception as error:
            results[side] = error

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                call("server", server, connection)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as sock:
            call("client", client, sock)
        thread.join(timeout=3 * TIMEOUT)
    assert not thread.is_alive()
    return results


WELCOME = {"rank": 2, "world": 3}


def server(
    secret: bytes | None, check: Callable[[dict], str | None] = lambda hello: None, timeout: float = TIMEOUT
) -> Peer:
    return lambda sock: server_handshake(sock, secret, timeout, MIB, check, dict(WELCOME))


def client(secret: bytes | None, hello: dict | None = None) -> Peer:
    return lambda sock: client_handshake(sock, hello or {"host": "w1"}, secret, TIMEOUT, MIB)


def test_handshake_without_secrets_welcomes_the_worker() -> None:
    results = run_pair(server(None), client(None))
    assert results["client"] == WELCOME
    assert results["server"] == {"host": "w1"}  # what the worker said about itself, in JOIN


def test_handshake_with_the_same_secret_welcomes_the_worker() -> None:
    results = run_pair(server(b"s3cret"), client(b"s3cret"))
    assert results["client"] == WELCOME  # the server's tag was checked and removed
    assert results["server"]["host"] == "w1"


def test_a_wrong_secret_is_refused_on_both_sides() -> None:
    results = run_pair(server(b"right"), client(b"wrong"))
    assert isinstance(results["server"], AuthenticationError)
    assert isinstance(results["client"], AuthenticationError)
    assert "authentication failed" in str(results["client"])


def test_a_worker_without_the_secret_is_told_how_to_set_it() -> None:
    results = run_pair(server(b"s3cret"), client(None))
    assert isinstance(results["client"], AuthenticationError)
    assert "CIFAR_PL_PS_SECRET" in str(results["client"])
    assert isinstance(results["server"], PeerClosed)


def test_a_worker_with_a_secret_refuses_a_server_without_one() -> None:
    results = run_pair(server(None), client(b"s3cret"))
    assert isinstance(results["client"], AuthenticationError)
    assert "did not ask" in str(results["client"])


def test_a_signature_veto_reaches_the_worker_as_signature_mismatch() -> None:
    seen = []
    results = run_pair(
        server(None, lambda hello: seen.append(hello) or "signature differs: fc.weight [3, 4]"),
        client(None, {"signature": [["fc.weight", [2, 4], "float32"]]}),
    )
    assert seen[0]["signature"] == [["fc.weight", [2, 4], "float32"]]
    assert isinstance(results["server"], SignatureMismatch)
    assert isinstance(results["client"], SignatureMismatch)
    assert "signature differs: fc.weight [3, 4]" in str(results["client"])


def test_signature_check_end_to_end_with_real_models() -> None:
    ours = model_signature(torch.nn.Linear(4, 3))
    check = lambda hello: signature_mismatch(ours, hello.get("signature"))  # noqa: E731
    results = run_pair(server(b"k", check), client(b"k", {"signature": model_signature(torch.nn.Linear(4, 2))}))
    assert isinstance(results["client"], SignatureMismatch)
    assert "weight has shape [3, 4] here, [2, 4] on the peer" in str(results["client"])
    results = run_pair(server(b"k", check), client(b"k", {"signature": model_signature(torch.nn.Linear(4, 3))}))
    assert results["client"] == WELCOME


def test_any_other_veto_is_a_plain_protocol_error() -> None:
    results = run_pair(server(None, lambda hello: "the run is full"), client(None))
    for side in ("server", "client"):
        assert type(results[side]) is ProtocolError and "the run is full" in str(results[side])


def test_a_peer_that_never_says_hello_times_out() -> None:
    start = time.monotonic()
    results = run_pair(server(None, timeout=0.3), lambda sock: sock.recv(1))
    assert isinstance(results["server"], ReadTimeout)
    assert time.monotonic() - start < 2.0


def test_the_server_rejects_a_first_message_that_is_not_hello() -> None:
    def speak_out_of_turn(sock: socket.socket) -> Message:
        send_message(sock, Message(MessageType.GRADS), TIMEOUT)
        return recv_message(sock, MIB, TIMEOUT)

    results = run_pair(server(None), speak_out_of_turn)
    assert isinstance(results["server"], BadFrame)
    assert (results["client"].type, results["client"].meta) == (MessageType.REJECT, {"reason": "expected HELLO"})


def test_the_server_rejects_another_protocol_version_in_its_own_version() -> None:
    def newer_worker(sock: socket.socket) -> Message:
        sock.sendall(raw_frame({"tensors": []}, version=3, kind=MessageType.HELLO))
        return recv_message(sock, MIB, TIMEOUT)

    results = run_pair(server(None), newer_worker)
    assert isinstance(results["server"], VersionMismatch)
    assert results["client"].type is MessageType.REJECT
    assert results["client"].meta["reason"] == "peer speaks protocol 3, this side speaks 2"


@pytest.mark.parametrize("nonce", ["zz" * 32, "ab" * 31, 42, None])
def test_the_server_refuses_a_malformed_client_nonce(nonce: Any) -> None:
    def bad_hello(sock: socket.socket) -> Message:
        send_message(sock, Message(MessageType.HELLO, {"nonce": nonce}), TIMEOUT)
        return recv_message(sock, MIB, TIMEOUT)

    results = run_pair(server(b"k"), bad_hello)
    assert isinstance(results["server"], BadFrame)
    assert results["client"].meta["reason"].startswith("malformed HELLO")


@pytest.mark.parametrize("mac", ["00" * 32, "not hex", "ab" * 8, 7])
def test_the_server_refuses_a_wrong_or_malformed_worker_tag(mac: Any) -> None:
    def bad_auth(sock: socket.socket) -> Message:
        send_message(sock, Message(MessageType.HELLO, {"nonce": new_nonce().hex()}), TIMEOUT)
        assert recv_message(sock, MIB, TIMEOUT).type is MessageType.CHALLENGE
        send_message(sock, Message(MessageType.AUTH, {"mac": mac}), TIMEOUT)
        return recv_message(sock, MIB, TIMEOUT)

    results = run_pair(server(b"k"), bad_auth)
    assert isinstance(results["server"], AuthenticationError)
    assert results["client"].meta == {"reason": "authentication failed"}


def test_the_server_proves_it_knows_the_secret() -> None:
    secret, client_nonce = b"k", new_nonce()

    def careful_worker(sock: socket.socket) -> bool:
        send_message(sock, Message(MessageType.HELLO, {"nonce": client_nonce.hex()}), TIMEOUT)
        server_nonce = bytes.fromhex(recv_message(sock, MIB, TIMEOUT).meta["nonce"])
        mac = auth_tag(secret, "worker", server_nonce, client_nonce)
        send_message(sock, Message(MessageType.AUTH, {"mac": mac.hex()}), TIMEOUT)
        ready = recv_message(sock, MIB, TIMEOUT)
        return ready.type is MessageType.READY and (
            ready.meta["mac"] == auth_tag(secret, "server", client_nonce, server_nonce).hex()
        )

    assert run_pair(server(secret), careful_worker)["client"] is True


def fake_server(answer: Callable[[bytes, dict], dict], challenge: str | None = None) -> Peer:
    """Reads HELLO, sends CHALLENGE (a fresh nonce unless given), reads AUTH, then says READY with
    ``answer(server_nonce, auth_meta)``; returns the next message, if any comes (it must not)."""

    def serve(sock: socket.socket) -> Message | None:
        recv_message(sock, MIB, TIMEOUT)
        nonce = new_nonce()
        send_message(sock, Message(MessageType.CHALLENGE, {"nonce": challenge or nonce.hex()}), TIMEOUT)
        auth = recv_message(sock, MIB, TIMEOUT)
        send_message(sock, Message(MessageType.READY, answer(nonce, auth.meta)), TIMEOUT)
        try:
            return recv_message(sock, MIB, TIMEOUT)
        except PeerClosed:
            return None

    return serve


@pytest.mark.parametrize(
    "answer",
    [
        lambda nonce, auth: {"mac": auth["mac"]},  # the worker's own tag reflected back
        lambda nonce, auth: {"mac": "00" * 32},
        lambda nonce, auth: {"mac": "not hex"},
        lambda nonce, auth: {},
    ],
    ids=["reflected", "wrong", "not-hex", "missing"],
)
def test_the_worker_refuses_a_server_that_cannot_prove_the_secret(answer: Callable) -> None:
    results = run_pair(fake_server(answer), client(b"k"))
    assert isinstance(results["client"], AuthenticationError)
    assert "mac" in str(results["client"]) or "could not prove" in str(results["client"])


def test_the_worker_refuses_a_malformed_challenge() -> None:
    results = run_pair(fake_server(lambda nonce, auth: {}, challenge="zz" * 32), client(b"k"))
    assert isinstance(results["client"], BadFrame)


def sized_hello(payload: int) -> bytes:
    """A valid HELLO whose payload is exactly ``payload`` bytes: JSON padded with trailing spaces."""
    meta = json.dumps({"protocol": PROTOCOL_VERSION, "nonce": new_nonce().hex(), "tensors": []}).encode()
    meta += b" " * (payload - 4 - len(meta))
    return (
        HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType.HELLO, 0, 4 + len(meta)) + struct.pack(">I", len(meta)) + meta
    )


@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["just-below", "at", "just-above"])
def test_handshake_frames_have_a_small_cap_of_their_own(offset: int) -> None:
    """The largest legal HELLO (64 KiB of JSON) passes, one byte more is refused, whatever the round
    loop's cap; a header announcing more is refused before its payload is waited for."""

    def hello_of_size(sock: socket.socket) -> Message | None:
        sock.sendall(sized_hello(HANDSHAKE_MAX_FRAME + offset) if offset <= 0 else b"")
        if offset > 0:  # more than 4 + MAX_META cannot be valid JSON meta: announce it, send nothing
            sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType.HELLO, 0, HANDSHAKE_MAX_FRAME + offset))
        try:
            return recv_message(sock, MIB, TIMEOUT)
        except PeerClosed:
            return None

    assert HANDSHAKE_MAX_FRAME == 4 + MAX_META
    start = time.monotonic()
    results = run_pair(
        lambda sock: server_handshake(sock, None, TIMEOUT, DEFAULT_MAX_FRAME, lambda h: None, {}), hello_of_size
    )
    if offset <= 0:
        assert results["client"].type is MessageType.READY  # the HELLO was read whole and accepted
    else:
        assert isinstance(results["server"], FrameTooLarge) and f"cap of {HANDSHAKE_MAX_FRAME}" in str(
            results["server"]
        )
        assert time.monotonic() - start < TIMEOUT / 2  # refused on the header alone


class SlowSender(socket.socket):
    """A socket that waits before every send: a peer that spends most of the timeout on each message."""

    delay = 0.35

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        time.sleep(self.delay)
        return super().sendmsg(*args, **kwargs)


def test_the_whole_handshake_has_one_deadline() -> None:
    """The worker sends each of its messages 0.35 s late: each read within a fresh 0.6 s deadline of its
    own would admit it; the handshake as a whole must end at 0.6 s."""

    def slow_worker(sock: socket.socket) -> dict:
        with SlowSender(fileno=os.dup(sock.fileno())) as slow:
            return client_handshake(slow, {"host": "w1"}, b"k", TIMEOUT)

    start = time.monotonic()
    results = run_pair(server(b"k", timeout=0.6), slow_worker)
    assert isinstance(results["server"], ReadTimeout), results
    assert "did not finish within 0.6 s" in str(results["server"])
    assert isinstance(results["client"], ProtocolError)
    assert time.monotonic() - start < 1.5


def test_a_frame_begun_just_before_the_handshakes_deadline_does_not_extend_it() -> None:
    """A peer that starts a frame just before the deadline, then sends nothing more: the frame's own
    timeout must not start afresh there (it stretched a 1 s handshake to about 2 s)."""
    ended: dict[str, float] = {}

    def server_side(sock: socket.socket) -> None:
        try:
            server_handshake(sock, b"k", 1.0, MIB, lambda hello: None, dict(WELCOME))
        finally:
            ended["server"] = time.monotonic()

    def late_starter(sock: socket.socket) -> None:
        time.sleep(0.85)
        sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType.HELLO, 0, 100)[:5])
        sock.recv(1)  # returns when the server gives up and closes

    start = time.monotonic()
    results = run_pair(server_side, late_starter)
    assert isinstance(results["server"], ReadTimeout) and "did not finish within 1 s" in str(results["server"])
    assert ended["server"] - start < 1.4, ended["server"] - start


def test_a_worker_says_nothing_about_itself_before_the_server_proves_the_secret() -> None:
    """HELLO holds only the protocol and a nonce; a server that cannot prove the secret (here: one without
    it) never gets the worker's model, data, host name or pid."""
    seen: list[Message] = []

    def server_without_secret(sock: socket.socket) -> None:
        seen.append(recv_message(sock, MIB, TIMEOUT))
        send_message(sock, Message(MessageType.READY, {}), TIMEOUT)
        with contextlib.suppress(PeerClosed):
            seen.append(recv_message(sock, MIB, TIMEOUT))

    details = {"host": "secret-host", "pid": 4242, "signature": [["w", [2], "float32"]], "data": {"labels": "ab"}}
    results = run_pair(server_without_secret, client(b"k", details))
    assert isinstance(results["client"], AuthenticationError)
    assert [m.type for m in seen] == [MessageType.HELLO]
    assert set(seen[0].meta) == {"protocol", "nonce"}
    results = run_pair(fake_server(lambda nonce, auth: {"mac": "00" * 32}), client(b"k", details))
    assert isinstance(results["client"], AuthenticationError) and results["server"] is None  # no JOIN followed


def make_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )


def test_model_signature_lists_parameters_then_persistent_buffers() -> None:
    net = make_net()
    net.register_buffer("scratch", torch.zeros(3), persistent=False)
    assert model_signature(net) == [
        ["0.weight", [4, 3, 3, 3], "float32"],
        ["0.bias", [4], "float32"],
        ["1.weight", [4], "float32"],
        ["1.bias", [4], "float32"],
        ["3.weight", [2, 4], "float32"],
        ["3.bias", [2], "float32"],
        ["1.running_mean", [4], "float32"],
        ["1.running_var", [4], "float32"],
        ["1.num_batches_tracked", [], "int64"],
    ]


def test_identical_models_have_equal_signatures_also_after_json() -> None:
    ours = model_signature(make_net())
    assert signature_mismatch(ours, model_signature(make_net())) is None
    assert signature_mismatch(ours, json.loads(json.dumps(ours))) is None


def test_signature_differences_name_the_first_one() -> None:
    ours = model_signature(make_net())
    wider = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Flatten(), torch.nn.Linear(5, 2)
    )
    assert signature_mismatch(ours, model_signature(wider)) == (
        "signature mismatch: 0.weight has shape [4, 3, 3, 3] here, [5, 3, 3, 3] on the peer"
    )
    assert "0.weight has dtype float32 here, float16 on the peer" in signature_mismatch(
        ours, model_signature(make_net().half())
    )
    assert "1.num_batches_tracked is missing from the peer's model" in signature_mismatch(ours, ours[:-1])
    assert "extra entry head.bias" in signature_mismatch(ours, [*ours, ["head.bias", [2], "float32"]])
    assert "0.bias is missing" in signature_mismatch(ours, ours[:1] + ours[2:])
    assert "another order" in signature_mismatch(ours, [ours[1], ours[0], *ours[2:]])


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        3,
        "abc",
        {"a": 1},
        [["x"]],
        [[1, [2], "float32"]],
        [["w", [-1], "float32"]],
        [["w", [True], "float32"]],
        [["w", 2, "float32"]],
    ],
)
def test_garbage_is_not_a_valid_signature(garbage: Any) -> None:
    assert "not a valid signature" in signature_mismatch(model_signature(make_net()), garbage)


def test_load_secret_from_env_file_or_nowhere(tmp_path) -> None:
    assert load_secret(env={"CIFAR_PL_PS_SECRET": "s3cret"}) == b"s3cret"
    assert load_secret(env={}) is None
    path = tmp_path / "secret"
    path.write_text("  from-file\n")
    assert load_secret(str(path), env={"CIFAR_PL_PS_SECRET": "ignored"}) == b"from-file"
    path.write_text(" \n")
    with pytest.raises(ConfigurationError, match="is empty"):
        load_secret(str(path), env={})
    with pytest.raises(ConfigurationError, match="is empty"):
        load_secret(env={"CIFAR_PL_PS_SECRET": ""})
    # every way a file cannot be read is the user's error to fix, not a traceback
    with pytest.raises(ConfigurationError, match=r"nope \(No such file"):
        load_secret(str(tmp_path / "nope"), env={})
    with pytest.raises(ConfigurationError, match=r"Is a directory"):
        load_secret(str(tmp_path), env={})


def test_auth_tags_are_hmac_sha256_bound_to_role_and_nonces() -> None:
    first, second = new_nonce(), new_nonce()
    assert len(first) == 32 and first != second
    tag = auth_tag(b"k", "worker", first, second)
    assert tag == hmac.new(b"k", b"worker\0" + first + second, hashlib.sha256).digest()
    assert check_tag(tag, auth_tag(b"k", "worker", first, second))
    assert not check_tag(tag, auth_tag(b"k", "server", first, second))
    assert not check_tag(tag, auth_tag(b"k", "worker", second, first))
