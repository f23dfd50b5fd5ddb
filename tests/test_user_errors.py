"""Bad values a user can type get one paragraph naming the key, the value and what is allowed, before
anything is built, and ``metrics.json`` records every outcome, from ``"running"`` at the start to the error
of a run that never trained. In process through ``train()``/``evaluate()`` with composed configs, plus one
real ``train.py`` for Hydra's own errors about the command line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from cifar_pl.cli import expand_home_in_overrides, explain_hydra_error, handle_errors
from cifar_pl.config_checks import check_train_config
from cifar_pl.errors import ConfigurationError
from cifar_pl.evaluation import evaluate
from cifar_pl.parameter_server import protocol as wire
from cifar_pl.training import train
from tests.helpers import CONF, TINY_SYNTHETIC, compose_config, run_script

PS = ["strategy=parameter_server"]

# overrides, then what the one paragraph must say: the key and value as typed, and what is allowed
BAD_VALUES = [
    (["trainer.max_epochs=-1"], ["trainer.max_epochs=-1", "at least 1", "one-cycle learning-rate schedule"]),
    (["trainer.max_epochs=-2"], ["trainer.max_epochs=-2", "whole number of epochs, at least 1"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "at least 1"]),
    (["trainer.max_epochs=2.5"], ["trainer.max_epochs=2.5", "whole number"]),
    (["data.batch_size=0"], ["data.batch_size=0", "images per batch, at least 1"]),
    (["data.eval_batch_size=-4"], ["data.eval_batch_size=-4", "at least 1"]),
    (["data.val_size=0"], ["data.val_size=0", "at least 1"]),
    (
        ["data=synthetic", "data.options.train_size=512"],
        ["data.val_size=1000", "smaller than data.options.train_size=512", "data.val_size=128"],
    ),
    (["data.num_workers=-1"], ["data.num_workers=-1", "at least 0"]),
    (["trainer.accumulate_grad_batches=0"], ["trainer.accumulate_grad_batches=0", "at least 1"]),
    (["num_threads=0"], ["num_threads=0", "or null"]),
    (["model.lr=0"], ["model.lr=0", "greater than 0"]),
    (["model.dropout=1.5"], ["model.dropout=1.5", "[0, 1)"]),
    (["model.dropout_placement=middle"], ["model.dropout_placement=middle", "one of both, first, last"]),
    (["model.label_smoothing=1"], ["model.label_smoothing=1", "[0, 1)"]),
    (["tta=yes"], ["tta=yes", "true, false or null"]),
    (["+num_thread=2"], ["num_thread is not a setting of train.py", "Did you mean num_threads?"]),
    (["data.tta=1"], ["data.tta=1", "true or false"]),
    (["data.flip=false", "tta=true"], ["tta=true", "data.flip=false", "Leave out tta=true"]),
    ([*PS, "strategy.workers=0"], ["strategy.workers=0", "at least 1"]),
    ([*PS, "strategy.min_workers=3"], ["strategy.min_workers=3", "at most strategy.workers=2"]),
    ([*PS, "strategy.round_timeout=0"], ["strategy.round_timeout=0", "seconds greater than 0"]),
    ([*PS, "strategy.frame_timeout=-1"], ["strategy.frame_timeout=-1", "seconds greater than 0"]),
    ([*PS, "strategy.join_timeout=soon"], ["strategy.join_timeout=soon", "seconds"]),
    ([*PS, "strategy.max_strikes=0"], ["strategy.max_strikes=0", "at least 1"]),
    ([*PS, "strategy.address=localhost"], ["strategy.address=localhost", "HOST:PORT"]),
    ([*PS, "strategy.straggler=skip"], ["strategy.straggler=skip", "one of drop, wait"]),
    (["+trainer.max_epoch=2"], ["trainer.max_epoch is not a setting", "Did you mean trainer.max_epochs?"]),
    (["data=synthetic", "+data.options.train_sizes=5"], ["data.options.train_sizes", "Did you mean"]),
    (["ckpt_path=nowhere/last.ckpt"], ["ckpt_path=nowhere/last.ckpt", "does not exist", "checkpoints/last.ckpt"]),
    ([*PS, "strategy.secret_file=nowhere/secret"], ["strategy.secret_file=nowhere/secret", "does not exist"]),
]


@pytest.mark.parametrize(("overrides", "says"), BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_value_is_one_paragraph_with_the_key_the_value_and_what_is_allowed(tmp_path, overrides, says):
    cfg = compose_config(tmp_path, overrides)
    with pytest.raises(ConfigurationError) as caught:
        train(cfg)
    message = str(caught.value)
    for words in says:
        assert words in message, message
    assert "\n" not in message
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and message in record["error"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was built


def test_a_path_option_that_is_a_file_where_a_folder_belongs(tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = compose_config(tmp_path, [f"data.root={tmp_path}/a_file"])
    with pytest.raises(ConfigurationError, match="is a file; it must be the folder"):
        check_train_config(cfg)


def test_metrics_json_says_running_while_the_run_trains(tmp_path):
    """A job killed without warning leaves "running", which the sweep summary reports as stopped."""
    cfg = compose_config(tmp_path, [*TINY_SYNTHETIC, "+callbacks.peek._target_=tests.test_user_errors.PeekAtStatus"])
    with pytest.raises(RuntimeError, match="peeked"):
        train(cfg)
    assert PeekAtStatus.seen == "running"
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: peeked"


class PeekAtStatus(L.Callback):
    """Reads metrics.json as training starts, then stops the run."""

    seen: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        PeekAtStatus.seen = json.loads((Path(trainer.default_root_dir) / "metrics.json").read_text())["status"]
        raise RuntimeError("peeked")


def test_a_trainer_lightning_refuses_is_a_user_error_and_leaves_metrics_json(tmp_path, capsys):
    cfg = compose_config(tmp_path, [*TINY_SYNTHETIC, "trainer.devices=0", "trainer.accelerator=cpu"])
    with pytest.raises(SystemExit) as exited:
        handle_errors(train)(cfg)  # as train.py runs it
    assert exited.value.code == 2
    assert "error: Lightning refused the settings: `Trainer(devices=0)`" in capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and "devices=0" in record["error"]


def test_evaluate_refuses_a_top_level_key_it_does_not_read(tmp_path):
    cfg = compose_config(tmp_path, ["ckpt_path=x.ckpt", "+eval_batchsize=64"], config_name="evaluate")
    with pytest.raises(
        ConfigurationError, match=r"eval_batchsize is not a setting of evaluate\.py\. Did you mean eval_batch_size"
    ):
        evaluate(cfg)


def test_evaluate_without_ckpt_path_says_what_to_pass(tmp_path):
    cfg = compose_config(tmp_path, [], config_name="evaluate")
    with pytest.raises(ConfigurationError) as caught:
        evaluate(cfg)
    message = str(caught.value)
    assert "add ckpt_path=<file>" in message and "python evaluate.py ckpt_path=outputs/" in message
    assert "\n" not in message


def _composition_error(overrides: list[str]) -> str:
    with (
        initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
        pytest.raises(ConfigCompositionException) as caught,
    ):
        compose("train", overrides=overrides)
    return explain_hydra_error(caught.value, CONF, "train.py")


def test_a_misspelled_key_gets_the_close_one_not_hydras_append_hint():
    message = _composition_error(["trainer.max_epoch=2"])
    assert message.startswith("trainer.max_epoch is not a setting here. Did you mean trainer.max_epochs?")
    assert "python train.py --cfg job --package trainer" in message
    assert "To append to your config use" not in message


def test_a_key_of_another_option_names_the_option_to_choose():
    message = _composition_error(["strategy.workers=3"])  # the default strategy is single
    assert "It is a setting of strategy=parameter_server" in message


def test_an_unknown_option_lists_the_groups_options():
    with (
        initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
        pytest.raises(ConfigCompositionException) as caught,
    ):
        compose("train", overrides=["data=cifar1O"])
    message = explain_hydra_error(caught.value, CONF, "train.py")
    assert "Could not find 'data/cifar1O' Available options in 'data': cifar10 " in message
    assert "search path" not in message


def test_train_py_reports_a_misspelled_key_in_one_paragraph_with_status_2(tmp_path):
    result = run_script("train.py", ["trainer.max_epoch=2", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Did you mean trainer.max_epochs?" in result.stderr.replace("\n       ", " ")
    assert "Traceback" not in result.stderr + result.stdout and "+trainer.max_epoch" not in result.stdout


# --- paths: ~ and environment variables --------------------------------------------------------------------


def test_tilde_on_the_command_line_is_expanded_as_a_shell_would(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_home_in_overrides(
        ["strategy.secret_file=~/.cifar_pl_secret", "hydra.run.dir=~", "~callbacks.progress_bar", "seed=1"]
    ) == [
        f"strategy.secret_file='{tmp_path}/.cifar_pl_secret'",
        f"hydra.run.dir='{tmp_path}'",
        "~callbacks.progress_bar",
        "seed=1",
    ]
    # a sweep or a quoted value is Hydra's to read, as typed
    assert expand_home_in_overrides(["data.root=~/a,~/b", "x='~/y'"]) == ["data.root=~/a,~/b", "x='~/y'"]


def test_tilde_and_variables_in_path_options_are_expanded(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / "runs").mkdir(parents=True)
    (home / ".cifar_pl_secret").write_text("s3cret\n")
    (home / "runs" / "last.ckpt").write_bytes(b"")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DATASETS", str(tmp_path / "datasets"))
    cfg = compose_config(
        tmp_path,
        [
            *PS,
            "strategy.secret_file='~/.cifar_pl_secret'",
            "data.root=$DATASETS/cifar",
            "ckpt_path='~/runs/last.ckpt'",
        ],
    )
    check_train_config(cfg)
    assert cfg.strategy.secret_file == f"{home}/.cifar_pl_secret"
    assert cfg.data.root == f"{tmp_path}/datasets/cifar"
    assert cfg.ckpt_path == f"{home}/runs/last.ckpt"
    assert wire.load_secret(cfg.strategy.secret_file) == b"s3cret"


def test_an_unset_variable_in_a_path_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_FOLDER", raising=False)
    cfg = compose_config(tmp_path, ["data.root='$NO_SUCH_FOLDER/data'"])
    with pytest.raises(ConfigurationError, match="the environment variable NO_SUCH_FOLDER is not set"):
        check_train_config(cfg)


def test_the_parameter_servers_frame_timeout_and_max_strikes_are_settings(tmp_path):
    cfg = compose_config(tmp_path, [*PS, "strategy.frame_timeout=0.5", "strategy.max_strikes=5"])
    check_train_config(cfg)
    strategy = instantiate(cfg.strategy, _convert_="all")
    assert (strategy.settings.frame_timeout, strategy.settings.max_strikes) == (0.5, 5)


@pytest.mark.parametrize("problem", ["a folder", "empty"])
def test_a_secret_file_that_cannot_give_a_secret_is_one_paragraph(tmp_path, problem):
    secret = tmp_path / "secret"
    if problem == "a folder":
        secret.mkdir()
    else:
        secret.write_text("\n")
    cfg = compose_config(tmp_path, [*PS, "data=synthetic", f"strategy.secret_file={secret}"])
    with pytest.raises(ConfigurationError) as caught:
        train(cfg)
    message = str(caught.value)
    assert str(secret) in message
    assert ("strategy.secret_file" if problem == "a folder" else "is empty") in message
    assert "\n" not in message
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and message in record["error"]


def test_a_sweep_jobs_checkpoint_path_gets_the_quoting_hydra_needs(tmp_path):
    """A sweep job's folder is named after its overrides (``0_model=cnn,trainer.max_epochs=1``): Hydra's
    override grammar cannot read such a value unquoted. The error gives the quoted form, and that form works."""
    ckpt = tmp_path / "multirun" / "0_model=cnn,trainer.max_epochs=1" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    result = run_script("evaluate.py", [f"ckpt_path={ckpt}"], cwd=tmp_path)
    message = result.stderr.replace("\n       ", " ")
    assert result.returncode == 2 and "Traceback" not in message, message
    suggested = message.rsplit("inside the shell's single quotes: ", 1)[1].strip()
    assert suggested == f"'ckpt_path=\"{ckpt}\"'"
    again = run_script("evaluate.py", shlex.split(suggested), cwd=tmp_path)  # as the shell would pass it
    message = again.stderr.replace("\n       ", " ")
    assert again.returncode == 2 and f"{ckpt} cannot be read as a checkpoint" in message, message
