"""The run configuration the pipeline and strategies benchmarks share: the project's own Hydra config with
synthetic CIFAR-shaped data, composed exactly as ``train.py`` composes it."""

from __future__ import annotations

import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[2]


def synthetic_data(train_size: int, val_size: int) -> list[str]:
    """Overrides for synthetic CIFAR-shaped data: ``train_size`` images of which ``val_size`` are held out.
    The test split is never used by a benchmark, so it is kept small (generating it is not timed, but slow)."""
    return [
        "data=synthetic",
        f"data.options.train_size={train_size}",
        "data.options.test_size=256",
        f"data.val_size={val_size}",
    ]


def default_config(workdir: Path, overrides: list[str]) -> DictConfig:
    """The project's default config (conf/train.yaml) with ``overrides``, writing under ``workdir``."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(workdir)
        cfg.paths.data_dir = str(workdir / "data")
        cfg.paths.output_dir = str(workdir / "run")
    return cfg


def spread(values: list[float], unit: str = "") -> str:
    """``median unit (min-max)`` of repeated measurements, for the human-readable lines."""
    return f"{statistics.median(values):,.1f}{unit} ({min(values):,.1f}-{max(values):,.1f})"
