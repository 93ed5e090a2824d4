"""The bundle's graphs as ONNX Runtime sessions, with the KV cache kept where the provider runs.

The decoder runs through IOBinding on every provider: on CUDA the presents stay on the device
and go straight back in as the next step's past; on the CPU the same code binds host memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlmguard.errors import BundleError
from vlmguard.guards import FEEDBACK
from vlmguard.integrity import DEFAULT_MODE, verify_bundle
from vlmguard.manifest import MANIFEST_NAME, Manifest, read_manifest

from .providers import create_session, provider_options, resolve_providers, trt_profiles

log = logging.getLogger("vlmguard.runtime")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclass
class DecoderState:
    """What one decode step hands the next: past KV (as bound values) and the guards' feedback.

    `carried` holds each guard output that the next step takes back as an input, under that
    input's name (SafePTR: `ptr_pruned_mask` -> `ptr_past_pruned_mask`; vlmguard/guards.py).
    """

    past: dict[str, object] = field(default_factory=dict)
    carried: dict[str, np.ndarray] = field(default_factory=dict)


class BundleEngine:
    """Loads a bundle's graphs once and runs them; knows nothing about guard policy."""

    def __init__(
        self,
        bundle: str | Path,
        providers: list[str] | str | None = None,
        provider_overrides: dict[str, dict] | None = None,
        threads: int | None = None,
        integrity: str = DEFAULT_MODE,
    ) -> None:
        """Check the bundle's files (`integrity`: "sha256" or "size"), then open its graphs."""
        self.bundle = Path(bundle)
        document = read_manifest(self.bundle)
        self.integrity = verify_bundle(self.bundle, integrity, document)  # before any session
        self.manifest = Manifest.from_json(document, self.bundle / MANIFEST_NAME)
        log.info(
            "vlmguard integrity (%s): %d files, %.1f MB in %.0f ms",
            self.integrity.mode,
            self.integrity.files,
            self.integrity.bytes / 1e6,
            self.integrity.seconds * 1e3,
        )
        self.providers = resolve_providers(providers)
        decoder = self.manifest.graphs["decoder"]
        bundle_sha = self.manifest.files.get(decoder.file, {}).get("sha256", "unknown")
        context = self.manifest.model.max_position_embeddings
        self.sessions: dict[str, ort.InferenceSession] = {}
        for role, record in self.manifest.graphs.items():
            path = self.bundle / record.file
            if not path.is_file():
                raise BundleError(f"{self.bundle} lacks {record.file}; re-export the bundle")
            options = provider_options(
                self.providers, bundle_sha, trt_profiles(record, context), provider_overrides
            )
            self.sessions[role] = create_session(path, self.providers, options, threads)
        self.used_providers = {role: s.get_providers() for role, s in self.sessions.items()}
        log.info("vlmguard sessions: %s", self.used_providers)
        self.decoder_inputs = {spec.name: spec for spec in decoder.inputs}
        self.decoder_outputs = [spec.name for spec in decoder.outputs]
        self.float_type = NUMPY_DTYPES[self.manifest.dtype]
        on_gpu = self.used_providers["decoder"][0] != "CPUExecutionProvider"
        self.device = "cuda" if on_gpu else "cpu"

    def has_input(self, name: str) -> bool:
        """Whether the decoder graph takes this (guard) input."""
        return name in self.decoder_inputs

    def image_features(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Vision encoder: the family's vision inputs -> projected features [N, T, hidden]."""
        feeds = {
            name: value.astype(self.float_type, copy=False) if value.dtype.kind == "f" else value
            for name, value in feeds.items()
        }
        return self.sessions["vision_encoder"].run(None, feeds)[0]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """Token embeddings [B, S, hidden]."""
        return self.sessions["embed_tokens"].run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def empty_state(self, batch: int) -> DecoderState:
        """A zero-length past for a prefill."""
        state = DecoderState()
        for name, spec in self.decoder_inputs.items():
            if name.startswith("past_key_values."):
                _, heads, _, dim = spec.dims
                state.past[name] = np.zeros((batch, heads, 0, dim), NUMPY_DTYPES[spec.dtype])
        for name in FEEDBACK.values():
            if self.has_input(name):
                state.carried[name] = np.zeros((batch, 0), np.int64)
        return state

    def run_decoder(
        self, feeds: dict[str, np.ndarray], state: DecoderState
    ) -> tuple[dict[str, np.ndarray], DecoderState]:
        """One decoder step: host feeds + past state -> host outputs (no presents) + next state."""
        session = self.sessions["decoder"]
        binding = session.io_binding()
        for name, value in feeds.items():
            if name in self.decoder_inputs:
                if value.dtype == np.float32 and self.float_type != np.float32:
                    value = value.astype(self.float_type)
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in state.past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name, value in state.carried.items():
            binding.bind_cpu_input(name, value)
        for name in self.decoder_outputs:
            binding.bind_output(name, self.device if name.startswith("present.") else "cpu")
        session.run_with_iobinding(binding)
        values = dict(zip(self.decoder_outputs, binding.get_outputs(), strict=True))
        next_state = DecoderState(
            past={
                "past_key_values." + name[len("present.") :]: value
                for name, value in values.items()
                if name.startswith("present.")
            }
        )
        host = {n: v.numpy() for n, v in values.items() if not n.startswith("present.")}
        next_state.carried = {FEEDBACK[n]: host[n] for n in FEEDBACK if n in host}
        return host, next_state
