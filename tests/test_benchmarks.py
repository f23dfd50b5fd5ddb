"""The benchmark scripts run and report their figures as JSON on the last line (smoke tests: the speed goals
themselves are measured by running the scripts in full, never asserted here)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_script


@pytest.mark.parametrize(
    "args, keys",
    [
        (
            ["pipeline", "--batches", "8", "--repeats", "1"],
            {"pipeline_ratio", "project_s_per_epoch", "baseline_s_per_epoch"},
        ),
        (["strategies", "--steps", "2", "--repeats", "1"], {"ps_vs_ddp", "ps_round_ms", "samples_per_s"}),
        (
            ["server-load", "--workers", "2", "--seconds", "1", "--processes", "1"],
            {"rounds_per_s", "p50_ms", "p99_ms", "peak_mib", "server_cpu_ms_per_round", "workers_cpu_ms_per_round"},
        ),
    ],
)
def test_benchmark_reports_its_figures(tmp_path, args, keys):
    result = run_script("experiments/benchmark.py", args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert keys <= set(figures)
    numbers = [figures[k] for k in keys if isinstance(figures[k], (int, float))]
    assert numbers and all(n > 0 for n in numbers), figures
