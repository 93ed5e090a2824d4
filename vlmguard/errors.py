"""Errors a user can cause; the CLI prints each as one line."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class VlmguardError(Exception):
    """Base class: a problem with the user's input, said in one line with what to do."""


class UnsupportedModelError(VlmguardError):
    """The checkpoint's family or towers are not among the supported ones."""


class SourceError(VlmguardError):
    """The source checkpoint is missing, incomplete or unreadable."""


class OutputExistsError(VlmguardError):
    """The output directory is not empty and --force was not given."""


class BundleError(VlmguardError):
    """A bundle is missing files, tampered with, or of an unsupported format version."""


class UsageError(VlmguardError, ValueError):
    """An argument or setting has a value no command can act on."""


USER_ERRORS = (VlmguardError, ValueError, FileExistsError, FileNotFoundError)


def one_line_errors(command: Callable[..., T]) -> Callable[..., T]:
    """Wrap a click command so the errors a user can cause print as one line, not a traceback."""
    import click

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            raise click.ClickException(str(err)) from err

    return wrapper
