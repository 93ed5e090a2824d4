"""A bundle with the safety detector: export --detector, the runtime's detector stage."""

from __future__ import annotations

import dataclasses
import math

import pytest
from support import noise_image

from vlmguard.manifest import read_manifest
from vlmguard.runtime.guarded_vlm import REFUSAL_TEXT, GuardedVLM

LOW, HIGH = {"detector_threshold": -1e9}, {"detector_threshold": 1e9}


@pytest.fixture(scope="module")
def bundle(detector_bundle):
    """The tiny clip-llama model exported with every guard and the default detector."""
    return detector_bundle


def _actions(result) -> dict[str, str]:
    return {d.stage: d.action for d in result.report.decisions}


def test_export_puts_the_detector_in_the_bundle(bundle):
    manifest = read_manifest(bundle)
    files = manifest["detector"]["files"]
    assert set(files) >= {"fp32", "int8"}
    for file in files.values():
        assert file in manifest["files"], "detector graphs are hashed like every other file"


def test_a_flagged_image_turns_on_the_safety_prefix_and_calibration(bundle):
    flagged = GuardedVLM.load(bundle, providers="cpu", policy=LOW)
    result = flagged.generate(noise_image(0), "What is this?", max_new_tokens=4)
    assert _actions(result)["detector"] == "flag" and _actions(result)["align"] == "calibrate"
    assert "detector" in result.report.guards_ran
    assert math.isfinite(result.report.scores["detector_ot"])
    assert result.report.timings_ms["detector"] > 0
    passed = GuardedVLM.load(bundle, providers="cpu", policy=HIGH)
    result = passed.generate(noise_image(0), "What is this?", max_new_tokens=4)
    assert _actions(result)["detector"] == "pass" and "align" not in _actions(result)
    text_only = passed.generate(None, "Hello?", max_new_tokens=4)
    assert _actions(text_only)["detector"] == "pass" and not text_only.report.refused


def test_the_flagged_prompt_carries_the_prefix(bundle):
    vlm = GuardedVLM.load(bundle, providers="cpu", policy=LOW)
    seen = []
    run = vlm.engine.run_decoder

    def spy(feeds, state):
        seen.append(feeds.get("align_prefix_mask"))
        return run(feeds, state)

    vlm.engine.run_decoder = spy
    vlm.generate(noise_image(0), "What is this?", max_new_tokens=2)
    assert seen[0].sum() > 5, "the safety prefix rows are marked for calibration"


@pytest.mark.parametrize("fault", ["raises", "nan"])
def test_a_failing_detector_refuses(bundle, fault):
    vlm = GuardedVLM.load(bundle, providers="cpu", policy=HIGH)
    detect = vlm.detector.detect

    def broken(image):
        if fault == "raises":
            raise RuntimeError("injected detector fault")
        return dataclasses.replace(detect(image), score_ot=float("nan"))

    vlm.detector.detect = broken
    result = vlm.generate(noise_image(0), "What is this?", max_new_tokens=4)
    assert result.report.refused and result.text == REFUSAL_TEXT
    assert result.report.refusal_reason.startswith("detector")
