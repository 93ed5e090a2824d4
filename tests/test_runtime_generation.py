"""The lean runtime's generation against transformers' generate, on the same tiny weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support import COMBO_IDS, COMBOS, noise_image

from vlmguard.runtime.guarded_vlm import GuardedVLM
from vlmguard.runtime.policy import GuardPolicy
from vlmguard.runtime.sampling import Sampling

PROMPTS = [
    "What is in this picture?",
    "Describe the colours.",
    "Is there an animal here? Answer yes or no.",
    "Tell me a short story about what you see, with a happy ending.",
    "Count the objects.",
    "Where could this photo have been taken?",
    "What would a child say about this image?",
    "List three words for it.",
]
NEW_TOKENS = 32


def _hf_greedy(setup, image, prompt: str, new_tokens: int) -> list[int]:
    """transformers' generate (greedy) on the source model: the new token ids up to EOS."""
    content = ([{"type": "image"}] if image is not None else []) + [
        {"type": "text", "text": prompt}
    ]
    conversation = [{"role": "user", "content": content}]
    text = setup.processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = setup.processor(
        text=[text], images=[image] if image is not None else None, return_tensors="pt"
    )
    with torch.no_grad():
        out = setup.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _vlm(setup, kind: str) -> GuardedVLM:
    """A runtime on the CPU over one of the setup's bundles, with every guard neutral."""
    return GuardedVLM.load(setup.bundles[kind], providers="cpu", policy=GuardPolicy.neutral())


@pytest.mark.parametrize("kind", ["plain", "guarded"])
@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_greedy_generation_is_token_identical_to_transformers(tiny_setup, vision, text, kind):
    setup = tiny_setup(vision, text)
    vlm = _vlm(setup, kind)
    images = [noise_image(10), noise_image(11, (64, 48))]
    for image in images:
        for prompt in PROMPTS:
            result = vlm.generate(image, prompt, max_new_tokens=NEW_TOKENS)
            want = _hf_greedy(setup, image, prompt, NEW_TOKENS)
            assert result.token_ids == want, prompt
            assert not result.report.refused


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_text_only_turn_matches_transformers(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    result = _vlm(setup, "guarded").generate(None, PROMPTS[3], max_new_tokens=16)
    assert result.token_ids == _hf_greedy(setup, None, PROMPTS[3], 16)


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_batch_with_padding_equals_one_by_one(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    vlm = _vlm(setup, "guarded")
    requests = [(noise_image(1), PROMPTS[0]), (None, PROMPTS[3]), (noise_image(2), PROMPTS[6])]
    batched = vlm.generate_batch(requests, max_new_tokens=12)
    for (image, prompt), result in zip(requests, batched, strict=True):
        alone = vlm.generate(image, prompt, max_new_tokens=12)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text


def test_sampling_with_a_seed_is_reproducible(tiny_setup):
    vlm = _vlm(tiny_setup("siglip", "llama"), "guarded")
    image = noise_image(3)

    def sample(seed: int) -> list[int]:
        return vlm.generate(
            image, PROMPTS[1], max_new_tokens=20, sampling=Sampling(1.5, 50, 0.95, seed)
        ).token_ids

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_stream_yields_the_same_text_as_generate(tiny_setup):
    vlm = _vlm(tiny_setup("clip", "qwen2"), "guarded")
    image = noise_image(4)
    whole = vlm.generate(image, PROMPTS[0], max_new_tokens=12)
    stream = vlm.stream(image, PROMPTS[0], max_new_tokens=12)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text == stream.result.text
    assert stream.report.decode_step_ms


def test_report_has_timings_and_guard_decisions(tiny_setup):
    vlm = GuardedVLM.load(tiny_setup("clip", "llama").bundles["guarded"], providers="cpu")
    result = vlm.generate(noise_image(5), PROMPTS[0], max_new_tokens=8)
    report = result.report
    for stage in ("preprocess", "vision_encoder", "prefill", "decode", "total"):
        assert report.timings_ms[stage] >= 0
    assert len(report.decode_step_ms) == 7  # the first token comes from the prefill
    stages = {d.stage: d.action for d in report.decisions}
    assert stages["detector"] == "absent"
    assert stages["oh"] == "observe" and report.scores["oh_angle"] > 0
    assert stages["ptr"] == "prune" and report.pruned_tokens > 0
    assert set(report.guards_ran) == {"ptr", "align", "oh"}
    assert report.providers["decoder"] == ["CPUExecutionProvider"]


def test_runtime_imports_without_torch_or_transformers():
    code = (
        "import sys; import vlmguard; from vlmguard import GuardedVLM; "
        "import vlmguard.runtime.guarded_vlm, vlmguard.cli; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1, top_p=0)
