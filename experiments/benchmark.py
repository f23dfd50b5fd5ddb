"""Benchmarks. Each prints human-readable lines, then its figures as JSON on the last line.

    python experiments/benchmark.py pipeline [--batches N] [--repeats R]
    python experiments/benchmark.py strategies [--steps N] [--repeats R] [--threads T]
    python experiments/benchmark.py server-load [--workers N] [--params P] [--seconds S]

pipeline: one training epoch's worth of steps of the real pipeline (this project's DataModule,
LightningModule, Trainer and callbacks from the default config, on CIFAR-sized synthetic data) against a
minimal hand-written PyTorch loop doing the same work (same model, batch size, accumulation, precision,
augmentation, clipping, optimizer and schedule, thread count), alternating in one process. The ratio
project / baseline is what the framework costs; the goal is at most 1.10.

strategies: the same number of optimizer steps (after a warm-up) with a single process, Lightning DDP
with 2 processes and the parameter server with 2 workers, through the project's Trainer set-up, the
same threads per process; throughput in samples/s, the ratio parameter server / DDP (goal: at least
0.95), and the server's median time per round: send, receive (the workers' compute included), average,
and its optimizer step between rounds.

server-load: the real parameter server against N simulated workers on 127.0.0.1 (real protocol and
gradient sizes, no model compute), rounds driven back to back for a bounded time: rounds/s, p50/p99 round
latency, the server's peak memory and its own CPU time per round, and two references measured in the same
run: a naive sequential server moving the same bytes over raw sockets, and how many rounds/s copying each
round's bytes once through memory would allow. Goal with 8 workers and the default model: 1,000 rounds/s.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from cifar_pl.callbacks import Throughput  # noqa: E402
from cifar_pl.data import ImageDataModule  # noqa: E402
from cifar_pl.models import build_network  # noqa: E402
from cifar_pl.runtime import configure_threads, quiet_third_party_noise, resolve_precision  # noqa: E402
from cifar_pl.training import build_trainer, instantiate_callbacks  # noqa: E402

CIFAR_SIZED = ["data=synthetic", "data.options.train_size=50000", "data.options.test_size=10000", "data.val_size=5000"]


def default_config(workdir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(workdir)
        cfg.paths.data_dir = str(workdir / "data")
        cfg.paths.output_dir = str(workdir / "run")
    return cfg


class _TrainEpochClock(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def time_project(cfg, datamodule: ImageDataModule, batches: int | None, run: int) -> float:
    """Seconds for one training epoch (or ``batches`` batches) of the real Trainer pipeline."""
    L.seed_everything(cfg.seed, verbose=False)
    model = instantiate(cfg.model, _convert_="all")
    clock = _TrainEpochClock()
    with open_dict(cfg):
        cfg.trainer.max_epochs = 1
        cfg.trainer.limit_val_batches = 0  # training steps only, like the baseline
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.limit_train_batches = batches or 1.0
        cfg.callbacks.model_summary = None
        cfg.paths.output_dir = str(Path(cfg.paths.root_dir) / f"run{run}")
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = build_trainer(cfg, [*instantiate_callbacks(cfg.callbacks), clock], logger)
    trainer.fit(model, datamodule=datamodule)
    return clock.seconds


def time_baseline(cfg, datamodule: ImageDataModule, batches: int | None, seed: int) -> float:
    """The same work as a minimal loop: uint8 data, batched crop/flip, bf16 autocast, accumulation,
    clipping, AdamW + OneCycleLR. No framework, no logging, no DataLoader."""
    torch.manual_seed(seed)
    hp, data = cfg.model, cfg.data
    model = build_network(hp.arch, hp.in_channels, hp.num_classes, hp.dropout).train()
    images, labels = datamodule.train_set.images, datamodule.train_set.labels
    n, batch, accumulate = len(labels), data.batch_size, cfg.trainer.accumulate_grad_batches
    total_batches = batches or math.ceil(n / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=hp.lr, total_steps=math.ceil(total_batches / accumulate), pct_start=hp.pct_start
    )
    precision = resolve_precision(cfg.trainer.precision, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    order = torch.randperm(n)
    start = time.perf_counter()
    for i in range(total_batches):
        idx = order[i * batch : (i + 1) * batch]
        x = datamodule.transform(images[idx], idx, epoch=0, train=True)
        with autocast:
            loss = F.cross_entropy(model(x), labels[idx]) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0 or i + 1 == total_batches:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    return time.perf_counter() - start


def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    quiet_third_party_noise()
    threads = configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = default_config(workdir, [*CIFAR_SIZED, "trainer.accelerator=cpu"])
        datamodule: ImageDataModule = instantiate(cfg.data, _convert_="all")
        datamodule.setup()
        batches = args.batches or math.ceil(len(datamodule.train_set) / cfg.data.batch_size)
        print(
            f"{batches} batches of {cfg.data.batch_size} per measurement, {threads} threads, "
            f"precision {resolve_precision(cfg.trainer.precision, 'cpu')}, {args.repeats} alternating repeats"
        )
        # warm up both contenders (oneDNN kernels, first-run code paths) before anything is timed
        time_baseline(cfg, datamodule, 40, seed=0)
        time_project(cfg.copy(), datamodule, 40, run=-1)
        project, baseline = [], []
        for r in range(args.repeats):  # ABBA order: neither contender always runs first
            if r % 2 == 0:
                project.append(time_project(cfg.copy(), datamodule, args.batches, r))
            baseline.append(time_baseline(cfg, datamodule, args.batches, seed=r))
            if r % 2 == 1:
                project.append(time_project(cfg.copy(), datamodule, args.batches, r))
            print(
                f"  repeat {r + 1}: project {project[-1]:.2f} s, baseline {baseline[-1]:.2f} s, "
                f"ratio {project[-1] / baseline[-1]:.3f}"
            )
    scale = math.ceil(len(datamodule.train_set) / cfg.data.batch_size) / batches
    project_s, baseline_s = statistics.median(project) * scale, statistics.median(baseline) * scale
    # each project run against the baseline run beside it: cancels the machine's drift between repeats
    ratio = statistics.median(p / b for p, b in zip(project, baseline, strict=True))
    result = {
        "pipeline_ratio": round(ratio, 4),
        "project_s_per_epoch": round(project_s, 3),
        "baseline_s_per_epoch": round(baseline_s, 3),
        "batches_per_measurement": batches,
        "repeats": args.repeats,
        "threads": threads,
    }
    print(
        f"project {project_s:.2f} s/epoch, minimal loop {baseline_s:.2f} s/epoch (medians); "
        f"median paired ratio {result['pipeline_ratio']:.3f}"
    )
    return result


def time_strategy(workdir: Path, name: str, overrides: list[str], steps: int, threads: int) -> dict[str, Any]:
    """Train ``steps`` optimizer steps with one strategy through the project's own Trainer set-up and
    return its steady-state throughput (and, for the parameter server, the server's per-round times)."""
    cfg = default_config(workdir, [*STRATEGY_DATA, f"num_threads={threads}", *overrides])
    with open_dict(cfg):
        cfg.trainer.max_steps = steps + WARMUP_STEPS
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_progress_bar = False
        cfg.paths.output_dir = str(workdir / name)
    L.seed_everything(cfg.seed, verbose=False)
    configure_threads(threads)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    meter = Throughput(warmup_steps=WARMUP_STEPS)
    trainer = build_trainer(cfg, [*instantiate_callbacks(cfg.callbacks), meter], False)
    trainer.fit(model, datamodule=datamodule)
    processes = trainer.world_size if trainer.world_size > 1 else getattr(trainer.strategy, "workers", 1)
    samples_per_step = processes * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    result = {
        "samples_per_s": meter.steps_per_second * samples_per_step,
        "steps": meter.steps,
        "samples_per_step": samples_per_step,
    }
    if hasattr(trainer.strategy, "round_ms"):
        result["round_ms"] = trainer.strategy.round_ms()
    print(
        f"  {name:16s} {result['samples_per_s']:8.1f} samples/s ({meter.steps} steps in {meter.seconds:.1f} s, "
        f"{samples_per_step} samples per step)",
        flush=True,
    )
    return result


STRATEGY_DATA = [
    "data=synthetic",
    "data.options.train_size=20000",
    "data.options.test_size=1000",
    "data.val_size=1000",
    "trainer.accelerator=cpu",
    "callbacks.model_checkpoint=null",
    "callbacks.last_checkpoint=null",
    "callbacks.recovery_checkpoint=null",
    "+trainer.enable_checkpointing=false",
    "test_after_fit=false",
]
WARMUP_STEPS = 5


def strategies(args: argparse.Namespace) -> dict[str, Any]:
    quiet_third_party_noise()
    threads = args.threads
    contenders = {
        "single": [],
        "ddp_2": ["strategy=ddp", "trainer.devices=2", f"strategy.threads_per_process={threads}"],
        "ps_2_workers": ["strategy=parameter_server", "strategy.workers=2", f"strategy.worker_threads={threads}"],
    }
    print(
        f"{args.steps} optimizer steps each after {WARMUP_STEPS} warm-up steps, {threads} thread(s) per process, "
        f"{args.repeats} alternating repeats"
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
            for name in order:
                runs[name].append(time_strategy(Path(tmp), f"{name}_{repeat}", contenders[name], args.steps, threads))
    throughput = {name: statistics.median(r["samples_per_s"] for r in results) for name, results in runs.items()}
    round_ms = {
        key: round(statistics.median(r["round_ms"][key] for r in runs["ps_2_workers"]), 3)
        for key in runs["ps_2_workers"][0]["round_ms"]
    }
    result = {
        "ps_vs_ddp": round(throughput["ps_2_workers"] / throughput["ddp_2"], 4),
        "ps_round_ms": round_ms,
        "samples_per_s": {name: round(v, 1) for name, v in throughput.items()},
        "ddp_vs_single": round(throughput["ddp_2"] / throughput["single"], 4),
        "steps": args.steps,
        "threads_per_process": threads,
        "repeats": args.repeats,
    }
    print(f"parameter server / DDP throughput: {result['ps_vs_ddp']:.3f}; server per round (ms, median): {round_ms}")
    return result


def _simulated_workers(
    host: str, port: int, count: int, sizes: tuple[int, int, int], max_frame: int, ready: Any
) -> None:
    """``count`` workers in one process: real connections, handshake and frames, gradients of the real sizes,
    no model compute (each answers an assignment at once with a preallocated gradient). When they are done,
    puts ("cpu", seconds) on ``ready``: the process's CPU time from the first timed round on."""
    import socket
    import threading

    from cifar_pl.parameter_server import protocol as wire

    torch.set_num_threads(1)
    grads, floats, ints = torch.zeros(sizes[0]), torch.zeros(sizes[1]), torch.zeros(sizes[2], dtype=torch.int64)
    cpu_started: list[float] = []
    lock = threading.Lock()

    def serve(i: int) -> None:
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire.client_handshake(sock, {"name": f"simulated-{i}"}, None, 30, max_frame)
        ready.put(i)
        reader = wire.FrameReader(max_frame)
        try:
            while True:
                message = reader.recv(sock, timeout=60, idle_timeout=600)
                if message.type == wire.MessageType.ASSIGN:
                    if not cpu_started and message.meta["round"] > 1:  # round 1 is the warm-up
                        with lock:
                            cpu_started[:] = cpu_started or [time.process_time()]
                    meta = {
                        "round": message.meta["round"],
                        "assignment": message.meta["assignment"],
                        "samples": len(message.tensors[0]),
                        "loss_sum": 0.0,
                        "correct": 0,
                    }
                    wire.send_message(sock, wire.Message(wire.MessageType.GRADS, meta, [grads, floats, ints]), 60)
                elif message.type == wire.MessageType.DONE:
                    return
        except wire.ProtocolError:
            return
        finally:
            sock.close()

    threads = [threading.Thread(target=serve, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ready.put(("cpu", time.process_time() - cpu_started[0] if cpu_started else 0.0))


class _FlatModel(torch.nn.Module):
    """A model of ``params`` parameters in a few tensors (no compute happens in this benchmark)."""

    def __init__(self, params: int) -> None:
        super().__init__()
        chunk = max(1, params // 8)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(chunk)) for _ in range(params // chunk)])


def _copy_bound(bytes_per_round: int, repeats: int = 20) -> float:
    """Rounds/s if a round cost nothing but copying its bytes once through memory (a hard upper bound)."""
    src, dst = torch.empty(bytes_per_round, dtype=torch.uint8), torch.empty(bytes_per_round, dtype=torch.uint8)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return repeats / (time.perf_counter() - start)


def _echo_workers(host: str, port: int, count: int, size: int) -> None:
    """The naive baseline's workers: read ``size`` bytes, send ``size`` bytes back, forever."""
    import socket
    import threading

    def serve() -> None:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer, reply = bytearray(size), bytes(size)
        view = memoryview(buffer)
        try:
            while True:
                got = 0
                while got < size:
                    n = sock.recv_into(view[got:])
                    if not n:
                        return
                    got += n
                sock.sendall(reply)
        except OSError:
            return

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _naive_rounds_per_s(workers: int, size: int, processes: int, seconds: float) -> float:
    """A naive sequential server moving the same bytes: each round, send every worker ``size`` bytes (its
    parameters), then read ``size`` bytes back from each (its gradient); no protocol, no checks, no sums."""
    import multiprocessing as mp
    import socket

    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    host, port = listener.getsockname()[:2]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_echo_workers, args=(host, port, n, size), daemon=True)
        for n in (len(range(p, workers, processes)) for p in range(processes))
    ]
    for proc in procs:
        proc.start()
    conns = [listener.accept()[0] for _ in range(workers)]
    payload, buffer = bytes(size), bytearray(size)
    view = memoryview(buffer)
    rounds, deadline = 0, time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for conn in conns:
            conn.sendall(payload)
        for conn in conns:
            got = 0
            while got < size:
                got += conn.recv_into(view[got:])
        rounds += 1
    elapsed = time.perf_counter() - start
    for conn in conns:
        conn.close()
    listener.close()
    for proc in procs:
        proc.join(timeout=10)
    return rounds / elapsed


def server_load(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing as mp
    import resource

    from cifar_pl.parameter_server.accounting import SampleAccounting
    from cifar_pl.parameter_server.server import ParameterServer, ServerSettings

    quiet_third_party_noise()
    torch.set_num_threads(1)
    module = _FlatModel(args.params) if args.params else build_network("cnn", 3, 10)
    settings = ServerSettings(round_timeout=60.0, max_frame=1 << 30)
    server = ParameterServer(module, settings, lambda hello: None, SampleAccounting(1 << 20))
    host, port = server.start()
    flat = server.flat
    sizes = (flat.num_params, flat.num_float_buffers, flat.num_int_buffers)
    processes = max(1, min(args.workers, args.processes))
    ctx, ready = mp.get_context("spawn"), None
    ready = ctx.Queue()
    procs = [
        ctx.Process(target=_simulated_workers, args=(host, port, n, sizes, settings.max_frame, ready), daemon=True)
        for n in (len(range(p, args.workers, processes)) for p in range(processes))
    ]
    for proc in procs:
        proc.start()
    for _ in range(args.workers):
        ready.get(timeout=120)
    server.wait_for_workers(args.workers, 60)
    # one round: every worker gets K micro-batches of 32 sample indices (never images)
    micro_batches = list(torch.arange(args.workers * args.micro_batches * 32).split(32))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # one warm-up round, not timed: the first one grows every connection's buffers and TCP windows
    server.run_round(epoch=0, micro_batches=micro_batches, version=0)
    latencies, version, deadline = [], 1, time.perf_counter() + args.seconds
    started, cpu_started = time.perf_counter(), time.thread_time()  # this thread runs every round
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        server.run_round(epoch=version // 1000, micro_batches=micro_batches, version=version)
        latencies.append(time.perf_counter() - t)
        version += 1  # new parameters every round, as after every optimizer step
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    server.stop("benchmark over")
    workers_cpu = sum(ready.get(timeout=60)[1] for _ in procs)
    for proc in procs:
        proc.join(timeout=10)
    latencies.sort()
    param_bytes = 4 * (sizes[0] + sizes[1]) + 8 * sizes[2]
    bytes_per_round = 2 * args.workers * param_bytes  # parameters out and gradients in, per worker
    bound = _copy_bound(bytes_per_round)
    naive = _naive_rounds_per_s(args.workers, param_bytes, processes, min(args.seconds, 5.0))
    result = {
        "rounds_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3),
        "peak_mib": round(peak_mib, 1),
        "peak_growth_mib": round(peak_mib - rss_before / 1024, 1),
        "server_cpu_ms_per_round": round(cpu / len(latencies) * 1000, 3),
        "workers_cpu_ms_per_round": round(workers_cpu / len(latencies) * 1000, 3),
        "workers": args.workers,
        "params": sizes[0],
        "mb_per_round": round(bytes_per_round / 2**20, 2),
        "copy_bound_rounds_per_s": round(bound, 1),
        "naive_socket_rounds_per_s": round(naive, 1),
        "vs_naive": round(len(latencies) / elapsed / naive, 3),
        "rounds": len(latencies),
        "seconds": round(elapsed, 2),
    }
    print(
        f"{args.workers} simulated workers, {sizes[0]:,} parameters: {result['rounds_per_s']} rounds/s, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, peak {result['peak_mib']} MiB, server CPU "
        f"{result['server_cpu_ms_per_round']} ms per round "
        f"(simulated workers: {result['workers_cpu_ms_per_round']} ms); "
        f"copying {result['mb_per_round']} MB once per round would allow {bound:.0f} rounds/s; a naive sequential "
        f"server moving the same bytes over raw sockets does {naive:.0f} rounds/s"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser("pipeline", help="the project's training pipeline against a minimal PyTorch loop")
    p.add_argument("--batches", type=int, default=None, help="batches per measurement (default: one epoch)")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements of each (medians are kept)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(run=pipeline)
    s = sub.add_parser(
        "strategies", help="single process, DDP with 2 processes and the parameter server with 2 workers"
    )
    s.add_argument("--steps", type=int, default=60, help="timed optimizer steps per strategy (after the warm-up)")
    s.add_argument("--repeats", type=int, default=3, help="alternating runs of each (medians are kept)")
    s.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1: 2 processes on 2 cores)")
    s.set_defaults(run=strategies)
    load = sub.add_parser(
        "server-load", help="the real server against simulated workers on 127.0.0.1 (no model compute)"
    )
    load.add_argument("--workers", type=int, default=8)
    load.add_argument("--params", type=int, default=0, help="model size (default: the improved CNN, 104,362)")
    load.add_argument("--seconds", type=float, default=10.0, help="how long to drive rounds")
    load.add_argument("--micro-batches", type=int, default=4, help="micro-batches per worker per round")
    load.add_argument("--processes", type=int, default=4, help="processes hosting the simulated workers")
    load.set_defaults(run=server_load)
    args = parser.parse_args(argv)
    print(json.dumps(args.run(args)))


if __name__ == "__main__":
    main()
