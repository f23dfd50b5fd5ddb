"""The parameter server: admits workers, hands each round's micro-batches to them, and averages their
gradients into the central model.

Threads: one accepts connections and runs each handshake in a short-lived thread of its own (at most
``max_pending`` at once, each bounded by a timeout; when all are taken, the oldest is cut off for the
newcomer, so peers that open connections and say nothing cannot keep a real worker out). Admitted
workers' sockets are non-blocking and belong
to the caller's thread (the Lightning training loop) alone: it runs each round as one selector loop that
sends to every worker at once, as far as each socket takes it, and reads every answer into that worker's
reused buffer, with no thread handoffs or locks on the hot path.

A round is complete only when every one of its micro-batches has an accepted gradient: the micro-batches
of a worker that leaves, fails or stops answering are handed to the others within the same round, so each
epoch uses every sample exactly once whatever happens to the workers. The one exception is a micro-batch
that every worker's gradient is rejected for (NaN or Inf): after ``max_rejections`` rejections it stops
the run (``rejection_policy="stop"``) or is left out and recorded (``"skip"``), never handed out forever.

Memory stays bounded however long the run and however many workers come and go: a connection that ends
is removed with its buffers, and the event log and per-worker counts keep a bounded number of entries.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import selectors
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from torch import Tensor

from cifar_pl.errors import RaisedBetweenSteps, UserFacingError
from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.accounting import SampleAccounting
from cifar_pl.parameter_server.compression import Compression, GradientDecoder
from cifar_pl.parameter_server.packing import FlatState
from cifar_pl.parameter_server.protocol import Message, MessageType

log = logging.getLogger(__name__)


REJECTION_POLICIES = ("stop", "skip")


class NoWorkersError(RuntimeError):
    """No worker is connected and none joined in time: the round cannot be computed."""


class RejectedMicroBatchError(UserFacingError, RaisedBetweenSteps):
    """Every gradient computed for one micro-batch was rejected, ``max_rejections`` times: with
    ``rejection_policy="stop"`` the run stops rather than hand it out forever. Raised before the round's
    step, so ``last.ckpt`` is saved at the step before it."""

    SHOWN_INDICES = 64

    def __init__(
        self, epoch: int, round: int, position: int, indices: list[int], reasons: list[str], advice: str = ""
    ) -> None:
        self.epoch, self.round, self.position, self.indices, self.reasons = epoch, round, position, indices, reasons
        shown = ", ".join(map(str, indices[: self.SHOWN_INDICES]))
        if len(indices) > self.SHOWN_INDICES:
            shown += f", ... ({len(indices)} in all)"
        distinct = list(dict.fromkeys(reasons))
        super().__init__(
            f"the parameter server stopped the run: every gradient of micro-batch {position} of round {round} "
            f"(epoch {epoch}), samples [{shown}], was rejected, {len(reasons)} times ({'; '.join(distinct)}). "
            f"Handing it out again would never end the round: a loss or gradient that is NaN or infinite on "
            f"every worker (fp16 overflowing after every loss-scale retry, a learning rate too high, or a "
            f"sample that gives a NaN loss) does not go away by retrying. Lower the learning rate or use "
            f"trainer.precision=32-true, look at those samples, or set strategy.rejection_policy=skip to leave "
            f"such micro-batches out (their samples are then listed in parameter_server/report.json)."
            + (f" {advice}" if advice else "")
        )


@dataclass
class ServerSettings:
    address: str = "127.0.0.1:0"
    secret: bytes | None = None
    round_timeout: float = 30.0  # past this, a late worker's share of the round goes to the others ("drop")
    straggler: str = "drop"  # "drop": reassign a late share and keep the worker; "wait": wait up to worker_timeout
    worker_timeout: float = 600.0  # a worker silent this long on an assignment is taken for dead and disconnected
    worker_wait: float = 120.0  # how long a round waits for a worker when none is left
    handshake_timeout: float = 10.0
    frame_timeout: float = 30.0  # once a frame has started, all of it must arrive within this
    max_frame: int = 256 * 1024 * 1024
    max_pending: int = 16  # concurrent connections still in their handshake
    max_strikes: int = 3  # rejected contributions, or rounds late in a row, before a worker is disconnected
    rejection_policy: str = "stop"  # a micro-batch rejected max_rejections times: "stop" the run, or "skip" it
    max_rejections: int = 3  # rejections of one micro-batch (computed alone) within a round before the policy
    compression: Compression = field(default_factory=Compression)  # how workers encode gradients (told in WELCOME)

    def __post_init__(self) -> None:
        if self.rejection_policy not in REJECTION_POLICIES:
            raise ValueError(
                f"rejection_policy={self.rejection_policy!r} is not one of {', '.join(REJECTION_POLICIES)}"
            )
        if self.max_rejections < 1 or self.max_strikes < 1:
            raise ValueError(f"max_rejections={self.max_rejections} and max_strikes={self.max_strikes} must be >= 1")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_address(address: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT``, or ``[v6]:PORT``) as a (host, port) pair."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return (host.strip("[]") or default_host), int(port)


def peer_text(value: Any, limit: int = 40) -> str:
    """A string field a worker sent about itself, made safe to store and log: printable and short."""
    return wire.printable(value, limit) if isinstance(value, str) else ""


@dataclass
class Connection:
    id: int
    name: str  # "worker-ID LABEL (HOST:PORT)": unique to this connection
    label: str  # what the worker calls itself (sanitised), the same across its reconnections
    sock: socket.socket  # non-blocking; read and written only by the thread that runs the rounds
    peer: str
    reader: wire.FrameReader
    writer: wire.FrameWriter = field(default_factory=wire.FrameWriter)
    version: int = -1  # the parameter version this worker holds
    alive: bool = True
    strikes: int = 0  # rejected contributions
    late: int = 0  # rounds in a row whose share it did not answer within the round timeout
    events: int = 0  # what the server's selector watches on its socket (0: not registered)

    def close(self) -> None:
        """Close the socket and let go of the buffers, whoever still holds on to this object."""
        self.alive = False
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.release()
        self.writer.take()


@dataclass
class Assignment:
    id: int
    worker: Connection
    micro_batches: range  # a contiguous run of positions in the round's list of micro-batches
    indices: Tensor  # their sample indices, concatenated
    samples: int
    sent: float
    deadline: float
    final: bool  # past this deadline the worker is taken for dead, not merely late


@dataclass
class RoundResult:
    gradient: Tensor  # flat: every micro-batch's mean-loss gradient over accumulation x planned_workers
    samples: int  # in accepted gradients
    loss_sum: float
    correct: int
    workers: list[str]
    reassigned_samples: int
    timings: dict[str, float]
    skipped_samples: int = 0  # in micro-batches left out under rejection_policy="skip"
    accepted: int = 0  # contributions (gradients) that went into it


class ParameterServer:
    """Serves one central module to any number of workers over TCP."""

    REFUSALS = ("rejected", "refused")  # connections that never became workers
    RECENT_REFUSALS = 50
    REFUSAL_LOG_BURST = 10  # log lines about refusals per 10 s; the rest are only counted
    EVENTS_KEPT = 1000  # the latest events are kept for the report; all of them are counted by kind
    NAMED_CONTRIBUTORS = 256  # workers counted by name in ``contributions``; any more share one entry
    OTHER_CONTRIBUTORS = "(other workers)"

    def __init__(
        self,
        module: torch.nn.Module,
        settings: ServerSettings,
        check_hello: Callable[[dict[str, Any]], str | None],
        accounting: SampleAccounting,
    ) -> None:
        self.module = module
        self.settings = settings
        self.flat = FlatState(module)
        self.decoder = GradientDecoder(settings.compression, self.flat.num_params)
        # bytes on the wire to and from admitted workers (frames queued to them, bytes read from them), in all
        self.bytes_to_workers = 0
        self.bytes_from_workers = 0
        self.check_hello = check_hello
        self.accounting = accounting
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.EVENTS_KEPT)
        self.event_counts: collections.Counter[str] = collections.Counter()  # every event, by kind
        # rounds each worker (by the name it gives itself) computed for, for at most NAMED_CONTRIBUTORS names
        self.contributions: collections.Counter[str] = collections.Counter()
        # connections turned away before they became workers: counted, the latest few kept (bounded memory)
        self.refusals: collections.Counter[str] = collections.Counter()
        self._recent_refusals: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.RECENT_REFUSALS)
        self._refusal_window = [time.monotonic(), 0]
        self._selector = selectors.DefaultSelector()  # the workers' sockets, used by the rounds' thread only
        self._lock = threading.Lock()
        self._joined = threading.Condition(self._lock)
        self._workers: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._assignment_ids = itertools.count(1)
        self._handshaking: dict[socket.socket, str] = {}  # in progress, oldest first, with their peers
        self._stopping = threading.Event()
        self._params_cache: tuple[int, list[bytes | memoryview]] | None = None
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.round = 0

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Listen (127.0.0.1 unless the settings name another address) and start accepting workers."""
        host, port = parse_address(self.settings.address)
        # a deep accept queue: a burst of connections (a flood, or many workers at once) must not overflow it,
        # or the kernel drops SYNs and every dropped peer, real workers too, waits a 1 s retransmission
        listener = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=1024
        )
        listener.settimeout(0.2)
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name="ps-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        self.address = listener.getsockname()[:2]
        self._event("listening", detail=f"{self.address[0]}:{self.address[1]}")
        return self.address

    def stop(self, reason: str = "training finished") -> None:
        """Tell every worker training is over, close every connection and stop the threads."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.values())
        done = wire.encode(Message(MessageType.DONE, {"reason": reason}))
        for conn in workers:
            if conn.alive:
                with suppress(wire.ProtocolError, OSError):  # best effort: the worker may be gone already
                    wire.send_parts(conn.sock, [*conn.writer.take(), *done], timeout=2.0, kind="DONE")
            self._unwatch(conn)
            conn.close()
        self._selector.close()
        if self._listener is not None:
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5.0)

    def _event(self, event: str, worker: Connection | None = None, **details: Any) -> None:
        entry = {"time": round(time.time(), 3), "round": self.round, "event": event, **details}
        if worker is not None:
            entry["worker"] = worker.name
        text = ", ".join(f"{k}={v}" for k, v in details.items())
        line = f"parameter server: {event}{f' {worker.name}' if worker else ''}{f' ({text})' if text else ''}"
        if event in self.REFUSALS:
            # anyone who can reach the port can cause these: count them all, keep and log only a few
            with self._lock:
                self.refusals[event] += 1
                self._recent_refusals.append(entry)
                now = time.monotonic()
                if now - self._refusal_window[0] > 10.0:
                    self._refusal_window = [now, 0]
                self._refusal_window[1] += 1
                quiet = self._refusal_window[1] > self.REFUSAL_LOG_BURST
            if not quiet:
                log.info(line)
            return
        with self._lock:
            self.events.append(entry)
            self.event_counts[event] += 1
        log.info(line)

    # --- admitting workers ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            evicted = []
            with self._lock:
                while len(self._handshaking) >= self.settings.max_pending:
                    # the oldest has had the longest to finish, and a real worker's handshake takes milliseconds
                    oldest = next(iter(self._handshaking))
                    evicted.append((oldest, self._handshaking.pop(oldest)))
                self._handshaking[sock] = f"{peer[0]}:{peer[1]}"
            for old_sock, old_peer in evicted:
                # recorded first: once the peer sees its connection end, the event log already says why
                self._event("refused", peer=old_peer, detail="handshake cut off: a newer connection needed its slot")
                with suppress(OSError):
                    old_sock.shutdown(socket.SHUT_RDWR)  # its thread's read ends at once, and it cleans up
            thread = threading.Thread(target=self._admit, args=(sock, peer), name="ps-handshake", daemon=True)
            thread.start()

    def _admit(self, sock: socket.socket, peer: tuple) -> None:
        peer_name = f"{peer[0]}:{peer[1]}"
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            worker_id = next(self._ids)
            joined = wire.server_handshake(
                sock,
                self.settings.secret,
                self.settings.handshake_timeout,
                wire.HANDSHAKE_MAX_FRAME,  # no handshake message carries tensors
                self.check_hello,
                {"worker_id": worker_id, "compression": self.settings.compression.to_meta()},
            )
        except (wire.ProtocolError, OSError) as error:
            with self._lock:
                cut_off = self._handshaking.pop(sock, None) is None  # the accept loop logged why
            if not cut_off:
                self._event("rejected", peer=peer_name, detail=str(error))
            sock.close()
            return
        with self._lock:
            if self._handshaking.pop(sock, None) is None:  # cut off just as it finished: its socket is shut
                sock.close()
                return
        label = peer_text(joined.get("name")) or peer_name.rpartition(":")[0]
        name = f"worker-{worker_id} {label} ({peer_name})"
        sock.setblocking(False)
        conn = Connection(worker_id, name, label, sock, peer_name, wire.FrameReader(self.settings.max_frame))
        with self._joined:
            if self._stopping.is_set():
                sock.close()
                return
            self._workers[worker_id] = conn
            self._joined.notify_all()
        pid = joined.get("pid")
        self._event("joined", conn, host=peer_text(joined.get("host")) or "?", pid=pid if _is_int(pid) else None)

    # --- the workers' sockets (the rounds' thread only) ----------------------------------------------

    def _send(self, conn: Connection, parts: list[bytes | memoryview]) -> None:
        """Queue frames for a worker and send what its socket takes now; the round loop sends the rest."""
        conn.writer.queue(parts)
        self.bytes_to_workers += sum(memoryview(part).nbytes for part in parts)
        conn.writer.flush(conn.sock)
        self._watch(conn)

    def _watch(self, conn: Connection) -> None:
        """Keep the selector watching the worker for answers, and for room to send while frames wait."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.writer.pending else 0)
        if events != conn.events:
            if conn.events:
                self._selector.modify(conn.sock, events, conn)
            else:
                self._selector.register(conn.sock, events, conn)
            conn.events = events

    def _unwatch(self, conn: Connection) -> None:
        if conn.events:
            with suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
            conn.events = 0

    def _watched(self) -> list[Connection]:
        return [key.data for key in self._selector.get_map().values()]

    def _io_deadline(self) -> float:
        """When the next watched worker will have stalled a frame (either way) for ``frame_timeout``."""
        times = [t for conn in self._watched() for t in (conn.writer.started, conn.reader.started) if t is not None]
        return min(times) + self.settings.frame_timeout if times else math.inf

    def _poll(self, timeout: float) -> list[tuple[Connection, Message | Exception]]:
        """Wait up to ``timeout`` seconds for the watched workers' sockets, send what they take and read
        what they sent: the complete messages and the failed connections, in order. A message's tensors
        are views on its worker's receive buffer, valid until the next poll."""
        results: list[tuple[Connection, Message | Exception]] = []
        for key, mask in self._selector.select(max(0.0, timeout)):
            conn = key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    conn.writer.flush(conn.sock)
                    self._watch(conn)
                if mask & selectors.EVENT_READ:
                    received = conn.reader.received
                    readable = conn.reader.read(conn.sock)
                    self.bytes_from_workers += conn.reader.received - received
                    while readable and (message := conn.reader.pop()) is not None:
                        results.append((conn, message))
            except (wire.ProtocolError, OSError) as error:
                results.append((conn, error.with_traceback(None)))  # no frame -> error -> frame cycle
        now, limit = time.monotonic(), self.settings.frame_timeout
        for conn in self._watched():
            if conn.writer.started is not None and now - conn.writer.started > limit:
                results.append(
                    (
                        conn,
                        wire.WriteTimeout(
                            f"it took nothing of the frames sent to it for {limit:g} s: it stopped reading"
                        ),
                    )
                )
            elif conn.reader.started is not None and now - conn.reader.started > limit:
                results.append(
                    (
                        conn,
                        wire.ReadTimeout(
                            f"it sent part of a message, then nothing for {limit:g} s ({conn.reader.missing()})"
                        ),
                    )
                )
        return results

    @property
    def recent_refusals(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._recent_refusals)

    @property
    def live_workers(self) -> list[Connection]:
        with self._lock:
            return [c for c in self._workers.values() if c.alive]

    def wait_for_workers(self, count: int, timeout: float) -> int:
        """Block until ``count`` workers are connected or ``timeout`` passes; returns how many are."""
        deadline = time.monotonic() + timeout
        with self._joined:
            while sum(c.alive for c in self._workers.values()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    break
                self._joined.wait(timeout=min(remaining, 0.5))
            return sum(c.alive for c in self._workers.values())

    def _drop(self, conn: Connection, why: str) -> None:
        """Close a worker's connection and forget it, buffers and all."""
        if conn.alive:
            self._unwatch(conn)
            conn.close()
            with self._lock:
                self._workers.pop(conn.id, None)
            self._event("left", conn, reason=why)

    def _count_contribution(self, conn: Connection) -> None:
        key = conn.label
        if key not in self.contributions and len(self.contributions) >= self.NAMED_CONTRIBUTORS:
            key = self.OTHER_CONTRIBUTORS
        self.contributions[key] += 1

    # --- rounds --------------------------------------------------------------------------------------

    def run_round(
        self,
        epoch: int,
        micro_batches: list[Tensor],
        version: int,
        accumulation: int | None = None,
        planned_workers: int = 1,
    ) -> RoundResult:
        """Compute the gradient of one optimizer step over ``micro_batches`` (tensors of sample indices)
        and load the workers' averaged BatchNorm statistics into the module. ``version`` names the current
        parameters (the optimizer step).

        Every micro-batch's gradient (of its mean loss) weighs ``1 / (accumulation * planned_workers)``,
        however the micro-batches are spread over the workers: as in Lightning, which divides each
        micro-batch's loss by ``accumulate_grad_batches`` even in an epoch's last, shorter window, and as
        in DDP, which averages its ranks. Workers divide each loss by ``accumulation`` (default: the
        round's micro-batches) and the server adds their sums with weight ``1 / planned_workers``: exactly
        1.0 for one planned worker, so one worker reproduces a single process bit for bit in float32."""
        self.round += 1
        for conn in self._watched():  # frames left in flight by the last round: their clocks ran while nobody listened
            conn.writer.restart_clock()
            conn.reader.restart_clock()
        return _Round(
            self, epoch, micro_batches, version, accumulation or max(1, len(micro_batches)), planned_workers
        ).run()

    def _params_frame(self, version: int) -> list[bytes | memoryview]:
        """The PARAMS frame for ``version``, flattened and encoded once and sent to every worker."""
        if self._params_cache is None or self._params_cache[0] != version:
            floats, ints = self.flat.buffers_flat()
            message = Message(MessageType.PARAMS, {"version": version}, [self.flat.params_flat(), floats, ints])
            self._params_cache = (version, wire.encode(message))
        return self._params_cache[1]

    def _check_contribution(self, message: Message, expected_samples: int) -> str | None:
        """Why a worker's answer cannot be used, or None: every field it sends is checked, within range.
        The gradient is decoded first (``strategy.compression``): ``message.tensors`` then holds it dense."""
        try:
            message.tensors = self.decoder.decode(message.meta, message.tensors)
        except wire.BadFrame as error:
            return f"malformed gradient: {error}"
        meta, tensors = message.meta, message.tensors
        if len(tensors) != 3 or not self.flat.shapes_match(*tensors):
            return "gradient tensors do not match the model's shapes"
        if meta.get("samples") != expected_samples:
            return f"covers {wire.printable(repr(meta.get('samples')), 40)} samples, {expected_samples} were assigned"
        loss, hits = meta.get("loss_sum"), meta.get("correct")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not _is_int(hits):
            return "missing loss or accuracy statistics"
        if not 0 <= hits <= expected_samples:
            return f"claims {wire.printable(str(hits), 40)} correct predictions for {expected_samples} samples"
        # a sum is NaN or infinite whenever any element is (or when the values are absurdly large)
        if not (math.isfinite(loss) and all(math.isfinite(float(t.sum())) for t in tensors[:2])):
            return "NaN or Inf in the gradient or loss"
        if loss < 0:
            return f"a negative loss sum ({loss:g})"
        return None

    def _wait_for_a_worker(self) -> list[Connection]:
        self._event("waiting", detail=f"no worker left; waiting up to {self.settings.worker_wait:g} s for one to join")
        if self.wait_for_workers(1, self.settings.worker_wait) == 0:
            raise NoWorkersError(
                f"no worker is connected to the parameter server at {self.address[0]}:{self.address[1]} and none "
                f"joined within {self.settings.worker_wait:g} s: start workers with strategy.role=worker "
                f"strategy.address=HOST:PORT, or raise strategy.worker_wait"
            )
        return self.live_workers


class _Round:
    """One round of ``ParameterServer.run_round``: its assignments, sums and bookkeeping. (An object, not
    nested functions: those call one another, and the reference cycle would keep every round's buffers
    alive until the garbage collector ran.)"""

    def __init__(
        self,
        server: ParameterServer,
        epoch: int,
        micro_batches: list[Tensor],
        version: int,
        divisor: int,
        planned_workers: int,
    ) -> None:
        self.server, self.settings, self.epoch, self.version = server, server.settings, epoch, version
        self.number = server.round
        self.divisor, self.weight = divisor, 1.0 / planned_workers
        self.started = time.perf_counter()
        self.timings = {"send": 0.0, "wait": 0.0, "aggregate": 0.0}
        self.count = len(micro_batches)
        sizes = [len(mb) for mb in micro_batches]
        self.starts = list(itertools.accumulate(sizes, initial=0))  # where each micro-batch begins in all_indices
        self.round_samples = self.starts[-1]
        # all the round's indices and micro-batch sizes in two tensors: a share (a run of micro-batches) is a slice
        self.all_indices = (
            torch.cat(micro_batches).to(torch.int64) if micro_batches else torch.zeros(0, dtype=torch.int64)
        )
        self.all_sizes = torch.tensor(sizes, dtype=torch.int64)
        flat = server.flat
        self.grad_sum = torch.zeros(flat.num_params, dtype=torch.float32)
        self.float_sum = torch.zeros(flat.num_float_buffers, dtype=torch.float32)  # sample-weighted average
        self.int_max = torch.full((flat.num_int_buffers,), -1, dtype=torch.int64)
        self.samples, self.loss_sum, self.correct, self.reassigned, self.skipped_samples = 0, 0.0, 0, 0, 0
        self.contributors: list[str] = []
        self.inflight: dict[int, Assignment] = {}
        self.used: list[Tensor] = []  # the sample indices of the accepted contributions
        self.late_this_round: set[int] = set()  # workers whose late strike this round is counted (one per round)
        self.rejections: dict[int, list[str]] = {}  # position -> why each gradient computed for it alone was rejected

    def run(self) -> RoundResult:
        server, inflight, timings = self.server, self.inflight, self.timings
        self.hand_out(range(self.count), server.live_workers or server._wait_for_a_worker())
        while inflight:
            t = time.perf_counter()
            self.handle_overdue()
            if not inflight:
                break
            deadline = min(*(a.deadline for a in inflight.values()), server._io_deadline())
            events = server._poll(deadline - time.monotonic())
            timings["wait"] += time.perf_counter() - t
            for conn, item in events:
                self.take(conn, item)
        t = time.perf_counter()
        if self.skipped_samples and self.samples:  # the statistics of the samples kept: their weights sum to 1 again
            self.float_sum.mul_(self.round_samples / self.samples)
        if self.samples:
            server.flat.load_buffers(self.float_sum, self.int_max)
        if self.used:
            server.accounting.used(self.epoch, torch.cat(self.used))
        server.accounting.round_done(self.epoch)
        timings["aggregate"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - self.started
        return RoundResult(
            self.grad_sum,
            self.samples,
            self.loss_sum,
            self.correct,
            self.contributors,
            self.reassigned,
            timings,
            skipped_samples=self.skipped_samples,
            accepted=len(self.used),
        )

    def assign(self, conn: Connection, positions: range) -> None:
        """Send the worker the current parameters (unless it has them) and its micro-batches, in one write."""
        t = time.perf_counter()
        settings, server = self.settings, self.server
        queued = 1 + sum(1 for a in self.inflight.values() if a.worker is conn)  # it answers them in turn
        final = settings.straggler == "wait"
        patience = settings.worker_timeout if final else settings.round_timeout * queued
        now = time.monotonic()
        indices = self.all_indices[self.starts[positions.start] : self.starts[positions.stop]]
        lengths = self.all_sizes[positions.start : positions.stop]
        assignment = Assignment(
            next(server._assignment_ids), conn, positions, indices, len(indices), now, now + patience, final
        )
        meta = {"round": self.number, "assignment": assignment.id, "epoch": self.epoch, "divisor": self.divisor}
        parts = wire.encode(Message(MessageType.ASSIGN, meta, [indices, lengths]))
        if conn.version != self.version:
            parts = server._params_frame(self.version) + parts
        server._send(conn, parts)
        conn.version = self.version
        self.inflight[assignment.id] = assignment
        self.timings["send"] += time.perf_counter() - t

    def hand_out(self, positions: range, candidates: list[Connection]) -> None:
        """Split ``positions`` into contiguous runs, one per candidate, as even as they can be; a worker
        that cannot be reached is dropped and its run, and anything else it had, goes to the others."""
        server = self.server
        queue = list(candidates)
        while positions:
            queue = [c for c in queue if c.alive] or server.live_workers or server._wait_for_a_worker()
            conn = queue.pop(0)
            share = -(-len(positions) // (len(queue) + 1))
            chunk, positions = positions[:share], positions[share:]
            try:
                self.assign(conn, chunk)
            except (wire.ProtocolError, OSError) as error:
                positions = range(chunk.start, positions.stop)
                self.lose(conn, f"send failed: {error}")

    def reassign(self, assignment: Assignment, why: str, isolate: bool = False) -> None:
        """Hand a share that will not be answered to the others, idle ones first; ``isolate``: one
        micro-batch per assignment, so that a rejection names the micro-batch it is for."""
        server, count = self.server, assignment.samples
        self.reassigned += count
        server.accounting.reassigned(self.epoch, count)
        server._event("reassigned", assignment.worker, samples=count, reason=why)
        others = [c for c in server.live_workers if c is not assignment.worker]
        idle = [c for c in others if not any(a.worker is c for a in self.inflight.values())]
        candidates = idle or others or server.live_workers
        if not isolate or len(assignment.micro_batches) == 1 or not candidates:
            self.hand_out(assignment.micro_batches, candidates)
            return
        for i, position in enumerate(assignment.micro_batches):
            self.hand_out(range(position, position + 1), [candidates[i % len(candidates)]])

    def lose(self, conn: Connection, why: str) -> None:
        """Disconnect a worker and hand everything it still had in this round to the others at once."""
        self.server._drop(conn, why)
        for assignment in [a for a in self.inflight.values() if a.worker is conn]:
            self.inflight.pop(assignment.id)
            self.reassign(assignment, f"{conn.name} left")

    def rejected(self, conn: Connection, assignment: Assignment, problem: str) -> None:
        """A contribution that failed the checks: strike the worker, then hand the share out again, one
        micro-batch at a time; a micro-batch rejected ``max_rejections`` times on its own gets the
        rejection policy instead."""
        server, settings = self.server, self.settings
        conn.strikes += 1
        server._event("rejected contribution", conn, reason=problem, strikes=conn.strikes)
        with suppress(wire.ProtocolError, OSError):
            server._send(conn, wire.encode(Message(MessageType.ERROR, {"reason": f"contribution rejected: {problem}"})))
        if conn.strikes >= settings.max_strikes:
            self.lose(conn, f"{conn.strikes} rejected contributions")
        positions = assignment.micro_batches
        if len(positions) > 1:
            self.reassign(assignment, f"rejected: {problem}", isolate=True)
            return
        history = self.rejections.setdefault(positions.start, [])
        history.append(problem)
        if len(history) < settings.max_rejections:
            self.reassign(assignment, f"rejected: {problem}")
            return
        indices = assignment.indices.tolist()
        if settings.rejection_policy == "stop":
            raise RejectedMicroBatchError(self.epoch, self.number, positions.start, indices, history)
        self.skipped_samples += assignment.samples
        server.accounting.skipped(self.epoch, assignment.indices)
        server._event(
            "skipped micro-batch", position=positions.start, rejections=len(history), samples=indices, reason=problem
        )

    def take(self, conn: Connection, item: Message | Exception) -> None:
        """One event of the round: a worker's answer (accepted into the sums, or rejected), or a lost
        connection (its shares reassigned)."""
        if isinstance(item, Exception):
            self.lose(conn, f"connection lost: {item}")
            return
        if item.type != MessageType.GRADS:
            self.lose(conn, f"protocol violation: unexpected {item.type.name}")
            return
        key = item.meta.get("assignment")
        assignment = self.inflight.get(key) if _is_int(key) else None
        if assignment is None or assignment.worker is not conn or item.meta.get("round") != self.number:
            return  # a late answer to an assignment that was already handed to someone else
        t = time.perf_counter()
        self.inflight.pop(assignment.id)
        problem = self.server._check_contribution(item, assignment.samples)
        if problem:
            self.rejected(conn, assignment, problem)
            return
        conn.late = 0
        grads, floats, ints = item.tensors
        self.grad_sum.add_(grads, alpha=self.weight)
        self.float_sum.add_(floats, alpha=item.meta["samples"] / self.round_samples)
        torch.maximum(self.int_max, ints, out=self.int_max)
        self.samples += item.meta["samples"]
        self.loss_sum += float(item.meta["loss_sum"])
        self.correct += item.meta["correct"]
        if conn.name not in self.contributors:
            self.contributors.append(conn.name)
            self.server._count_contribution(conn)
        self.used.append(assignment.indices)
        self.timings["aggregate"] += time.perf_counter() - t

    def handle_overdue(self) -> None:
        """Shares past their deadline: a straggler's go to the others (one late strike per round, however
        many it had), a dead worker's too, and a lone straggler is waited for up to the worker timeout."""
        settings, inflight = self.settings, self.inflight
        now = time.monotonic()
        for assignment in [a for a in inflight.values() if a.deadline <= now]:
            conn = assignment.worker
            if assignment.id not in inflight:
                continue  # handled with an earlier overdue assignment of the same worker
            others = [c for c in self.server.live_workers if c is not conn]
            if not assignment.final and not others:
                # a straggler nobody can stand in for: wait for it, up to the worker timeout
                assignment.final = True
                assignment.deadline = assignment.sent + settings.worker_timeout
                continue
            inflight.pop(assignment.id)
            if assignment.final:
                self.lose(conn, f"no answer within the worker timeout ({settings.worker_timeout:g} s)")
                self.reassign(assignment, "worker timeout")
                continue
            if conn.id not in self.late_this_round:  # a late round is one strike, however many shares it had
                self.late_this_round.add(conn.id)
                conn.late += 1
                if conn.late >= settings.max_strikes:
                    self.lose(conn, f"late past the round timeout {conn.late} rounds in a row")
                else:
                    self.server._event(
                        "straggler",
                        conn,
                        detail=f"no answer within the round timeout ({settings.round_timeout:g} s); "
                        "dropped for this round",
                    )
            self.reassign(assignment, "round timeout")
