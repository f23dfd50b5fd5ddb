"""The commands the README and docs/ show work as written, so the documentation cannot drift from the code.

Every ``train.py`` and ``evaluate.py`` command in a ```bash block (also after ``torchrun``/``srun``) is
composed with Hydra as the entry point composes it and goes through the same validation pass, with every
value of a sweep; a ``ckpt_path`` placeholder becomes a checkpoint the first run wrote, and ``evaluate.py``
then evaluates it for real. The README's offline first run runs as a real ``train.py`` (with small dataset
sizes substituted) and must print what the README shows; ``python train.py --help`` runs as written.
Not run: the set-up and test commands (CI runs them verbatim from ``.ci/run``), downloads and runs on
real datasets, many-machine launches, and commands that serve or wait (``tensorboard``); the code they
reach is tested elsewhere (tests/test_train_end_to_end.py, tests/test_sweeps.py, tests/test_data_formats.py).
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from cifar_pl.cli import expand_home_in_overrides
from cifar_pl.config_checks import check_train_config
from cifar_pl.evaluation import evaluate
from cifar_pl.parameter_server import protocol as wire
from tests.helpers import CONF, REPO, TINY_SYNTHETIC, compose_config, run_script

README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
ENTRY_POINTS = ("train.py", "evaluate.py")
# flags of Hydra's command line that are not overrides, with how many values follow each
FLAGS = {"-m": 0, "--multirun": 0, "--help": 0, "--cfg": 1, "--package": 1, "--resolve": 0}
SMALL = [o for o in TINY_SYNTHETIC if o != "data=synthetic"]


def bash_commands(text: str) -> list[str]:
    """Each command of each ```bash block, continuation lines joined, comment lines left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def entry_point_call(command: str) -> tuple[str, list[str]] | None:
    """(entry point, its arguments) for a command that runs train.py or evaluate.py, else None."""
    tokens = shlex.split(command, comments=True)
    for i, token in enumerate(tokens):
        if Path(token).name in ENTRY_POINTS:
            return Path(token).name, tokens[i + 1 :]
    return None


def documented_calls() -> list[tuple[str, str, list[str]]]:
    calls = []
    for document in DOCUMENTS:
        for command in bash_commands(document.read_text()):
            call = entry_point_call(command)
            if call is not None:
                calls.append((f"{document.relative_to(REPO)}: {command}", *call))
    return calls


CALLS = documented_calls()


def overrides_of(args: list[str]) -> list[str]:
    kept, skip = [], 0
    for arg in args:
        if skip:
            skip -= 1
        elif arg in FLAGS:
            skip = FLAGS[arg]
        else:
            kept.append(arg)
    return kept


def sweep_values(overrides: list[str]) -> tuple[list[str], dict[int, list[str]]]:
    """The overrides of a sweep's first job, and the other values of each swept key by its position."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = {i: list(o.sweep_string_iterator()) for i, o in enumerate(parsed) if o.is_sweep_override()}
    first = [f"{o.get_key_element()}={sweeps[i][0]}" if i in sweeps else overrides[i] for i, o in enumerate(parsed)]
    return first, {i: values[1:] for i, values in sweeps.items()}


def job_configs(tmp_path: Path, config_name: str, overrides: list[str]) -> Iterator[DictConfig]:
    """The config of every job a sweep would run, one swept key varied at a time: every value of each sweep
    is checked, without the product of all of them. A swept group is composed again; a swept value is set
    in a copy of the first job's config, as Hydra would set it (composing is the slow part)."""
    first, others = sweep_values(overrides)
    cfg = compose_config(tmp_path, first, config_name=config_name)
    yield cfg
    parser = OverridesParser.create()
    for i, values in others.items():
        written = first[i].split("=", 1)[0]  # with its + or ~, which a group added to the defaults needs
        key = written.lstrip("+~")
        for value in values:
            if (CONF / key).is_dir():
                yield compose_config(tmp_path, [*first[:i], f"{written}={value}", *first[i + 1 :]], config_name)
            else:
                job = copy.deepcopy(cfg)
                OmegaConf.update(job, key, parser.parse_override(f"{key}={value}").value(), merge=False)
                yield job


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    """The README's offline first run, as a real ``train.py``, with small dataset sizes substituted."""
    command = next(c for c in bash_commands(README.read_text()) if "data=synthetic" in c)
    script, args = entry_point_call(command) or ("", [])
    cwd = tmp_path_factory.mktemp("first_run")
    result = run_script(script, [*args, *SMALL], cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, result.stdout + result.stderr


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder holding the shared secret the README's parameter-server commands read."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / ".cifar_pl_secret").write_text("a shared secret\n")
    monkeypatch.setenv("HOME", str(folder))
    return folder


def _with_checkpoint(overrides: list[str], checkpoint: Path) -> list[str]:
    return [f"ckpt_path={checkpoint}" if o.startswith("ckpt_path=") and "<" in o else o for o in overrides]


@pytest.mark.parametrize(("where", "script", "args"), CALLS, ids=[c[0] for c in CALLS])
def test_every_documented_command_composes_and_passes_the_checks(first_run, home, tmp_path, where, script, args):
    cwd, _ = first_run
    checkpoint = next((cwd / "outputs").rglob("last.ckpt"))
    overrides = _with_checkpoint(expand_home_in_overrides(overrides_of(args)), checkpoint)
    configs = list(job_configs(tmp_path, script.removesuffix(".py"), overrides))
    for cfg in configs:
        if script == "train.py":
            check_train_config(cfg)
            if cfg.get("strategy") is not None and cfg.strategy.get("secret_file"):
                assert wire.load_secret(cfg.strategy.secret_file) == b"a shared secret"
        else:
            evaluation = evaluate(cfg)  # the checkpoint the first run wrote, for real
            assert evaluation["dataset"] == "synthetic" and 0 <= evaluation["test/acc"] <= 1


def test_the_commands_found_include_the_readmes_own():
    found = {where.split(": ", 1)[1] for where, _, _ in CALLS}
    assert "python train.py data=synthetic trainer.max_epochs=2" in found
    assert "python evaluate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt" in found
    assert len([w for w in found if "strategy=parameter_server" in w]) >= 3


def test_the_secret_file_example_works_verbatim(home, tmp_path):
    example = re.search(r"strategy\.secret_file=~/\S+", README.read_text())
    assert example is not None
    (override,) = expand_home_in_overrides([example.group(0)])
    cfg = compose_config(tmp_path, ["strategy=parameter_server", override])
    check_train_config(cfg)
    assert wire.load_secret(cfg.strategy.secret_file) == b"a shared secret"


def test_the_first_run_prints_what_the_readme_shows(first_run):
    _, output = first_run
    text = README.read_text()
    shown = text[text.index("python train.py data=synthetic") :]
    shown = shown[shown.index("```text\n") + 8 :]
    shown = shown[: shown.index("```")]
    lines = [line for line in shown.splitlines() if line.strip() and line.strip() != "..."]
    assert len(lines) >= 4
    for line in lines:  # "..." stands for anything, a number for any number
        pattern = re.sub(r"\d+(?:\\\.\d+)?", r"[\\d.]+", re.escape(line)).replace(r"\.\.\.", ".*")
        assert re.search(pattern, output), f"the README shows {line!r}; the run printed:\n{output[-2500:]}"


def test_the_first_runs_sizes_in_the_readme_match_the_config(tmp_path):
    cfg = compose_config(tmp_path, ["data=synthetic"])
    text = " ".join(README.read_text().split())
    train, val, test = cfg.data.options.train_size, cfg.data.val_size, cfg.data.options.test_size
    batches = math.ceil((train - val) / cfg.data.batch_size)
    steps = math.ceil(batches / cfg.trainer.accumulate_grad_batches)
    assert f"{train:,} training images, of which {val:,} are held out for validation, and {test:,} test" in text
    assert f"({batches} batches of {cfg.data.batch_size} images, {steps} optimizer steps)" in text


def test_help_says_how_to_see_a_groups_settings(tmp_path):
    assert "python train.py --help" in README.read_text()
    result = run_script("train.py", ["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "python train.py strategy=parameter_server --help" in result.stdout
    assert "--cfg job --package strategy" in result.stdout
    assert "strategy: ddp, parameter_server, single" in result.stdout


def test_evaluate_help_offers_only_what_evaluate_reads(tmp_path):
    result = run_script("evaluate.py", ["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    offered = result.stdout.split("data=", 1)[1].split(" ", 1)[0].split("|")
    assert sorted(offered) == sorted(p.stem for p in (CONF / "data").glob("*.yaml"))  # every dataset, no other
    assert "strategy: ddp" not in result.stdout and "model: cnn" not in result.stdout
