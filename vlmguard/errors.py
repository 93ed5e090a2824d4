"""Errors a user can cause; the CLI prints each as one line."""

from __future__ import annotations


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
