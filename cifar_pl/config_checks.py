"""One pass over the composed config before anything is built.

Every value a user can get wrong on the command line is checked here, so that a bad one is reported as one
paragraph naming the key, the value given, what is allowed and how to fix it (exit status 2), instead of a
traceback from deep inside Lightning, a sampler or a scheduler minutes later. The pass also expands ``~``
and environment variables in every path option, and refuses keys that the component they configure does not
take (``+trainer.max_epoch=2`` would otherwise end in a ``TypeError`` from the Trainer).
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from cifar_pl.errors import ConfigurationError

_ABSENT = object()

# path options, in the order they are expanded (paths.* first: data.root interpolates paths.data_dir)
TRAIN_PATHS = ("paths.root_dir", "paths.data_dir", "data.root", "ckpt_path", "strategy.secret_file")
EVALUATE_PATHS = ("paths.root_dir", "paths.data_dir", "data.root", "ckpt_path", "data_root")

MAX_EPOCHS_HINT = (
    "Lightning reads -1 as 'train until stopped', but the one-cycle learning-rate schedule is sized from "
    "trainer.max_epochs when training starts (it rises, then anneals to its end over exactly that many "
    "epochs), so it needs a number; Ctrl-C stops a run at any time, and ckpt_path=.../last.ckpt resumes it."
)


def invalid_setting(key: str, value: Any, allowed: str, hint: str = "") -> ConfigurationError:
    """The paragraph for a value outside what its key allows: the key, the value as typed, what is allowed."""
    return ConfigurationError(f"{key}={shown(value)} is not valid: {key} must be {allowed}. {hint}".strip())


def shown(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value))
    return str(value)


# --- what a value may be ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What a key allows: ``accepts(value)`` and the words that say so."""

    accepts: Callable[[Any], bool]
    allowed: str
    hint: str = ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole(minimum: int, what: str, hint: str = "") -> Rule:
    return Rule(lambda v: _is_int(v) and v >= minimum, f"a whole number of {what}, at least {minimum}", hint)


def optional_whole(minimum: int, what: str, default: str) -> Rule:
    return Rule(
        lambda v: v is None or (_is_int(v) and v >= minimum),
        f"a whole number of {what}, at least {minimum}, or null ({default})",
    )


def positive_seconds(what: str) -> Rule:
    return Rule(lambda v: _is_number(v) and v > 0, f"a number of seconds greater than 0 ({what})")


def number_in(low: float, high: float, closed_low: bool, closed_high: bool, what: str) -> Rule:
    def accepts(v: Any) -> bool:
        return _is_number(v) and (v >= low if closed_low else v > low) and (v <= high if closed_high else v < high)

    left, right = "[" if closed_low else "(", "]" if closed_high else ")"
    return Rule(accepts, f"a number in {left}{low:g}, {high:g}{right} ({what})")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices))


def host_port(role_hint: str) -> Rule:
    def accepts(v: Any) -> bool:
        if v is None:
            return True
        host, sep, port = str(v).rpartition(":")
        return bool(sep and host) and port.isdigit() and 0 <= int(port) <= 65535

    return Rule(accepts, f"HOST:PORT with a port from 0 to 65535, or null ({role_hint})")


POSITIVE_NUMBER = Rule(lambda v: _is_number(v) and v > 0, "a number greater than 0")
NON_NEGATIVE_NUMBER = Rule(lambda v: _is_number(v) and v >= 0, "a number, 0 or more")
OPTIONAL_NON_NEGATIVE = Rule(lambda v: v is None or (_is_number(v) and v >= 0), "a number, 0 or more, or null (off)")
WHOLE = Rule(_is_int, "a whole number")
BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
OPTIONAL_BOOLEAN = Rule(lambda v: v is None or isinstance(v, bool), "true, false or null (the data config's data.tta)")

TRAIN_RULES: dict[str, Rule] = {
    "seed": WHOLE,
    "num_threads": optional_whole(1, "CPU threads", "every core this process may use"),
    "test_after_fit": BOOLEAN,
    "tta": OPTIONAL_BOOLEAN,
    "data.tta": BOOLEAN,
    "trainer.max_epochs": whole(1, "epochs", MAX_EPOCHS_HINT),
    "trainer.accumulate_grad_batches": whole(1, "batches per optimizer step"),
    "trainer.log_every_n_steps": whole(1, "optimizer steps"),
    "trainer.num_sanity_val_steps": Rule(
        lambda v: _is_int(v) and v >= -1, "a whole number of validation batches, 0 to skip the check, -1 for all"
    ),
    "trainer.gradient_clip_val": OPTIONAL_NON_NEGATIVE,
    "data.batch_size": whole(1, "images per batch"),
    "data.eval_batch_size": whole(1, "images per batch"),
    "data.val_size": whole(1, "training images held out for validation"),
    "data.num_workers": whole(0, "loader processes (0 loads batches in the training process)"),
    "data.crop_padding": whole(0, "pixels"),
    "data.options.train_size": whole(1, "images"),
    "data.options.test_size": whole(1, "images"),
    "model.lr": POSITIVE_NUMBER,
    "model.weight_decay": NON_NEGATIVE_NUMBER,
    "model.dropout": number_in(0, 1, True, False, "the fraction of activations dropped"),
    # cifar_pl.models.DROPOUT_PLACEMENTS, spelt out: importing models pulls in torch
    "model.dropout_placement": one_of("both", "first", "last"),
    "model.label_smoothing": number_in(0, 1, True, False, "the share of the target spread over all classes"),
    "model.pct_start": number_in(0, 1, False, False, "the fraction of the schedule spent warming up"),
    "model.div_factor": POSITIVE_NUMBER,
    "model.final_div_factor": POSITIVE_NUMBER,
    "callbacks.recovery_checkpoint.every_n_train_steps": whole(1, "optimizer steps"),
    "callbacks.graceful_interrupt.sync_every_n_steps": whole(1, "optimizer steps"),
    "callbacks.progress_bar.refresh_rate": whole(1, "batches"),
    # strategy=ddp
    "strategy.threads_per_process": optional_whole(1, "CPU threads", "the cores shared evenly"),
    # strategy=parameter_server
    "strategy.role": one_of("local", "server", "worker"),
    "strategy.workers": whole(1, "workers"),
    "strategy.min_workers": optional_whole(1, "workers", "all of strategy.workers"),
    "strategy.address": host_port("127.0.0.1 and a port chosen for you"),
    "strategy.straggler": one_of("drop", "wait"),
    "strategy.round_timeout": positive_seconds("how long a round waits for a worker"),
    "strategy.worker_timeout": positive_seconds("how long a silent worker is kept"),
    "strategy.join_timeout": positive_seconds("how long the server waits for workers to join"),
    "strategy.worker_wait": positive_seconds("how long the server waits when no worker is left"),
    "strategy.reconnect_timeout": positive_seconds("how long a worker looks for a lost server"),
    "strategy.frame_timeout": positive_seconds("how long a frame may take once it has started"),
    "strategy.max_strikes": whole(1, "rejected or late answers in a row before a worker is cut off"),
    "strategy.worker_threads": optional_whole(1, "CPU threads", "the cores shared evenly"),
    "strategy.max_frame_mb": whole(1, "MiB"),
    "strategy.max_pending_handshakes": whole(1, "connections"),
    "strategy.resume": BOOLEAN,
    # both engines: parameter_server takes none, bf16, fp16, topk; ddp takes none, bf16, fp16, powersgd
    "strategy.compression": one_of("none", "bf16", "fp16", "topk", "powersgd"),
    "strategy.topk_ratio": number_in(0, 1, False, True, "the share of gradient entries topk sends"),
    "strategy.powersgd_rank": whole(1, "the rank of PowerSGD's low-rank approximation"),
    "strategy.powersgd_start_step": whole(2, "optimizer steps of plain all-reduce before PowerSGD starts"),
}

EVALUATE_RULES: dict[str, Rule] = {
    "seed": WHOLE,
    "num_threads": TRAIN_RULES["num_threads"],
    "eval_batch_size": whole(1, "images per batch"),
    "tta": OPTIONAL_BOOLEAN,
    "data.tta": BOOLEAN,
    "data.eval_batch_size": whole(1, "images per batch"),
    "data.options.test_size": whole(1, "images"),
}


def select(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``, ``_ABSENT`` where the chosen options have no such key."""
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)


def check_rules(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    for key, rule in rules.items():
        value = select(cfg, key)
        if value is not _ABSENT and not rule.accepts(value):
            raise invalid_setting(key, value, rule.allowed, rule.hint)


# --- relations between values -------------------------------------------------------------------------------


def check_split_sizes(cfg: DictConfig) -> None:
    """The validation hold-out must leave training images; for the synthetic set the size is in the config,
    so this is known before anything is generated (for files it is checked when they are read)."""
    train_size = select(cfg, "data.options.train_size")
    val_size = select(cfg, "data.val_size")
    if train_size is _ABSENT or val_size is _ABSENT or val_size < train_size:
        return
    raise invalid_setting(
        "data.val_size",
        val_size,
        f"smaller than data.options.train_size={train_size}, the number of synthetic training images it is "
        f"held out from",
        f"Shrink it with the training set, e.g. data.options.train_size={train_size} "
        f"data.val_size={max(1, train_size // 4)}.",
    )


def check_workers(cfg: DictConfig) -> None:
    workers, least = select(cfg, "strategy.workers"), select(cfg, "strategy.min_workers")
    if _is_int(workers) and _is_int(least) and least > workers:
        raise invalid_setting(
            "strategy.min_workers", least, f"at most strategy.workers={workers}, the workers a round is planned for"
        )


# the gradient compressions each engine has (cifar_pl.parameter_server.compression.METHODS and
# cifar_pl.ddp.COMM_HOOKS, spelt out: importing them pulls in torch)
PS_TARGET, DDP_TARGET = "cifar_pl.parameter_server.strategy.ParameterServerStrategy", "cifar_pl.ddp.SpawnDDPStrategy"
ENGINE_COMPRESSIONS = {
    PS_TARGET: ("parameter_server", ("none", "bf16", "fp16", "topk")),
    DDP_TARGET: ("ddp", ("none", "fp16", "bf16", "powersgd")),
}


def check_compression(cfg: DictConfig) -> None:
    """``strategy.compression`` names one the chosen engine has (topk is the parameter server's, powersgd DDP's)."""
    engine = ENGINE_COMPRESSIONS.get(str(select(cfg, "strategy._target_")))
    compression = select(cfg, "strategy.compression")
    if engine is not None and compression is not _ABSENT and compression not in engine[1]:
        other = "strategy=ddp" if compression == "powersgd" else "strategy=parameter_server"
        raise invalid_setting(
            "strategy.compression",
            compression,
            f"one of {', '.join(engine[1])} with strategy={engine[0]}",
            f"({compression} exists only with {other}.)" if compression in ("topk", "powersgd") else "",
        )


# --- keys the configured component does not take -------------------------------------------------------------


def accepted_keys(target: str) -> set[str] | None:
    """The keyword arguments ``target`` takes; None when it takes any (``**kwargs``) or cannot be inspected."""
    try:
        return parameters_of(get_method(target))
    except (ValueError, TypeError, ImportError, AttributeError):
        return None


def parameters_of(function: Callable[..., Any]) -> set[str] | None:
    signature = inspect.signature(function)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return set(signature.parameters)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_key_error(key: str, known: Iterable[str], owner: str, entry_point: str = "train.py") -> ConfigurationError:
    """The paragraph for a key that nothing reads: the closest known key, and how to list them all."""
    parent, _, name = key.rpartition(".")
    close = did_you_mean(name, known)
    suggestion = f" Did you mean {parent + '.' if parent else ''}{close}?" if close else ""
    package = f" --package {parent.split('.')[0]}" if parent else ""
    return ConfigurationError(
        f"{key} is not a setting of {owner}.{suggestion} `python {entry_point} --cfg job{package}` lists the "
        f"settings there are, for the options chosen on the command line."
    )


# the top-level keys of each entry point's config: conf/<train|evaluate>.yaml's own and its groups'
TOP_LEVEL_KEYS = {
    "train.py": {
        *("task_name", "seed", "num_threads", "ckpt_path", "test_after_fit", "tta"),
        *("data", "model", "trainer", "strategy", "callbacks", "logger", "paths"),
    },
    "evaluate.py": {
        *("task_name", "ckpt_path", "seed", "num_threads", "data_root", "eval_batch_size", "accelerator"),
        *("precision", "tta", "data", "paths"),
    },
}


def check_keys(cfg: DictConfig, entry_point: str = "train.py") -> None:
    """Every top-level key must be one the entry point reads (``+num_thread=2`` would otherwise be ignored
    without a word), and every key of a node with a ``_target_`` a parameter of that target."""
    known = TOP_LEVEL_KEYS[entry_point]
    for key in map(str, cfg):
        if key not in known and key != "hydra":
            raise unknown_key_error(key, known, entry_point, entry_point)
    for path, node in _targets(cfg):
        accepted = accepted_keys(str(node["_target_"]))
        if accepted is None:
            continue
        for key in map(str, node):
            if not key.startswith("_") and key not in accepted:
                owner = f"{node['_target_']} (the {path} config)"
                raise unknown_key_error(f"{path}.{key}", accepted, owner, entry_point)
    options = select(cfg, "data.options")
    dataset = select(cfg, "data.dataset")
    if isinstance(options, DictConfig) and isinstance(dataset, str):
        from cifar_pl.data import SOURCES  # imported here: the data package pulls in torch

        source = SOURCES.get(dataset)
        accepted = None if source is None else parameters_of(source)
        for key in map(str, options):
            if accepted is not None and key not in accepted:
                owner = f"the {dataset} dataset (it takes {_listed(accepted)})"
                raise unknown_key_error(f"data.options.{key}", accepted, owner, entry_point)


def _listed(names: set[str]) -> str:
    return ", ".join(sorted(names)) if names else "no options"


def _targets(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    found = []
    for group in ("data", "model", "trainer", "strategy", "logger"):
        node = select(cfg, group)
        if isinstance(node, DictConfig) and "_target_" in node:
            found.append((group, node))
    callbacks = select(cfg, "callbacks")
    if isinstance(callbacks, DictConfig):
        for name, node in callbacks.items():
            if isinstance(node, DictConfig) and "_target_" in node:
                found.append((f"callbacks.{name!s}", node))
    return found


# --- paths ----------------------------------------------------------------------------------------------------


def expand_path(value: str) -> str:
    """``~`` and ``$VARIABLES`` expanded, as a shell would."""
    return os.path.expandvars(os.path.expanduser(value))


def expand_paths(cfg: DictConfig, keys: Iterable[str]) -> None:
    """Expand ``~`` and environment variables in the path options, in place. A value that has nothing to
    expand is left alone (interpolations such as data.root=${paths.data_dir} stay as they are)."""
    for key in keys:
        value = select(cfg, key)
        if not isinstance(value, str):
            continue
        expanded = expand_path(value)
        unset = _VARIABLE.search(expanded)
        if unset:
            raise ConfigurationError(
                f"{key}={value}: the environment variable {unset.group(1) or unset.group(2)} is not set. Set it, "
                f"or give the path in full."
            )
        if expanded != value:
            with open_dict(cfg):
                OmegaConf.update(cfg, key, expanded, merge=False)


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def check_file(cfg: DictConfig, key: str, what: str, example: str) -> None:
    value = select(cfg, key)
    if value is _ABSENT or value is None or value == "":
        return
    path = Path(str(value))
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigurationError(f"{key}={value}: {path.resolve()} {problem}. Give the path of {what}, e.g. {example}.")


def check_folder(cfg: DictConfig, key: str) -> None:
    value = select(cfg, key)
    if isinstance(value, str) and Path(value).exists() and not Path(value).is_dir():
        raise ConfigurationError(
            f"{key}={value} is a file; it must be the folder that holds the datasets (or where to download them)."
        )


# --- the passes -------------------------------------------------------------------------------------------------


def check_train_config(cfg: DictConfig) -> None:
    """Everything ``train.py`` can check before building anything; raises a ``ConfigurationError``."""
    expand_paths(cfg, TRAIN_PATHS)
    check_rules(cfg, TRAIN_RULES)
    check_split_sizes(cfg)
    check_workers(cfg)
    check_compression(cfg)
    check_keys(cfg)
    check_folder(cfg, "data.root")
    check_file(
        cfg,
        "ckpt_path",
        "a checkpoint written by an earlier run, to resume it",
        "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt",
    )
    check_file(
        cfg,
        "strategy.secret_file",
        "a file holding the parameter server's shared secret",
        "strategy.secret_file=~/.cifar_pl_secret (or set CIFAR_PL_PS_SECRET instead)",
    )


EVALUATE_EXAMPLE = "python evaluate.py ckpt_path=outputs/2026-12-02/10-27-07/checkpoints/last.ckpt"


def check_evaluate_config(cfg: DictConfig) -> None:
    """Everything ``evaluate.py`` can check before loading anything; raises a ``ConfigurationError``."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigurationError(
            "evaluate.py needs the checkpoint to evaluate: add ckpt_path=<file>, e.g. "
            f"{EVALUATE_EXAMPLE} (train.py prints the checkpoint folder when it starts and the best checkpoint "
            "when it ends; last.ckpt or the epoch*-val_acc*.ckpt file beside it both work)."
        )
    expand_paths(cfg, EVALUATE_PATHS)
    check_rules(cfg, EVALUATE_RULES)
    check_keys(cfg, "evaluate.py")
    check_folder(cfg, "data.root")
    check_folder(cfg, "data_root")
