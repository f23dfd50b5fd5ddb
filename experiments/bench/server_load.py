"""server-load: how many rounds per second the parameter server sustains when workers answer at once.

Three servers take turns (a balanced order, once each per repeat) against the same load generator: N
simulated workers in ``--processes`` processes on 127.0.0.1, with no model compute. Each server runs in a
fresh process of its own; the load generator's processes live for the whole benchmark.

- ``project``: the real ``ParameterServer`` (its selector loop, deadlines, contribution checks, sample
  accounting), driving rounds back to back with new parameters every round, as after every optimizer step.
- ``naive``: the simplest server that speaks the same protocol to the same simulated workers: the same
  handshake and frames (``protocol.encode``, ``send_parts``, ``FrameReader``), one worker after another on
  blocking sockets, and the same weighted sum of gradients and BatchNorm statistics; no checks, no
  accounting, no per-frame deadlines, no reassignment. ``vs_naive`` (project / naive, paired per repeat)
  is what the real server's design and safety cost or save, with the workers and the bytes held equal.
- ``raw floor``: no protocol at all: the same bytes each way per worker over raw sockets, echoed back by
  trivial workers in the same processes. Not a server one could use: the floor of moving these bytes
  between processes on this machine, reported as the rounds/s it would allow.

The simulated workers are built on the protocol module's public functions (``client_handshake``,
``FrameReader``, ``send_message``), so they follow the protocol as it changes. For each window: rounds/s,
the CPU time per round of the server's process and of the load generator's processes (from the first timed
round), and for the project server the round latency (p50, p99 from 100 rounds up, max) and its process's
peak memory. One untimed warm-up round precedes each window (it grows every buffer and TCP window).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import multiprocessing as mp
import resource
import socket
import statistics
import threading
import time
import traceback
from typing import Any

import torch

from cifar_pl.models import build_network
from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.accounting import SampleAccounting
from cifar_pl.parameter_server.compression import Compression, GradientDecoder, GradientEncoder
from cifar_pl.parameter_server.packing import FlatState
from cifar_pl.parameter_server.protocol import Message, MessageType
from cifar_pl.parameter_server.server import ParameterServer, ServerSettings
from experiments.bench.stats import balanced_order, describe, paired_summary

SERVERS = ("project", "naive", "raw")
TRAIN_SAMPLES = 50_000  # the accounting covers one epoch of CIFAR-10's training set (all rounds are in epoch 0)
MAX_FRAME = 1 << 30
TIMEOUT = 60.0
SAMPLES_PER_MICRO_BATCH = 32


class _FlatModel(torch.nn.Module):
    """A model of ``params`` parameters in a few tensors (no compute happens in this benchmark)."""

    def __init__(self, params: int) -> None:
        super().__init__()
        chunk = max(1, params // 8)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(chunk)) for _ in range(params // chunk)])


def _model(params: int) -> torch.nn.Module:
    return _FlatModel(params) if params else build_network("cnn", 3, 10)


def _micro_batches(workers: int, per_worker: int) -> list[torch.Tensor]:
    """One round's micro-batches of sample indices: ``per_worker`` of 32 for each worker."""
    count = workers * per_worker * SAMPLES_PER_MICRO_BATCH
    return list((torch.arange(count) % TRAIN_SAMPLES).split(SAMPLES_PER_MICRO_BATCH))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed_rounds(one_round: Any, seconds: float, counters: Any = None) -> dict[str, Any]:
    """One untimed warm-up round, then rounds back to back for ``seconds``: their latencies, wall and CPU;
    with ``counters`` (a function giving the bytes moved so far each way), the bytes per timed round."""
    setup_peak = _peak_mib()
    one_round(0)
    peak_before = _peak_mib()
    counted = counters() if counters else None
    latencies: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        one_round(len(latencies) + 1)
        latencies.append(time.perf_counter() - t)
    moved = (
        {way: (total - counted[way]) / len(latencies) for way, total in counters().items()}
        if counters and counted is not None and latencies
        else None
    )
    return {
        "bytes_per_round": moved,
        "rounds": len(latencies),
        "seconds": time.perf_counter() - started,
        "server_cpu_s": time.process_time() - cpu_started,
        "latencies": latencies,
        "peak_mib": _peak_mib(),
        "peak_growth_mib": _peak_mib() - peak_before,
        "warmup_growth_mib": peak_before - setup_peak,
    }


# --- the three servers, each in a process of its own ------------------------------------------------------


def _serve(
    kind: str, workers: int, params: int, per_worker: int, seconds: float, compression: Compression, results: Any
) -> None:
    try:
        torch.set_num_threads(1)
        target = {"project": _project_server, "naive": _naive_server, "raw": _raw_server}[kind]
        results.put(("result", target(workers, _model(params), per_worker, seconds, compression, results)))
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise


def _project_server(
    workers: int, module: torch.nn.Module, per_worker: int, seconds: float, compression: Compression, results: Any
) -> dict:
    settings = ServerSettings(round_timeout=TIMEOUT, max_frame=MAX_FRAME, compression=compression)
    server = ParameterServer(module, settings, lambda hello: None, SampleAccounting(TRAIN_SAMPLES))
    results.put(("listening", server.start()))
    try:
        if server.wait_for_workers(workers, 120) < workers:
            raise RuntimeError(f"only {server.wait_for_workers(workers, 0)} of {workers} simulated workers joined")
        micro_batches = _micro_batches(workers, per_worker)
        return _timed_rounds(
            lambda version: server.run_round(0, micro_batches, version),
            seconds,
            lambda: {"to_workers": server.bytes_to_workers, "from_workers": server.bytes_from_workers},
        )
    finally:
        server.stop("benchmark over")


def _naive_server(
    workers: int, module: torch.nn.Module, per_worker: int, seconds: float, compression: Compression, results: Any
) -> dict:
    flat = FlatState(module)
    decoder = GradientDecoder(compression, flat.num_params)
    welcome = {"compression": compression.to_meta()}
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    results.put(("listening", listener.getsockname()[:2]))
    conns: list[tuple[socket.socket, wire.FrameReader]] = []
    for worker_id in range(1, workers + 1):
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire.server_handshake(sock, None, TIMEOUT, MAX_FRAME, lambda hello: None, {"worker_id": worker_id, **welcome})
        conns.append((sock, wire.FrameReader(MAX_FRAME)))
    micro_batches = _micro_batches(workers, per_worker)
    assignments = itertools.count(1)

    def one_round(version: int) -> None:
        floats, ints = flat.buffers_flat()
        params = wire.encode(Message(MessageType.PARAMS, {"version": version}, [flat.params_flat(), floats, ints]))
        indices = torch.cat(micro_batches)
        sizes = torch.tensor([len(m) for m in micro_batches])
        share = len(indices) // workers
        for w, (sock, _) in enumerate(conns):
            meta = {"round": version + 1, "assignment": next(assignments), "epoch": 0, "divisor": per_worker}
            mine = [indices[w * share : (w + 1) * share], sizes[w * per_worker : (w + 1) * per_worker]]
            wire.send_parts(sock, params + wire.encode(Message(MessageType.ASSIGN, meta, mine)), TIMEOUT)
        grad_sum = torch.zeros(flat.num_params)
        float_sum = torch.zeros(flat.num_float_buffers)
        int_max = torch.full((flat.num_int_buffers,), -1, dtype=torch.int64)
        for sock, reader in conns:
            answer = reader.recv(sock, TIMEOUT)
            grads, floats, ints = decoder.decode(answer.meta, answer.tensors)
            weight = answer.meta["samples"] / len(indices)
            grad_sum.add_(grads, alpha=weight)
            float_sum.add_(floats, alpha=weight)
            torch.maximum(int_max, ints, out=int_max)
        flat.load_buffers(float_sum, int_max)

    try:
        return _timed_rounds(one_round, seconds)
    finally:
        for sock, _ in conns:
            with contextlib.suppress(wire.ProtocolError, OSError):  # best effort: the benchmark is over
                wire.send_message(sock, Message(MessageType.DONE, {"reason": "benchmark over"}), 2.0)
            sock.close()
        listener.close()


def _raw_server(
    workers: int, module: torch.nn.Module, per_worker: int, seconds: float, compression: Compression, results: Any
) -> dict:
    flat = FlatState(module)
    size, answer = _payload_bytes(flat), _answer_bytes(flat, compression)
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    results.put(("listening", listener.getsockname()[:2]))
    conns = []
    for _ in range(workers):
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(sock)
    payload, buffer = bytes(size), bytearray(answer)
    view = memoryview(buffer)

    def one_round(version: int) -> None:
        for conn in conns:
            conn.sendall(payload)
        for conn in conns:
            got = 0
            while got < answer:
                n = conn.recv_into(view[got:])
                if not n:
                    raise ConnectionError("an echo worker went away")
                got += n

    try:
        return _timed_rounds(one_round, seconds)
    finally:
        for conn in conns:
            conn.close()
        listener.close()


def _payload_bytes(flat: FlatState) -> int:
    """Bytes of one worker's parameters (or gradient) with the BatchNorm statistics: what goes each way."""
    return 4 * (flat.num_params + flat.num_float_buffers) + 8 * flat.num_int_buffers


def _answer_bytes(flat: FlatState, compression: Compression) -> int:
    """Bytes of one worker's encoded gradient with the BatchNorm statistics: what comes back."""
    _, gradient = GradientEncoder(compression, flat.num_params).encode(torch.zeros(flat.num_params))
    return sum(t.numel() * t.element_size() for t in gradient) + _payload_bytes(flat) - 4 * flat.num_params


# --- the load generator: simulated workers ----------------------------------------------------------------


def _protocol_worker(sock: socket.socket, index: int, sizes: tuple[int, int, int], mark: Any) -> None:
    """A simulated worker: the real handshake and frames, a gradient of the real sizes encoded as the server
    says (a fixed random one: topk selects among distinct magnitudes), no compute."""
    grads = torch.randn(sizes[0], generator=torch.Generator().manual_seed(index))
    floats, ints = torch.zeros(sizes[1]), torch.zeros(sizes[2], dtype=torch.int64)
    welcome = wire.client_handshake(sock, {"name": f"simulated-{index}"}, None, TIMEOUT, MAX_FRAME)
    encoder = GradientEncoder(Compression.from_meta(welcome.get("compression")), sizes[0])
    reader = wire.FrameReader(MAX_FRAME)
    assignments = 0
    while True:
        try:
            message = reader.recv(sock, timeout=TIMEOUT, idle_timeout=600)
        except wire.PeerClosed:
            return
        if message.type == MessageType.ASSIGN:
            assignments += 1
            if assignments == 2:  # the first one is the warm-up round's
                mark()
            encoding, gradient = encoder.encode(grads)
            meta = {
                "round": message.meta["round"],
                "assignment": message.meta["assignment"],
                "samples": len(message.tensors[0]),
                "loss_sum": 0.0,
                "correct": 0,
                **encoding,
            }
            wire.send_message(sock, Message(MessageType.GRADS, meta, [*gradient, floats, ints]), TIMEOUT)
        elif message.type == MessageType.DONE:
            return


def _echo_worker(sock: socket.socket, size: int, answer: int, mark: Any) -> None:
    """The raw floor's worker: read ``size`` bytes, send ``answer`` bytes back, until the server hangs up."""
    buffer, reply = bytearray(size), bytes(answer)
    view = memoryview(buffer)
    rounds = 0
    while True:
        got = 0
        while got < size:
            n = sock.recv_into(view[got:])
            if not n:
                return
            got += n
        rounds += 1
        if rounds == 2:
            mark()
        sock.sendall(reply)


def _simulated_worker(command: tuple, index: int, mark: Any, errors: list[str]) -> None:
    """One simulated worker thread: connect, then speak the protocol (or echo, for the raw floor)."""
    mode, host, port, _, sizes, payload = command
    try:
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
    except OSError as error:
        errors.append(f"simulated worker {index} could not connect: {error}")
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if mode == "echo":
            _echo_worker(sock, *payload, mark)
        else:
            _protocol_worker(sock, index, sizes, mark)
    except (wire.ProtocolError, OSError) as error:
        errors.append(f"simulated worker {index}: {error}")
    finally:
        sock.close()


def _load_process(commands: Any, results: Any) -> None:
    """Hosts simulated workers, one thread each, for one server after another; reports the process's CPU
    time from the first timed round (any of its workers receiving its second round) to the end."""
    torch.set_num_threads(1)
    while (command := commands.get()) is not None:
        started: list[float] = []
        lock = threading.Lock()

        def mark(started: list[float] = started, lock: threading.Lock = lock) -> None:
            with lock:
                if not started:
                    started.append(time.process_time())

        errors: list[str] = []
        threads = [
            threading.Thread(target=_simulated_worker, args=(command, i, mark, errors), daemon=True)
            for i in range(command[3])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.put(("cpu", time.process_time() - started[0] if started else 0.0, errors))


class LoadGenerator:
    """``processes`` long-lived processes that host the simulated workers for each server in turn."""

    def __init__(self, ctx: Any, workers: int, processes: int) -> None:
        self.counts = [len(range(p, workers, processes)) for p in range(processes)]
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in self.counts]
        self.processes = [ctx.Process(target=_load_process, args=(c, self.results), daemon=True) for c in self.commands]
        for process in self.processes:
            process.start()

    def attach(
        self, mode: str, address: tuple[str, int], sizes: tuple[int, int, int], payload: tuple[int, int]
    ) -> None:
        for commands, count in zip(self.commands, self.counts, strict=True):
            commands.put((mode, address[0], address[1], count, sizes, payload))

    def cpu_seconds(self) -> float:
        """The CPU time of all the load processes in the last window (waits for its workers to finish)."""
        total = 0.0
        for _ in self.processes:
            _, cpu, errors = self.results.get(timeout=120)
            if errors:
                raise RuntimeError("the load generator failed: " + "; ".join(errors[:3]))
            total += cpu
        return total

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def _window(
    ctx: Any, kind: str, load: LoadGenerator, args: argparse.Namespace, sizes: Any, payload: tuple[int, int]
) -> dict:
    """One timed window of one server against the load generator."""
    results = ctx.Queue()
    compression = Compression(args.compression, args.topk_ratio)
    server = ctx.Process(
        target=_serve,
        args=(kind, args.workers, args.params, args.micro_batches, args.seconds, compression, results),
        daemon=True,
    )
    server.start()
    try:
        what, value = results.get(timeout=120)
        if what == "error":
            raise RuntimeError(f"the {kind} server failed:\n{value}")
        load.attach("echo" if kind == "raw" else "protocol", value, sizes, payload)
        what, value = results.get(timeout=300 + 2 * args.seconds)
        if what == "error":
            raise RuntimeError(f"the {kind} server failed:\n{value}")
        value["workers_cpu_s"] = load.cpu_seconds()
        return value
    finally:
        server.join(timeout=30)
        if server.is_alive():
            server.terminate()
            server.join(timeout=5)


def _copy_bound(bytes_per_round: int, repeats: int = 20) -> float:
    """Rounds/s if a round cost nothing but copying its bytes once through memory (a hard upper bound)."""
    src, dst = torch.empty(bytes_per_round, dtype=torch.uint8), torch.empty(bytes_per_round, dtype=torch.uint8)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return repeats / (time.perf_counter() - start)


def _compression_text(compression: Compression) -> str:
    if compression.method == "topk":
        return f"topk ({compression.topk_ratio:g} of the entries, with error feedback)"
    return {"none": "float32 (no compression)", "bf16": "bfloat16", "fp16": "float16, scaled"}[compression.method]


def _per_round_ms(windows: list[dict], key: str) -> float:
    return round(statistics.median(w[key] / w["rounds"] * 1000 for w in windows), 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    flat = FlatState(_model(args.params))
    sizes = (flat.num_params, flat.num_float_buffers, flat.num_int_buffers)
    compression = Compression(args.compression, args.topk_ratio)
    payload = (_payload_bytes(flat), _answer_bytes(flat, compression))
    bytes_per_round = args.workers * sum(payload)  # parameters out and (encoded) gradients in, per worker
    processes = max(1, min(args.workers, args.processes))
    print(
        f"{args.workers} simulated workers in {processes} processes, {sizes[0]:,} parameters, gradients "
        f"{_compression_text(compression)} ({bytes_per_round / 2**20:.2f} MiB moved per round); servers "
        f"{', '.join(SERVERS)} in a balanced order, "
        f"{args.repeats} repeats of {args.seconds:g} s windows",
        flush=True,
    )
    # servers and load processes fork from a server process that has imported torch and this module once
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", __name__])
    windows: dict[str, list[dict]] = {kind: [] for kind in SERVERS}
    load = LoadGenerator(ctx, args.workers, processes)
    try:
        for repeat in range(args.repeats):
            order = [SERVERS[i] for i in balanced_order(len(SERVERS), repeat)]
            for kind in order:
                windows[kind].append(_window(ctx, kind, load, args, sizes, payload))
            rates = {kind: windows[kind][-1]["rounds"] / windows[kind][-1]["seconds"] for kind in SERVERS}
            print(
                f"  repeat {repeat + 1} ({' > '.join(order)}): "
                + ", ".join(f"{kind} {rate:,.1f}" for kind, rate in rates.items())
                + f" rounds/s; project / naive {rates['project'] / rates['naive']:.3f}",
                flush=True,
            )
    finally:
        load.close()

    def rate(w: dict) -> float:
        return w["rounds"] / w["seconds"]

    servers = {
        kind: {
            "rounds_per_s": round(statistics.median(rate(w) for w in ws), 1),
            "rounds_per_s_range": [round(min(rate(w) for w in ws), 1), round(max(rate(w) for w in ws), 1)],
            "server_cpu_ms_per_round": _per_round_ms(ws, "server_cpu_s"),
            "workers_cpu_ms_per_round": _per_round_ms(ws, "workers_cpu_s"),
            # CPU of server and load generator together, per second of wall time: how many cores they kept busy
            "cores_busy": round(
                statistics.median((w["server_cpu_s"] + w["workers_cpu_s"]) / w["seconds"] for w in ws), 2
            ),
        }
        for kind, ws in windows.items()
    }
    paired = {
        "vs_naive": paired_summary(
            [rate(p) / rate(n) for p, n in zip(windows["project"], windows["naive"], strict=True)]
        ),
        "vs_raw_floor": paired_summary(
            [rate(p) / rate(r) for p, r in zip(windows["project"], windows["raw"], strict=True)]
        ),
    }
    latencies = sorted(t for w in windows["project"] for t in w["latencies"])
    p99 = latencies[math.ceil(0.99 * len(latencies)) - 1] * 1000 if len(latencies) >= 100 else None
    bound = _copy_bound(bytes_per_round)
    result = {
        "rounds_per_s": servers["project"]["rounds_per_s"],
        "vs_naive": paired["vs_naive"]["median"],
        "paired_ratios": paired,
        "servers": servers,
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(p99, 3) if p99 is not None else None,
        "max_ms": round(latencies[-1] * 1000, 3),
        "peak_mib": round(max(w["peak_mib"] for w in windows["project"]), 1),
        "peak_growth_mib": round(max(w["peak_growth_mib"] for w in windows["project"]), 1),
        "warmup_growth_mib": round(max(w["warmup_growth_mib"] for w in windows["project"]), 1),
        "copy_bound_rounds_per_s": round(bound, 1),
        "mib_per_round": round(bytes_per_round / 2**20, 2),
        "compression": compression.to_meta(),
        # the project server's own counters: every frame to and from the workers, all of them together
        "bytes_per_round": {
            way: round(statistics.median(w["bytes_per_round"][way] for w in windows["project"]))
            for way in ("to_workers", "from_workers")
        },
        "workers": args.workers,
        "params": sizes[0],
        "rounds": len(latencies),
        "seconds_per_window": args.seconds,
        "repeats": args.repeats,
    }
    print("median over the repeats (range of rounds/s):")
    labels = {"project": "project server", "naive": "naive server (same protocol)", "raw": "raw-socket floor"}
    for kind, s in servers.items():
        print(
            f"  {labels[kind]:29s} {s['rounds_per_s']:9,.1f} rounds/s ({s['rounds_per_s_range'][0]:,.1f}-"
            f"{s['rounds_per_s_range'][1]:,.1f}); CPU per round: server {s['server_cpu_ms_per_round']} ms, "
            f"simulated workers {s['workers_cpu_ms_per_round']} ms; {s['cores_busy']} cores busy"
        )
    print(
        f"project server latency over {len(latencies)} rounds: p50 {result['p50_ms']} ms, "
        + (f"p99 {result['p99_ms']} ms" if p99 is not None else "p99 not reported (fewer than 100 rounds)")
        + f", max {result['max_ms']} ms; its process's peak memory {result['peak_mib']} MiB "
        f"(the warm-up round added {result['warmup_growth_mib']} MiB, the timed rounds {result['peak_growth_mib']} MiB)"
    )
    moved = result["bytes_per_round"]
    print(
        f"bytes per round on the wire (project server, all workers): {moved['to_workers']:,} to the workers, "
        f"{moved['from_workers']:,} from them"
    )
    print("  " + describe("project / naive", paired["vs_naive"]))
    print("  " + describe("project / raw floor", paired["vs_raw_floor"]))
    print(
        f"copying {result['mib_per_round']} MiB once through memory per round would allow {bound:,.0f} rounds/s "
        f"(an upper bound no server reaches)"
    )
    return result
