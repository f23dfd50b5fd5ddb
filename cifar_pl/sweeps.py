"""Sweep results: every job's ``metrics.json`` and overrides collected into ``results.csv``/``results.md``,
with plots of training time and test accuracy against epochs; a sweep over seeds also gets
``results_by_setting.csv``/``.md``: mean, lowest and highest result of each setting over its seeds.

Runs by itself (``python experiments/summarize.py SWEEP_DIR``) and at the end of every Hydra multirun
(``SummarizeSweep``, registered in ``conf/hydra/default.yaml``). A job that failed, or died before writing
its metrics, is a row saying so, never a crash of the summary.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import numpy as np
import yaml
from hydra.experimental.callback import Callback
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

log = logging.getLogger(__name__)

EPOCHS_KEY = "trainer.max_epochs"
SEED_KEY = "seed"
# the per-setting summary of a sweep over seeds: (column, metric, statistic)
SETTING_COLUMNS = [
    ("test/acc mean", "test/acc", "mean"),
    ("test/acc min", "test/acc", "min"),
    ("test/acc max", "test/acc", "max"),
    ("best_val/acc mean", "best_val/acc", "mean"),
    ("seconds_per_epoch mean", "seconds_per_epoch", "mean"),
]
RESULT_COLUMNS = [
    "status",
    "epochs",
    "train_seconds",
    "seconds_per_epoch",
    "best_val/acc",
    "test/acc",
    "params",
    "error",
]
# columns a table gets when any of its jobs reports them: where a job was tested with mirror images averaged
# in (tta), whether each was and every job's single-view accuracy; parameter-server runs' throughput and staleness
OPTIONAL_COLUMNS = ["tta", "test/acc_single_view", "samples_per_s", "staleness_mean"]


@dataclass
class Job:
    """One job of a sweep: its directory, the overrides it ran with, and what it reported."""

    name: str
    overrides: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.metrics.get("status", "failed"))

    @property
    def number(self) -> str:
        """The job's number in the sweep (its folder is ``<number>_<overrides>``)."""
        return self.name.split("_", 1)[0]

    def row(self, swept: list[str], columns: list[str] = RESULT_COLUMNS) -> dict[str, Any]:
        row: dict[str, Any] = {"job": self.number, **{key: self.overrides.get(key, "") for key in swept}}
        for column in columns:
            row[column] = self.metrics.get(column, "")
        if self.metrics.get("tta") is False and "test/acc_single_view" in columns:
            row["test/acc_single_view"] = self.metrics.get("test/acc", "")  # it was tested one view
        row["status"] = self.status
        return row


@dataclass
class SweepSummary:
    jobs: list[Job]
    swept: list[str]
    files: list[Path]

    @property
    def failed(self) -> list[Job]:
        return [job for job in self.jobs if job.status != "completed"]


def _job_number(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (1 << 30, path.name)


def _read_overrides(job_dir: Path) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def _last_error_line(job_dir: Path) -> str:
    for log_file in sorted(job_dir.glob("*.log")):
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line or "Error" in line]
        if errors or lines:
            return (errors or lines)[-1][-300:]
    return ""


def load_job(job_dir: Path) -> Job:
    """A job's overrides and metrics; a missing or unreadable ``metrics.json`` becomes a failure reason."""
    try:
        overrides = _read_overrides(job_dir)
    except (OSError, yaml.YAMLError) as error:
        overrides = {}
        log.warning("%s: cannot read its overrides (%s)", job_dir, error)
    try:
        metrics = json.loads((job_dir / "metrics.json").read_text())
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        reason = _last_error_line(job_dir)
        metrics = {
            "status": "failed",
            "error": "no metrics.json (the job stopped before training)" + (f": {reason}" if reason else ""),
        }
    except (OSError, ValueError) as error:
        metrics = {"status": "failed", "error": f"unreadable metrics.json: {error}"}
    if metrics.get("status") == "running":  # killed without a chance to record it
        metrics = {**metrics, "status": "failed", "error": metrics.get("error") or "the job stopped while running"}
    return Job(job_dir.name, overrides, metrics)


def find_jobs(sweep_dir: Path) -> list[Job]:
    job_dirs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return [load_job(p) for p in sorted(job_dirs, key=_job_number)]


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs: what the sweep varied."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def _format(value: Any, column: str) -> str:
    if isinstance(value, float):
        if "/acc" in column.split(" ")[0]:  # "test/acc", "test/acc mean", "test/acc_single_view", ...
            return f"{value:.4f}"
        return f"{value:.1f}" if "seconds" in column else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _write_table(rows: list[dict[str, Any]], columns: list[str], sweep_dir: Path, stem: str) -> list[Path]:
    """``<stem>.csv`` and ``<stem>.md`` (a Markdown table) in ``sweep_dir``."""
    csv_path, md_path = sweep_dir / f"{stem}.csv", sweep_dir / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_format(row[c], c) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def _reports(job: Job, column: str) -> bool:
    """Whether ``job`` has a value for ``column`` (``"tta": false``, a job tested one view, does not count)."""
    value = job.metrics.get(column)
    return value is not None and value is not False


def write_tables(jobs: list[Job], swept: list[str], sweep_dir: Path) -> list[Path]:
    extra = [c for c in OPTIONAL_COLUMNS if any(_reports(job, c) for job in jobs)]
    columns = [*RESULT_COLUMNS[:-1], *extra, RESULT_COLUMNS[-1]]  # the error stays last
    return _write_table([job.row(swept, columns) for job in jobs], ["job", *swept, *columns], sweep_dir, "results")


def write_setting_tables(jobs: list[Job], swept: list[str], sweep_dir: Path) -> list[Path]:
    """One row per setting (every swept key but the seed, in job order) over its completed jobs: how many
    seeds ran, and the mean, lowest and highest test accuracy (the spread between seeds)."""
    keys = [k for k in swept if k != SEED_KEY]
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.overrides.get(k, "") for k in keys), []).append(job)
    rows = []
    for setting, members in groups.items():
        done = [job for job in members if job.status == "completed"]
        row: dict[str, Any] = {
            **dict(zip(keys, setting, strict=True)),
            "runs": len(done),
            "failed": len(members) - len(done),
        }
        for column, metric, statistic in SETTING_COLUMNS:
            values = [float(j.metrics[metric]) for j in done if isinstance(j.metrics.get(metric), (int, float))]
            row[column] = float(getattr(np, statistic)(values)) if values else ""
        rows.append(row)
    columns = [*keys, "runs", "failed", *(c for c, _, _ in SETTING_COLUMNS)]
    return _write_table(rows, columns, sweep_dir, "results_by_setting")


def _series(jobs: list[Job], swept: list[str], value: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Completed jobs grouped by every swept setting except the epoch count: (epochs, values) per group."""
    others = [k for k in swept if k != EPOCHS_KEY]
    groups: dict[str, list[tuple[float, float]]] = {}
    for job in jobs:
        if job.status != "completed" or not isinstance(job.metrics.get(value), (int, float)):
            continue
        label = ", ".join(f"{k}={job.overrides.get(k, '')}" for k in others) or "all jobs"
        groups.setdefault(label, []).append((float(job.metrics["epochs"]), float(job.metrics[value])))
    return {
        label: (np.array([p[0] for p in sorted(points)]), np.array([p[1] for p in sorted(points)]))
        for label, points in groups.items()
    }


def plot_time(jobs: list[Job], swept: list[str], path: Path) -> Path:
    """Training time against epochs, with a least-squares line per group; the slope is seconds per epoch."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, (epochs, seconds) in _series(jobs, swept, "train_seconds").items():
        points = ax.plot(epochs, seconds, "o")[0]
        name = label
        if len(set(epochs.tolist())) >= 2:
            slope, intercept = np.polyfit(epochs, seconds, 1)
            grid = np.linspace(0, epochs.max(), 50)
            ax.plot(grid, slope * grid + intercept, "-", color=points.get_color(), alpha=0.7)
            # slope: the cost of one more epoch; intercept: what every run pays once (setup, first validation)
            name = f"{label}: {slope:.2f} s/epoch + {intercept:.1f} s"
        points.set_label(name)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    return _save(fig, ax, "training time (s)", "Training time against epochs (linear fit)", path)


def plot_accuracy(jobs: list[Job], swept: list[str], path: Path) -> Path:
    """Test accuracy against epochs, one line per model (or other swept setting)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, (epochs, accuracy) in _series(jobs, swept, "test/acc").items():
        ax.plot(epochs, accuracy, "o-", label=label)
    return _save(fig, ax, "test accuracy", "Test accuracy against epochs", path)


def plot_accuracy_over_time(jobs: list[Job], swept: list[str], path: Path) -> Path | None:
    """Validation accuracy after each epoch against wall-clock seconds since training started, one line per
    job (parameter-server runs record it: ``accuracy_timeline``), its test accuracy a star at its end; None
    when no job has a timeline."""
    timelines = [job for job in jobs if job.status == "completed" and job.metrics.get("accuracy_timeline")]
    if not timelines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for job in timelines:
        label = ", ".join(f"{k}={job.overrides.get(k, '')}" for k in swept) or job.name
        seconds, accuracy = zip(*job.metrics["accuracy_timeline"], strict=True)
        line = ax.plot(seconds, accuracy, "o-", label=f"{label} (validation)")[0]
        if isinstance(job.metrics.get("test/acc"), (int, float)):
            ax.plot([seconds[-1]], [job.metrics["test/acc"]], "*", markersize=12, color=line.get_color())
    ax.set_xlim(left=0)
    title = "Validation accuracy per epoch against wall-clock time (stars: test)"
    return _save(fig, ax, "accuracy", title, path, "seconds since training started")


def _save(fig: plt.Figure, ax: plt.Axes, ylabel: str, title: str, path: Path, xlabel: str = "epochs") -> Path:
    """Label a plot (whole epochs on an epochs axis), add its legend and write it as a PNG."""
    ax.set_xlabel(xlabel)
    if xlabel == "epochs":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize_sweep(sweep_dir: str | Path) -> SweepSummary:
    """Write results.csv, results.md, time_vs_epochs.png and accuracy_vs_epochs.png into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"{sweep_dir} is not a directory: give the folder of a multirun (multirun/<date>/<time>)"
        )
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(
            f"{sweep_dir} holds no Hydra jobs (sub-folders with .hydra/overrides.yaml): give the folder of a multirun"
        )
    swept = swept_keys(jobs)
    files = write_tables(jobs, swept, sweep_dir)
    if SEED_KEY in swept:
        files += write_setting_tables(jobs, swept, sweep_dir)
    files.append(plot_time(jobs, swept, sweep_dir / "time_vs_epochs.png"))
    files.append(plot_accuracy(jobs, swept, sweep_dir / "accuracy_vs_epochs.png"))
    over_time = plot_accuracy_over_time(jobs, swept, sweep_dir / "accuracy_vs_time.png")
    if over_time is not None:
        files.append(over_time)
    return SweepSummary(jobs, swept, files)


def report(summary: SweepSummary) -> str:
    done = len(summary.jobs) - len(summary.failed)
    lines = [f"Sweep summary: {done} of {len(summary.jobs)} jobs completed."]
    lines += [f"  failed: {job.name}: {job.metrics.get('error', job.status)}" for job in summary.failed]
    lines += [f"  wrote {path}" for path in summary.files]
    return "\n".join(lines)


class SummarizeSweep(Callback):
    """Hydra callback: summarise the sweep when a multirun ends; exit non-zero if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = summarize_sweep(config.hydra.sweep.dir)
        print(report(summary), flush=True)
        if summary.failed:
            raise SystemExit(1)
