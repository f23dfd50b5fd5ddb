"""The parameter server: admits workers, hands each round's micro-batches to them, and averages their
gradients into the central model.

Threads: one accepts connections and runs each handshake in a short-lived thread of its own (at most
``max_pending`` at once, each bounded by a timeout). Admitted workers' sockets are non-blocking and belong
to the caller's thread (the Lightning training loop) alone: it runs each round as one selector loop that
sends to every worker at once, as far as each socket takes it, and reads every answer into that worker's
reused buffer, with no thread handoffs or locks on the hot path.

A round is complete only when every one of its micro-batches has an accepted gradient: the micro-batches
of a worker that leaves, fails or stops answering are handed to the others within the same round, so each
epoch uses every sample exactly once whatever happens to the workers.
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

from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.accounting import SampleAccounting
from cifar_pl.parameter_server.packing import FlatState
from cifar_pl.parameter_server.protocol import Message, MessageType

log = logging.getLogger(__name__)


class NoWorkersError(RuntimeError):
    """No worker is connected and none joined in time: the round cannot be computed."""


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


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_address(address: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT``, or ``[v6]:PORT``) as a (host, port) pair."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return (host.strip("[]") or default_host), int(port)


@dataclass
class Connection:
    id: int
    name: str
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
        self.alive = False
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


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
    gradient: Tensor  # flat, the sample-weighted average of the workers' gradients
    samples: int
    loss_sum: float
    correct: int
    workers: list[str]
    reassigned_samples: int
    timings: dict[str, float]


class ParameterServer:
    """Serves one central module to any number of workers over TCP."""

    REFUSALS = ("rejected", "refused")  # connections that never became workers
    RECENT_REFUSALS = 50
    REFUSAL_LOG_BURST = 10  # log lines about refusals per 10 s; the rest are only counted

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
        self.check_hello = check_hello
        self.accounting = accounting
        self.events: list[dict[str, Any]] = []
        self.contributions: collections.Counter[str] = collections.Counter()  # rounds each worker computed for
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
        self._pending = threading.BoundedSemaphore(settings.max_pending)
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
        self.events.append(entry)
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
            if not self._pending.acquire(blocking=False):
                self._event(
                    "refused", peer=f"{peer[0]}:{peer[1]}", detail="too many connections still in their handshake"
                )
                sock.close()
                continue
            thread = threading.Thread(target=self._admit, args=(sock, peer), name="ps-handshake", daemon=True)
            thread.start()

    def _admit(self, sock: socket.socket, peer: tuple) -> None:
        peer_name = f"{peer[0]}:{peer[1]}"
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            worker_id = next(self._ids)
            hello = wire.server_handshake(
                sock,
                self.settings.secret,
                self.settings.handshake_timeout,
                self.settings.max_frame,
                self.check_hello,
                {"worker_id": worker_id},
            )
        except (wire.ProtocolError, OSError) as error:
            self._event("rejected", peer=peer_name, detail=str(error))
            sock.close()
            return
        finally:
            self._pending.release()
        name = f"worker-{worker_id} {str(hello.get('name', ''))[:40]} ({peer_name})".replace("  ", " ")
        sock.setblocking(False)
        conn = Connection(worker_id, name, sock, peer_name, wire.FrameReader(self.settings.max_frame))
        with self._joined:
            if self._stopping.is_set():
                sock.close()
                return
            self._workers[worker_id] = conn
            self._joined.notify_all()
        self._event("joined", conn, host=str(hello.get("host", "?")), pid=hello.get("pid"))

    # --- the workers' sockets (the rounds' thread only) ----------------------------------------------

    def _send(self, conn: Connection, parts: list[bytes | memoryview]) -> None:
        """Queue frames for a worker and send what its socket takes now; the round loop sends the rest."""
        conn.writer.queue(parts)
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
                if mask & selectors.EVENT_READ and conn.reader.read(conn.sock):
                    while (message := conn.reader.pop()) is not None:
                        results.append((conn, message))
            except (wire.ProtocolError, OSError) as error:
                results.append((conn, error))
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
        if conn.alive:
            self._unwatch(conn)
            conn.close()
            self._event("left", conn, reason=why)

    # --- rounds --------------------------------------------------------------------------------------

    def run_round(self, epoch: int, micro_batches: list[Tensor], version: int) -> RoundResult:
        """Compute the gradient of one optimizer step over ``micro_batches`` (tensors of sample indices):
        return the sample-weighted average of the workers' gradients, and load their averaged BatchNorm
        statistics into the module. ``version`` names the current parameters (the optimizer step)."""
        self.round += 1
        started = time.perf_counter()
        for conn in self._watched():  # frames left in flight by the last round: their clocks ran while nobody listened
            conn.writer.restart_clock()
            conn.reader.restart_clock()
        timings = {"send": 0.0, "wait": 0.0, "aggregate": 0.0}
        todo = range(len(micro_batches))
        sizes = [len(mb) for mb in micro_batches]
        starts = list(itertools.accumulate(sizes, initial=0))  # where each micro-batch begins in all_indices
        round_samples = starts[-1]
        # all the round's indices and micro-batch sizes in two tensors: a share (a run of micro-batches) is a slice
        all_indices = torch.cat(micro_batches).to(torch.int64) if micro_batches else torch.zeros(0, dtype=torch.int64)
        all_sizes = torch.tensor(sizes, dtype=torch.int64)
        workers = self.live_workers or self._wait_for_a_worker()
        grad_sum = torch.zeros(self.flat.num_params, dtype=torch.float32)  # becomes the weighted average
        float_sum = torch.zeros(self.flat.num_float_buffers, dtype=torch.float32)
        int_max = torch.full((self.flat.num_int_buffers,), -1, dtype=torch.int64)
        samples, loss_sum, correct, reassigned = 0, 0.0, 0, 0
        contributors: list[str] = []
        inflight: dict[int, Assignment] = {}
        used: list[Tensor] = []  # the sample indices of the accepted contributions

        def assign(conn: Connection, positions: range) -> None:
            """Send the worker the current parameters (unless it has them) and its micro-batches, in one write."""
            t = time.perf_counter()
            queued = 1 + sum(1 for a in inflight.values() if a.worker is conn)  # it answers them in turn
            final = self.settings.straggler == "wait"
            patience = self.settings.worker_timeout if final else self.settings.round_timeout * queued
            now = time.monotonic()
            indices = all_indices[starts[positions.start] : starts[positions.stop]]
            lengths = all_sizes[positions.start : positions.stop]
            assignment = Assignment(
                next(self._assignment_ids), conn, positions, indices, len(indices), now, now + patience, final
            )
            meta = {"round": self.round, "assignment": assignment.id, "epoch": epoch}
            parts = wire.encode(Message(MessageType.ASSIGN, meta, [indices, lengths]))
            if conn.version != version:
                parts = self._params_frame(version) + parts
            self._send(conn, parts)
            conn.version = version
            inflight[assignment.id] = assignment
            timings["send"] += time.perf_counter() - t

        def hand_out(positions: range, candidates: list[Connection]) -> None:
            """Split ``positions`` into contiguous runs, one per candidate, as even as they can be; a worker
            that cannot be reached is dropped and its run goes back to the others."""
            queue = list(candidates)
            while positions:
                queue = [c for c in queue if c.alive] or self.live_workers or self._wait_for_a_worker()
                conn = queue.pop(0)
                share = -(-len(positions) // (len(queue) + 1))
                chunk, positions = positions[:share], positions[share:]
                try:
                    assign(conn, chunk)
                except (wire.ProtocolError, OSError) as error:
                    self._drop(conn, f"send failed: {error}")
                    positions = range(chunk.start, positions.stop)

        def reassign(assignment: Assignment, why: str) -> None:
            nonlocal reassigned
            count = assignment.samples
            reassigned += count
            self.accounting.reassigned(epoch, count)
            self._event("reassigned", assignment.worker, samples=count, reason=why)
            others = [c for c in self.live_workers if c is not assignment.worker]
            idle = [c for c in others if not any(a.worker is c for a in inflight.values())]
            hand_out(assignment.micro_batches, idle or others or self.live_workers)

        def take(conn: Connection, item: Message | Exception) -> None:
            """One event of the round: a worker's answer (accepted into the sums, or rejected and its
            share reassigned), or a lost connection (its shares reassigned)."""
            nonlocal samples, loss_sum, correct
            if isinstance(item, Exception):
                self._drop(conn, f"connection lost: {item}")
                self._orphan_assignments_of(conn, inflight, reassign)
                return
            if item.type != MessageType.GRADS:
                self._drop(conn, f"protocol violation: unexpected {item.type.name}")
                self._orphan_assignments_of(conn, inflight, reassign)
                return
            key = item.meta.get("assignment")
            assignment = inflight.get(key) if _is_int(key) else None
            if assignment is None or assignment.worker is not conn or item.meta.get("round") != self.round:
                return  # a late answer to an assignment that was already handed to someone else
            t = time.perf_counter()
            problem = self._check_contribution(item, assignment.samples)
            if problem:
                inflight.pop(assignment.id)
                conn.strikes += 1
                self._event("rejected contribution", conn, reason=problem, strikes=conn.strikes)
                with suppress(wire.ProtocolError, OSError):
                    self._send(
                        conn, wire.encode(Message(MessageType.ERROR, {"reason": f"contribution rejected: {problem}"}))
                    )
                if conn.strikes >= self.settings.max_strikes:
                    self._drop(conn, f"{conn.strikes} rejected contributions")
                    self._orphan_assignments_of(conn, inflight, reassign)
                reassign(assignment, f"rejected: {problem}")
                return
            inflight.pop(assignment.id)
            conn.late = 0
            grads, floats, ints = item.tensors
            # weight by share of the round's samples: exactly 1.0 for a lone worker, so one worker
            # reproduces a single-process run bit for bit in float32
            share = item.meta["samples"] / round_samples
            grad_sum.add_(grads, alpha=share)
            float_sum.add_(floats, alpha=share)
            torch.maximum(int_max, ints, out=int_max)
            samples += item.meta["samples"]
            loss_sum += float(item.meta["loss_sum"])
            correct += int(item.meta["correct"])
            if conn.name not in contributors:
                contributors.append(conn.name)
                self.contributions[conn.name] += 1
            used.append(assignment.indices)
            timings["aggregate"] += time.perf_counter() - t

        hand_out(todo, workers)
        while inflight:
            t = time.perf_counter()
            now = time.monotonic()
            overdue = [a for a in inflight.values() if a.deadline <= now]
            for assignment in overdue:
                conn = assignment.worker
                if assignment.id not in inflight:
                    continue  # handled with an earlier overdue assignment of the same worker
                others = [c for c in self.live_workers if c is not conn]
                if not assignment.final and not others:
                    # a straggler nobody can stand in for: wait for it, up to the worker timeout
                    assignment.final = True
                    assignment.deadline = assignment.sent + self.settings.worker_timeout
                    continue
                inflight.pop(assignment.id)
                if assignment.final:
                    self._drop(conn, f"no answer within the worker timeout ({self.settings.worker_timeout:g} s)")
                    self._orphan_assignments_of(conn, inflight, reassign)
                    reassign(assignment, "worker timeout")
                    continue
                conn.late += 1
                if conn.late >= self.settings.max_strikes:
                    self._drop(conn, f"late past the round timeout {conn.late} rounds in a row")
                    self._orphan_assignments_of(conn, inflight, reassign)
                else:
                    self._event(
                        "straggler",
                        conn,
                        detail=f"no answer within the round timeout ({self.settings.round_timeout:g} s); "
                        "dropped for this round",
                    )
                reassign(assignment, "round timeout")
            if not inflight:
                break
            deadline = min(*(a.deadline for a in inflight.values()), self._io_deadline())
            events = self._poll(deadline - time.monotonic())
            timings["wait"] += time.perf_counter() - t
            for conn, item in events:
                take(conn, item)

        t = time.perf_counter()
        self.flat.load_buffers(float_sum, int_max)
        if used:
            self.accounting.used(epoch, torch.cat(used))
        self.accounting.round_done(epoch)
        timings["aggregate"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        return RoundResult(grad_sum, samples, loss_sum, correct, contributors, reassigned, timings)

    def _orphan_assignments_of(self, conn: Connection, inflight: dict[int, Assignment], reassign: Callable) -> None:
        for assignment in [a for a in inflight.values() if a.worker is conn]:
            inflight.pop(assignment.id)
            reassign(assignment, f"{conn.name} left")

    def _params_frame(self, version: int) -> list[bytes | memoryview]:
        """The PARAMS frame for ``version``, flattened and encoded once and sent to every worker."""
        if self._params_cache is None or self._params_cache[0] != version:
            floats, ints = self.flat.buffers_flat()
            message = Message(MessageType.PARAMS, {"version": version}, [self.flat.params_flat(), floats, ints])
            self._params_cache = (version, wire.encode(message))
        return self._params_cache[1]

    def _check_contribution(self, message: Message, expected_samples: int) -> str | None:
        meta, tensors = message.meta, message.tensors
        if len(tensors) != 3 or not self.flat.shapes_match(*tensors):
            return "gradient tensors do not match the model's shapes"
        if meta.get("samples") != expected_samples:
            return f"covers {meta.get('samples')} samples, {expected_samples} were assigned"
        loss = meta.get("loss_sum")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not isinstance(meta.get("correct"), int):
            return "missing loss or accuracy statistics"
        # a sum is NaN or infinite whenever any element is (or when the values are absurdly large)
        if not (math.isfinite(loss) and all(math.isfinite(float(t.sum())) for t in tensors[:2])):
            return "NaN or Inf in the gradient"
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
