"""Shared plumbing for the entry points: user errors as one paragraph, not a traceback (also Hydra's, for a
misspelled key), in a sweep a failing job recorded rather than fatal to the jobs after it, and ``~`` in a
command-line value expanded as the shell expands it in an assignment."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifar_pl.errors import UserFacingError

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 1  # as Lightning exits on Ctrl-C


def _paragraph(message: str) -> str:
    """Wrap at spaces only: paths and URLs stay whole so they can be copied."""
    return textwrap.fill(
        message, width=100, subsequent_indent="       ", break_long_words=False, break_on_hyphens=False
    )


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def user_error_in(error: BaseException) -> BaseException | None:
    """The user's error behind ``error``: itself, or the cause Hydra's ``instantiate`` wrapped it in."""
    # imported here: the entry points import this module before Lightning, to answer --help at once
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (UserFacingError, MisconfigurationException)):
            return seen
        seen = seen.__cause__
    return None


def _print_error(message: str) -> None:
    print("\nerror: " + _paragraph(message), file=sys.stderr)


def handle_errors(task: F) -> F:
    """Run a Hydra task function.

    Single run: a ``UserFacingError`` is printed as one wrapped paragraph on stderr and the process exits
    with status 2, and so is a configuration Lightning refuses (its ``MisconfigurationException`` names the
    setting); anything else is a bug and keeps its traceback.

    A SIGTERM that Lightning acts on outside training (sanity check, test) ends the run as interrupted, with
    status 1 like Ctrl-C; Lightning's own exception for it is a bare ``SystemExit``, status 0, which a
    scheduler would take for success.

    Multirun: the error goes to the job's log (its ``metrics.json`` already records it) and the task
    returns, so the remaining jobs still run and the sweep summary reports this one as failed. (Hydra's
    own handling would abort the summary, and ``SystemExit`` would abort the sweep.)
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as raised:
            error = user_error_in(raised)
            if error is None:  # a bug: its traceback, in the job's log in a sweep
                if not in_multirun():
                    raise
                log.exception("job failed: %s: %s", type(raised).__name__, raised)
                return None
            message = str(error) if isinstance(error, UserFacingError) else f"Lightning refused the settings: {error}"
            if in_multirun():
                log.error("job failed: %s", message)
                return None
            _print_error(message)
            raise SystemExit(EXIT_USER_ERROR) from None
        except SystemExit as stop:
            # imported here, as in user_error_in: a SystemExit from the task comes after Lightning's import
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            if isinstance(stop, SIGTERMException):
                raise SystemExit(EXIT_INTERRUPTED) from None
            raise

    return wrapper  # type: ignore[return-value]


# --- the entry points' own start ------------------------------------------------------------------------------

# key=~... on the command line: Hydra's override grammar has no "~" in values (it means "delete" before a key)
_HOME_VALUE = re.compile(r"^(\+{0,2}[A-Za-z_][\w.@/-]*)=(~[^'\",\\\[\]{}()]*)$")


def expand_home_in_overrides(argv: Sequence[str]) -> list[str]:
    """``key=~/path`` becomes ``key='/home/me/path'``, as a shell expands ``~`` after ``=`` in an assignment
    (it does not in ``key.sub=~/path``, a word it does not take for one). Anything else is left as it is."""
    expanded = []
    for arg in argv:
        match = _HOME_VALUE.match(arg)
        home = os.path.expanduser(match.group(2)) if match else None
        expanded.append(f"{match.group(1)}='{home}'" if match and home and "'" not in home else arg)
    return expanded


def run_entry_point(main: Callable[[], Any], config_dir: Path, entry_point: str) -> None:
    """Run a ``@hydra.main`` function with ``~`` expanded in the overrides, and Hydra's own errors about the
    command line (a misspelled key, an unknown option, a value it cannot parse) as one paragraph, status 2."""
    sys.argv[1:] = expand_home_in_overrides(sys.argv[1:])
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors here instead of printing its own text
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:
        _print_error(explain_hydra_error(error, config_dir, entry_point))
        raise SystemExit(EXIT_USER_ERROR) from None


def explain_hydra_error(error: Exception, config_dir: Path, entry_point: str) -> str:
    """Hydra's message, or for an override of a key that does not exist, what the user probably meant:
    the close key (trainer.max_epoch -> trainer.max_epochs), or the option of the group that has it
    (strategy.workers -> strategy=parameter_server)."""
    if isinstance(error, OverrideParseException) and (quoted := _quoted_override(error.override)):
        key = error.override.partition("=")[0]
        return (
            f"Hydra cannot read the value given to {key}: it holds characters Hydra's override grammar keeps for "
            f"itself (= , brackets, quotes or spaces), as the folder names of a sweep's jobs do. Put the value in "
            f"double quotes for Hydra, inside the shell's single quotes: {quoted}"
        )
    cause = error.__cause__
    if not isinstance(cause, OmegaConfBaseException) or not getattr(cause, "full_key", None):
        # e.g. an option that does not exist: Hydra lists the group's options, then its search path
        return " ".join(str(error).split("\nConfig search path:")[0].split())
    from cifar_pl.config_checks import did_you_mean  # the config checks import torch; only when needed

    key = str(cause.full_key)
    parent_key, _, name = key.rpartition(".")
    parent = getattr(cause, "parent_node", None)
    known = [str(k) for k in parent] if isinstance(parent, DictConfig) else []
    close = did_you_mean(name, known)
    if close:
        hint = f"Did you mean {parent_key + '.' if parent_key else ''}{close}?"
    else:
        hint = _options_with(config_dir, parent_key, name) or ""
    package = f" --package {parent_key.split('.')[0]}" if parent_key else ""
    return (
        f"{key} is not a setting here. {hint} `python {entry_point} --cfg job{package}` lists the settings "
        f"there are, for the options chosen on the command line (Hydra's hint to add +{key} would only pass "
        f"the unknown key on, to fail later)."
    ).replace("  ", " ")


def _quoted_override(override: str) -> str | None:
    """``key='"value"'`` for an override whose value Hydra cannot parse because of its reserved characters,
    when quoting it is enough (it holds no double quote of its own); else None."""
    key, sep, value = override.partition("=")
    if not sep or '"' in value or "'" in value or not any(c in value for c in "=,[]{}() "):
        return None
    return f"'{key}=\"{value}\"'"


def _options_with(config_dir: Path, group: str, name: str) -> str | None:
    """Which options of config group ``group`` have the key ``name``, as a hint to choose one."""
    if not group or "." in group or not (config_dir / group).is_dir():
        return None
    having = []
    for option in sorted((config_dir / group).glob("*.yaml")):
        try:
            node = OmegaConf.load(option)
        except (OSError, OmegaConfBaseException):
            continue
        if isinstance(node, DictConfig) and name in node:
            having.append(f"{group}={option.stem}")
    if not having:
        return None
    return f"It is a setting of {' and '.join(having)}: choose that option first, e.g. {having[0]} {group}.{name}=..."
