"""Benchmarks. Each prints human-readable lines, then its figures as JSON on the last line.

    python experiments/benchmark.py pipeline [--batches N] [--repeats R] [--train-size N] [--warmup-batches N]
    python experiments/benchmark.py strategies [--steps N] [--repeats R] [--warmup-steps N] [--processes P]
    python experiments/benchmark.py server-load [--workers N] [--params P] [--seconds S] [--repeats R]
                                                [--compression none|bf16|fp16|topk] [--topk-ratio F]
    python experiments/benchmark.py ps-modes [--slowdown 1.0,2.0] [--staleness S] [--repeats R] [--train-size N]

pipeline: this project's Trainer pipeline against a minimal PyTorch loop doing the same work (one epoch,
its end and checkpoint included): what the framework costs. Goal: at most 1.10.

strategies: the parameter server against DDP with the same bare compute body (torch DDP, no_sync while
accumulating), a flat all-reduce, the same body with no communication at all, Lightning DDP (what the
framework adds) and a single process on every core: throughput, and the parameter server's paired ratios.

server-load: the real parameter server and a naive sequential server speaking the same protocol to the
same simulated workers (no model compute): rounds/s, latency, CPU per round of each server and of the
load generator, and the raw-socket floor of moving those bytes at all; with ``--compression``, every server
gets the workers' gradients so encoded (the raw floor moves the encoded size), and the bytes per round on the
wire are reported.

ps-modes: the parameter server's sync, ssp and async modes with local workers, one of them slowed down
(default: two workers, the second 2x slower): training samples/s of each and the paired ratios
async/sync and ssp/sync. Ideal for async: 1.5; ssp is paced by the slow worker once it is S rounds behind.

Every benchmark runs its contenders once per repeat, in a balanced order, and reports the median of the
paired ratios with their range and a confidence interval for the median (see experiments/bench/stats.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Only light imports up here: the processes that server-load and strategies spawn re-import this file as
# their __main__, and each benchmark imports its own module (Lightning, Hydra...) only when it runs.


def _runner(module: str) -> Any:
    return lambda args: importlib.import_module(f"experiments.bench.{module}").run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)

    p = sub.add_parser("pipeline", help="the project's training pipeline against a minimal PyTorch loop")
    p.add_argument("--batches", type=int, default=None, help="batches per measurement (default: one epoch)")
    p.add_argument("--repeats", type=int, default=10, help="paired measurements (default 10: a 98%% CI for the median)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--train-size", type=int, default=50_000, help="synthetic images, 10%% held out (CIFAR-10: 50,000)")
    p.add_argument("--warmup-batches", type=int, default=40, help="untimed batches of each contender first")
    p.set_defaults(run=_runner("pipeline"))

    s = sub.add_parser("strategies", help="parameter server, bare DDP, flat all-reduce, Lightning DDP, single")
    s.add_argument("--steps", type=int, default=150, help="timed optimizer steps per contender (after the warm-up)")
    s.add_argument("--warmup-steps", type=int, default=5, help="untimed optimizer steps first (start-up, kernels)")
    s.add_argument("--repeats", type=int, default=6, help="paired repeats (default 6: every contender in every place)")
    s.add_argument("--processes", type=int, default=2, help="DDP ranks and parameter-server workers")
    s.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / processes)")
    s.set_defaults(run=_runner("strategies"))

    load = sub.add_parser(
        "server-load", help="the real and a naive server against simulated workers on 127.0.0.1 (no compute)"
    )
    load.add_argument("--workers", type=int, default=8)
    load.add_argument("--params", type=int, default=0, help="model size (default: the improved CNN, 104,362)")
    load.add_argument("--seconds", type=float, default=10.0, help="length of each timed window")
    load.add_argument("--repeats", type=int, default=6, help="paired repeats of the three servers")
    load.add_argument("--micro-batches", type=int, default=4, help="micro-batches per worker per round")
    load.add_argument("--processes", type=int, default=4, help="processes hosting the simulated workers")
    load.add_argument(
        "--compression",
        choices=("none", "bf16", "fp16", "topk"),  # cifar_pl.parameter_server.compression.METHODS (no torch here)
        default="none",
        help="how the simulated workers encode their gradients (strategy.compression)",
    )
    load.add_argument("--topk-ratio", type=float, default=0.01, help="with --compression topk: the share sent")
    load.set_defaults(run=_runner("server_load"))

    m = sub.add_parser("ps-modes", help="sync, ssp and async parameter-server training with a slowed-down worker")
    m.add_argument("--slowdown", default="1.0,2.0", help="per local worker, how many times slower (default 1.0,2.0)")
    m.add_argument("--staleness", type=int, default=2, help="ssp's strategy.staleness (default 2)")
    m.add_argument("--repeats", type=int, default=3, help="paired repeats of the three modes (default 3)")
    m.add_argument("--train-size", type=int, default=4096, help="training samples: one epoch per measurement")
    m.add_argument("--batch-size", type=int, default=32, help="micro-batch size (default 32, as data=cifar10)")
    m.add_argument("--micro-batches", type=int, default=2, help="micro-batches per worker share (accumulation)")
    m.add_argument("--warmup-steps", type=int, default=4, help="untimed optimizer steps first")
    m.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: cores / workers)")
    m.set_defaults(run=_runner("ps_modes"))
    return parser


def main(argv: list[str] | None = None) -> None:
    from experiments.bench.stats import machine_load

    args = build_parser().parse_args(argv)
    print(f"machine at the start: {machine_load()}", flush=True)  # other work running shows here
    figures = args.run(args)
    print(f"machine at the end: {machine_load()}")
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
