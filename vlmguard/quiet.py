"""Silence the messages of our dependencies that a vlmguard user cannot act on, in one place.

- transformers' "Loading weights" progress bars and its info/warning chatter while the exporter,
  calibration or a benchmark peer loads a checkpoint (`quiet_offline_tools`);
- onnxruntime.quantization's advice to "run pre-processing before quantization", logged on the
  root logger for every detector variant it quantizes (`drop_dependency_advice`).

ONNX Runtime's messages about a provider it cannot create are handled where the providers are
chosen (runtime/providers.py). Standard library only at import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator

# Substrings of log messages dropped while `drop_dependency_advice` is active.
ADVICE = ("Please consider to run pre-processing before quantization",)


class _DropAdvice(logging.Filter):
    """Drops the log records whose message contains one of ADVICE."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in ADVICE)


def quiet_offline_tools() -> None:
    """Turn off transformers' progress bars and everything it logs below an error."""
    if importlib.util.find_spec("transformers") is None:
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def drop_dependency_advice() -> Iterator[None]:
    """Drop ADVICE from the root logger for the duration, without configuring logging.

    onnxruntime.quantization calls `logging.warning`, which would also install a root handler
    (basicConfig) when there is none; a NullHandler stands in for the duration so it does not.
    """
    root = logging.getLogger()
    advice = _DropAdvice()
    stand_in = logging.NullHandler() if not root.handlers else None
    root.addFilter(advice)
    if stand_in is not None:
        root.addHandler(stand_in)
    try:
        yield
    finally:
        root.removeFilter(advice)
        if stand_in is not None:
            root.removeHandler(stand_in)
