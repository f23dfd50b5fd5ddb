"""Asynchronous and bounded-staleness (SSP) training on the parameter server: work is handed out without a
round barrier, and the server applies each optimizer step's work as soon as it is complete.

An epoch's work is a list of *ticks*, each one optimizer step's micro-batches:

- ``async``: a tick is one worker's share of a round (``accumulate_grad_batches`` micro-batches); a
  worker's contribution is applied as one optimizer step the moment it arrives, whatever version of the
  parameters it was computed on, and the worker gets the new parameters with its next assignment.
- ``ssp``: a tick is a round (every share, as in sync) and is applied as one optimizer step, ticks in order,
  once all its shares are in. A worker may take a share of tick ``r`` while ``r <= next + S`` (``next``:
  the first tick not yet applied), so it runs at most ``S`` ticks ahead of the slowest share and computes
  on parameters at most ``S`` optimizer steps old; a worker takes at most one share of a tick while other
  live workers have taken none of it, so a fast worker waits instead of doing the slow one's share.
  ``S = 0`` is exactly sync.

Whatever the mode, an epoch's ticks are fixed up front (so the learning-rate schedule's length is exact),
each tick is applied once, and everything sync guarantees holds per tick: the shares of a worker that
leaves or is late are handed to others, a rejected contribution (NaN/Inf, wrong shape) is handed out
again one micro-batch at a time until the rejection policy applies, and the epoch's accounting proves
every sample was used exactly once. Each worker holds at most one assignment at a time.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.protocol import Message, MessageType
from cifar_pl.parameter_server.server import (
    Assignment,
    Connection,
    ParameterServer,
    RejectedMicroBatchError,
    RoundResult,
    _is_int,
)

MODES = ("sync", "async", "ssp")
POLL_SLICE = 0.25  # seconds between looks at newly joined workers while waiting for answers


@dataclass
class TickPlan:
    """One optimizer step's micro-batches (sample indices), and how many of them each share holds."""

    micro_batches: list[Tensor]
    shares: list[int]


class StalenessStats:
    """How stale the applied contributions were: optimizer steps applied between the parameters a
    contribution was computed on and the step that applied it. Bounded memory: a histogram, and a count,
    sum and max since telemetry last read them."""

    def __init__(self) -> None:
        self.histogram: collections.Counter[int] = collections.Counter()
        self._recent_count = self._recent_sum = self._recent_max = 0  # since telemetry last read them

    def add(self, values: list[int]) -> None:
        self.histogram.update(values)
        if values:
            self._recent_count += len(values)
            self._recent_sum += sum(values)
            self._recent_max = max(self._recent_max, *values)

    def recent(self) -> tuple[float, int]:
        """Mean and max since the last call (telemetry); (0.0, 0) when no contribution came since."""
        count, total, worst = self._recent_count, self._recent_sum, self._recent_max
        self._recent_count = self._recent_sum = self._recent_max = 0
        return (total / count if count else 0.0), worst

    def report(self) -> dict[str, Any]:
        count = sum(self.histogram.values())
        total = sum(k * n for k, n in self.histogram.items())
        return {
            "contributions": count,
            "mean": round(total / count, 4) if count else 0.0,
            "max": max(self.histogram, default=0),
            "histogram": {str(k): self.histogram[k] for k in sorted(self.histogram)},
        }

    def state_dict(self) -> dict[str, int]:
        return {str(k): n for k, n in self.histogram.items()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.histogram = collections.Counter({int(k): int(n) for k, n in state.items()})


class Tick:
    """One optimizer step's work in flight: its pieces still to hand out, and the sums of the accepted ones."""

    def __init__(self, number: int, plan: TickPlan, weight: float) -> None:
        self.number, self.weight = number, weight
        sizes = [len(mb) for mb in plan.micro_batches]
        self.starts = list(itertools.accumulate(sizes, initial=0))
        self.round_samples = self.starts[-1]
        self.all_indices = (
            torch.cat(plan.micro_batches).to(torch.int64) if plan.micro_batches else torch.zeros(0, dtype=torch.int64)
        )
        self.all_sizes = torch.tensor(sizes, dtype=torch.int64)
        bounds = list(itertools.accumulate(plan.shares, initial=0))
        self.pending: list[range] = [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        self.inflight = 0
        self.taken: collections.Counter[int] = collections.Counter()  # worker id -> pieces it took
        self.grad_sum: Tensor | None = None
        self.float_sum: Tensor | None = None
        self.int_max: Tensor | None = None
        self.samples, self.loss_sum, self.correct, self.reassigned, self.skipped_samples = 0, 0.0, 0, 0, 0
        self.contributors: list[str] = []
        self.versions: list[int] = []  # the parameter version each accepted contribution was computed on
        self.used: list[Tensor] = []
        self.late: set[int] = set()  # workers struck late for this tick (once each)
        self.rejections: dict[int, list[str]] = {}
        self.wait = 0.0

    @property
    def complete(self) -> bool:
        return not self.pending and not self.inflight


@dataclass
class TickResult:
    number: int
    result: RoundResult
    staleness: list[int] = field(default_factory=list)


class Pipeline:
    """Runs ``async`` and ``ssp`` epochs on a ``ParameterServer`` (its sockets, checks and accounting)."""

    def __init__(
        self, server: ParameterServer, mode: str, staleness: int, planned_workers: int, accumulation: int
    ) -> None:
        if mode not in ("async", "ssp"):
            raise ValueError(f"Pipeline runs async or ssp, not {mode!r}")
        self.server, self.settings, self.mode, self.staleness = server, server.settings, mode, staleness
        self.weight = 1.0 if mode == "async" else 1.0 / planned_workers
        self.divisor = accumulation
        self.epoch: int | None = None
        self.ticks: dict[int, Tick] = {}
        self.open: list[int] = []  # ticks with pieces still to hand out, ascending
        self.next = 0  # ssp: the first tick not yet applied
        self.finished: collections.deque[Tick] = collections.deque()  # async: complete, in completion order
        self.applied: set[int] = set()  # this epoch's ticks already applied
        self.inflight: dict[int, tuple[Assignment, Tick, int]] = {}  # assignment id -> (it, its tick, version)

    # --- epochs --------------------------------------------------------------------------------------

    def start_epoch(self, epoch: int, plans: list[TickPlan], applied: set[int]) -> None:
        """Plan the epoch's ticks; ``applied``: those a resumed run had applied before its checkpoint."""
        self.drain(0.0)
        self.epoch, self.applied = epoch, set(applied)
        self.ticks = {i: Tick(i, plan, self.weight) for i, plan in enumerate(plans) if i not in self.applied}
        self.open = [i for i, tick in self.ticks.items() if tick.pending]
        self.next = min(self.ticks, default=len(plans))
        self.finished.clear()

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the answers still out (their work is not used), so that a run
        stopped mid-epoch tells its workers it is done when they are listening, not mid-computation."""
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            for conn, item in self.server._poll(min(POLL_SLICE, deadline - time.monotonic())):
                if isinstance(item, Exception):
                    self.server._drop(conn, f"connection lost: {item}")
                for key in [k for k, (a, _, _) in self.inflight.items() if a.worker is conn]:
                    del self.inflight[key]
        for assignment, tick, _ in self.inflight.values():
            tick.inflight -= 1
            tick.pending.append(assignment.micro_batches)
        self.inflight.clear()

    # --- one optimizer step --------------------------------------------------------------------------

    def step(self, version: int) -> TickResult:
        """The next tick to apply, complete: in ssp the first not yet applied, in async the first to
        complete. ``version``: the optimizer steps the server's parameters have taken (the global step)."""
        server = self.server
        for conn in server._watched():  # the optimizer step or validation ran while nobody listened
            conn.writer.restart_clock()
            conn.reader.restart_clock()
        started = time.perf_counter()
        timings = {"send": 0.0, "wait": 0.0, "aggregate": 0.0}
        # shares stay out across steps here: answers that came in while the server was away (its step, a
        # validation, a checkpoint) are read before any deadline is judged, so punctual ones are not late
        for conn, item in server._poll(0.0):
            self.take(conn, item)
        while True:
            tick = self._ready()
            if tick is not None:
                return self._finish(tick, version, timings, started)
            t = time.perf_counter()
            self.hand_out(version)
            timings["send"] += time.perf_counter() - t
            if self._ready() is not None:
                continue  # every micro-batch of the tick was skipped while handing out
            t = time.perf_counter()
            self.handle_overdue()
            deadlines = [a.deadline for a, _, _ in self.inflight.values()]
            deadline = min(time.monotonic() + POLL_SLICE, server._io_deadline(), *deadlines)
            events = server._poll(deadline - time.monotonic())
            timings["wait"] += time.perf_counter() - t
            t = time.perf_counter()
            for conn, item in events:
                self.take(conn, item)
            timings["aggregate"] += time.perf_counter() - t

    def _ready(self) -> Tick | None:
        if self.mode == "async":
            return self.finished[0] if self.finished else None
        tick = self.ticks.get(self.next)
        return tick if tick is not None and tick.complete else None

    def _finish(self, tick: Tick, version: int, timings: dict[str, float], started: float) -> TickResult:
        t = time.perf_counter()
        if self.mode == "async":
            self.finished.popleft()
        del self.ticks[tick.number]
        self.applied.add(tick.number)
        if self.mode == "ssp":
            self.next = min(self.ticks, default=self.next + 1)
        server = self.server
        assert self.epoch is not None
        if tick.samples and tick.float_sum is not None and tick.int_max is not None:
            if tick.skipped_samples:  # the statistics of the samples kept: their weights sum to 1 again
                tick.float_sum.mul_(tick.round_samples / tick.samples)
            server.flat.load_buffers(tick.float_sum, tick.int_max)
        if tick.used:
            server.accounting.used(self.epoch, torch.cat(tick.used))
        server.accounting.round_done(self.epoch)
        server.round += 1
        timings["aggregate"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        gradient = tick.grad_sum if tick.grad_sum is not None else torch.zeros(server.flat.num_params)
        result = RoundResult(
            gradient,
            tick.samples,
            tick.loss_sum,
            tick.correct,
            tick.contributors,
            tick.reassigned,
            timings,
            skipped_samples=tick.skipped_samples,
            accepted=len(tick.versions),
        )
        return TickResult(tick.number, result, [version - v for v in tick.versions])

    # --- handing out ---------------------------------------------------------------------------------

    def _busy(self) -> set[int]:
        return {assignment.worker.id for assignment, _, _ in self.inflight.values()}

    def _choose(self, conn: Connection, live: list[Connection]) -> Tick | None:
        """The tick whose next piece this worker computes, or None (it waits)."""
        for number in self.open:
            if self.mode == "async":
                return self.ticks[number]
            if number > self.next + self.staleness:
                return None  # further ahead than the staleness bound allows
            tick = self.ticks[number]
            if not tick.taken[conn.id]:
                return tick
            # it already has a share of this tick: another only if the workers with none cannot take them all
            if len(tick.pending) > sum(1 for c in live if not tick.taken[c.id]):
                return tick
        return None

    def hand_out(self, version: int) -> None:
        """Give each idle live worker the next piece it may compute (with the current parameters)."""
        server = self.server
        live = server.live_workers
        if not live and not self.inflight and self.open:
            live = server._wait_for_a_worker()
        busy = self._busy()
        for conn in live:
            if conn.id in busy or not conn.alive:
                continue
            tick = self._choose(conn, live)
            if tick is None:
                continue
            positions = tick.pending.pop(0)
            if not tick.pending:
                self.open.remove(tick.number)
            try:
                self.assign(conn, tick, positions, version)
            except (wire.ProtocolError, OSError) as error:
                self._put_back(tick, positions, front=True)
                self.lose(conn, f"send failed: {error}")

    def assign(self, conn: Connection, tick: Tick, positions: range, version: int) -> None:
        server, settings = self.server, self.settings
        final = settings.straggler == "wait"
        now = time.monotonic()
        indices = tick.all_indices[tick.starts[positions.start] : tick.starts[positions.stop]]
        lengths = tick.all_sizes[positions.start : positions.stop]
        assignment = Assignment(
            next(server._assignment_ids),
            conn,
            positions,
            indices,
            len(indices),
            now,
            now + (settings.worker_timeout if final else settings.round_timeout),
            final,
        )
        meta = {"round": tick.number, "assignment": assignment.id, "epoch": self.epoch, "divisor": self.divisor}
        parts = wire.encode(Message(MessageType.ASSIGN, meta, [indices, lengths]))
        if conn.version != version:
            parts = server._params_frame(version) + parts
        tick.taken[conn.id] += 1
        tick.inflight += 1
        self.inflight[assignment.id] = (assignment, tick, version)
        server._send(conn, parts)
        conn.version = version

    def _put_back(self, tick: Tick, positions: range, front: bool = False) -> None:
        if not tick.pending:
            bisect.insort(self.open, tick.number)
        if front:
            tick.pending.insert(0, positions)
        else:
            tick.pending.append(positions)

    def _withdraw(self, assignment_id: int) -> tuple[Assignment, Tick, int]:
        assignment, tick, version = self.inflight.pop(assignment_id)
        tick.inflight -= 1
        return assignment, tick, version

    def reassign(self, assignment: Assignment, tick: Tick, why: str, isolate: bool = False) -> None:
        """Put a piece that will not be answered back to be handed out (``isolate``: one micro-batch at a
        time, so that a rejection names its micro-batch)."""
        count = assignment.samples
        tick.reassigned += count
        assert self.epoch is not None
        self.server.accounting.reassigned(self.epoch, count)
        self.server._event("reassigned", assignment.worker, samples=count, reason=why)
        positions = assignment.micro_batches
        if isolate and len(positions) > 1:
            for position in reversed(positions):
                self._put_back(tick, range(position, position + 1), front=True)
        else:
            self._put_back(tick, positions, front=True)

    def lose(self, conn: Connection, why: str) -> None:
        self.server._drop(conn, why)
        for key in [k for k, (a, _, _) in self.inflight.items() if a.worker is conn]:
            assignment, tick, _ = self._withdraw(key)
            self.reassign(assignment, tick, f"{conn.name} left")

    def rejected(self, conn: Connection, assignment: Assignment, tick: Tick, problem: str) -> None:
        server, settings = self.server, self.settings
        conn.strikes += 1
        server._event("rejected contribution", conn, reason=problem, strikes=conn.strikes)
        with contextlib.suppress(wire.ProtocolError, OSError):
            server._send(conn, wire.encode(Message(MessageType.ERROR, {"reason": f"contribution rejected: {problem}"})))
        if conn.strikes >= settings.max_strikes:
            self.lose(conn, f"{conn.strikes} rejected contributions")
        positions = assignment.micro_batches
        if len(positions) > 1:
            self.reassign(assignment, tick, f"rejected: {problem}", isolate=True)
            return
        history = tick.rejections.setdefault(positions.start, [])
        history.append(problem)
        if len(history) < settings.max_rejections:
            self.reassign(assignment, tick, f"rejected: {problem}")
            return
        indices = assignment.indices.tolist()
        assert self.epoch is not None
        if settings.rejection_policy == "stop":
            raise RejectedMicroBatchError(self.epoch, tick.number + 1, positions.start, indices, history)
        tick.skipped_samples += assignment.samples
        server.accounting.skipped(self.epoch, assignment.indices)
        server._event(
            "skipped micro-batch", position=positions.start, rejections=len(history), samples=indices, reason=problem
        )
        self._maybe_finished(tick)

    def _maybe_finished(self, tick: Tick) -> None:
        if self.mode == "async" and tick.complete:
            self.finished.append(tick)

    def take(self, conn: Connection, item: Message | Exception) -> None:
        """A worker's answer (accepted into its tick's sums, or rejected), or a lost connection."""
        if isinstance(item, Exception):
            self.lose(conn, f"connection lost: {item}")
            return
        if item.type != MessageType.GRADS:
            self.lose(conn, f"protocol violation: unexpected {item.type.name}")
            return
        key = item.meta.get("assignment")
        entry = self.inflight.get(key) if _is_int(key) else None
        if entry is None or entry[0].worker is not conn:
            return  # a late answer to a piece already handed to someone else
        assignment, tick, version = self._withdraw(entry[0].id)
        problem = self.server._check_contribution(item, assignment.samples)
        if problem:
            self.rejected(conn, assignment, tick, problem)
            return
        conn.late = 0
        grads, floats, ints = item.tensors
        if tick.grad_sum is None or tick.float_sum is None or tick.int_max is None:
            flat = self.server.flat
            tick.grad_sum = torch.zeros(flat.num_params, dtype=torch.float32)
            tick.float_sum = torch.zeros(flat.num_float_buffers, dtype=torch.float32)
            tick.int_max = torch.full((flat.num_int_buffers,), -1, dtype=torch.int64)
        # the message's tensors are views on the worker's receive buffer: added into the tick's own sums now
        tick.grad_sum.add_(grads, alpha=tick.weight)
        tick.float_sum.add_(floats, alpha=item.meta["samples"] / tick.round_samples)
        torch.maximum(tick.int_max, ints, out=tick.int_max)
        tick.samples += item.meta["samples"]
        tick.loss_sum += float(item.meta["loss_sum"])
        tick.correct += item.meta["correct"]
        tick.versions.append(version)
        if conn.name not in tick.contributors:
            tick.contributors.append(conn.name)
            self.server._count_contribution(conn)
        tick.used.append(assignment.indices)
        self._maybe_finished(tick)

    def handle_overdue(self) -> None:
        """Pieces past their deadline: a straggler's go back to be handed out (one late strike per tick),
        a lone straggler is waited for up to the worker timeout, and a dead worker is disconnected."""
        settings, now = self.settings, time.monotonic()
        for key in [k for k, (a, _, _) in self.inflight.items() if a.deadline <= now]:
            if key not in self.inflight:
                continue
            assignment, tick, _ = self.inflight[key]
            conn = assignment.worker
            others = [c for c in self.server.live_workers if c is not conn]
            if not assignment.final and not others:
                assignment.final = True
                assignment.deadline = assignment.sent + settings.worker_timeout
                continue
            self._withdraw(key)
            if assignment.final:
                self.lose(conn, f"no answer within the worker timeout ({settings.worker_timeout:g} s)")
                self.reassign(assignment, tick, "worker timeout")
                continue
            if conn.id not in tick.late:
                tick.late.add(conn.id)
                conn.late += 1
                if conn.late >= settings.max_strikes:
                    self.lose(conn, f"late past the round timeout {conn.late} times in a row")
                else:
                    self.server._event(
                        "straggler", conn, detail=f"no answer within the round timeout ({settings.round_timeout:g} s)"
                    )
            self.reassign(assignment, tick, "round timeout")


def tick_plans(shares: list[list[Tensor]], micro_batches: int, rounds: int, mode: str) -> list[TickPlan]:
    """An epoch's ticks from its shares (one per planned worker, each a list of micro-batches): round ``j``
    holds micro-batches ``j*K .. j*K+K-1`` of every share; async makes each share's part its own tick."""
    plans = []
    k = micro_batches
    for j in range(rounds):
        parts = [share[j * k : (j + 1) * k] for share in shares]
        if mode == "async":
            plans += [TickPlan(list(part), [len(part)]) for part in parts if part]
        else:
            plans.append(TickPlan([mb for part in parts for mb in part], [len(part) for part in parts]))
    return plans


def async_ticks(samples: int, workers: int, batch_size: int, micro_batches: int) -> int:
    """How many ticks (optimizer steps) an async epoch has: one per share per round it has work in."""
    total = 0
    for w in range(workers):
        share = len(range(w, samples, workers))
        total += math.ceil(math.ceil(share / batch_size) / micro_batches)
    return total
