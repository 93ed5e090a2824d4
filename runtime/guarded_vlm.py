"""GuardedVLM: guarded generation from a bundle, fail-closed (DESIGN.md, the request path).

Per request: preprocess -> detector verdict (or "absent") -> safety prefix and attentive
calibration when flagged -> prefill with the SafePTR and Oh taps -> Oh's refusal path when the
angle passes the threshold -> decode with the pruned keys kept masked. A guard stage that
raises, yields a non-finite score, or is required by the policy but missing from the bundle
ends in a refusal with the reason in the report, unless the policy opts into fail_open.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmguard.errors import VlmguardError

from .engine import BundleEngine, DecoderState
from .image_preprocess import ImageInput, preprocess_image
from .policy import GuardPolicy
from .prompting import EncodedPrompt, PromptBuilder
from .report import GuardReport
from .sampling import Sampling, pick_tokens

REFUSAL_TEXT = "I cannot help with that request."
POLICY_FILE = "policy.json"  # a bundle's calibrated policy, if calibration wrote one


class ContextLengthError(VlmguardError):
    """The prompt plus the requested new tokens do not fit the model's context window."""


class GuardStageError(Exception):
    """A guard stage could not produce a usable result (raised inside the pipeline only)."""


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
class _Row:
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
    text: str | None = None  # set when the row ends early (refused)
    done: bool = False
    batch: _Batch | None = None  # the prefilled batch whose decode loop carries this row


class GuardedVLM:
    """A guarded vision-language model loaded from a bundle."""

    def __init__(self, engine: BundleEngine, policy: GuardPolicy) -> None:
        self.engine = engine
        self.policy = policy
        self.manifest = engine.manifest
        self.prompts = PromptBuilder.from_bundle(engine.bundle, self.manifest)
        self.processor_config = _read_json(engine.bundle / "preprocessor_config.json")
        self.defenses = set(self.manifest["guards"]["defenses"])
        layers = self.manifest["model"]["num_layers"]
        default_gamma = (
            self.manifest["guards"].get("align", {}).get("default_gamma", [0.0] * layers)
        )
        gamma = default_gamma if policy.align_gamma is None else policy.align_gamma
        self.align_gamma = np.zeros(layers, np.float32)
        self.align_gamma[: len(gamma)] = gamma
        self.context = self.manifest["model"]["max_position_embeddings"]
        self.detector = self._load_detector() if "detector" in self.manifest else None

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        providers: list[str] | str | None = None,
        provider_options: dict[str, dict] | None = None,
        policy: GuardPolicy | dict | str | Path | None = None,
    ) -> GuardedVLM:
        """Open a bundle on the best available providers (TensorRT -> CUDA -> CPU by default).

        Without a `policy`, the bundle's own policy.json (written by calibration) is used if it
        has one, else the defaults (angles observed, SafePTR at K = 10%).
        """
        if policy is None:
            own = Path(bundle) / POLICY_FILE
            policy = GuardPolicy.load(own) if own.is_file() else GuardPolicy()
        elif isinstance(policy, dict):
            policy = GuardPolicy.from_dict(policy)
        elif not isinstance(policy, GuardPolicy):
            policy = GuardPolicy.load(policy)
        return cls(BundleEngine(bundle, providers, provider_options), policy)

    # ----------------------------------------------------------------- public API

    def generate(
        self,
        image: ImageInput | None,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Result:
        """Answer one request; returns the text and its GuardReport."""
        sampling = Sampling(temperature, top_k, top_p, seed)
        return self.generate_batch([(image, prompt)], max_new_tokens, sampling, stop)[0]

    def generate_batch(
        self,
        requests: list[tuple[ImageInput | None, str]],
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
    ) -> list[Result]:
        """Answer several requests together, left-padded into one batch."""
        rows = self._start(requests, max_new_tokens)
        for _ in self._decode(rows, max_new_tokens, sampling or Sampling(), stop or []):
            pass
        return [self._result(row, stop) for row in rows]

    def stream(
        self,
        image: ImageInput | None,
        prompt: str,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
    ) -> TokenStream:
        """Yield the answer's text piece by piece; the report is on the stream when it ends."""
        rows = self._start([(image, prompt)], max_new_tokens)
        return TokenStream(self, rows, max_new_tokens, sampling or Sampling(), stop or [])

    # ----------------------------------------------------------------- pipeline

    def _start(self, requests: list[tuple[ImageInput | None, str]], max_new: int) -> list[_Row]:
        """Check inputs, run the pre-prefill guards, then prefill (with Oh's refusal path)."""
        started = time.perf_counter()
        rows = [_Row(image, prompt) for image, prompt in requests]
        for row in rows:  # bad input fails here, before any model runs
            if not isinstance(row.prompt, str):
                raise TypeError(f"prompt must be a str, not {type(row.prompt).__name__}")
            if row.image is not None:
                with row.report.timed("preprocess"):
                    row.pixels = preprocess_image(row.image, self.processor_config)
            self._encode(row)
            self._check_context(row, max_new)
        for row in rows:
            row.report.providers = self.engine.used_providers
            self._required_guards(row)
            if not row.done:
                self._detector_stage(row)
        self._prefill(rows)
        if any(row.refusal_path for row in rows):
            self._prefill(rows)  # again, with Oh's safety instruction and refusal opening
        for row in rows:
            row.report.timings_ms["total"] = (time.perf_counter() - started) * 1e3
        return rows

    def _encode(self, row: _Row) -> None:
        """Tokenize the row's conversation with whatever prefixes its guards asked for."""
        prefix = None
        opening = ""
        if row.refusal_path:
            prefix = self.policy.oh_safety_instruction
            opening = self.policy.oh_refusal_opening
        if row.flagged:
            prefix = self.policy.align_safety_prefix + (prefix or "")
        row.encoded = self.prompts.encode(
            row.prompt,
            row.image is not None,
            safety_prefix=prefix,
            assistant_prefix=" " + opening if opening else "",
        )
        row.opening = opening

    def _check_context(self, row: _Row, max_new: int) -> None:
        """Refuse, before any model runs, a prompt that cannot fit the context window.

        Room is kept for the longest prompt the guards may make of it (safety prefix, Oh's
        instruction and forced opening), so no guard can push a request past the context.
        """
        prefix = (self.policy.align_safety_prefix if self.detector is not None else "") + (
            self.policy.oh_safety_instruction if "oh" in self.defenses else ""
        )
        opening = " " + self.policy.oh_refusal_opening if "oh" in self.defenses else ""
        longest = self.prompts.token_count(
            row.prompt, row.image is not None, prefix or None, opening
        )
        used = longest + max_new
        if used > self.context:
            raise ContextLengthError(
                f"the prompt needs up to {longest} tokens with its guard prefixes and "
                f"max_new_tokens is {max_new}: {used} exceeds the model's context of "
                f"{self.context}; shorten the prompt or lower max_new_tokens"
            )

    def _fail(self, row: _Row, stage: str, reason: str) -> None:
        """Fail closed (refuse) or, if the policy opted out, note it and go on unguarded."""
        if self.policy.fail_open:
            row.report.decide(stage, "fail_open", f"{reason}; continuing unguarded (fail_open)")
            return
        row.report.refuse(stage, reason)
        row.text, row.done = REFUSAL_TEXT, True

    def _required_guards(self, row: _Row) -> None:
        """Refuse when the policy requires a guard this bundle does not carry."""
        carried = self.defenses | ({"detector"} if "detector" in self.manifest else set())
        for guard in self.policy.require:
            if guard not in carried:
                self._fail(row, guard, f"the policy requires {guard} but the bundle lacks it")

    def _load_detector(self) -> object:
        """The bundle's safety detector, in the variant that fits the providers."""
        from vlmguard.guard_models.detector import SafetyDetector

        thresholds = dict(self.manifest["detector"].get("thresholds", {}))
        if self.policy.detector_threshold is not None:  # applies to the deciding method's score
            method = thresholds.get("method", "ot")
            for key in ("global", "ot") if method == "any" else (method,):
                thresholds[key] = self.policy.detector_threshold
        return SafetyDetector(
            self.manifest["detector"],
            self.engine.bundle,
            self.engine.providers,
            thresholds=thresholds,
        )

    def _detector_stage(self, row: _Row) -> None:
        """The safety detector's verdict; when unsafe, the safety prefix and calibration go on."""
        if self.detector is None:
            row.report.decide("detector", "absent", "the bundle has no safety detector")
            return
        if row.image is None:
            row.report.decide("detector", "pass", "text-only turn: no image to check")
            return
        try:
            with row.report.timed("detector"):
                detection = self.detector.detect(row.image)
        except Exception as err:  # a detector that cannot judge must not wave the image through
            self._fail(row, "detector", f"the detector failed: {_first_line(err)}")
            return
        scores = {"detector_global": detection.score_global, "detector_ot": detection.score_ot}
        if not all(math.isfinite(v) for v in scores.values()):
            self._fail(row, "detector", f"non-finite detector score {scores}")
            return
        row.report.scores |= scores
        row.report.guards_ran.append("detector")
        top = detection.top_concepts[0]["name"] if detection.top_concepts else "?"
        if detection.unsafe:
            row.flagged = True
            self._encode(row)
            row.report.decide("detector", "flag", f"{detection.reason} (top concept: {top})")
        else:
            row.report.decide("detector", "pass", f"below thresholds (top concept: {top})")

    def _prefill(self, rows: list[_Row]) -> None:
        """Embed, merge image features, run the guarded prefill and read the guard taps."""
        live = [row for row in rows if not row.done]
        if not live:
            return
        if any(row.refusal_path for row in live):
            live = [row for row in live if row.refusal_path]  # the second pass redoes these only
        encoded = [row.encoded for row in live]
        ids, mask = self.prompts.pad_batch(encoded)
        offsets = [ids.shape[1] - len(e.input_ids) for e in encoded]
        embeds = self.engine.embed(ids)
        images = [i for i, row in enumerate(live) if row.image is not None]
        if images:
            with _timed_all(live, "vision_encoder"):
                features = self.engine.image_features(
                    np.concatenate([live[i].pixels for i in images])
                )
            for feature, i in zip(features, images, strict=True):
                rows_at = np.asarray(encoded[i].image_rows) + offsets[i]
                if len(rows_at) != len(feature):
                    raise VlmguardError(
                        f"the prompt has {len(rows_at)} image rows but the vision encoder gave "
                        f"{len(feature)} features; the bundle's processor files are inconsistent"
                    )
                embeds[i, rows_at] = feature
        feeds = self._prefill_feeds(live, encoded, offsets, ids, mask)
        state = self.engine.empty_state(len(live))
        try:
            with _timed_all(live, "prefill"):
                outputs, state = self.engine.run_decoder(feeds | {"inputs_embeds": embeds}, state)
        except Exception as err:  # the guarded prefill is itself a guard stage: fail closed
            if self.policy.fail_open or not self.defenses:
                raise
            for row in live:
                self._fail(row, "prefill", f"the guarded prefill failed: {_first_line(err)}")
            return
        batch = _Batch(live, state, mask, feeds.get("align_prefix_mask"))
        for row in live:
            ran = [d for d in ("ptr", "align", "oh") if d in self.defenses]
            row.report.guards_ran += [d for d in ran if d not in row.report.guards_ran]
            row.batch = batch
        for stage, check in (("ptr", self._ptr_stage), ("oh", self._oh_stage)):
            if stage in self.defenses:
                try:
                    check(live, outputs)
                except Exception as err:  # a guard that cannot judge must not wave through
                    for row in live:
                        if not row.done:
                            self._fail(row, stage, f"the guard stage failed: {_first_line(err)}")
        batch.last_logits = outputs["logits"][:, -1]

    def _prefill_feeds(
        self,
        rows: list[_Row],
        encoded: list[EncodedPrompt],
        offsets: list[int],
        ids: np.ndarray,
        mask: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Model inputs plus each carried guard's prefill inputs."""
        batch, seq = ids.shape
        feeds = {"attention_mask": mask, "position_ids": _positions(mask)}
        if self.engine.has_input("guard_positions"):
            feeds["guard_positions"] = np.arange(seq, dtype=np.int64)

        def row_mask(attr: str, only: list[bool] | None = None) -> np.ndarray:
            out = np.zeros((batch, seq), np.int64)
            for i, (enc, offset) in enumerate(zip(encoded, offsets, strict=True)):
                if only is None or only[i]:
                    out[i, np.asarray(getattr(enc, attr), dtype=np.int64) + offset] = 1
            return out

        if "align" in self.defenses:
            feeds["align_gamma"] = self.align_gamma
            feeds["align_prefix_mask"] = row_mask("prefix_rows", [r.flagged for r in rows])
            for row in rows:
                if row.flagged:
                    row.report.decide("align", "calibrate", "detector flagged: safety prefix on")
        if "ptr" in self.defenses:
            feeds["ptr_image_mask"] = row_mask("image_rows")
            feeds["ptr_instruction_mask"] = row_mask("instruction_rows")
            feeds["ptr_k_fraction"] = np.array(self.policy.ptr_k_fraction, np.float32)
        return feeds

    def _ptr_stage(self, rows: list[_Row], outputs: dict[str, np.ndarray]) -> None:
        """Check SafePTR's pruned-token mask and report how many tokens it masked."""
        pruned = outputs.get("ptr_pruned_mask")
        for i, row in enumerate(rows):
            if pruned is None or pruned.ndim != 2 or pruned.shape[0] != len(rows):
                self._fail(row, "ptr", "the decoder returned no usable pruned-token mask")
                continue
            row.report.pruned_tokens = int(pruned[i].sum())
            count = row.report.pruned_tokens
            row.report.decide("ptr", "prune", f"{count} token{'s' * (count != 1)} masked")

    def _oh_stage(self, rows: list[_Row], outputs: dict[str, np.ndarray]) -> None:
        """Read Oh Defense's angle and take the refusal path when it passes the threshold."""
        angles = outputs.get("oh_angle")
        for i, row in enumerate(rows):
            if row.done or row.refusal_path:
                continue
            if angles is None or angles.shape != (len(rows),):
                self._fail(row, "oh", "the decoder returned no usable oh_angle")
                continue
            angle = float(angles[i])
            if not math.isfinite(angle):
                self._fail(row, "oh", f"oh_angle is not finite ({angle})")
                continue
            row.report.scores["oh_angle"] = angle
            threshold = self.policy.oh_threshold
            if threshold is None:
                row.report.decide("oh", "observe", "no calibrated threshold: angle reported only")
            elif angle > threshold:
                row.refusal_path = True
                self._encode(row)
                row.report.decide(
                    "oh", "refusal_path", f"angle {angle:.3f} > {threshold:.3f} degrees"
                )
            else:
                row.report.decide("oh", "pass", f"angle {angle:.3f} <= {threshold:.3f} degrees")

    def _decode(
        self, rows: list[_Row], max_new: int, sampling: Sampling, stop: list[str]
    ) -> Iterator[None]:
        """Decode every live row until EOS, a stop string or max_new tokens; yields per step."""
        rng = np.random.default_rng(sampling.seed)
        batches = {id(row.batch): row.batch for row in rows if row.batch is not None}
        for batch in batches.values():
            yield from self._decode_batch(batch, max_new, sampling, stop, rng)

    def _decode_batch(
        self,
        batch: _Batch,
        max_new: int,
        sampling: Sampling,
        stop: list[str],
        rng: np.random.Generator,
    ) -> Iterator[None]:
        """The decode loop of one prefilled batch."""
        rows, size = batch.rows, len(batch.rows)
        eos = set(self.prompts.eos_token_ids)
        pad = self.prompts.pad_token_id
        logits, state, mask, prefix = batch.last_logits, batch.state, batch.mask, batch.prefix
        position = _positions(mask)[:, -1:]
        guard_feeds = self._decode_guard_feeds(size)
        for step in range(max_new):
            tokens = pick_tokens(logits, sampling, rng)
            for i, row in enumerate(rows):
                if row.done or row.batch is not batch:
                    tokens[i] = pad
                    continue
                row.tokens.append(int(tokens[i]))
                if tokens[i] in eos or self._hit_stop(row, stop):
                    row.done = True
            yield
            # rows taken over by a later prefill (Oh's refusal path) are decoded there
            if all(row.done or row.batch is not batch for row in rows) or step == max_new - 1:
                break
            started = time.perf_counter()
            mask = np.concatenate([mask, np.ones((size, 1), np.int64)], axis=1)
            position = position + 1
            feeds = guard_feeds | {
                "inputs_embeds": self.engine.embed(tokens[:, None]),
                "attention_mask": mask,
                "position_ids": position,
            }
            if prefix is not None:
                prefix = np.concatenate([prefix, np.zeros((size, 1), np.int64)], axis=1)
                feeds["align_prefix_mask"] = prefix
            outputs, state = self.engine.run_decoder(feeds, state)
            logits = outputs["logits"][:, -1]
            elapsed = (time.perf_counter() - started) * 1e3
            for row in rows:
                row.report.decode_step_ms.append(elapsed)

    def _decode_guard_feeds(self, size: int) -> dict[str, np.ndarray]:
        """The guard inputs every decode step shares: side branches empty, nothing new to prune."""
        feeds = {}
        if self.engine.has_input("guard_positions"):
            feeds["guard_positions"] = np.zeros(0, np.int64)
        if "align" in self.defenses:
            feeds["align_gamma"] = self.align_gamma
        if "ptr" in self.defenses:
            feeds["ptr_image_mask"] = np.zeros((size, 1), np.int64)
            feeds["ptr_instruction_mask"] = np.zeros((size, 1), np.int64)
            feeds["ptr_k_fraction"] = np.array(self.policy.ptr_k_fraction, np.float32)
        return feeds

    def _hit_stop(self, row: _Row, stop: list[str]) -> bool:
        """Whether the row's text now contains a stop string."""
        if not stop:
            return False
        text = self.prompts.decode(row.tokens)
        return any(s in text for s in stop)

    def _result(self, row: _Row, stop: list[str] | None = None) -> Result:
        """Finish a row: its text (opening included), timings and report."""
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


@dataclass
class _Batch:
    """A prefilled batch: its rows, decoder state, attention mask and GuardAlign prefix mask."""

    rows: list[_Row]
    state: DecoderState
    mask: np.ndarray
    prefix: np.ndarray | None
    last_logits: np.ndarray | None = None


class TokenStream:
    """Iterates over an answer's text pieces as they are decoded; `.report` once it ends."""

    def __init__(
        self, vlm: GuardedVLM, rows: list[_Row], max_new: int, sampling: Sampling, stop: list[str]
    ) -> None:
        self._vlm, self._rows = vlm, rows
        self._steps = vlm._decode(rows, max_new, sampling, stop)
        self._stop = stop
        self.result: Result | None = None

    @property
    def report(self) -> GuardReport:
        """The request's report (complete once the stream is exhausted)."""
        return self._rows[0].report

    def __iter__(self) -> Iterator[str]:
        """Yield new text as tokens arrive."""
        row, shown = self._rows[0], ""
        if row.text is not None or row.opening:
            shown = row.text if row.text is not None else row.opening + " "
            yield shown
        for _ in self._steps:
            text = self._vlm.prompts.decode(row.tokens)
            full = (row.opening + " " + text.lstrip()) if row.opening else text
            if full.startswith(shown) and len(full) > len(shown):
                yield full[len(shown) :]
                shown = full
        self.result = self._vlm._result(row, self._stop)


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _positions(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' generate derives them from the attention mask."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


@contextmanager
def _timed_all(rows: list[_Row], stage: str) -> Iterator[None]:
    """Time a block once and add it to every row's report under the same stage."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = (time.perf_counter() - start) * 1e3
        for row in rows:
            row.report.timings_ms[stage] = row.report.timings_ms.get(stage, 0.0) + elapsed


def _read_json(path: Path) -> dict:
    """A JSON file of the bundle, with a one-line error if it is missing."""
    if not path.is_file():
        raise VlmguardError(f"{path.parent} lacks {path.name}; re-export the bundle")
    return json.loads(path.read_text())
