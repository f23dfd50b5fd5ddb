"""What ``evaluate.py`` does: rebuild the model from a checkpoint, test it, and report overall and
per-class accuracy (a table on the console, ``evaluation.json``, a confusion-matrix PNG, TensorBoard)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on headless machines
import matplotlib.pyplot as plt
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cifar_pl.classifier import ImageClassifier, use_test_time_flip
from cifar_pl.config_checks import check_evaluate_config
from cifar_pl.data import ImageDataModule
from cifar_pl.errors import ConfigurationError
from cifar_pl.files import write_json
from cifar_pl.runtime import configure_threads, quiet_third_party_noise, resolve_precision

log = logging.getLogger(__name__)


def load_checkpoint(given: str) -> tuple[Path, dict[str, Any]]:
    """Read a Lightning checkpoint with ``weights_only=True``: tensors and plain data only, never
    arbitrary pickled objects."""
    path = Path(given).expanduser()
    if not given or not path.is_file():
        raise ConfigurationError(
            f"ckpt_path={given!r} is not a checkpoint file. Give the path of a checkpoint written by train.py, "
            f"for example "
            f"outputs/<date>/<time>/checkpoints/last.ckpt (train.py prints the folder when it starts)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigurationError(
            f"{path} cannot be read as a checkpoint ({type(error).__name__}: {error}). "
            f"Pass a .ckpt file written by train.py."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigurationError(
            f"{path} is not a checkpoint written by train.py (it has no model hyperparameters or weights)."
        )
    return path, checkpoint


def build_datamodule(cfg: DictConfig, checkpoint: dict[str, Any], path: Path) -> ImageDataModule:
    """The data config given on the command line, else the dataset the checkpoint was trained on."""
    if cfg.get("data") is not None:
        return instantiate(cfg.data, _convert_="all")
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not hparams:
        raise ConfigurationError(
            f"{path} does not record which dataset it was trained on; choose one, e.g. data=cifar10."
        )
    hparams = dict(hparams, eval_batch_size=cfg.eval_batch_size)
    if cfg.get("data_root"):
        hparams["root"] = cfg.data_root
    return ImageDataModule(**hparams)


def tested_with_mirrors(checkpoint: dict[str, Any]) -> bool:
    """Whether the run that wrote ``checkpoint`` tested with each image's mirror averaged in (checkpoints
    written before 7 December 2026 do not say: they were tested one view)."""
    return bool((checkpoint.get("datamodule_hyper_parameters") or {}).get("tta", False))


def trained_with_flips(checkpoint: dict[str, Any]) -> bool | None:
    """Whether the run that wrote ``checkpoint`` trained on mirror images (None where it does not say)."""
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not hparams:
        return None
    return bool(hparams.get("augment", True) and hparams.get("flip", True))


def _check_compatible(model: ImageClassifier, datamodule: ImageDataModule) -> None:
    m, d = model, datamodule
    if (m.num_classes, m.in_channels) != (d.num_classes, d.channels):
        raise ConfigurationError(
            f"the checkpoint's model takes {m.in_channels}-channel images and predicts {m.num_classes} classes, "
            f"but the {d.dataset} data has {d.channels} channels and {d.num_classes} classes; "
            f"evaluate it on the dataset it was trained on (leave out data=...)."
        )


def plot_confusion(confusion: torch.Tensor, classes: tuple[str, ...], title: str) -> plt.Figure:
    """Row-normalised confusion matrix (rows: true class), with counts written in the cells when they fit."""
    k = len(classes)
    rates = confusion / confusion.sum(1, keepdim=True).clamp_min(1)
    size = min(4 + 0.5 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 20:
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(int(confusion[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def print_accuracy_table(per_class: dict[str, float], counts: dict[str, int], overall: float) -> None:
    table = Table(title="Test accuracy", show_footer=True)
    table.add_column("class", footer="overall")
    table.add_column("images", justify="right", footer=str(sum(counts.values())))
    table.add_column("accuracy", justify="right", footer=f"{overall:.4f}")
    for name, accuracy in per_class.items():
        table.add_row(name, str(counts[name]), f"{accuracy:.4f}")
    Console().print(table)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    quiet_third_party_noise()
    check_evaluate_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path, checkpoint = load_checkpoint(str(cfg.ckpt_path))
    configure_threads(cfg.get("num_threads"))

    model = ImageClassifier(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    datamodule = build_datamodule(cfg, checkpoint, ckpt_path)
    _check_compatible(model, datamodule)
    datamodule.tta = tested_with_mirrors(checkpoint)  # by default, as the training run's final test did
    use_test_time_flip(model, datamodule, cfg.get("tta"), trained_with_flips(checkpoint))

    logger = TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False)
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        logger=logger,
        callbacks=[RichProgressBar()],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    confusion = model.test_confusion.compute().cpu().to(torch.int64)
    classes = datamodule.classes
    counts = confusion.sum(1)
    per_class = {name: float(confusion[i, i] / max(int(counts[i]), 1)) for i, name in enumerate(classes)}
    overall = float(results["test/acc"])
    print_accuracy_table(per_class, {n: int(c) for n, c in zip(classes, counts, strict=True)}, overall)
    if model.test_time_flip:
        log.info(
            f"With each image's mirror averaged in (tta): {overall:.4f}; each image alone: "
            f"{results['test/acc_single_view']:.4f}"
        )

    dataset = datamodule.dataset
    figure = plot_confusion(confusion, classes, f"{dataset}: test accuracy {overall:.4f}")
    png = run_dir / "confusion_matrix.png"
    figure.savefig(png)
    step = int(checkpoint.get("global_step", 0))
    logger.experiment.add_figure("test/confusion_matrix", figure, global_step=step)
    for name, accuracy in per_class.items():
        logger.experiment.add_scalar(f"test_per_class/{name}", accuracy, global_step=step)
    logger.experiment.flush()
    plt.close(figure)

    evaluation = {
        "checkpoint": str(ckpt_path.resolve()),
        "dataset": dataset,
        "model": model.arch,
        "test/acc": overall,
        "test/loss": float(results["test/loss"]),
        "tta": model.test_time_flip,
        **({"test/acc_single_view": float(results["test/acc_single_view"])} if model.test_time_flip else {}),
        "num_images": int(counts.sum()),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_png": str(png),
        "tensorboard_dir": logger.log_dir,
    }
    write_json(run_dir / "evaluation.json", evaluation)
    log.info(f"Evaluation written to {run_dir / 'evaluation.json'} and {png}")
    return evaluation
