"""Train a classifier from the Hydra config in conf/train.yaml.

python train.py                                  # CIFAR-10, improved CNN, 25 epochs
python train.py data=synthetic trainer.max_epochs=2
python train.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # resume
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cifar_pl.cli import handle_errors, run_entry_point


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@handle_errors
def main(cfg: DictConfig) -> float | None:
    from cifar_pl.training import train  # imported here: --help and command-line errors need no torch

    metrics = train(cfg)
    return metrics.get("test/acc")


if __name__ == "__main__":
    run_entry_point(main, Path(__file__).parent / "conf", "train.py")
