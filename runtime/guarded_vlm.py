"""GuardedVLM: guarded generation from a bundle, fail-closed (docs/architecture.md).

Per request: input checks -> preprocess (the family's) -> detector verdict (or "absent") ->
safety prefix and attentive calibration when flagged -> prefill with the SafePTR and Oh taps
-> Oh's refusal path when the angle passes the threshold -> decode with the pruned keys kept
masked. The guards' online stages live in `runtime/guards/`, the decode loop in
`runtime/generation.py`, one request's state in `runtime/request.py`; this module wires them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from vlmguard.guards import DECODER_GUARDS

from .engine import BundleEngine
from .families import runtime_family
from .generation import Generator, TokenStream
from .guards import FailRule, decoder_stages
from .guards.base import PrefillLayout
from .guards.detector import detector_stage, load_detector
from .image_preprocess import DEFAULT_MAX_IMAGE_PIXELS, ImageInput
from .policy import GuardPolicy, PolicyError, check_policy_fits
from .prompting import PromptBuilder
from .request import (
    REFUSAL_TEXT,
    Batch,
    ContextLengthError,
    ModelRunError,
    Request,
    Result,
    describe,
    first_line,
    floats_of_shape,
    timed_all,
)
from .sampling import Sampling

__all__ = ["REFUSAL_TEXT", "ContextLengthError", "GuardedVLM", "ModelRunError", "Result"]
POLICY_FILE = "policy.json"  # a bundle's calibrated policy, if calibration wrote one
UNGUARDED = "unguarded baseline (--no-guard): every guard input neutral, no guard acts"


class GuardedVLM:
    """A guarded vision-language model loaded from a bundle."""

    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images are refused

    def __init__(self, engine: BundleEngine, policy: GuardPolicy) -> None:
        self.engine = engine
        self.policy = policy
        self.manifest = engine.manifest
        check_policy_fits(policy, self.manifest, engine.bundle)  # a calibrated policy fits
        self.family = runtime_family(engine.bundle, self.manifest)
        self.prompts = PromptBuilder.from_bundle(
            engine.bundle, self.manifest.to_json(), self.family.expand_image
        )
        self.defenses = self.manifest.defenses
        self.context = self.manifest.model.max_position_embeddings
        self.rule = FailRule(policy, guarded=bool(self.defenses) and policy.guarded)
        self.stages = decoder_stages(self.defenses, policy, self.rule, self._gamma())
        logits = self.manifest.graphs["decoder"].output("logits")
        vocab_size = logits.dims[-1] if logits else None  # checked on every step's logits
        self.generator = Generator(
            engine, self.prompts, self.family, self.stages, self.rule, vocab_size
        )
        carried = self.manifest.detector is not None and policy.guarded  # unguarded: not loaded
        self.detector = load_detector(engine, policy) if carried else None

    def _gamma(self) -> np.ndarray:
        """GuardAlign's per-layer strengths: the policy's, else the bundle's defaults."""
        layers = self.manifest.model.num_layers
        default = self.manifest.guards.get("align", {}).get("default_gamma", [0.0] * layers)
        gamma = default if self.policy.align_gamma is None else self.policy.align_gamma
        if len(gamma) > layers:
            raise PolicyError(f"align_gamma has {len(gamma)} values for a {layers}-layer model")
        out = np.zeros(layers, np.float32)
        out[: len(gamma)] = gamma
        return out

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
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
    ) -> Result:
        """Answer one request; returns the text and its GuardReport.

        `ignore_eos` decodes exactly `max_new_tokens` (for benchmarks: fixed-length answers).
        """
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
        steps = self.generator.decode(
            rows, max_new_tokens, sampling or Sampling(), stop or [], ignore_eos
        )
        for _ in steps:
            pass
        return [self.generator.result(row, stop) for row in rows]

    def stream(
        self,
        image: ImageInput | None,
        prompt: str,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
    ) -> TokenStream:
        """Yield the answer's text piece by piece; the report is on the stream when it ends."""
        rows = self._start([(image, prompt)], max_new_tokens)
        steps = self.generator.decode(
            rows, max_new_tokens, sampling or Sampling(), stop or [], ignore_eos
        )
        return TokenStream(self.generator, rows[0], steps, stop or [])

    # ----------------------------------------------------------------- pipeline

    def _start(self, requests: list[tuple[ImageInput | None, str]], max_new: int) -> list[Request]:
        """Check inputs, run the pre-prefill guards, then prefill (with Oh's refusal path)."""
        started = time.perf_counter()
        rows = [Request(image, prompt) for image, prompt in requests]
        for row in rows:  # bad input fails here, before any model runs
            if not isinstance(row.prompt, str):
                raise TypeError(f"prompt must be a str, not {type(row.prompt).__name__}")
            if row.image is not None:
                with row.report.timed("preprocess"):
                    row.pixels = self.family.preprocess(row.image, self.max_image_pixels)
            with row.report.timed("tokenize"):
                self._encode(row)
                self._check_context(row, max_new)
        for row in rows:
            row.report.providers = self.engine.used_providers
            if not self.policy.guarded:
                row.report.decide("guards", "off", UNGUARDED)
                continue
            self._required_guards(row)
            if not row.done:
                detector_stage(self.detector, row, self.rule)
                if row.flagged:
                    self._encode(row)
        self._prefill(rows)
        if any(row.refusal_path for row in rows):
            for row in rows:
                if row.refusal_path and not row.done:
                    self._encode(row)
            self._prefill(rows)  # again, with Oh's safety instruction and refusal opening
        for row in rows:
            row.report.timings_ms["total"] = (time.perf_counter() - started) * 1e3
        return rows

    def _encode(self, row: Request) -> None:
        """Tokenize the request's conversation with whatever prefixes its guards asked for."""
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

    def _check_context(self, row: Request, max_new: int) -> None:
        """Refuse, before any model runs, a prompt that cannot fit the context window.

        Room is kept for the longest prompt the guards may make of it (safety prefix, Oh's
        instruction and forced opening), so no guard can push a request past the context.
        """
        oh = "oh" in self.defenses and self.policy.guarded
        prefix = (self.policy.align_safety_prefix if self.detector is not None else "") + (
            self.policy.oh_safety_instruction if oh else ""
        )
        opening = " " + self.policy.oh_refusal_opening if oh else ""
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

    def _required_guards(self, row: Request) -> None:
        """Refuse when the policy requires a guard this bundle does not carry."""
        carried = self.defenses | ({"detector"} if self.manifest.detector is not None else set())
        for guard in self.policy.require:
            if guard not in carried:
                reason = f"the policy requires {guard} but the bundle lacks it"
                self.rule.guard_failed(row, guard, reason)

    def _prefill(self, rows: list[Request]) -> None:
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

    def _prefill_rows(self, live: list[Request]) -> None:
        """The prefill proper, over the requests `_prefill` chose."""
        features = self._vision_stage(live)
        live = [row for row in live if not row.done]  # requests whose image failed are refused
        if not live:
            return
        encoded = [row.encoded for row in live]
        ids, mask = self.prompts.pad_batch(encoded)
        layout = PrefillLayout(
            encoded, [ids.shape[1] - len(e.input_ids) for e in encoded], ids.shape[1]
        )
        feeds = {"attention_mask": mask, "position_ids": self.family.position_ids(mask)}
        if self.engine.has_input("guard_positions"):
            feeds["guard_positions"] = np.arange(ids.shape[1], dtype=np.int64)
        for stage in self.stages.values():
            feeds |= stage.prefill_feeds(live, layout)
        state = self.engine.empty_state(len(live))
        try:
            embeds = self.engine.embed(ids)
            for i, row in enumerate(live):
                if row.image is not None:
                    rows = np.asarray(encoded[i].image_rows) + layout.offsets[i]
                    embeds[i, rows] = features[id(row)]
            outputs, state = self.engine.run_decoder(feeds | {"inputs_embeds": embeds}, state)
        except Exception as err:  # the guarded prefill is itself a guard stage: fail closed
            reason = f"the guarded prefill failed: {first_line(err)}"
            self.rule.model_failed(live, "prefill", reason, err)
            return
        batch = Batch(live, state, mask)
        for stage in self.stages.values():
            stage.begin_decode(batch, feeds)
        for row in live:
            row.batch = batch
        if self.policy.guarded:
            self._guard_taps(live, outputs, layout)
        batch.last_logits = self.generator.last_logits(batch, outputs, "prefill")

    def _guard_taps(
        self, live: list[Request], outputs: dict[str, np.ndarray], layout: PrefillLayout
    ) -> None:
        """Each carried guard reads its prefill outputs and acts; one that cannot judge fails."""
        for row in live:
            ran = [d for d in DECODER_GUARDS if d in self.defenses]
            row.report.guards_ran += [d for d in ran if d not in row.report.guards_ran]
        for stage in self.stages.values():
            try:
                stage.after_prefill(live, outputs, layout)
            except Exception as err:  # a guard that cannot judge must not wave through
                for row in live:
                    if not row.done:
                        reason = f"the guard stage failed: {first_line(err)}"
                        self.rule.guard_failed(row, stage.name, reason)

    def _vision_stage(self, rows: list[Request]) -> dict[int, np.ndarray]:
        """Image features by id(request); requests whose features are unusable are refused."""
        images = [row for row in rows if row.image is not None]
        if not images:
            return {}
        embeds = self.engine.decoder_inputs.get("inputs_embeds")
        want = (len(images), self.prompts.tokens_per_image, embeds.dims[-1] if embeds else None)
        try:
            with timed_all(rows, "vision_encoder"):
                feeds = self.family.vision_feeds([r.pixels for r in images])
                features = self.engine.image_features(feeds)
            if not floats_of_shape(features, want):
                raise ValueError(f"it returned {describe(features)}, not shape {want}")
        except Exception as err:  # no image features, no answer about the image
            reason = f"the vision encoder failed: {first_line(err)}"
            self.rule.model_failed(images, "vision_encoder", reason, err)
            return {}
        finite = np.isfinite(features).all(axis=(1, 2))
        bad = [row for row, ok in zip(images, finite, strict=True) if not ok]
        reason = "the vision encoder returned non-finite features"
        self.rule.model_failed(bad, "vision_encoder", reason)
        return {id(r): f for r, f, ok in zip(images, features, finite, strict=True) if ok}
