"""The benchmark scripts run and report every figure as JSON on the last line (smoke tests at tiny sizes: the
speed goals themselves are measured by running the scripts in full, never asserted here), and the
statistics they report are computed right."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from hydra.utils import instantiate

import cifar_pl.checkpointing
from cifar_pl.files import write_atomically
from experiments.bench.common import default_config, synthetic_data
from experiments.bench.pipeline import TrainClock, time_project
from experiments.bench.stats import balanced_order, median_ci, paired_summary
from tests.helpers import REPO, project_processes

PAIRED_KEYS = {"median", "min", "max", "ci", "ci_coverage", "values"}


# tiny sizes: every code path and every figure, in seconds
SMOKE_ARGS = {
    "pipeline": ["--batches", "2", "--repeats", "2", "--train-size", "400", "--warmup-batches", "1"],
    "strategies": ["--steps", "2", "--warmup-steps", "1", "--repeats", "1"],
    # topk: the gradients the simulated workers send are encoded, and every server decodes them
    "server-load": [
        "--workers",
        "2",
        "--seconds",
        "0.5",
        "--processes",
        "1",
        "--repeats",
        "1",
        "--compression",
        "topk",
    ],
    "ps-modes": ["--repeats", "1", "--train-size", "512", "--batch-size", "16", "--warmup-steps", "1"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """The four benchmarks at tiny sizes, run at the same time: on 2 cores most of each run is one process
    starting (imports) or waiting on another, so together they take little longer than the longest alone.
    Returns each one's exit status, stdout and stderr, once every process they started is gone."""
    before = project_processes()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    runs = {}
    for name, args in SMOKE_ARGS.items():
        folder = tmp_path_factory.mktemp(name)
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            command = [sys.executable, str(REPO / "experiments" / "benchmark.py"), name, *args]
            # a session of its own: on a timeout the benchmark is killed with everything it started
            process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=err, start_new_session=True)
            runs[name] = (process, folder)
    results = {}
    deadline = time.monotonic() + 600
    try:
        for name, (process, folder) in runs.items():
            status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            results[name] = (status, (folder / "stdout").read_text(), (folder / "stderr").read_text())
    finally:
        for process, _ in runs.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    settle = time.monotonic() + 10  # the processes each benchmark started must end with it
    while (left := project_processes() - before) and time.monotonic() < settle:
        time.sleep(0.1)
    assert not left, f"processes left running after the benchmarks: {sorted(left)}"
    return results


def figures_of(smoke_runs, name: str) -> dict:
    status, stdout, stderr = smoke_runs[name]
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def check_paired(summary: dict, repeats: int) -> None:
    """A paired-ratio summary: its values, their median, range and a confidence interval inside the range."""
    assert set(summary) == PAIRED_KEYS
    values = summary["values"]
    assert len(values) == repeats and all(v > 0 for v in values)
    assert summary["median"] == pytest.approx(statistics.median(values), abs=1e-4)
    assert (summary["min"], summary["max"]) == (min(values), max(values))
    low, high = summary["ci"]
    assert summary["min"] <= low <= summary["median"] <= high <= summary["max"]
    assert 0 <= summary["ci_coverage"] < 1


@pytest.mark.slow
def test_pipeline_benchmark(smoke_runs):
    figures = figures_of(smoke_runs, "pipeline")
    assert set(figures) == {
        "pipeline_ratio",
        "paired_ratios",
        "goal",
        "goal_verdict",
        "project_s",
        "baseline_s",
        "batches_per_measurement",
        "full_epoch",
        "repeats",
        "threads",
    }
    check_paired(figures["paired_ratios"], repeats=2)
    assert figures["pipeline_ratio"] == figures["paired_ratios"]["median"]
    assert figures["goal"] == 1.10
    assert figures["goal_verdict"] in {"met", "not met", "undecided at this precision"}
    assert figures["project_s"] > 0 and figures["baseline_s"] > 0
    assert (figures["batches_per_measurement"], figures["full_epoch"], figures["repeats"]) == (2, False, 2)
    assert figures["threads"] >= 1


@pytest.mark.slow
def test_strategies_benchmark(smoke_runs):
    figures = figures_of(smoke_runs, "strategies")
    assert set(figures) == {
        "samples_per_s",
        "ps_vs_ddp_bare",
        "ps_vs_ddp_lightning",
        "ps_vs_allreduce",
        "paired_ratios",
    }
    throughput = figures["samples_per_s"]
    contenders = {"parameter_server", "ddp_bare", "allreduce", "compute_only", "ddp_lightning", "single"}
    assert set(throughput) == contenders and all(v > 0 for v in throughput.values())
    paired = figures["paired_ratios"]
    assert set(paired) == {
        "ps_vs_ddp_bare",
        "ps_vs_allreduce",
        "ps_vs_ddp_lightning",
        "ps_vs_compute_only",
        "ddp_lightning_vs_ddp_bare",
        "ps_vs_single",
    }
    for name, summary in paired.items():
        check_paired(summary, repeats=1)
        numerator, denominator = name.replace("ps_", "parameter_server_").split("_vs_")
        # one repeat: the paired ratio is the ratio of that repeat's throughputs; the throughputs are reported
        # to 0.1 samples/s and the ratio to 4 decimals, so both roundings widen the tolerance
        top, bottom = throughput[numerator], throughput[denominator]
        ratio = top / bottom
        assert abs(summary["median"] - ratio) <= ratio * (0.05 / top + 0.05 / bottom + 1e-4) + 5e-5
    for key in ("ps_vs_ddp_bare", "ps_vs_ddp_lightning", "ps_vs_allreduce"):
        assert figures[key] == paired[key]["median"]


@pytest.mark.slow
def test_server_load_benchmark(smoke_runs):
    figures = figures_of(smoke_runs, "server-load")
    assert set(figures) == {
        "rounds_per_s",
        "vs_naive",
        "paired_ratios",
        "servers",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "peak_mib",
        "peak_growth_mib",
        "warmup_growth_mib",
        "copy_bound_rounds_per_s",
        "mib_per_round",
        "compression",
        "bytes_per_round",
        "workers",
        "params",
        "rounds",
        "seconds_per_window",
        "repeats",
    }
    servers = figures["servers"]
    assert set(servers) == {"project", "naive", "raw"}
    for figures_of_one in servers.values():
        assert set(figures_of_one) == {
            "rounds_per_s",
            "rounds_per_s_range",
            "server_cpu_ms_per_round",
            "workers_cpu_ms_per_round",
            "cores_busy",
        }
        low, high = figures_of_one["rounds_per_s_range"]
        assert 0 < low <= figures_of_one["rounds_per_s"] <= high
        # every server and the load generator did measurable work in every round
        assert figures_of_one["server_cpu_ms_per_round"] > 0 and figures_of_one["workers_cpu_ms_per_round"] > 0
        assert figures_of_one["cores_busy"] > 0
    assert set(figures["paired_ratios"]) == {"vs_naive", "vs_raw_floor"}
    for summary in figures["paired_ratios"].values():
        check_paired(summary, repeats=1)
    assert figures["vs_naive"] == figures["paired_ratios"]["vs_naive"]["median"]
    project, naive = servers["project"]["rounds_per_s"], servers["naive"]["rounds_per_s"]  # to 0.1 rounds/s
    ratio = project / naive  # the ratio is reported to 4 decimals, hence the 5e-5
    assert abs(figures["vs_naive"] - ratio) <= ratio * (0.05 / project + 0.05 / naive + 1e-4) + 5e-5
    assert figures["rounds_per_s"] == servers["project"]["rounds_per_s"]
    assert figures["rounds"] > 0
    assert 0 < figures["p50_ms"] <= figures["max_ms"]
    if figures["rounds"] >= 100:
        assert figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    else:  # a 99th percentile of fewer than 100 rounds would only be their maximum
        assert figures["p99_ms"] is None
    assert figures["peak_mib"] > 0 and figures["peak_growth_mib"] >= 0 and figures["warmup_growth_mib"] >= 0
    # 2 workers x (104,362 parameters + 448 BatchNorm statistics in float32 + 3 counters in int64) out; back,
    # topk's 1,044 int32 indices and float32 values with the same statistics
    statistics_bytes = 4 * 448 + 24
    assert figures["params"] == 104_362 and figures["mib_per_round"] == round(
        2 * (4 * 104_362 + statistics_bytes + 8 * 1_044 + statistics_bytes) / 2**20, 2
    )
    assert figures["compression"] == {"method": "topk", "topk_ratio": 0.01}
    # on the wire, frames add headers and meta (under 1 KiB a worker) to these, and each worker's assignment
    # (4 micro-batches of 32 int64 sample indices, and their 4 sizes)
    moved = figures["bytes_per_round"]
    assert 0 < moved["to_workers"] - 2 * (4 * 104_362 + statistics_bytes + 8 * (4 * 32 + 4)) < 2 * 1024
    assert 0 < moved["from_workers"] - 2 * (8 * 1_044 + statistics_bytes) < 2 * 1024
    assert figures["copy_bound_rounds_per_s"] > 0
    assert (figures["workers"], figures["seconds_per_window"], figures["repeats"]) == (2, 0.5, 1)


# --- the statistics every benchmark reports ----------------------------------------------------------------


@pytest.mark.slow
def test_ps_modes_benchmark(smoke_runs):
    """sync, ssp and async with the second worker 2x slower: the figures of each mode, the paired ratios, and
    the staleness each mode had (none in sync)."""
    figures = figures_of(smoke_runs, "ps-modes")
    assert set(figures["samples_per_s"]) == {"sync", "ssp", "async"}
    assert all(v > 0 for v in figures["samples_per_s"].values())
    for ratio in ("async_vs_sync", "ssp_vs_sync"):
        check_paired(figures["paired_ratios"][ratio], repeats=1)
        assert figures[ratio] == figures["paired_ratios"][ratio]["median"]
    assert figures["staleness_mean"]["sync"] == 0 and figures["staleness_mean"]["async"] > 0
    assert "ssp: " in smoke_runs["ps-modes"][1] and "async / sync: median" in smoke_runs["ps-modes"][1]


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_balanced_order_puts_every_contender_in_every_place_and_after_every_other(n):
    rows = [balanced_order(n, r) for r in range(n if n % 2 == 0 else 2 * n)]
    assert all(sorted(row) == list(range(n)) for row in rows)
    places = Counter((place, c) for row in rows for place, c in enumerate(row))
    assert len(set(places.values())) == 1 and len(places) == n * n  # every contender in every place equally often
    neighbours = Counter(pair for row in rows for pair in pairwise(row))
    assert len(set(neighbours.values())) == 1 and len(neighbours) == n * (n - 1)
    assert [balanced_order(2, r) for r in range(4)] == [[0, 1], [1, 0], [0, 1], [1, 0]]  # AB BA AB BA


def test_median_confidence_interval_from_order_statistics():
    values = [1.17, 1.08, 1.10, 1.12, 1.09, 1.11, 1.15, 1.10, 1.13]
    # 9 values: the 2nd smallest and 2nd largest cover the median with 1 - 2 * (1 + 9) / 512 = 96.1%
    assert median_ci(values) == (1.09, 1.15, pytest.approx(1 - 20 / 512))
    # 12 values: the 3rd from each end, 1 - 2 * (1 + 12 + 66) / 4096 = 96.1%
    low, high, coverage = median_ci(list(range(12)))
    assert (low, high, coverage) == (2, 9, pytest.approx(1 - 158 / 4096))
    # too few values for 95%: the whole range, with the coverage it has
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0, pytest.approx(0.75))
    assert median_ci([2.0]) == (2.0, 2.0, 0.0)
    summary = paired_summary(values)
    assert summary == {
        "median": 1.11,
        "min": 1.08,
        "max": 1.17,
        "ci": [1.09, 1.15],
        "ci_coverage": 0.961,
        "values": values,
    }


def test_pipeline_clock_includes_the_epoch_end_checkpoint(tmp_path, monkeypatch):
    """The project side of the pipeline benchmark is timed through the end of the epoch, last.ckpt included."""
    saves: list[tuple[str, float]] = []

    def recorded_write(path, data):
        write_atomically(path, data)
        saves.append((Path(path).name, time.perf_counter()))

    monkeypatch.setattr(cifar_pl.checkpointing, "write_atomically", recorded_write)
    cfg = default_config(tmp_path, [*synthetic_data(256, 64), "trainer.accelerator=cpu"])
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    clock = TrainClock()
    seconds = time_project(cfg, datamodule, batches=2, run="clock", clock=clock)
    assert [name for name, _ in saves] == ["last.ckpt"]
    assert clock.started < saves[0][1] <= clock.stopped  # the save finished inside the timed window
    assert seconds == clock.stopped - clock.started
