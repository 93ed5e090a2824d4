"""The CUDA execution provider against the CPU on the same bundles (runs only where a GPU is).

CI has no GPU, so these skip there (the reason says so); on a GPU machine with onnxruntime-gpu
they check that the IOBinding path keeps the KV cache on the device and answers like the CPU.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from support import noise_image

from vlmguard.export.exporter import export_bundle
from vlmguard.runtime.guarded_vlm import GuardedVLM
from vlmguard.runtime.providers import resolve_providers

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _cuda_usable() -> bool:
    """Whether onnxruntime offers CUDA and a session really runs on it."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return "CUDAExecutionProvider" in resolve_providers(None)


pytestmark = pytest.mark.skipif(not _cuda_usable(), reason="no CUDA GPU on this machine")
REQUESTS = [
    (noise_image(1, (64, 48)), "what is in the picture?"),
    (noise_image(2, (30, 90)), "describe the colours"),
    (None, "tell me a short story"),
]


@pytest.fixture(scope="module")
def bundles(tiny_setup, tmp_path_factory):
    """fp32 and fp16 guarded bundles with the default detector (fp32, int8 and fp16 variants)."""
    source = tiny_setup("clip", "llama").source
    root = tmp_path_factory.mktemp("cuda")
    return {
        dtype: export_bundle(
            source, root / dtype, dtype=dtype, detector="default", detector_quantize="int8,fp16"
        )
        for dtype in ("fp32", "fp16")
    }


def test_sessions_really_run_on_cuda(bundles):
    vlm = GuardedVLM.load(bundles["fp32"], providers=CUDA)
    for role, used in vlm.engine.used_providers.items():
        assert used[0] == "CUDAExecutionProvider", role
    assert vlm.detector.variant == "fp16"  # never dynamic int8 on a GPU provider
    result = vlm.generate(*REQUESTS[0], max_new_tokens=2)
    assert result.report.providers["decoder"][0] == "CUDAExecutionProvider"
    assert not result.report.refused


def test_present_kv_stays_on_the_device(bundles):
    vlm = GuardedVLM.load(bundles["fp32"], providers=CUDA)
    ids = np.array([[1, 5, 9, 17]], np.int64)
    feeds = {
        "inputs_embeds": vlm.engine.embed(ids),
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(4, dtype=np.int64)[None],
    } | vlm._decode_guard_feeds(1)
    feeds["guard_positions"] = np.arange(4, dtype=np.int64)
    feeds["ptr_image_mask"] = np.zeros_like(ids)
    feeds["ptr_instruction_mask"] = np.zeros_like(ids)
    feeds["align_prefix_mask"] = np.zeros_like(ids)
    _, state = vlm.engine.run_decoder(feeds, vlm.engine.empty_state(1))
    assert all(value.device_name().lower() == "cuda" for value in state.past.values())


def test_fp32_on_cuda_answers_like_the_cpu(bundles):
    cpu = GuardedVLM.load(bundles["fp32"], providers="cpu")
    gpu = GuardedVLM.load(bundles["fp32"], providers=CUDA)
    for image, prompt in REQUESTS:
        want = cpu.generate(image, prompt, max_new_tokens=8)
        got = gpu.generate(image, prompt, max_new_tokens=8)
        assert got.token_ids == want.token_ids
        assert got.report.pruned_tokens == want.report.pruned_tokens
        # ORT's CUDA provider runs fp32 matmuls in TF32 by default; the angle (arccos of a
        # cosine near 1) amplifies that: 0.009 degrees apart on an H200, same tokens
        assert got.report.scores["oh_angle"] == pytest.approx(
            want.report.scores["oh_angle"], abs=0.05
        )
        for key in ("detector_global", "detector_ot"):  # fp16 detector on CUDA vs fp32 on CPU
            if key in want.report.scores:
                assert got.report.scores[key] == pytest.approx(want.report.scores[key], abs=2e-2)


def test_fp16_on_cuda_keeps_the_first_tokens(bundles):
    cpu = GuardedVLM.load(bundles["fp32"], providers="cpu")
    gpu = GuardedVLM.load(bundles["fp16"], providers=CUDA)
    agree = 0
    for image, prompt in REQUESTS:
        want = cpu.generate(image, prompt, max_new_tokens=4).token_ids
        got = gpu.generate(image, prompt, max_new_tokens=4).token_ids
        agree += got[0] == want[0]
    assert agree >= len(REQUESTS) - 1  # random tiny weights have near-ties; fp16 may flip one
