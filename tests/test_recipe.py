"""The training recipe's options (label smoothing, test-time flips), the per-dataset defaults, and the
ablation experiment that chose them."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_pl.classifier import ImageClassifier, use_test_time_flip
from cifar_pl.data import ImageDataModule
from cifar_pl.errors import ConfigurationError
from tests.helpers import CONF, TINY_SYNTHETIC, compose_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> ImageDataModule:
    datamodule = instantiate(compose_config(tmp_path_factory.mktemp("data"), TINY_SYNTHETIC).data, _convert_="all")
    datamodule.setup()
    return datamodule


def _tester() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def test_label_smoothing_is_in_the_training_loss(tiny_data):
    torch.manual_seed(0)
    model = ImageClassifier(label_smoothing=0.1).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    loss, correct = model.classification_loss(x, y)
    with torch.no_grad():
        log_p = model(x).log_softmax(1)
    # smoothing 0.1: 0.9 of the target's weight on the true class, 0.1 spread evenly over the 10 classes
    expected = (0.9 * -log_p[torch.arange(6), y] + 0.1 * -log_p.mean(1)).mean()
    loss = loss.detach()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) != pytest.approx(float(F.nll_loss(log_p, y)), rel=1e-3)
    assert int(correct) == int((log_p.argmax(1) == y).sum())


def test_label_smoothing_leaves_the_validation_loss_plain(tiny_data):
    torch.manual_seed(0)
    smoothed, plain = ImageClassifier(label_smoothing=0.3), ImageClassifier(label_smoothing=0.0)
    plain.load_state_dict(smoothed.state_dict())
    results = [_tester().validate(m, datamodule=tiny_data, verbose=False)[0]["val/loss"] for m in (smoothed, plain)]
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_test_time_flip_averages_each_images_logits_with_its_mirrors(tiny_data):
    torch.manual_seed(0)
    model = ImageClassifier().eval()
    with torch.no_grad():  # a freshly built head gives nearly the same logits for every image: make them differ
        for parameter in model.net.classifier.parameters():
            parameter.normal_(0.0, 1.0)
    test = tiny_data.test_set
    assert test is not None
    x = tiny_data.transform(test.images, torch.arange(len(test.labels)), epoch=0, train=False)
    with torch.no_grad():
        single, averaged = model(x), (model(x) + model(x.flip(-1))) / 2
    expected = {
        name: (float(logits.argmax(1).eq(test.labels).float().mean()), float(F.cross_entropy(logits, test.labels)))
        for name, logits in (("single", single), ("averaged", averaged))
    }
    assert expected["single"][1] != pytest.approx(expected["averaged"][1], rel=1e-3)  # the test tells them apart

    plain = _tester().test(model, datamodule=tiny_data, verbose=False)[0]
    use_test_time_flip(model, tiny_data, True)
    flipped = _tester().test(model, datamodule=tiny_data, verbose=False)[0]
    assert (plain["test/acc"], plain["test/loss"]) == pytest.approx(expected["single"], rel=1e-5)
    assert (flipped["test/acc"], flipped["test/loss"]) == pytest.approx(expected["averaged"], rel=1e-5)
    assert flipped["test/acc_single_view"] == pytest.approx(expected["single"][0], rel=1e-6)
    assert "test/acc_single_view" not in plain


def test_test_time_flip_is_refused_for_data_whose_flips_may_change_the_class(tmp_path):
    cfg = compose_config(tmp_path, [*TINY_SYNTHETIC, "data.flip=false"])
    datamodule = instantiate(cfg.data, _convert_="all")
    with pytest.raises(ConfigurationError, match=r"data\.flip"):
        use_test_time_flip(ImageClassifier(), datamodule, True)
    use_test_time_flip(ImageClassifier(), datamodule, False)  # off is always fine


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"dropout_placement": "middle"}, r"model\.dropout_placement='middle'.*both.*first.*last"),
        ({"label_smoothing": 1.0}, r"model\.label_smoothing=1\.0"),
        ({"dropout": -0.1}, r"model\.dropout=-0\.1"),
    ],
)
def test_bad_recipe_values_are_configuration_errors(setting, message):
    with pytest.raises(ConfigurationError, match=message):
        ImageClassifier(**setting)


# --- the ablation experiment -------------------------------------------------------------------------

# the recipe before issue 14, which every ablation setting starts from
OLD_RECIPE = {
    "data.augment": True,
    "data.crop_padding": 4,
    "data.flip": True,
    "model.dropout": 0.5,
    "model.dropout_placement": "both",
    "model.label_smoothing": 0.0,
    "model.lr": 0.01,
    "model.pct_start": 0.25,
    "model.weight_decay": 0.01,
}

# keys that together are one thing to ablate: the head's dropout is a rate and where it applies
KNOB = {"model.dropout": "head dropout", "model.dropout_placement": "head dropout"}


def _ablation_settings() -> list[str]:
    return sorted(p.stem for p in (CONF / "ablation").glob("*.yaml"))


def _recipe(cfg) -> dict[str, object]:
    return {key: OmegaConf.select(cfg, key) for key in OLD_RECIPE}


def test_the_ablation_experiment_sweeps_every_setting_over_two_seeds_at_8_epochs():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=ablation"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = dict(cfg.hydra.sweeper.params)
    assert sorted(params) == ["+ablation", "seed"] and params["seed"] == "42,43"
    swept = params["+ablation"].split(",")
    assert swept[0] == "baseline" and sorted(swept) == _ablation_settings()
    assert cfg.data.dataset == "fashion_mnist" and cfg.trainer.max_epochs == 8
    assert cfg.tta is False  # single view, as the table was measured


def test_each_ablation_setting_changes_the_old_recipe_as_it_says():
    """Hydra composes a setting as the baseline file and then its own keys (``defaults: [baseline, _self_]``);
    the files are merged the same way here, which takes milliseconds where 15 compositions take seconds."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose(config_name="train", overrides=["experiment=ablation", "+ablation=baseline"])
    assert _recipe(composed) == OLD_RECIPE  # pinned: whatever today's defaults are
    baseline = OmegaConf.load(CONF / "ablation" / "baseline.yaml")
    for name in _ablation_settings():
        if name == "baseline":
            continue
        setting = OmegaConf.load(CONF / "ablation" / f"{name}.yaml")
        assert list(setting.pop("defaults")) == ["baseline", "_self_"], name
        changed = {
            KNOB.get(key, key)
            for key, value in _recipe(OmegaConf.merge(baseline, setting)).items()
            if value != OLD_RECIPE[key]
        }
        if name.startswith("combo_"):  # several changes together, on purpose
            assert len(changed) >= 2, (name, changed)
        else:  # one change alone
            assert len(changed) == 1, (name, changed)
        assert set(OmegaConf.to_container(setting)) <= {"data", "model"}, name


# --- the defaults the ablation chose (docs/recipe.md) ----------------------------------------------------

# model settings, the same for every dataset and shared by both networks (the legacy net has no dropout)
CHOSEN_MODEL = {
    "model.dropout": 0.0,
    "model.dropout_placement": "both",
    "model.label_smoothing": 0.1,
    "model.lr": 0.01,
    "model.pct_start": 0.25,
    "model.weight_decay": 0.01,
}
CHOSEN = {
    "fashion_mnist": {"data.augment": True, "data.crop_padding": 0, "data.flip": True, **CHOSEN_MODEL},
    "cifar10": {"data.augment": True, "data.crop_padding": 4, "data.flip": True, **CHOSEN_MODEL},
}


@pytest.mark.parametrize("dataset", sorted(CHOSEN))
def test_the_dataset_option_alone_gets_the_chosen_recipe(tmp_path, dataset):
    cfg = compose_config(tmp_path, [f"data={dataset}"])
    assert _recipe(cfg) == CHOSEN[dataset]
    datamodule, model = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    transform = datamodule.transform  # what training does to a batch: crop padding, flips
    assert (transform.padding, transform.flip) == {"fashion_mnist": (0, True), "cifar10": (4, True)}[dataset]
    dropout = [m.p for m in model.net.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropout == [CHOSEN_MODEL["model.dropout"]] * 2  # placement "both": after each hidden layer
    assert model.label_smoothing == CHOSEN_MODEL["model.label_smoothing"]
    # the final test: mirror-averaged for Fashion-MNIST, one view for CIFAR-10 (tta left to the data config)
    assert cfg.tta is None
    assert use_test_time_flip(model, datamodule, cfg.tta) is {"fashion_mnist": True, "cifar10": False}[dataset]
    assert model.test_time_flip is (dataset == "fashion_mnist")


def test_a_network_trained_without_flips_is_tested_single_view_unless_asked(tmp_path, caplog):
    """Mirror images it never saw cost such a network up to a point: Fashion-MNIST's default test (data.tta)
    leaves them out when training did, and tta=true still averages them in, with a warning."""
    cfg = compose_config(tmp_path, ["data=fashion_mnist", "data.augment=false"])
    datamodule, model = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    assert use_test_time_flip(model, datamodule, cfg.tta) is False and not caplog.records
    assert use_test_time_flip(model, datamodule, True) is True and model.test_time_flip
    assert "trained without flips (data.augment=false)" in caplog.text
    # data whose mirror images may change class: one view by default, without a word
    cfg = compose_config(tmp_path, ["data=fashion_mnist", "data.flip=false"])
    datamodule, model = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    assert use_test_time_flip(model, datamodule, cfg.tta) is False and not model.test_time_flip


@pytest.mark.parametrize("dataset", sorted(CHOSEN))
def test_both_networks_train_with_the_same_recipe(tmp_path, dataset):
    cnn, legacy = (compose_config(tmp_path, [f"data={dataset}", f"model={arch}"]) for arch in ("cnn", "legacy"))
    differ = {key for key in OmegaConf.to_container(cnn.model) if cnn.model[key] != legacy.model[key]}
    assert differ <= {"arch", "dropout"}  # the legacy net has no dropout layer: its dropout setting is unused
    assert cnn.data == legacy.data and cnn.trainer == legacy.trainer
    model = instantiate(legacy.model, _convert_="all")
    assert model.label_smoothing == CHOSEN_MODEL["model.label_smoothing"]
    assert not [m for m in model.net.modules() if isinstance(m, torch.nn.Dropout)]
