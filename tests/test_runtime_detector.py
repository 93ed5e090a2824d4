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


def _runtime_modules() -> list[str]:
    """Every module of vlmguard.runtime, subpackages included."""
    import pkgutil

    import vlmguard.runtime

    found = pkgutil.walk_packages(vlmguard.runtime.__path__, "vlmguard.runtime.")
    return ["vlmguard.runtime", *sorted(info.name for info in found)]


@pytest.mark.parametrize("module", _runtime_modules())
def test_each_runtime_module_imports_lean(module):
    """Importing a runtime module loads no guard_models module, nor torch or transformers."""
    import subprocess
    import sys

    code = (
        f"import sys, importlib; importlib.import_module({module!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
        " or m.startswith('vlmguard.guard_models'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_runtime_source_imports_guard_models_or_torch():
    """No runtime file imports guard_models, torch or transformers, even lazily in a function."""
    import ast
    from pathlib import Path

    import vlmguard.runtime

    offending = []
    for root in vlmguard.runtime.__path__:
        for path in sorted(Path(root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    # `from ..guard_models import x` in runtime/ is vlmguard.guard_models too
                    names = [node.module if node.level < 2 else f"vlmguard.{node.module}"]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] in ("torch", "transformers") or name.startswith(
                        "vlmguard.guard_models"
                    ):
                        offending.append(f"{path.name}:{node.lineno} imports {name}")
    assert not offending, offending


def test_the_default_detector_runs_without_guard_models():
    """Loading and running the packaged default leaves guard_models, torch, transformers out."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import numpy as np\n"
        "from vlmguard.runtime.detector import SafetyDetector\n"
        "detection = SafetyDetector.load('default').detect(np.zeros((40, 40, 3), np.uint8))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
        " or m.startswith('vlmguard.guard_models'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_guard_means_no_guard_acts(bundle):
    """--no-guard on a detector bundle: no detector, no prefix, no guard decision, no refusal."""
    from vlmguard.runtime.policy import GuardPolicy

    vlm = GuardedVLM.load(bundle, providers="cpu", policy=GuardPolicy.neutral())
    seen = []
    run = vlm.engine.run_decoder

    def spy(feeds, state):
        seen.append(feeds)
        return run(feeds, state)

    vlm.engine.run_decoder = spy
    result = vlm.generate(noise_image(0), "What is this?", max_new_tokens=3)
    assert vlm.detector is None
    assert [(d.stage, d.action) for d in result.report.decisions] == [("guards", "off")]
    assert result.report.guards_ran == [] and not result.report.refused
    assert "detector_ot" not in result.report.scores and "oh_angle" not in result.report.scores
    prefill = seen[0]
    assert not prefill["align_prefix_mask"].any() and not prefill["align_gamma"].any()
    assert float(prefill["ptr_k_fraction"]) == 0.0
    plain = vlm.prompts.encode("What is this?", True)
    assert prefill["attention_mask"].shape[1] == len(plain.input_ids), "no safety prefix"


def _heatmap(tmp_path, scores, threshold=0.5):
    """Render a score map over a white 32 x 32 view; return the PNG as an RGB array."""
    import numpy as np
    from PIL import Image

    from vlmguard.runtime.detector_heatmap import render_heatmap

    view = np.full((32, 32, 3), 255, np.uint8)
    path = render_heatmap(view, np.asarray(scores, np.float32), threshold, tmp_path / "h.png")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_the_heatmap_scale_is_fixed_around_the_threshold_with_a_colour_bar(tmp_path):
    import numpy as np

    from vlmguard.runtime.detector_heatmap import _RAMP, colorize, scale_scores

    assert scale_scores(np.array([-1.0, 0.0, 0.25, 0.5, 1.0, 3.0]), 0.5).tolist() == [
        0,
        0,
        0.25,
        0.5,
        1,
        1,
    ]
    hottest = colorize(np.array([1.0]))[0].astype(int)
    safe = _heatmap(tmp_path, [[0.10, 0.12], [0.11, 0.14]])  # a safe flower's range
    unsafe = _heatmap(tmp_path, [[0.10, 0.12], [0.11, 1.40]])
    assert safe.shape[1] == 448 and safe.shape[0] > 448  # title band and colour bar added
    band = safe.shape[0] - 448

    def near(pixels, colour, tolerance=80):  # blended 75% over white
        return (np.abs(pixels - colour).sum(axis=-1) < tolerance).any()

    picture_rows = slice(band // 3, band // 3 + 400)  # inside the picture, whatever the split
    assert not near(safe[picture_rows], hottest)  # a low maximum is not painted hottest
    assert near(unsafe[picture_rows], hottest)  # a patch far over the threshold is
    bar = safe[-band // 2 :]
    assert near(bar, hottest) and near(bar, _RAMP[0].astype(int))  # the colour bar, both ends
    title = safe[2:12]  # the title: white text on a dark band, not on the picture
    assert np.median(title.sum(axis=-1)) < 150 and (title.min(axis=-1) > 200).any()
