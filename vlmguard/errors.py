"""The errors a user can cause, all under `VlmguardError`; the CLI prints each as one line.

Anything else that escapes a command (a bare ValueError, a KeyError) is a bug and keeps its
traceback. `vlmguard --debug CMD` (or VLMGUARD_DEBUG=1) shows the traceback of user errors too.
Subclasses also derive from the builtin a caller would catch (ValueError, FileNotFoundError,
FileExistsError) where that reads naturally, so `except ValueError` keeps working.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEBUG_ENV = "VLMGUARD_DEBUG"
DEBUG_META = "vlmguard.debug"  # click context meta key set by `vlmguard --debug`

# What each optional extra of pyproject.toml brings, by importable module name.
EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "safetensors", "onnx", "onnxscript"),
    "plot": ("matplotlib",),
}


class VlmguardError(Exception):
    """Base class: a problem with the user's input, said in one line with what to do."""


class UsageError(VlmguardError, ValueError):
    """An argument or option value is malformed, out of range or not one of the choices."""


class InputNotFoundError(VlmguardError, FileNotFoundError):
    """A file or directory the user named does not exist (or holds nothing usable)."""


class InputDataError(VlmguardError, ValueError):
    """A file the user gave is malformed: bad JSON, missing fields, unreadable content."""


class MissingExtraError(VlmguardError):
    """The command needs an optional extra (export, plot) that is not installed."""


class UnsupportedModelError(VlmguardError):
    """The checkpoint's family or towers are not among the supported ones."""


class SourceError(VlmguardError):
    """The source checkpoint is missing, incomplete or unreadable."""


class OutputExistsError(VlmguardError, FileExistsError):
    """The output directory is not empty and --force was not given."""


class BundleError(VlmguardError):
    """A bundle is missing files, tampered with, or of an unsupported format version."""


def _missing_module(name: str) -> bool:
    """Whether `name` cannot be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a blocking finder, or sys.modules[name] is None
        return True


def require_extra(extra: str) -> None:
    """Refuse, in one line naming the extra to install, when one of its modules is missing."""
    for module in EXTRAS[extra]:
        if _missing_module(module):
            raise MissingExtraError(
                f"this command needs the {extra} extra ({module} is missing): "
                f"pip install 'vlmguard[{extra}]'"
            )


def debug_enabled() -> bool:
    """Whether user errors should keep their traceback (--debug or VLMGUARD_DEBUG=1)."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    import click

    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(DEBUG_META))


def one_line(message: str) -> str:
    """A message folded onto one line (the CLI's error format)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def one_line_errors(command: Callable[..., T]) -> Callable[..., T]:
    """Wrap a click command so VlmguardErrors print as one line (unless debugging)."""
    import click

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return command(*args, **kwargs)
        except VlmguardError as err:
            if debug_enabled():
                raise
            raise click.ClickException(one_line(str(err)) or type(err).__name__) from err

    return wrapper
