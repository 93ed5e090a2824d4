"""One request's state through the pipeline, its result, and the checks on model outputs.

A `Request` carries one (image, prompt) pair from input checks to its answer: its pixels, the
guards' flags, its encoded prompt, the tokens decoded so far and its `GuardReport`. A `Batch` is
the requests one prefill ran together, with the decoder state their decode loop carries on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from vlmguard.errors import VlmguardError

from .engine import DecoderState
from .image_preprocess import ImageInput
from .prompting import EncodedPrompt
from .report import GuardReport

REFUSAL_TEXT = "I cannot help with that request."


class ContextLengthError(VlmguardError):
    """The prompt plus the requested new tokens do not fit the model's context window."""


class ModelRunError(VlmguardError):
    """A model stage failed where no refusal applies (fail_open, or a bundle without guards)."""


@dataclass
class Result:
    """One request's answer and its guard report; unpacks as `text, report`."""

    text: str
    report: GuardReport
    token_ids: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[object]:
        """Allow `text, report = vlm.generate(...)`."""
        return iter((self.text, self.report))


@dataclass
class Request:
    """One request inside a batch, as the pipeline carries it."""

    image: ImageInput | None
    prompt: str
    report: GuardReport = field(default_factory=GuardReport)
    pixels: np.ndarray | None = None
    flagged: bool = False  # detector said unsafe: safety prefix + calibration
    refusal_path: bool = False  # Oh Defense fired: safety instruction + forced opening
    encoded: EncodedPrompt | None = None
    opening: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set when the request ends early (refused)
    done: bool = False
    batch: Batch | None = None  # the prefilled batch whose decode loop carries this request

    def refuse(self, stage: str, reason: str) -> None:
        """End in a refusal with the reason in the report; tokens decoded so far are dropped."""
        self.report.refuse(stage, reason)
        self.text, self.done, self.tokens = REFUSAL_TEXT, True, []

    def live_in(self, batch: Batch) -> bool:
        """Whether this request is still decoding in `batch` (not ended, not taken over)."""
        return not self.done and self.batch is batch


@dataclass
class Batch:
    """A prefilled batch: its requests, decoder state, attention mask and guard step state."""

    rows: list[Request]
    state: DecoderState
    mask: np.ndarray
    guard_state: dict[str, np.ndarray] = field(default_factory=dict)  # per-step guard inputs
    last_logits: np.ndarray | None = None

    def live(self) -> list[Request]:
        """The requests this batch still decodes."""
        return [row for row in self.rows if row.live_in(self)]


def floats_of_shape(value: object, want: tuple[int | None, ...]) -> bool:
    """Whether a model output is a float array of the wanted shape (None: any size)."""
    return (
        isinstance(value, np.ndarray)
        and np.issubdtype(value.dtype, np.floating)
        and value.ndim == len(want)
        and all(not isinstance(w, int) or w == d for w, d in zip(want, value.shape, strict=True))
    )


def describe(value: object) -> str:
    """A model output's shape and dtype, for a refusal reason."""
    if value is None:
        return "missing"
    if isinstance(value, np.ndarray):
        return f"shape {value.shape}, {value.dtype}"
    return type(value).__name__


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def timed_all(rows: list[Request], stage: str) -> Iterator[None]:
    """Time a block once and add it to every request's report under the same stage."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = (time.perf_counter() - start) * 1e3
        for row in rows:
            row.report.timings_ms[stage] = row.report.timings_ms.get(stage, 0.0) + elapsed
