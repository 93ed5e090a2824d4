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


@pytest.fixture
def cuda_offered_without_driver(monkeypatch):
    """onnxruntime-gpu's provider list on a machine without an NVIDIA driver."""
    from vlmguard.runtime import providers

    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: offered)
    monkeypatch.setattr(providers, "_loads", lambda *names: False)
    monkeypatch.setattr(providers, "_probed", {})
    monkeypatch.setattr(providers, "_stated", set())
    return providers


def test_an_explicit_provider_that_cannot_run_is_one_line_unless_a_fallback_is_listed(
    cuda_offered_without_driver, caplog
):
    for asked in ("cuda", "tensorrt", "CUDAExecutionProvider", "tensorrt,cuda"):
        with pytest.raises(ProviderError, match="cannot run here: no NVIDIA driver") as err:
            resolve_providers(asked)
        assert "\n" not in str(err.value) and "--providers cpu" in str(err.value)
    assert resolve_providers(None) == ["CPUExecutionProvider"]  # the default stays silent
    assert not caplog.records
    with caplog.at_level("WARNING", logger="vlmguard.runtime"):
        assert resolve_providers("cuda,cpu") == ["CPUExecutionProvider"]
        assert resolve_providers("cuda,cpu") == ["CPUExecutionProvider"]
    stated = [r.getMessage() for r in caplog.records]
    assert len(stated) == 1  # stated once per process
    assert "CUDAExecutionProvider cannot run here" in stated[0] and "falling back" in stated[0]


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu (it offers CUDA even where it cannot run)",
)
def test_cuda_libraries_that_do_not_load_are_found_without_ort_noise(monkeypatch, capfd):
    from vlmguard.runtime import providers

    monkeypatch.setattr(providers, "_probed", {})
    monkeypatch.setattr(providers, "_loads", lambda *names: True)  # as if a driver were there
    reason = providers.unavailable_reason("CUDAExecutionProvider")
    if reason is None:
        pytest.skip("CUDA runs on this machine")
    assert "ONNX Runtime could not create it" in reason
    with pytest.raises(ProviderError, match="cannot run here"):
        resolve_providers("cuda")
    assert resolve_providers(None)[-1] == "CPUExecutionProvider"
    out, err = capfd.readouterr()
    assert "Failed to" not in out + err and "onnxruntime" not in out + err


def test_detect_with_an_explicit_provider_that_cannot_run(cuda_offered_without_driver, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from vlmguard.cli import main

    image = tmp_path / "flower.png"
    Image.new("RGB", (32, 32), "white").save(image)
    refused = CliRunner().invoke(main, ["detect", "default", str(image), "--providers", "cuda"])
    assert refused.exit_code == 1
    assert refused.output.startswith("Error: execution provider 'cuda' cannot run here")
    assert refused.output.count("\n") == 1
    fallback = CliRunner().invoke(
        main, ["detect", "default", str(image), "--providers", "cuda,cpu", "--json"]
    )
    assert fallback.exit_code == 0, fallback.output


def test_a_family_axis_needs_its_range_in_the_graph_record():
    from vlmguard.errors import BundleError

    tiles = TensorSpec("pixel_values", ("num_tiles", 3, 512, 512), "float32")
    graph = GraphRecord("onnx/vision_encoder.onnx", (tiles,), ())
    with pytest.raises(BundleError, match="axis 'num_tiles' with no TensorRT range"):
        trt_profiles(graph, context=512)
    ranged = GraphRecord(graph.file, graph.inputs, (), axes={"num_tiles": [1, 5, 17]})
    profiles = trt_profiles(ranged, context=512)
    assert profiles["trt_profile_max_shapes"] == "pixel_values:17x3x512x512"
