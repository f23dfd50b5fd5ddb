"""What ``train.py`` does: build data, model, callbacks, logger and trainer from the Hydra config, fit,
test the best checkpoint, and write ``metrics.json`` into the run directory (also when the run fails)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.model_summary import summarize
from omegaconf import DictConfig, OmegaConf

from cifar_pl.callbacks import EpochTimer
from cifar_pl.classifier import use_test_time_flip
from cifar_pl.cli import in_multirun
from cifar_pl.config_checks import check_train_config
from cifar_pl.data import ImageDataModule
from cifar_pl.errors import ConfigurationError
from cifar_pl.files import remove_stale_temporaries, write_json
from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.worker import Worker, WorkerSettings
from cifar_pl.run_status import records_status
from cifar_pl.runtime import configure_threads, quiet_third_party_noise, resolve_precision, uses_cuda
from cifar_pl.trainer_state import find_callback

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Every entry of the ``callbacks`` group with a ``_target_``; set one to null to switch it off."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def hydra_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build_strategy(cfg: DictConfig) -> Strategy | str:
    """The ``strategy`` group as a Lightning strategy; one without ``_target_`` (``single``) lets Lightning pick."""
    node = cfg.get("strategy")
    return instantiate(node, _convert_="all") if node is not None and "_target_" in node else "auto"


def build_trainer(cfg: DictConfig, callbacks: list[Callback], logger: Logger | bool) -> L.Trainer:
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.get("accelerator", "auto"))
    if not cfg.trainer.get("enable_progress_bar", True):
        # trainer.enable_progress_bar=false alone switches the bar off (Lightning refuses the pair otherwise)
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, precision=precision, strategy=build_strategy(cfg)
    )


def build_tester(cfg: DictConfig, trainer: L.Trainer) -> L.Trainer:
    """The trainer that tests the best checkpoint: the fit's own, or for a fit over several processes a
    single-device one (DDP's sampler would pad the test set with repeated images)."""
    if trainer.world_size == 1:
        return trainer
    return L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.get("accelerator", "auto")),
        logger=trainer.logger or False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.get("enable_progress_bar", True),
        default_root_dir=trainer.default_root_dir,
    )


def tensorboard_root(run_dir: Path) -> Path:
    """Where to point TensorBoard: the sweep folder in a multirun (all its jobs side by side), else the run."""
    return Path(HydraConfig.get().sweep.dir) if in_multirun() else run_dir


def announce_outputs(run_dir: Path, trainer: L.Trainer) -> None:
    lines = [f"Run directory:    {run_dir}"]
    if trainer.logger is not None and trainer.logger.log_dir:
        lines.append(f"TensorBoard logs: {trainer.logger.log_dir}")
    checkpoint = find_callback(trainer, ModelCheckpoint)
    if checkpoint is not None and checkpoint.dirpath:
        lines.append(f"Checkpoints:      {checkpoint.dirpath}")
    lines.append(f"View the curves:  tensorboard --logdir {tensorboard_root(run_dir)}")
    log.info("\n" + "\n".join(lines))


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``ckpt_path`` if given; with ``strategy.resume=true``, the newer of the run's recovery.ckpt and
    last.ckpt (restart the command with ``hydra.run.dir=`` the interrupted run's folder)."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if cfg.get("strategy") is None or not cfg.strategy.get("resume"):
        return None
    folder = run_dir / "checkpoints"
    candidates = [p for p in (folder / "recovery.ckpt", folder / "last.ckpt") if p.is_file()]
    if not candidates:
        raise ConfigurationError(
            f"strategy.resume=true, but {folder} holds no recovery.ckpt or last.ckpt. Run the same command with "
            f"hydra.run.dir=<the folder of the run to resume>, or give ckpt_path=<a checkpoint>."
        )
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def remove_leftovers_of_killed_runs(run_dir: Path, ckpt_path: str | None) -> None:
    """The temporary files that a run killed outright (SIGKILL, out of memory) left beside its metrics.json
    and checkpoints: in this run's folders and in those of the run being resumed."""
    folders = [run_dir, run_dir / "checkpoints"]
    if ckpt_path:
        folders += [Path(ckpt_path).parent, Path(ckpt_path).parent.parent]
    for path in remove_stale_temporaries(*folders):
        log.info("Removed %s, left by a run killed while writing it", path)


@records_status
def train(cfg: DictConfig) -> dict[str, Any]:
    quiet_third_party_noise()
    check_train_config(cfg)
    if cfg.get("strategy") is not None and cfg.strategy.get("role") == "worker":
        return run_worker(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    if ckpt_path and not Path(ckpt_path).is_file():
        raise ConfigurationError(
            f"ckpt_path={ckpt_path} does not exist. Give the path of a checkpoint written by an earlier run, "
            f"usually <run directory>/checkpoints/last.ckpt, to resume it."
        )
    remove_leftovers_of_killed_runs(run_dir, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    threads = configure_threads(cfg.get("num_threads"))

    datamodule: L.LightningDataModule = instantiate(cfg.data, _convert_="all")
    model: L.LightningModule = instantiate(cfg.model, _convert_="all")
    tta = use_test_time_flip(model, datamodule, cfg.get("tta"))  # refused before training, not after
    if isinstance(datamodule, ImageDataModule):  # checkpoints record the test this run does, for evaluate.py
        datamodule.tta = datamodule.hparams["tta"] = tta
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = build_trainer(cfg, instantiate_callbacks(cfg.get("callbacks")), logger)
    if trainer.is_global_zero:
        log.info("\n%s", summarize(model, max_depth=2))
    announce_outputs(run_dir, trainer)

    metrics: dict[str, Any] = {
        "status": "running",
        "dataset": cfg.data.dataset,
        "model": cfg.model.get("arch"),
        "params": getattr(model, "num_parameters", None),
        "precision": str(trainer.precision),
        "threads": threads,
        "seed": cfg.seed,
        "tta": tta,
        "overrides": hydra_overrides(),
        "run_dir": str(run_dir),
    }
    started = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics["train_seconds"] = time.perf_counter() - started
        metrics.update(_fit_results(trainer))
        if trainer.interrupted:
            metrics["status"] = "interrupted"
        elif cfg.get("test_after_fit", True) and trainer.is_global_zero:
            best = metrics.get("checkpoint") or metrics.get("last_checkpoint")
            if best:  # only the weights matter for testing; a checkpoint is read as tensors and plain data
                log.info("Testing the best checkpoint: %s", best)
                model.load_state_dict(torch.load(best, map_location=model.device, weights_only=True)["state_dict"])
            results = build_tester(cfg, trainer).test(model, datamodule=datamodule)
            metrics.update({k: float(v) for k, v in results[0].items()})
            metrics["status"] = "completed"
        else:
            metrics["status"] = "completed"
    except BaseException as error:  # record why, so nothing is lost and sweeps can report it
        metrics.setdefault("train_seconds", time.perf_counter() - started)
        metrics.update(_fit_results(trainer))
        metrics["status"] = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
        metrics["error"] = f"{type(error).__name__}: {error}"
        if trainer.is_global_zero:
            write_json(run_dir / METRICS_FILE, metrics)
        raise
    if trainer.is_global_zero:
        write_json(run_dir / METRICS_FILE, metrics)
        log_hparams(trainer, cfg, metrics)
        _report(run_dir, metrics)
    return metrics


def run_worker(cfg: DictConfig) -> dict[str, Any]:
    """``strategy.role=worker``: serve gradients to the parameter server at ``strategy.address`` until it
    says training is done. Data and model come from the same config as the server's, built in the same
    order (the handshake checks that they match)."""
    settings = cfg.strategy
    if not settings.get("address"):
        raise ConfigurationError("strategy.role=worker needs strategy.address=HOST:PORT, the server's address")
    L.seed_everything(cfg.seed, workers=True)
    configure_threads(cfg.get("num_threads") or settings.get("worker_threads"))
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    accelerator = cfg.trainer.get("accelerator", "auto")
    device = torch.device("cuda", 0) if uses_cuda(accelerator) else torch.device("cpu")
    name = f"{socket.gethostname()}-{os.getpid()}"
    try:
        worker_settings = WorkerSettings(
            address=settings.address,
            name=name,
            secret=wire.load_secret(settings.get("secret_file")),
            connect_timeout=float(settings.get("join_timeout", 120.0)),
            max_frame=int(settings.get("max_frame_mb", 256)) * 2**20,
            frame_timeout=float(settings.get("frame_timeout", 30.0)),
            reconnect_timeout=float(settings.get("reconnect_timeout", 60.0)),
        )
        code = Worker(
            model.to(device), datamodule, resolve_precision(cfg.trainer.precision, accelerator), worker_settings
        ).run()
    except (wire.ProtocolError, ConnectionError) as error:
        raise ConfigurationError(f"worker {name} stopped: {error}") from None
    except KeyboardInterrupt:
        log.warning("worker %s stopped by Ctrl-C; the server hands its share to the other workers", name)
        raise SystemExit(130) from None
    return {"status": "completed" if code == 0 else "failed", "role": "worker"}


HPARAM_GROUPS = ("data", "model", "trainer", "strategy")
FINAL_METRICS = ("test/acc", "test/acc_single_view", "test/loss", "best_val/acc", "train_seconds", "seconds_per_epoch")


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings as flat scalars for TensorBoard's HParams view (lists become strings)."""
    flat: dict[str, Any] = {"seed": cfg.seed}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not str(key).startswith("_"):
                    visit(f"{prefix}.{key}", value)
        elif node is not None:
            flat[prefix] = node if isinstance(node, (bool, int, float, str)) else str(node)

    for group in HPARAM_GROUPS:
        if cfg.get(group) is not None:
            visit(group, OmegaConf.to_container(cfg[group], resolve=True))
    return flat


def log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """One HParams entry per run: its settings and final metrics, so TensorBoard compares a sweep's jobs."""
    final = {
        f"hparams/{k.replace('/', '_')}": float(metrics[k])
        for k in FINAL_METRICS
        if isinstance(metrics.get(k), (int, float))
    }
    settings = hparams_of(cfg)
    settings["tta"] = bool(metrics.get("tta", False))  # the test this run did, whatever data.tta says
    for logger in trainer.loggers:
        logger.log_hyperparams(settings, metrics=final)
        logger.save()


def _fit_results(trainer: L.Trainer) -> dict[str, Any]:
    out: dict[str, Any] = {"epochs": trainer.current_epoch, "global_step": trainer.global_step}
    timer = find_callback(trainer, EpochTimer)
    if timer is not None and timer.epoch_seconds:
        out["seconds_per_epoch"] = timer.mean_epoch_seconds
        out["epoch_seconds"] = timer.epoch_seconds
    for checkpoint in trainer.checkpoint_callbacks:
        if not isinstance(checkpoint, ModelCheckpoint):
            continue
        if checkpoint.monitor is None:  # last.ckpt, recovery.ckpt: their "best" is their latest
            out[f"{checkpoint.filename}_checkpoint"] = checkpoint.best_model_path or None
        else:
            out["checkpoint"] = checkpoint.best_model_path or None
            if checkpoint.best_model_score is not None:
                out[f"best_{checkpoint.monitor}"] = float(checkpoint.best_model_score)
    if trainer.logger is not None and trainer.logger.log_dir:
        out["tensorboard_dir"] = trainer.logger.log_dir
    run_metrics = getattr(trainer.strategy, "run_metrics", None)  # the parameter server's mode, throughput...
    if callable(run_metrics):
        out.update(run_metrics())
    return out


def _report(run_dir: Path, metrics: dict[str, Any]) -> None:
    acc = metrics.get("test/acc")
    summary = [
        f"Finished {metrics['epochs']} epoch(s) in {metrics['train_seconds']:.1f} s"
        + (f" ({metrics['seconds_per_epoch']:.1f} s/epoch)" if metrics.get("seconds_per_epoch") else ""),
    ]
    if acc is not None:
        summary.append(f"Test accuracy:   {acc:.4f} (best checkpoint: {metrics.get('checkpoint')})")
        if metrics.get("test/acc_single_view") is not None:
            summary.append(
                f"                 with mirror images (tta); one view: {metrics['test/acc_single_view']:.4f}"
            )
    summary.append(f"Metrics:         {run_dir / METRICS_FILE}")
    summary.append(f"View the curves: tensorboard --logdir {tensorboard_root(run_dir)}")
    log.info("\n" + "\n".join(summary))
