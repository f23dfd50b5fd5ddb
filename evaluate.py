"""Evaluate a checkpoint on the test split: overall and per-class accuracy, confusion matrix.

python evaluate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt
python evaluate.py ckpt_path=... data_root=/elsewhere/data    # dataset moved since training
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cifar_pl.cli import handle_errors, run_entry_point


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@handle_errors
def main(cfg: DictConfig) -> float:
    from cifar_pl.evaluation import evaluate  # imported here: --help and command-line errors need no torch

    return evaluate(cfg)["test/acc"]


if __name__ == "__main__":
    run_entry_point(main, Path(__file__).parent / "conf", "evaluate.py")
