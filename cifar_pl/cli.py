"""Shared plumbing for the entry points: user errors as one paragraph, not a traceback, and in a sweep,
a failing job recorded rather than fatal to the jobs after it."""

from __future__ import annotations

import functools
import logging
import sys
import textwrap
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException

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


def handle_errors(task: F) -> F:
    """Run a Hydra task function.

    Single run: a ``UserFacingError`` is printed as one wrapped paragraph on stderr and the process exits
    with status 2; anything else is a bug and keeps its traceback.

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
        except UserFacingError as error:
            if in_multirun():
                log.error("job failed: %s", error)
                return None
            print("\nerror: " + _paragraph(str(error)), file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except SIGTERMException:
            raise SystemExit(EXIT_INTERRUPTED) from None
        except Exception as error:
            if not in_multirun():
                raise
            log.exception("job failed: %s: %s", type(error).__name__, error)
            return None

    return wrapper  # type: ignore[return-value]
