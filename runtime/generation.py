"""The decode loop: token picks, KV-cache steps with the guards' decode feeds, streaming.

Each prefilled `Batch` decodes until every live request hits EOS, a stop string or
`max_new_tokens`. Every step runs the decoder with each carried guard's step inputs, checks the
guards' state (SafePTR's pruned keys stay masked) and the logits (non-finite logits refuse,
since they would decode into garbage that looks like an answer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from .engine import BundleEngine
from .families import RuntimeFamily
from .guards import DecoderGuardStage, FailRule
from .prompting import PromptBuilder
from .report import GuardReport
from .request import Batch, Request, Result, describe, first_line, floats_of_shape
from .sampling import Sampling, pick_tokens


class Generator:
    """Runs decode loops over prefilled batches and finishes their results."""

    def __init__(
        self,
        engine: BundleEngine,
        prompts: PromptBuilder,
        family: RuntimeFamily,
        stages: dict[str, DecoderGuardStage],
        rule: FailRule,
        vocab_size: int | None,
    ) -> None:
        self.engine, self.prompts, self.family = engine, prompts, family
        self.stages, self.rule, self.vocab_size = stages, rule, vocab_size

    def last_logits(self, batch: Batch, outputs: dict[str, np.ndarray], stage: str) -> np.ndarray:
        """The last position's logits [B, V]; live requests with unusable logits are refused."""
        logits = outputs.get("logits")
        want = (len(batch.rows), None, self.vocab_size)
        if not floats_of_shape(logits, want) or logits.shape[1] == 0:
            reason = f"the decoder returned no usable logits ({describe(logits)})"
            self.rule.model_failed(batch.live(), stage, reason)
            return np.zeros((len(batch.rows), 1), np.float32)
        last = logits[:, -1]
        finite = np.isfinite(last).all(axis=-1)
        if not finite.all():
            bad = [
                r for r, ok in zip(batch.rows, finite, strict=True) if r.live_in(batch) and not ok
            ]
            self.rule.model_failed(bad, stage, "the decoder returned non-finite logits")
            last = np.where(finite[:, None], last, 0).astype(last.dtype)
        return last

    def decode(
        self,
        rows: list[Request],
        max_new: int,
        sampling: Sampling,
        stop: list[str],
        ignore_eos: bool = False,
    ) -> Iterator[None]:
        """Decode every live request until EOS, a stop string or max_new tokens; yields per step."""
        rng = np.random.default_rng(sampling.seed)
        batches = {id(row.batch): row.batch for row in rows if row.batch is not None}
        for batch in batches.values():
            yield from self._decode_batch(batch, max_new, sampling, stop, rng, ignore_eos)

    def _decode_feeds(self, size: int) -> dict[str, np.ndarray]:
        """The guard inputs every decode step shares: side branches empty, nothing new to prune."""
        feeds = {}
        if self.engine.has_input("guard_positions"):
            feeds["guard_positions"] = np.zeros(0, np.int64)
        for stage in self.stages.values():
            feeds |= stage.decode_feeds(size)
        return feeds

    def _decode_batch(
        self,
        batch: Batch,
        max_new: int,
        sampling: Sampling,
        stop: list[str],
        rng: np.random.Generator,
        ignore_eos: bool = False,
    ) -> Iterator[None]:
        """The decode loop of one prefilled batch; each step's time includes its token pick."""
        rows, size = batch.rows, len(batch.rows)
        eos = set() if ignore_eos else set(self.prompts.eos_token_ids)
        pad = self.prompts.pad_token_id
        logits, state, mask = batch.last_logits, batch.state, batch.mask
        position = self.family.position_ids(mask)[:, -1:]
        shared_feeds = self._decode_feeds(size)
        for step in range(max_new):
            picked = time.perf_counter()
            tokens = pick_tokens(logits, sampling, rng)
            for i, row in enumerate(rows):
                if not row.live_in(batch):
                    tokens[i] = pad
                    continue
                row.tokens.append(int(tokens[i]))
                if tokens[i] in eos or self._hit_stop(row, stop):
                    row.done = True
            pick_ms = (time.perf_counter() - picked) * 1e3
            yield
            # requests taken over by a later prefill (Oh's refusal path) are decoded there
            if not batch.live() or step == max_new - 1:
                for row in rows:  # the last pick belongs to the last step
                    if row.report.decode_step_ms:
                        row.report.decode_step_ms[-1] += pick_ms
                break
            started = time.perf_counter() - pick_ms / 1e3
            mask = np.concatenate([mask, np.ones((size, 1), np.int64)], axis=1)
            position = position + 1
            feeds = shared_feeds | {"attention_mask": mask, "position_ids": position}
            for stage in self.stages.values():
                feeds |= stage.step_feeds(batch)
            before = state
            try:
                feeds["inputs_embeds"] = self.engine.embed(tokens[:, None])
                outputs, state = self.engine.run_decoder(feeds, state)
            except Exception as err:  # a guarded decode step that fails ends the answer
                reason = f"a decode step failed: {first_line(err)}"
                self.rule.model_failed(batch.live(), "decode", reason, err)
                break
            for stage in self.stages.values() if self.rule.policy.guarded else ():
                stage.after_step(batch, before, state)
            logits = self.last_logits(batch, outputs, "decode")
            elapsed = (time.perf_counter() - started) * 1e3
            for row in rows:
                row.report.decode_step_ms.append(elapsed)

    def _hit_stop(self, row: Request, stop: list[str]) -> bool:
        """Whether the request's text now contains a stop string."""
        if not stop:
            return False
        text = self.prompts.decode(row.tokens)
        return any(s in text for s in stop)

    def result(self, row: Request, stop: list[str] | None = None) -> Result:
        """Finish a request: its text (opening included), timings and report."""
        if row.text is None:
            text = self.prompts.decode(row.tokens)
            for s in stop or []:
                text = text.split(s)[0]
            row.text = (row.opening + " " + text.lstrip()).strip() if row.opening else text
        report = row.report
        report.timings_ms["decode"] = float(sum(report.decode_step_ms))
        report.timings_ms["total"] = (
            report.timings_ms.get("total", 0.0) + report.timings_ms["decode"]
        )
        return Result(row.text, report, list(row.tokens))


class TokenStream:
    """Iterates over an answer's text pieces as they are decoded; `.report` once it ends."""

    def __init__(
        self, generator: Generator, row: Request, steps: Iterator[None], stop: list[str]
    ) -> None:
        self._generator, self._row, self._steps, self._stop = generator, row, steps, stop
        self.result: Result | None = None

    @property
    def report(self) -> GuardReport:
        """The request's report (complete once the stream is exhausted)."""
        return self._row.report

    def __iter__(self) -> Iterator[str]:
        """Yield new text as tokens arrive."""
        row, shown = self._row, ""
        if row.text is not None or row.opening:
            shown = row.text if row.text is not None else row.opening + " "
            yield shown
        prompts = self._generator.prompts
        for _ in self._steps:
            text = prompts.decode(row.tokens)
            full = (row.opening + " " + text.lstrip()) if row.opening else text
            if full.startswith(shown) and len(full) > len(shown):
                yield full[len(shown) :]
                shown = full
        self.result = self._generator.result(row, self._stop)
