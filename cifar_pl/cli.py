"""Shared plumbing for the entry points: user errors as one paragraph, not a traceback."""

from __future__ import annotations

import functools
import sys
import textwrap
from typing import Any, Callable, TypeVar

from cifar_pl.errors import UserFacingError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


def _paragraph(message: str) -> str:
    """Wrap at spaces only: paths and URLs stay whole so they can be copied."""
    return textwrap.fill(
        message, width=100, subsequent_indent="       ", break_long_words=False, break_on_hyphens=False
    )


def report_user_errors(task: F) -> F:
    """Run ``task``; a ``UserFacingError`` is printed as one wrapped paragraph on stderr and the process
    exits with status 2. Anything else is a bug and keeps its traceback."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except UserFacingError as error:
            print("\nerror: " + _paragraph(str(error)), file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]
