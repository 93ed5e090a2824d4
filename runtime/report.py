"""GuardReport: every score, every decision and why, and per-stage timings of one request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass
class Decision:
    """One guard stage's outcome: what it did and why."""

    stage: str
    action: str  # e.g. "pass", "flag", "refusal_path", "refuse", "absent", "observe"
    reason: str


@dataclass
class GuardReport:
    """What the guard saw and did for one request."""

    refused: bool = False
    refusal_reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    guards_ran: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    decode_step_ms: list[float] = field(default_factory=list)
    providers: dict[str, list[str]] = field(default_factory=dict)
    pruned_tokens: int | None = None

    def decide(self, stage: str, action: str, reason: str) -> None:
        """Record a stage's decision."""
        self.decisions.append(Decision(stage, action, reason))

    def refuse(self, stage: str, reason: str) -> None:
        """Mark the request refused by a stage, with the reason."""
        self.refused = True
        self.refusal_reason = f"{stage}: {reason}"
        self.decide(stage, "refuse", reason)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of a block to `timings_ms[stage]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1e3
            self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + elapsed

    def to_dict(self) -> dict:
        """The JSON form."""
        return asdict(self)
