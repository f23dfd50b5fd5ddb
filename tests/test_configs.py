"""Every config group composes with Hydra's compose API, and every ``_target_`` instantiates."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cifar_pl.config_checks import TOP_LEVEL_KEYS
from cifar_pl.training import build_trainer, instantiate_callbacks
from tests.helpers import CONF, compose_config


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _targets(node, path="") -> list[tuple[str, DictConfig]]:
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, node))
        for key in node:
            found += _targets(node[key], f"{path}.{key}" if path else str(key))
    return found


def test_every_group_has_its_options():
    assert _options("data") == ["cifar10", "cifar100", "fashion_mnist", "synthetic"]
    assert _options("model") == ["cnn", "legacy"]


@pytest.mark.parametrize("data", _options("data"))
@pytest.mark.parametrize("model", _options("model"))
def test_train_config_composes_and_instantiates(tmp_path, data, model):
    cfg = compose_config(tmp_path, [f"data={data}", f"model={model}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    assert isinstance(datamodule, L.LightningDataModule) and isinstance(module, L.LightningModule)
    assert module.hparams.num_classes == datamodule.hparams.num_classes == cfg.data.num_classes
    assert module.hparams.in_channels == datamodule.hparams.channels
    trainer = build_trainer(cfg, instantiate_callbacks(cfg.callbacks), instantiate(cfg.logger))
    assert trainer.accumulate_grad_batches == 4 and trainer.gradient_clip_val == 1.0
    assert trainer.max_epochs == 25


def test_every_target_in_every_config_file_instantiates(tmp_path):
    cfg = compose_config(tmp_path)
    targets = _targets(cfg.callbacks, "callbacks") + _targets(cfg.logger, "logger")
    assert len(targets) == 8  # 7 callbacks and the logger
    for path, node in targets:
        assert instantiate(node, _convert_="all") is not None, path
    assert isinstance(build_trainer(cfg, [], False), L.Trainer)  # the trainer, as train.py builds it


def test_defaults_are_the_documented_recipe(tmp_path):
    cfg = compose_config(tmp_path)
    assert cfg.data.dataset == "cifar10" and cfg.data.batch_size == 32 and cfg.data.val_size == 5000
    assert cfg.model.arch == "cnn" and cfg.model.weight_decay == 0.01 and cfg.model.dropout == 0.0
    assert cfg.model.label_smoothing == 0.1 and cfg.data.crop_padding == 4 and cfg.data.flip
    assert cfg.trainer.precision == "16-mixed"
    module = instantiate(cfg.model, _convert_="all")
    assert module.num_parameters == 104_362


def test_cpu_gets_bf16_without_lightnings_warning(tmp_path, recwarn):
    cfg = compose_config(tmp_path, ["trainer.accelerator=cpu"])
    trainer = build_trainer(cfg, [], False)
    assert trainer.precision == "bf16-mixed"
    assert not [w for w in recwarn if "16-mixed" in str(w.message) or "bf16" in str(w.message)]


def test_evaluate_config_composes(tmp_path):
    cfg = compose_config(tmp_path, ["ckpt_path=x.ckpt"], config_name="evaluate")
    assert cfg.get("data") is None and cfg.ckpt_path == "x.ckpt"
    cfg = compose_config(tmp_path, ["ckpt_path=x.ckpt", "data=fashion_mnist"], config_name="evaluate")
    assert cfg.data.dataset == "fashion_mnist" and Path(cfg.data.root) == tmp_path / "data"


@pytest.mark.parametrize("entry_point", sorted(TOP_LEVEL_KEYS))
def test_the_top_level_keys_checked_are_those_of_the_entry_points_config(entry_point):
    """The config checks refuse any other top-level key: the list must follow conf/train.yaml and evaluate.yaml."""
    primary = OmegaConf.load(CONF / entry_point.replace(".py", ".yaml"))
    groups = {str(next(iter(d))) for d in primary.defaults if isinstance(d, DictConfig)}
    assert TOP_LEVEL_KEYS[entry_point] == (set(map(str, primary)) - {"defaults", "hydra"}) | groups - {
        "hydra",
        "experiment",
    }


def test_every_global_option_passes_the_config_checks(tmp_path):
    """Experiments, ablation settings and compressions write at the top level (``@package _global_``): each
    must pass the checks train.py runs first (no top-level key they add may be one train.py does not read)."""
    from cifar_pl.config_checks import check_train_config

    options = [f"experiment={name}" for name in _options("experiment")]
    options += [f"+ablation={name}" for name in _options("ablation")]
    options += [f"+compression={name}" for name in _options("compression")]
    for option in options:
        check_train_config(compose_config(tmp_path, [option]))
