"""Errors meant for the person at the keyboard: the entry points print them as one paragraph and exit
non-zero, without a traceback (see ``cifar_pl.cli.report_user_errors``)."""

from __future__ import annotations


class UserFacingError(Exception):
    """An error whose message alone tells the user what went wrong, where, and how to fix it."""


class DatasetError(UserFacingError):
    """A dataset is missing and cannot be downloaded, or its files are truncated or corrupt."""


class ConfigurationError(UserFacingError):
    """The configuration asks for something impossible (a bad path, mismatched sizes, ...)."""


class RaisedBetweenSteps:
    """Marks an exception raised only where the training state is exactly that after an optimizer step (no
    accumulation window or step half done): ``RunCheckpoint`` saves ``last.ckpt`` for these, and only these,
    because a run resumed from it goes on as if it had not stopped."""
