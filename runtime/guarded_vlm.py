"""GuardedVLM: guarded generation from a bundle, fail-closed (DESIGN.md, the request path).

Per request: preprocess -> detector verdict (or "absent") -> safety prefix and attentive
calibration when flagged -> prefill with the SafePTR and Oh taps -> Oh's refusal path when the
angle passes the threshold -> decode with the pruned keys kept masked. A guard stage that
raises, yields a non-finite score, or is required by the policy but missing from the bundle
ends in a refusal with the reason in the report, unless the policy opts into fail_open.

The model stages a guarded request runs through (vision encoder, prefill, each decode step) are
held to the same rule: an exception, a missing or misshapen output, or non-finite features or
logits refuse the request (only the rows concerned, in a batch) and drop any tokens decoded so
far. Under fail_open, or in a bundle without in-model guards, there is no unguarded answer to
fall back to, so such a failure raises ModelRunError (one line) instead.
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

from vlmguard.errors import BundleError, VlmguardError

from .engine import BundleEngine, DecoderState
from .image_preprocess import DEFAULT_MAX_IMAGE_PIXELS, ImageInput, preprocess_image
from .policy import GuardPolicy, PolicyError
from .prompting import EncodedPrompt, PromptBuilder
from .report import GuardReport
from .sampling import Sampling, pick_tokens

REFUSAL_TEXT = "I cannot help with that request."
POLICY_FILE = "policy.json"  # a bundle's calibrated policy, if calibration wrote one


class ContextLengthError(VlmguardError):
    """The prompt plus the requested new tokens do not fit the model's context window."""


class GuardStageError(Exception):
    """A guard stage could not produce a usable result (raised inside the pipeline only)."""


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

    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images are refused

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
        if len(gamma) > layers:
            raise PolicyError(f"align_gamma has {len(gamma)} values for a {layers}-layer model")
        self.align_gamma = np.zeros(layers, np.float32)
        self.align_gamma[: len(gamma)] = gamma
        self.context = self.manifest["model"]["max_position_embeddings"]
        outputs = {s["name"]: s["shape"] for s in self.manifest["graphs"]["decoder"]["outputs"]}
        self.vocab_size = outputs.get("logits", [None])[-1]  # checked on every step's logits
        self.detector = self._load_detector() if "detector" in self.manifest else None

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        providers: list[str] | str | None = None,
        provider_options: dict[str, dict] | None = None,
        policy: GuardPolicy | dict | str | Path | None = None,
        integrity: str = "sha256",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> GuardedVLM:
        """Open a bundle on the best available providers (TensorRT -> CUDA -> CPU by default).

        Without a `policy`, the bundle's own policy.json (written by calibration) is used if it
        has one, else the defaults (angles observed, SafePTR at K = 10%). `integrity` is how
        the bundle's files are checked before any graph runs: "sha256" (default) or "size".
        Images over `max_image_pixels` pixels (None: no limit) are refused before decoding.
        """
        if policy is None:
            own = Path(bundle) / POLICY_FILE
            policy = GuardPolicy.load(own) if own.is_file() else GuardPolicy()
        elif isinstance(policy, dict):
            policy = GuardPolicy.from_dict(policy)
        elif not isinstance(policy, GuardPolicy):
            policy = GuardPolicy.load(policy)
        vlm = cls(BundleEngine(bundle, providers, provider_options, integrity=integrity), policy)
        vlm.max_image_pixels = max_image_pixels
        if vlm.detector is not None:
            vlm.detector.max_pixels = max_image_pixels
        return vlm

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
        ignore_eos: bool = False,
    ) -> Result:
        """Answer one request; returns the text and its GuardReport.

        `ignore_eos` decodes exactly `max_new_tokens` (for benchmarks: fixed-length answers).
        """
        sampling = Sampling(temperature, top_k, top_p, seed)
        return self.generate_batch(
            [(image, prompt)], max_new_tokens, sampling, stop, ignore_eos=ignore_eos
        )[0]

    def generate_batch(
        self,
        requests: list[tuple[ImageInput | None, str]],
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
    ) -> list[Result]:
        """Answer several requests together, left-padded into one batch."""
        rows = self._start(requests, max_new_tokens)
        steps = self._decode(rows, max_new_tokens, sampling or Sampling(), stop or [], ignore_eos)
        for _ in steps:
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
                    row.pixels = preprocess_image(
                        row.image, self.processor_config, self.max_image_pixels
                    )
            with row.report.timed("tokenize"):
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
        _refuse(row, stage, reason)

    def _model_failed(
        self, rows: list[_Row], stage: str, reason: str, err: BaseException | None = None
    ) -> None:
        """A model stage failed for these rows: refuse them, or raise where none can refuse."""
        if not rows:
            return
        if self.policy.fail_open or not self.defenses:
            raise ModelRunError(f"{stage}: {reason}") from err
        for row in rows:
            _refuse(row, stage, reason)

    def _required_guards(self, row: _Row) -> None:
        """Refuse when the policy requires a guard this bundle does not carry."""
        carried = self.defenses | ({"detector"} if "detector" in self.manifest else set())
        for guard in self.policy.require:
            if guard not in carried:
                self._fail(row, guard, f"the policy requires {guard} but the bundle lacks it")

    def _load_detector(self) -> object:
        """The bundle's safety detector, in the variant that fits the providers."""
        from vlmguard.guard_models.detector import DetectorNotFoundError, SafetyDetector

        thresholds = dict(self.manifest["detector"].get("thresholds", {}))
        if self.policy.detector_threshold is not None:  # applies to the deciding method's score
            method = thresholds.get("method", "ot")
            for key in ("global", "ot") if method == "any" else (method,):
                thresholds[key] = self.policy.detector_threshold
        try:
            return SafetyDetector(
                self.manifest["detector"],
                self.engine.bundle,
                self.engine.providers,
                thresholds=thresholds,
            )
        except (DetectorNotFoundError, KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"{self.engine.bundle}'s safety detector cannot be loaded ({_first_line(err)}); "
                "re-export the bundle"
            ) from err

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
            scores = {
                "detector_global": float(detection.score_global),
                "detector_ot": float(detection.score_ot),
            }
            unsafe = bool(detection.unsafe)
            top = detection.top_concepts[0]["name"] if detection.top_concepts else "?"
        except Exception as err:  # a detector that cannot judge must not wave the image through
            self._fail(row, "detector", f"the detector failed: {_first_line(err)}")
            return
        if not all(math.isfinite(v) for v in scores.values()):
            self._fail(row, "detector", f"non-finite detector score {scores}")
            return
        row.report.scores |= scores
        row.report.guards_ran.append("detector")
        if unsafe:
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
        started = time.perf_counter()
        vision_before = [row.report.timings_ms.get("vision_encoder", 0.0) for row in live]
        try:
            self._prefill_rows(live)
        finally:
            elapsed = (time.perf_counter() - started) * 1e3
            for row, before in zip(live, vision_before, strict=True):
                vision = row.report.timings_ms.get("vision_encoder", 0.0) - before
                row.report.timings_ms["prefill"] = (
                    row.report.timings_ms.get("prefill", 0.0) + elapsed - vision
                )

    def _prefill_rows(self, live: list[_Row]) -> None:
        """The prefill proper, over the rows `_prefill` chose."""
        features = self._vision_stage(live)
        live = [row for row in live if not row.done]  # rows whose image failed are refused
        if not live:
            return
        encoded = [row.encoded for row in live]
        ids, mask = self.prompts.pad_batch(encoded)
        offsets = [ids.shape[1] - len(e.input_ids) for e in encoded]
        feeds = self._prefill_feeds(live, encoded, offsets, ids, mask)
        state = self.engine.empty_state(len(live))
        try:
            embeds = self.engine.embed(ids)
            for i, row in enumerate(live):
                if row.image is not None:
                    embeds[i, np.asarray(encoded[i].image_rows) + offsets[i]] = features[id(row)]
            outputs, state = self.engine.run_decoder(feeds | {"inputs_embeds": embeds}, state)
        except Exception as err:  # the guarded prefill is itself a guard stage: fail closed
            reason = f"the guarded prefill failed: {_first_line(err)}"
            self._model_failed(live, "prefill", reason, err)
            return
        batch = _Batch(live, state, mask, feeds.get("align_prefix_mask"))
        for row in live:
            ran = [d for d in ("ptr", "align", "oh") if d in self.defenses]
            row.report.guards_ran += [d for d in ran if d not in row.report.guards_ran]
            row.batch = batch
        width = ids.shape[1]
        checks = (
            ("ptr", lambda: self._ptr_stage(live, outputs, width)),
            ("oh", lambda: self._oh_stage(live, outputs)),
        )
        for stage, check in checks:
            if stage in self.defenses:
                try:
                    check()
                except Exception as err:  # a guard that cannot judge must not wave through
                    for row in live:
                        if not row.done:
                            self._fail(row, stage, f"the guard stage failed: {_first_line(err)}")
        batch.last_logits = self._last_logits(batch, outputs, "prefill")

    def _vision_stage(self, rows: list[_Row]) -> dict[int, np.ndarray]:
        """Image features by id(row); rows whose features are unusable are refused."""
        images = [row for row in rows if row.image is not None]
        if not images:
            return {}
        embed_width = self.engine.decoder_inputs.get("inputs_embeds", {}).get("shape", [None])
        want = (len(images), self.prompts.tokens_per_image, embed_width[-1])
        try:
            with _timed_all(rows, "vision_encoder"):
                features = self.engine.image_features(np.concatenate([r.pixels for r in images]))
            if not _floats_of_shape(features, want):
                raise GuardStageError(f"it returned {_describe(features)}, not shape {want}")
        except Exception as err:  # no image features, no answer about the image
            reason = f"the vision encoder failed: {_first_line(err)}"
            self._model_failed(images, "vision_encoder", reason, err)
            return {}
        finite = np.isfinite(features).all(axis=(1, 2))
        bad = [row for row, ok in zip(images, finite, strict=True) if not ok]
        self._model_failed(bad, "vision_encoder", "the vision encoder returned non-finite features")
        return {id(r): f for r, f, ok in zip(images, features, finite, strict=True) if ok}

    def _last_logits(self, batch: _Batch, outputs: dict[str, np.ndarray], stage: str) -> np.ndarray:
        """The last position's logits [B, V]; the live rows whose logits are unusable are refused.

        Non-finite logits would decode into garbage that looks like an answer, so they refuse.
        """
        live = [not row.done and row.batch is batch for row in batch.rows]
        logits = outputs.get("logits")
        want = (len(batch.rows), None, self.vocab_size)
        if not _floats_of_shape(logits, want) or logits.shape[1] == 0:
            rows = [row for row, ok in zip(batch.rows, live, strict=True) if ok]
            reason = f"the decoder returned no usable logits ({_describe(logits)})"
            self._model_failed(rows, stage, reason)
            return np.zeros((len(batch.rows), 1), np.float32)
        last = logits[:, -1]
        finite = np.isfinite(last).all(axis=-1)
        if not finite.all():
            bad = [r for r, ok, on in zip(batch.rows, finite, live, strict=True) if on and not ok]
            self._model_failed(bad, stage, "the decoder returned non-finite logits")
            last = np.where(finite[:, None], last, 0).astype(last.dtype)
        return last

    def _ptr_kept(self, batch: _Batch, before: np.ndarray, after: np.ndarray | None) -> None:
        """Refuse the live rows when a decode step did not carry SafePTR's pruned-key mask on."""
        width = before.shape[1]
        if not (
            isinstance(after, np.ndarray)
            and after.shape == (before.shape[0], width + 1)
            and np.array_equal(after[:, :width], before)
        ):
            for row in batch.rows:
                if not row.done and row.batch is batch:
                    self._fail(row, "ptr", "a decode step dropped SafePTR's pruned-key mask")

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

    def _ptr_stage(self, rows: list[_Row], outputs: dict[str, np.ndarray], width: int) -> None:
        """Check SafePTR's pruned-token mask (0/1 per position) and report how many it masked."""
        pruned = outputs.get("ptr_pruned_mask")
        usable = (
            isinstance(pruned, np.ndarray)
            and pruned.shape == (len(rows), width)
            and (pruned.dtype == np.bool_ or np.issubdtype(pruned.dtype, np.integer))
            and bool(np.isin(pruned, (0, 1)).all())
        )
        for i, row in enumerate(rows):
            if not usable:
                reason = f"the decoder returned no usable pruned-token mask ({_describe(pruned)})"
                self._fail(row, "ptr", reason)
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
        self,
        rows: list[_Row],
        max_new: int,
        sampling: Sampling,
        stop: list[str],
        ignore_eos: bool = False,
    ) -> Iterator[None]:
        """Decode every live row until EOS, a stop string or max_new tokens; yields per step."""
        rng = np.random.default_rng(sampling.seed)
        batches = {id(row.batch): row.batch for row in rows if row.batch is not None}
        for batch in batches.values():
            yield from self._decode_batch(batch, max_new, sampling, stop, rng, ignore_eos)

    def _decode_batch(
        self,
        batch: _Batch,
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
        logits, state, mask, prefix = batch.last_logits, batch.state, batch.mask, batch.prefix
        position = _positions(mask)[:, -1:]
        guard_feeds = self._decode_guard_feeds(size)
        for step in range(max_new):
            picked = time.perf_counter()
            tokens = pick_tokens(logits, sampling, rng)
            for i, row in enumerate(rows):
                if row.done or row.batch is not batch:
                    tokens[i] = pad
                    continue
                row.tokens.append(int(tokens[i]))
                if tokens[i] in eos or self._hit_stop(row, stop):
                    row.done = True
            pick_ms = (time.perf_counter() - picked) * 1e3
            yield
            # rows taken over by a later prefill (Oh's refusal path) are decoded there
            if all(row.done or row.batch is not batch for row in rows) or step == max_new - 1:
                for row in rows:  # the last pick belongs to the last step
                    if row.report.decode_step_ms:
                        row.report.decode_step_ms[-1] += pick_ms
                break
            started = time.perf_counter() - pick_ms / 1e3
            mask = np.concatenate([mask, np.ones((size, 1), np.int64)], axis=1)
            position = position + 1
            feeds = guard_feeds | {"attention_mask": mask, "position_ids": position}
            if prefix is not None:
                prefix = np.concatenate([prefix, np.zeros((size, 1), np.int64)], axis=1)
                feeds["align_prefix_mask"] = prefix
            before = state.pruned
            try:
                feeds["inputs_embeds"] = self.engine.embed(tokens[:, None])
                outputs, state = self.engine.run_decoder(feeds, state)
            except Exception as err:  # a guarded decode step that fails ends the answer
                live = [row for row in rows if not row.done and row.batch is batch]
                self._model_failed(live, "decode", f"a decode step failed: {_first_line(err)}", err)
                break
            if "ptr" in self.defenses and before is not None:
                self._ptr_kept(batch, before, state.pruned)
            logits = self._last_logits(batch, outputs, "decode")
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


def _refuse(row: _Row, stage: str, reason: str) -> None:
    """End a row in a refusal with the reason in its report; tokens decoded so far are dropped."""
    row.report.refuse(stage, reason)
    row.text, row.done, row.tokens = REFUSAL_TEXT, True, []


def _floats_of_shape(value: object, want: tuple[int | None, ...]) -> bool:
    """Whether a model output is a float array of the wanted shape (None: any size)."""
    return (
        isinstance(value, np.ndarray)
        and np.issubdtype(value.dtype, np.floating)
        and value.ndim == len(want)
        and all(not isinstance(w, int) or w == d for w, d in zip(want, value.shape, strict=True))
    )


def _describe(value: object) -> str:
    """A model output's shape and dtype, for a refusal reason."""
    if value is None:
        return "missing"
    if isinstance(value, np.ndarray):
        return f"shape {value.shape}, {value.dtype}"
    return type(value).__name__


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
