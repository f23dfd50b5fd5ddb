"""The parameter server's wire protocol: framing, messages, tensors, handshake and model signatures.

A frame is a 16-byte header, ``HEADER`` = magic ``CFPS`` | protocol version (u8) | message type (u8) |
flags (u16, always 0) | payload length (u64), all big-endian, followed by the payload:
``meta_len`` (u32, big-endian) | ``meta_len`` bytes of UTF-8 JSON object | raw tensor bytes. The JSON
lists the tensors as ``"tensors": [{"dtype": ..., "shape": [...]}, ...]``; their bytes follow in that
order, C-contiguous, in little-endian byte order.

Security rules: nothing read from a socket is unpickled, ``torch.load``-ed or evaluated; only JSON and
raw bytes of a few plain dtypes are accepted. The payload length is checked against the caller's cap
right after the header arrives, and a receive buffer grows only as the payload's bytes actually arrive
(never to an announced length), so a peer pays in real traffic for every byte it makes the receiver hold.
Handshake frames carry no tensors and have a small cap of their own (``HANDSHAKE_MAX_FRAME``); the whole
handshake has one deadline, and every other read and write has one too. Any ``ProtocolError`` leaves
the stream at an unknown position: close the connection.

The handshake (protocol 2) authenticates both ends before either says anything about itself:
HELLO (worker: protocol, nonce) -> [CHALLENGE (server nonce) -> AUTH (worker's tag), with a secret] ->
READY (the server's tag, with a secret) -> JOIN (worker: model signature, data fingerprint, name, host,
pid) -> WELCOME or REJECT. The shared secret authenticates both ends (HMAC-SHA256 over fresh nonces, the
secret never travels); it does not encrypt or protect the messages that follow, so run on a trusted
network.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import os
import secrets
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from cifar_pl.errors import ConfigurationError

if sys.byteorder != "little":  # tensors travel in native order, which must be the wire's little-endian
    raise ImportError("the parameter-server protocol needs a little-endian machine")

# 2: mutual authentication before the worker describes itself (READY and JOIN), a divisor in ASSIGN
PROTOCOL_VERSION = 2
MAGIC = b"CFPS"
HEADER = struct.Struct(">4sBBHQ")  # magic, protocol version, message type, flags (must be 0), payload length
DEFAULT_MAX_FRAME = 256 * 1024 * 1024  # bytes of payload; callers pass their own cap
MAX_META = 64 * 1024  # bytes of JSON metadata inside a payload
HANDSHAKE_MAX_FRAME = 4 + MAX_META  # handshake messages carry JSON and no tensors: the largest legal one
MAX_TENSORS = 64
MAX_DIMS = 8
ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {dtype: name for name, dtype in ALLOWED_DTYPES.items()}
_META_LEN = struct.Struct(">I")
_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with options builds one per call
_MAX_IOV = 512  # buffers per sendmsg call, below the usual IOV_MAX of 1024
_ALIGN = 8  # meta JSON is padded with spaces so that tensor data starts 8-byte aligned in the payload
NONCE_BYTES = 32
SECRET_ENV = "CIFAR_PL_PS_SECRET"


class MessageType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    REJECT = 5
    PARAMS = 6
    ASSIGN = 7
    GRADS = 8
    DONE = 9
    ERROR = 10
    READY = 11  # server: the worker is authenticated (and here is the server's own proof); describe yourself
    JOIN = 12  # worker: its model signature, data fingerprint, name, host and pid


@dataclass
class Message:
    type: MessageType
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable, str keys
    tensors: list[torch.Tensor] = field(default_factory=list)


class ProtocolError(Exception):
    """The peer broke the protocol, went away or was too slow; the connection cannot be used further."""


class FrameTooLarge(ProtocolError):
    """The header announced a payload above the receiver's cap."""


MAX_JSON_INT = 2**63 - 1  # the largest integer a frame's meta may carry


class BadFrame(ProtocolError):
    """Bad magic, flags or message type, or a malformed payload, meta or tensor descriptor."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    def __init__(self, peer_version: int, our_version: int = PROTOCOL_VERSION) -> None:
        super().__init__(peer_version, our_version)  # plain args, so the error pickles
        self.peer_version = peer_version
        self.our_version = our_version

    def __str__(self) -> str:
        return f"peer speaks protocol {self.peer_version}, this side speaks {self.our_version}"


class PeerClosed(ProtocolError):
    """The connection ended, possibly in the middle of a frame."""


class ReadTimeout(ProtocolError):
    """A read did not complete before its deadline."""


class WriteTimeout(ProtocolError):
    """A send did not complete before its deadline (the peer stopped reading)."""


class AuthenticationError(ProtocolError):
    """One side could not prove it knows the shared secret, or only one side has one."""


class SignatureMismatch(ProtocolError):
    """The worker's model differs from the server's (parameter names, shapes or dtypes)."""


def printable(text: str, limit: int = 300) -> str:
    """Peer-supplied text made safe for a log line: no control characters, bounded length."""
    clipped = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clipped + ("..." if len(text) > limit else "")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat byte view: no copy when it is already on the CPU and contiguous."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout is not torch.strided:
        raise ValueError(f"only dense tensors can be sent, got {type(tensor).__name__}")
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"tensor dtype {tensor.dtype} cannot be sent; allowed: {', '.join(ALLOWED_DTYPES)}")
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"a tensor with {tensor.dim()} dimensions cannot be sent (at most {MAX_DIMS})")
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.to("cpu")
    flat = flat.contiguous()
    if flat.dim() != 1:
        flat = flat.reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are what matter
        flat = flat.view(torch.int16)
    return flat.numpy().data.cast("B")  # the array behind the view keeps the tensor alive


def encode(message: Message) -> list[bytes | memoryview]:
    """The frame as parts for a gather write: header and meta as bytes, then one view per tensor."""
    if "tensors" in message.meta:
        raise ValueError('meta must not use the key "tensors": the encoder writes the tensor list there')
    if len(message.tensors) > MAX_TENSORS:
        raise ValueError(f"{len(message.tensors)} tensors in one message, at most {MAX_TENSORS} allowed")
    views = [_tensor_bytes(t) for t in message.tensors]
    descriptors = [{"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for t in message.tensors]
    meta = _JSON.encode({**message.meta, "tensors": descriptors}).encode()
    meta += b" " * (-(_META_LEN.size + len(meta)) % _ALIGN)
    if len(meta) > MAX_META:
        raise ValueError(f"meta is {len(meta)} bytes of JSON, the peer accepts at most {MAX_META}")
    length = _META_LEN.size + len(meta) + sum(v.nbytes for v in views)
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType(message.type), 0, length)
    return [header + _META_LEN.pack(len(meta)) + meta, *views]


def _parse_header(header: bytes | bytearray | memoryview) -> tuple[MessageType, int]:
    """Validate the fixed header; returns the message type and the announced payload length."""
    if len(header) != HEADER.size:
        raise BadFrame(f"a header is {HEADER.size} bytes, got {len(header)}")
    magic, version, type_code, flags, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise BadFrame(f"bad magic {magic!r} (expected {MAGIC!r}): the peer does not speak this protocol")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    if flags != 0:
        raise BadFrame(f"header flags must be 0, got {flags:#06x}")
    try:
        return MessageType(type_code), length
    except ValueError:
        raise BadFrame(f"unknown message type {type_code}") from None


def _is_dim(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _descriptors(meta: dict[str, Any]) -> list[tuple[torch.dtype, list[int]]]:
    """The tensor descriptors of a decoded meta, checked one by one."""
    listed = meta.pop("tensors", None)
    if not isinstance(listed, list):
        raise BadFrame('meta must hold a "tensors" list')
    if len(listed) > MAX_TENSORS:
        raise BadFrame(f"{len(listed)} tensors announced, at most {MAX_TENSORS} allowed")
    result = []
    for index, desc in enumerate(listed):
        if not isinstance(desc, dict) or set(desc) != {"dtype", "shape"}:
            raise BadFrame(f'tensor {index}: a descriptor is an object with exactly "dtype" and "shape"')
        dtype, shape = desc["dtype"], desc["shape"]
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise BadFrame(f"tensor {index}: dtype {printable(repr(dtype), 40)} is not allowed")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_dim(d) for d in shape):
            raise BadFrame(f"tensor {index}: shape must be a list of at most {MAX_DIMS} non-negative ints")
        if math.prod(max(d, 1) for d in shape) >= 2**62:
            raise BadFrame(f"tensor {index}: shape {shape} is too large to index")
        result.append((ALLOWED_DTYPES[dtype], shape))
    return result


def _bounded_int(text: str) -> int:
    """JSON integers as json.loads reads them, refused beyond 64 bits: a peer's ``10**400`` would otherwise
    reach checks such as ``math.isfinite`` as a Python int, which raise OverflowError instead of refusing."""
    value = int(text) if len(text) <= 20 else MAX_JSON_INT + 1
    if abs(value) > MAX_JSON_INT:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is beyond the 64 bits allowed")
    return value


def decode(header: bytes | bytearray | memoryview, payload: bytearray | memoryview) -> Message:
    """Rebuild a message from a received frame; every malformation is a ``ProtocolError``. The tensors
    are views on ``payload`` (no copy), so it must be writable: a bytearray or a view of one."""
    message_type, length = _parse_header(header)
    if not isinstance(payload, (bytearray, memoryview)) or memoryview(payload).readonly:
        payload = bytearray(payload)
    if len(payload) != length:
        raise BadFrame(f"the header announced {length} payload bytes, got {len(payload)}")
    if length < _META_LEN.size:
        raise BadFrame(f"a payload is at least {_META_LEN.size} bytes, got {length}")
    (meta_len,) = _META_LEN.unpack_from(payload)
    if meta_len > MAX_META or meta_len > length - _META_LEN.size:
        raise BadFrame(f"meta length {meta_len} exceeds the cap {MAX_META} or the payload")
    offset = _META_LEN.size + meta_len
    try:
        meta = json.loads(bytes(payload[_META_LEN.size : offset]).decode("utf-8"), parse_int=_bounded_int)
    except (ValueError, RecursionError) as error:  # bad UTF-8, bad JSON and huge integers are ValueErrors
        raise BadFrame(f"meta is not valid UTF-8 JSON: {error}") from None
    if not isinstance(meta, dict):
        raise BadFrame(f"meta must be a JSON object, got {type(meta).__name__}")
    descriptors = _descriptors(meta)
    sizes = [math.prod(shape) * dtype.itemsize for dtype, shape in descriptors]
    if sum(sizes) != length - offset:
        raise BadFrame(f"the tensors need {sum(sizes)} bytes, the payload carries {length - offset}")
    tensors = []
    for (dtype, shape), size in zip(descriptors, sizes, strict=True):
        if size == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:
            flat = torch.frombuffer(payload, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            tensors.append(flat if len(shape) == 1 else flat.reshape(shape))
        offset += size
    return Message(message_type, meta, tensors)


def _set_deadline(sock: socket.socket, deadline: float, error: type[ProtocolError], what: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:  # settimeout(0) would make the socket non-blocking instead
        raise error(what)
    sock.settimeout(remaining)


def send_message(sock: socket.socket, message: Message, timeout: float) -> None:
    """Send one frame with a gather write; the whole send must finish within ``timeout`` seconds."""
    send_parts(sock, encode(message), timeout, MessageType(message.type).name)


def _consume(views: list[memoryview], sent: int) -> None:
    """Drop the first ``sent`` bytes from a gather write's list of views, in place."""
    while views and sent >= views[0].nbytes:
        sent -= views.pop(0).nbytes
    if views and sent:
        views[0] = views[0][sent:]


def send_parts(sock: socket.socket, parts: list[bytes | memoryview], timeout: float, kind: str = "frames") -> None:
    """Send already-encoded frames (``encode``'s output, or several frames' concatenated) in gather writes,
    within ``timeout`` seconds: one encoding can then go to many peers, one syscall can carry two frames."""
    views = [memoryview(part) for part in parts]
    total = sum(v.nbytes for v in views)
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    what = f"sending {kind} did not finish within {timeout} s: the peer stopped reading"
    try:
        while views:
            _set_deadline(sock, deadline, WriteTimeout, what)
            try:
                sent = sock.sendmsg(views) if hasattr(sock, "sendmsg") else sock.send(views[0])
            except TimeoutError:
                raise WriteTimeout(what) from None
            except ConnectionError as error:
                raise PeerClosed(
                    f"the peer closed the connection while {kind} was sent ({total} bytes): {error}"
                ) from None
            _consume(views, sent)
    finally:
        sock.settimeout(previous)


class FrameReader:
    """Reads one connection's frames into a buffer that is reused from frame to frame.

    A message's tensors are views on that buffer: they stay valid until the next ``read``/``recv`` on the
    same reader, so a caller that keeps them longer must copy them. Reusing the buffer spares the receiver
    a fresh zero-filled allocation per frame, a cost that adds up at hundreds of frames per second.

    The buffer grows only when it is full and the frame in it is not complete, at most doubling: it never
    holds more than about twice the bytes that have actually arrived, whatever length a header announces.
    (Growing to an announced length at once let a peer that sent nothing but headers make the receiver
    allocate and zero-fill the whole cap per connection.)

    Blocking use: ``recv``. Non-blocking use (a selector): ``read`` when the socket is readable, then
    ``pop`` until it returns None. ``greedy`` readers take whatever the socket has, several frames per
    call when they are there; the others never read past the current frame, so the socket can be handed
    on afterwards (the handshake's reads).
    """

    MIN_GROWTH = 64 * 1024  # the smallest step a full buffer grows by

    def __init__(self, max_frame: int, capacity: int = 64 * 1024, greedy: bool = True) -> None:
        self.max_frame = max_frame
        self.greedy = greedy
        self._buffer = bytearray(max(capacity, HEADER.size))
        self._view = memoryview(self._buffer)
        self._start = 0  # where the current frame begins in the buffer
        self._end = 0  # how far the buffer is filled
        self._length: int | None = None  # the current frame's payload length, once its header is checked
        self.started: float | None = None  # when the incomplete frame's first byte arrived; None: none is
        self.received = 0  # bytes read from the socket in all (for the server's bytes-per-round telemetry)

    @property
    def capacity(self) -> int:
        """Bytes the receive buffer holds now."""
        return len(self._buffer)

    @property
    def partial(self) -> bool:
        """Whether part of a frame has arrived and the rest has not."""
        return self._end > self._start

    def restart_clock(self) -> None:
        """Start the incomplete frame's clock again: for a caller that stopped reading for a while (between
        rounds), so the time it was not listening does not count against the peer."""
        if self.partial:
            self.started = time.monotonic()

    def missing(self) -> str:
        """How much of the current frame is missing, for error messages."""
        have = self._end - self._start
        if self._length is None:
            return f"{HEADER.size - have} of {HEADER.size} bytes of the header missing"
        return f"{HEADER.size + self._length - have} of {self._length} bytes of the payload missing"

    def release(self) -> None:
        """Let go of the receive buffer (for a connection that has ended); messages popped before keep
        theirs alive as long as they are used."""
        self._buffer = bytearray(HEADER.size)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self._length, self.started = None, None

    def _frame_size(self) -> int | None:
        """Header plus payload bytes of the current frame, once its header has arrived (and passed the cap)."""
        if self._length is None:
            if self._end - self._start < HEADER.size:
                return None
            _, length = _parse_header(self._view[self._start : self._start + HEADER.size])
            if length > self.max_frame:
                raise FrameTooLarge(
                    f"the peer announced a {length}-byte payload, above the cap of {self.max_frame} bytes"
                )
            self._length = length
        return HEADER.size + self._length

    def read(self, sock: socket.socket) -> bool:
        """One ``recv`` into the buffer; False when a non-blocking socket had nothing. The tensors of
        messages popped before are no longer valid after this. Raises ``PeerClosed`` at EOF."""
        if self._start:  # keep only the unread bytes, moved to the front (the same length: views allowed)
            left = self._end - self._start
            # through a copy: bytearray slice assignment memcpy()s, and the two ranges may overlap
            self._buffer[:left] = bytes(self._view[self._start : self._end])
            self._start, self._end = 0, left
        size = self._frame_size()
        if self._end == len(self._buffer):  # full: the frame in it is incomplete (complete ones are popped)
            if size is None or size <= self._end:
                return True  # a complete frame waits to be popped: nothing to read until it is
            self._grow(min(size, len(self._buffer) + max(len(self._buffer), self.MIN_GROWTH)))
        want = len(self._buffer) - self._end
        if not self.greedy:
            want = min(want, (HEADER.size if size is None else size) - self._end)
        try:
            count = sock.recv_into(self._view[self._end : self._end + want])
        except BlockingIOError:
            return False
        except ConnectionError as error:
            where = f"in the middle of a message ({self.missing()})" if self.partial else "between messages"
            raise PeerClosed(f"the connection broke {where}: {error}") from None
        if count == 0:
            if self.partial:
                raise PeerClosed(f"the peer closed the connection in the middle of a message ({self.missing()})")
            raise PeerClosed("the peer closed the connection")
        if not self.partial:
            self.started = time.monotonic()
        self._end += count
        self.received += count
        return True

    def pop(self) -> Message | None:
        """The next complete frame in the buffer, decoded and checked, or None if it has not all arrived."""
        size = self._frame_size()
        if size is None or self._end - self._start < size:
            return None
        body = self._start + HEADER.size
        message = decode(self._view[self._start : body], self._view[body : self._start + size])
        self._start += size
        self._length = None
        if self._start == self._end:
            self._start = self._end = 0
            self.started = None
        else:
            self.started = time.monotonic()
        return message

    def _grow(self, size: int) -> None:
        """A new buffer of ``size`` bytes holding the unread ones; the old one lives on in its views, if any."""
        have = self._end - self._start
        buffer = bytearray(size)
        buffer[:have] = self._view[self._start : self._end]
        self._buffer, self._view = buffer, memoryview(buffer)
        self._start, self._end = 0, have

    def recv(
        self, sock: socket.socket, timeout: float, idle_timeout: float | None = None, deadline: float | None = None
    ) -> Message:
        """Block for the next message on a blocking socket: wait up to ``idle_timeout`` (default
        ``timeout``) for its first byte, then the rest must arrive within ``timeout`` seconds, so a peer
        that stalls mid-frame is cut off. ``deadline`` (``time.monotonic()``) bounds it all, whatever the
        timeouts allow: a handshake's messages share one."""
        wait = timeout if idle_timeout is None else idle_timeout
        idle_deadline = time.monotonic() + wait
        last = math.inf if deadline is None else deadline
        previous = sock.gettimeout()
        try:
            while (message := self.pop()) is None:
                if self.partial:
                    assert self.started is not None
                    late = f"the peer sent part of a message, then nothing for {timeout:g} s ({self.missing()})"
                    _set_deadline(sock, min(self.started + timeout, last), ReadTimeout, late)
                else:
                    late = f"no message arrived within {wait:g} s"
                    _set_deadline(sock, min(idle_deadline, last), ReadTimeout, late)
                try:
                    self.read(sock)
                except TimeoutError:
                    raise ReadTimeout(late) from None
        finally:
            sock.settimeout(previous)
        return message


class FrameWriter:
    """Frames queued for one non-blocking socket and sent as far as the socket takes them: a sender that
    serves many peers from one thread never waits on the slowest. ``started`` is when the queue last
    made progress, so the caller can cut off a peer that stopped reading."""

    def __init__(self) -> None:
        self._views: list[memoryview] = []
        self.started: float | None = None  # last progress while something was queued (monotonic)

    @property
    def pending(self) -> bool:
        return bool(self._views)

    def restart_clock(self) -> None:
        """Start the progress clock again: for a caller that stopped sending for a while (between rounds),
        so the time it was not sending does not count against the peer."""
        if self._views:
            self.started = time.monotonic()

    def queue(self, parts: list[bytes | memoryview]) -> None:
        """Queue encoded frames (``encode``'s output). The parts must not change until they are sent."""
        if not self._views:
            self.started = time.monotonic()
        self._views.extend(memoryview(part).cast("B") for part in parts if len(part))

    def flush(self, sock: socket.socket) -> bool:
        """Send what the socket takes without blocking; True once everything queued is sent."""
        views = self._views
        while views:
            try:
                sent = sock.sendmsg(views[:_MAX_IOV]) if hasattr(sock, "sendmsg") else sock.send(views[0])
            except BlockingIOError:
                return False
            except ConnectionError as error:
                raise PeerClosed(f"the peer closed the connection while frames were sent to it: {error}") from None
            self.started = time.monotonic()
            _consume(views, sent)
        self.started = None
        return True

    def take(self) -> list[memoryview]:
        """Everything still queued, removed from the queue (to finish sending it some other way)."""
        views, self._views, self.started = self._views, [], None
        return views


def recv_message(
    sock: socket.socket,
    max_frame: int,
    timeout: float,
    idle_timeout: float | None = None,
    deadline: float | None = None,
) -> Message:
    """Read exactly one frame (nothing past it) into a buffer of its own: see ``FrameReader.recv``."""
    return FrameReader(max_frame, capacity=HEADER.size, greedy=False).recv(sock, timeout, idle_timeout, deadline)


def load_secret(secret_file: str | None = None, env: Mapping[str, str] = os.environ) -> bytes | None:
    """The shared secret from ``secret_file`` if given, else from ``$CIFAR_PL_PS_SECRET``, else None.
    Surrounding whitespace is dropped from both, so a file and the variable holding the same text agree."""
    if secret_file is not None:
        try:
            with open(secret_file, "rb") as handle:
                secret = handle.read().strip()
        except OSError as error:
            raise ConfigurationError(
                f"Cannot read the parameter server's shared-secret file {secret_file} ({error.strerror}). "
                "Point strategy.secret_file at a readable file that holds the secret (in a container: the "
                "mounted secret must be readable by the user the process runs as), or leave it unset to use "
                f"${SECRET_ENV}."
            ) from error
        where = f"file {secret_file}"
    elif SECRET_ENV in env:
        secret, where = env[SECRET_ENV].strip().encode("utf-8"), f"${SECRET_ENV}"
    else:
        return None
    if not secret:
        raise ConfigurationError(
            f"The parameter server's shared secret in {where} is empty: put the shared secret there (the same on "
            "the server and every worker), or leave it unset."
        )
    return secret


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def auth_tag(secret: bytes, role: str, first: bytes, second: bytes) -> bytes:
    """HMAC over both nonces; the role keeps a worker's tag from being replayed as the server's."""
    return hmac.new(secret, role.encode() + b"\0" + first + second, hashlib.sha256).digest()


def check_tag(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def _hex_field(meta: dict[str, Any], key: str, size: int, error: type[ProtocolError]) -> bytes:
    """A hex field from the peer, validated: ``error`` instead of ValueError/KeyError/TypeError."""
    value = meta.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise error(f'"{key}" must be {size} bytes as hex, got {printable(repr(value), 80)}')
    return raw


REJECT_GRACE = 0.5  # seconds a refusal may take to send, even when the handshake's deadline has passed


class _Deadline:
    """One deadline for a whole handshake: each read and write gets what is left of it, so a peer that
    spends nearly the whole timeout on every message cannot stretch the handshake to several timeouts."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout

    def left(self) -> float:
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise ReadTimeout(f"the handshake did not finish within {self.timeout:g} s")
        return remaining

    def recv(self, sock: socket.socket, max_frame: int) -> Message:
        try:
            return recv_message(sock, max_frame, self.left(), deadline=self.at)
        except ReadTimeout:
            raise ReadTimeout(f"the handshake did not finish within {self.timeout:g} s") from None

    def send(self, sock: socket.socket, message: Message) -> None:
        send_message(sock, message, self.left())


def _reject(sock: socket.socket, reason: str, timeout: float = REJECT_GRACE) -> None:
    """Tell the peer why it is refused; best effort, since the caller raises its own error next."""
    with suppress(ProtocolError, OSError):
        send_message(sock, Message(MessageType.REJECT, {"reason": reason}), timeout)


def _rejected(meta: dict[str, Any]) -> ProtocolError:
    reason = meta.get("reason")
    reason = printable(reason) if isinstance(reason, str) else "no reason given"
    text = f"the parameter server refused this worker: {reason}"
    if reason.startswith("authentication"):
        return AuthenticationError(text)
    return SignatureMismatch(text) if reason.startswith("signature") else ProtocolError(text)


def client_handshake(
    sock: socket.socket,
    hello: dict,
    secret: bytes | None,
    timeout: float,
    max_frame: int = HANDSHAKE_MAX_FRAME,
) -> dict:
    """The worker's side, within ``timeout`` seconds in all: HELLO, answer a CHALLENGE, check that READY
    proves the server knows the secret too, and only then JOIN with ``hello`` (model signature, data
    fingerprint, name...), so nothing about this worker reaches a server that cannot prove the secret. A
    worker with a secret refuses a server without one. Returns WELCOME's meta."""
    deadline = _Deadline(timeout)
    client_nonce = new_nonce()
    deadline.send(sock, Message(MessageType.HELLO, {"protocol": PROTOCOL_VERSION, "nonce": client_nonce.hex()}))
    reply = deadline.recv(sock, max_frame)
    server_nonce = None
    if reply.type is MessageType.CHALLENGE:
        if secret is None:
            raise AuthenticationError(f"the server requires a shared secret; set {SECRET_ENV} or strategy.secret_file")
        server_nonce = _hex_field(reply.meta, "nonce", NONCE_BYTES, BadFrame)
        mac = auth_tag(secret, "worker", server_nonce, client_nonce)
        deadline.send(sock, Message(MessageType.AUTH, {"mac": mac.hex()}))
        reply = deadline.recv(sock, max_frame)
    if reply.type is MessageType.REJECT:
        raise _rejected(reply.meta)
    if reply.type is not MessageType.READY:
        raise BadFrame(f"expected READY from the server, got {reply.type.name}")
    if secret is not None:
        if server_nonce is None:
            raise AuthenticationError(
                "this worker has a shared secret but the server did not ask for it: refusing an unauthenticated server"
            )
        mac = _hex_field(reply.meta, "mac", hashlib.sha256().digest_size, AuthenticationError)
        if not check_tag(auth_tag(secret, "server", client_nonce, server_nonce), mac):
            raise AuthenticationError("the server could not prove it knows the shared secret")
    deadline.send(sock, Message(MessageType.JOIN, dict(hello)))
    reply = deadline.recv(sock, max_frame)
    if reply.type is MessageType.REJECT:
        raise _rejected(reply.meta)
    if reply.type is not MessageType.WELCOME:
        raise BadFrame(f"expected WELCOME from the server, got {reply.type.name}")
    return reply.meta


def _authenticate(sock: socket.socket, secret: bytes, client_nonce: bytes, deadline: _Deadline) -> bytes:
    """CHALLENGE the worker and check its AUTH; returns the server nonce for the server's own tag."""
    server_nonce = new_nonce()
    deadline.send(sock, Message(MessageType.CHALLENGE, {"nonce": server_nonce.hex()}))
    reply = deadline.recv(sock, HANDSHAKE_MAX_FRAME)
    try:
        if reply.type is not MessageType.AUTH:
            raise AuthenticationError(f"expected AUTH, got {reply.type.name}")
        mac = _hex_field(reply.meta, "mac", hashlib.sha256().digest_size, AuthenticationError)
        if not check_tag(auth_tag(secret, "worker", server_nonce, client_nonce), mac):
            raise AuthenticationError("the worker's tag does not match: it does not know the shared secret")
    except AuthenticationError:
        _reject(sock, "authentication failed")
        raise
    return server_nonce


def server_handshake(
    sock: socket.socket,
    secret: bytes | None,
    timeout: float,
    max_frame: int,
    check_hello: Callable[[dict], str | None],
    welcome: dict,
) -> dict:
    """The server's side, within ``timeout`` seconds in all, every frame capped at ``max_frame`` (at most
    ``HANDSHAKE_MAX_FRAME``: no handshake message carries tensors): read HELLO, authenticate the worker
    when there is a secret, send READY (with the server's own tag), read JOIN, let ``check_hello`` veto it,
    then WELCOME it. Returns JOIN's meta."""
    deadline = _Deadline(timeout)
    cap = min(max_frame, HANDSHAKE_MAX_FRAME)
    try:
        hello = deadline.recv(sock, cap)
    except VersionMismatch as error:
        _reject(sock, str(error))
        raise
    if hello.type is not MessageType.HELLO:
        _reject(sock, "expected HELLO")
        raise BadFrame(f"expected HELLO from the worker, got {hello.type.name}")
    try:
        client_nonce = _hex_field(hello.meta, "nonce", NONCE_BYTES, BadFrame)
    except BadFrame as error:
        _reject(sock, f"malformed HELLO: {error}")
        raise
    ready: dict[str, Any] = {}
    if secret is not None:
        server_nonce = _authenticate(sock, secret, client_nonce, deadline)
        ready["mac"] = auth_tag(secret, "server", client_nonce, server_nonce).hex()
    deadline.send(sock, Message(MessageType.READY, ready))
    join = deadline.recv(sock, cap)
    if join.type is not MessageType.JOIN:
        _reject(sock, "expected JOIN")
        raise BadFrame(f"expected JOIN from the worker, got {join.type.name}")
    reason = check_hello(join.meta)
    if reason is not None:
        _reject(sock, reason)
        raise SignatureMismatch(reason) if reason.startswith("signature") else ProtocolError(reason)
    deadline.send(sock, Message(MessageType.WELCOME, dict(welcome)))
    return join.meta


def model_signature(module: torch.nn.Module) -> list[list]:
    """What must match between server and workers: names, shapes and dtypes of the parameters, then of
    the buffers that are saved with the model (BatchNorm statistics), in order."""
    persistent = module.state_dict(keep_vars=True).keys()
    named = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if n in persistent)]
    return [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in named]


def _valid_signature(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and isinstance(entry[2], str)
        and isinstance(entry[1], list)
        and all(_is_dim(d) for d in entry[1])
        for entry in value
    )


def signature_mismatch(ours: list, theirs: Any) -> str | None:
    """None when the peer's signature equals ours, else one line naming the first difference. Starts
    with "signature" so that a server can pass it to the worker as a REJECT reason."""
    if not _valid_signature(theirs):
        return "signature mismatch: not a valid signature from the peer (expected [[name, shape, dtype], ...])"
    our_names = {entry[0] for entry in ours}
    their_names = {entry[0] for entry in theirs}
    for (name, shape, dtype), (their_name, their_shape, their_dtype) in zip(
        ours, theirs, strict=False
    ):  # lengths compared below
        if name != their_name:
            if name not in their_names:
                return f"signature mismatch: {printable(name)} is missing from the peer's model"
            if their_name not in our_names:
                return f"signature mismatch: the peer's model has an extra entry {printable(their_name)}"
            return f"signature mismatch: entries in another order (here {name}, on the peer {printable(their_name)})"
        if list(shape) != their_shape:
            return f"signature mismatch: {name} has shape {list(shape)} here, {their_shape} on the peer"
        if dtype != their_dtype:
            return f"signature mismatch: {name} has dtype {dtype} here, {printable(their_dtype, 40)} on the peer"
    if len(ours) > len(theirs):
        return f"signature mismatch: {ours[len(theirs)][0]} is missing from the peer's model"
    if len(theirs) > len(ours):
        return f"signature mismatch: the peer's model has an extra entry {printable(theirs[len(ours)][0])}"
    return None
