"""Fail-closed guards, the Oh refusal path, and bad input refused before any model runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from support import noise_image

from vlmguard.cli import main
from vlmguard.errors import BundleError
from vlmguard.runtime.guarded_vlm import REFUSAL_TEXT, ContextLengthError, GuardedVLM
from vlmguard.runtime.image_preprocess import ImageInputError
from vlmguard.runtime.policy import GuardPolicy, PolicyError


@pytest.fixture(scope="module")
def guarded(tiny_setup):
    """The tiny clip-llama guarded bundle."""
    return tiny_setup("clip", "llama").bundles["guarded"]


def _with_fault(vlm: GuardedVLM, fault) -> None:
    """Make the decoder's prefill outputs pass through `fault` (decode steps are left alone)."""
    run = vlm.engine.run_decoder

    def faulty(feeds, state):
        outputs, state = run(feeds, state)
        if "guard_positions" in feeds and len(feeds["guard_positions"]):
            outputs = fault(dict(outputs))
        return outputs, state

    vlm.engine.run_decoder = faulty


def _raise(outputs):
    raise RuntimeError("injected fault")


FAULTS = {
    "nan angle": (lambda o: o | {"oh_angle": np.full_like(o["oh_angle"], np.nan)}, "oh", "finite"),
    "inf angle": (lambda o: o | {"oh_angle": np.full_like(o["oh_angle"], np.inf)}, "oh", "finite"),
    "missing angle": (lambda o: {k: v for k, v in o.items() if k != "oh_angle"}, "oh", "oh_angle"),
    "wrong angle shape": (lambda o: o | {"oh_angle": np.zeros(5, np.float32)}, "oh", "oh_angle"),
    "missing pruned mask": (
        lambda o: {k: v for k, v in o.items() if k != "ptr_pruned_mask"},
        "ptr",
        "pruned",
    ),
    "pruned mask of wrong rank": (
        lambda o: o | {"ptr_pruned_mask": np.zeros(3, np.int64)},
        "ptr",
        "pruned",
    ),
    "prefill raises": (_raise, "prefill", "injected fault"),
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_each_guard_fault_ends_in_a_refusal(guarded, fault):
    change, stage, reason = FAULTS[fault]
    vlm = GuardedVLM.load(guarded, providers="cpu")
    if fault == "prefill raises":
        vlm.engine.run_decoder = lambda feeds, state: _raise(None)
    else:
        _with_fault(vlm, change)
    result = vlm.generate(noise_image(0), "What is in this picture?", max_new_tokens=4)
    assert result.report.refused
    assert result.text == REFUSAL_TEXT and result.token_ids == []
    assert result.report.refusal_reason.startswith(stage)
    assert reason in result.report.refusal_reason


def test_fail_open_is_an_explicit_opt_out(guarded):
    vlm = GuardedVLM.load(guarded, providers="cpu", policy={"fail_open": True})
    _with_fault(vlm, FAULTS["nan angle"][0])
    result = vlm.generate(noise_image(0), "What is in this picture?", max_new_tokens=4)
    assert not result.report.refused and len(result.token_ids) == 4
    assert any(d.action == "fail_open" for d in result.report.decisions)


def test_a_required_guard_missing_from_the_bundle_refuses(tiny_setup, guarded):
    vlm = GuardedVLM.load(guarded, providers="cpu", policy={"require": ["detector"]})
    result = vlm.generate(noise_image(0), "Hello?", max_new_tokens=4)
    assert result.report.refused and "detector" in result.report.refusal_reason
    plain = GuardedVLM.load(
        tiny_setup("clip", "llama").bundles["plain"], policy={"require": ["oh"]}
    )
    assert plain.generate(None, "Hello?", max_new_tokens=4).report.refused


def test_oh_refusal_path_prepends_the_instruction_and_forces_the_opening(guarded):
    vlm = GuardedVLM.load(guarded, providers="cpu", policy={"oh_threshold": 0.0})
    result = vlm.generate(noise_image(0), "What is in this picture?", max_new_tokens=6)
    assert not result.report.refused
    assert result.text.startswith("I cannot")
    actions = {d.stage: d.action for d in result.report.decisions}
    assert actions["oh"] == "refusal_path"
    strict = GuardedVLM.load(guarded, providers="cpu", policy={"oh_threshold": 1e9})
    passed = strict.generate(noise_image(0), "What is in this picture?", max_new_tokens=6)
    assert {d.stage: d.action for d in passed.report.decisions}["oh"] == "pass"
    assert not passed.text.startswith("I cannot")


def test_bad_input_is_refused_before_any_model_runs(guarded):
    vlm = GuardedVLM.load(guarded, providers="cpu")

    def never(*args, **kwargs):
        raise AssertionError("a model ran")

    vlm.engine.run_decoder = vlm.engine.image_features = never
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 512"):
        vlm.generate(None, "word " * 600, max_new_tokens=8)
    with pytest.raises(ImageInputError):
        vlm.generate(b"this is not an image", "What is this?")
    with pytest.raises(TypeError, match="prompt must be a str"):
        vlm.generate(None, 42)


def test_bad_bundles_and_policies_say_what_is_wrong(guarded, tmp_path):
    with pytest.raises(BundleError, match="no guard_config.json"):
        GuardedVLM.load(tmp_path)
    newer = tmp_path / "newer"
    shutil.copytree(guarded, newer)
    manifest = json.loads((newer / "guard_config.json").read_text())
    manifest["format_version"] = 99
    (newer / "guard_config.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        GuardedVLM.load(newer)
    with pytest.raises(PolicyError, match="unknown policy key"):
        GuardPolicy.from_dict({"oh_treshold": 2.0})
    with pytest.raises(PolicyError, match="finite"):
        GuardPolicy.from_dict({"oh_threshold": float("nan")})


def test_cli_run_json_and_errors(guarded, tmp_path):
    image = tmp_path / "img.png"
    noise_image(0).save(image)
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "run",
            str(guarded),
            "--image",
            str(image),
            "--prompt",
            "Hi?",
            "--json",
            "--max-new-tokens",
            "5",
            "--providers",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert isinstance(payload["text"], str) and "oh_angle" in payload["report"]["scores"]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    result = runner.invoke(
        main, ["run", str(guarded), "--image", str(tmp_path / "bad.png"), "--prompt", "Hi?"]
    )
    assert result.exit_code == 1 and result.output.startswith("Error:")
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["run", str(guarded), "--prompt", "Hi?", "--providers", "rocm"])
    assert result.exit_code == 1 and "not offered" in result.output


def test_demo_runs_end_to_end(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output and "oh" in result.output
    assert "vlmguard export" in result.output


def test_context_check_keeps_room_for_the_guard_prefixes(guarded):
    vlm = GuardedVLM.load(guarded, providers="cpu")
    prompt = "word " * 200
    plain = vlm.prompts.token_count(prompt, False)
    vlm.engine.run_decoder = _raise  # nothing may run
    with pytest.raises(ContextLengthError, match="guard prefixes"):
        vlm.generate(None, prompt, max_new_tokens=vlm.context - plain)  # fits only unguarded
