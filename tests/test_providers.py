"""Execution-provider choice and TensorRT options (no GPU needed to check them)."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from vlmguard.guards import TensorSpec
from vlmguard.manifest import GraphRecord
from vlmguard.runtime.providers import (
    DEFAULT_ORDER,
    ProviderError,
    engine_cache_dir,
    provider_options,
    resolve_providers,
    trt_profiles,
)

GRAPH = GraphRecord(
    "onnx/decoder_model_merged.onnx",
    (
        TensorSpec("inputs_embeds", ("batch_size", "sequence_length", 64), "float32"),
        TensorSpec(
            "past_key_values.0.key", ("batch_size", 2, "past_sequence_length", 16), "float32"
        ),
        TensorSpec("ptr_k_fraction", (), "float32"),
    ),
    (),
)


def test_short_and_full_names_resolve_and_unknown_ones_are_refused():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    default = resolve_providers(None)
    assert default[-1] == "CPUExecutionProvider"
    assert set(default) <= set(DEFAULT_ORDER) & set(ort.get_available_providers())
    with pytest.raises(ProviderError, match="not offered"):
        resolve_providers("rocm")


def test_tensorrt_gets_fp16_caches_and_explicit_profiles():
    profiles = trt_profiles(GRAPH, context=512, max_batch=4)
    assert profiles["trt_profile_min_shapes"] == (
        "inputs_embeds:1x1x64,past_key_values.0.key:1x2x0x16"
    )
    assert profiles["trt_profile_max_shapes"] == (
        "inputs_embeds:4x512x64,past_key_values.0.key:4x2x512x16"
    )
    trt, cpu = provider_options(
        ["TensorrtExecutionProvider", "CPUExecutionProvider"], "sha-a", profiles
    )
    assert trt["trt_fp16_enable"] and trt["trt_engine_cache_enable"]
    assert trt["trt_profile_opt_shapes"] and cpu == {}
    assert engine_cache_dir("sha-a") != engine_cache_dir("sha-b")
    overridden = provider_options(
        ["TensorrtExecutionProvider"],
        "x",
        overrides={"TensorrtExecutionProvider": {"trt_fp16_enable": False}},
    )
    assert overridden[0]["trt_fp16_enable"] is False
