"""Fault injection: every guard and model stage failing in every way ends fail-closed.

The request matrix (`REQUEST_FAULTS`) breaks one stage of a guarded bundle with a safety
detector in one way per case: the stage raises, returns NaN or inf, an output of the wrong
shape or dtype, or no output at all. Fail-closed, each case must end in a refusal whose reason
names the stage, with no tokens of the answer kept. Under `fail_open` a guard stage (detector,
ptr, oh) is skipped with a "fail_open" decision and the answer is the one the model gives
unhindered, while a model stage (vision encoder, prefill, decode) has no unguarded answer to
fall back to and raises a one-line ModelRunError. The load matrix (`LOAD_FAULTS`) makes each
graph's ONNX Runtime session fail to be created: loading must raise a one-line BundleError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidProtobuf
from support import noise_image

from vlmguard.cli import main
from vlmguard.errors import BundleError
from vlmguard.manifest import read_manifest
from vlmguard.runtime.guarded_vlm import REFUSAL_TEXT, GuardedVLM, ModelRunError
from vlmguard.runtime.policy import GuardPolicy
from vlmguard.runtime.sampling import Sampling

PROMPT = "What is in this picture?"
MAX_NEW = 5
PASS = {"detector_threshold": 1e9}  # the detector runs and lets the noise image through
GUARD_STAGES = {"detector", "ptr", "oh"}  # fail_open skips these; the rest are model stages
Install = Callable[[GuardedVLM, pytest.MonkeyPatch], None]


@pytest.fixture(scope="module")
def bundle(detector_bundle) -> Path:
    """The tiny clip-llama model with every in-model guard and the default safety detector."""
    return detector_bundle


@pytest.fixture(scope="module")
def closed(bundle) -> GuardedVLM:
    """The bundle under the default, fail-closed policy."""
    return GuardedVLM.load(bundle, providers="cpu", policy=PASS)


@pytest.fixture(scope="module")
def opened(closed) -> GuardedVLM:
    """The same engine under a fail_open policy."""
    return GuardedVLM(closed.engine, GuardPolicy.from_dict(PASS | {"fail_open": True}))


@pytest.fixture(scope="module")
def clean(closed):
    """The unbroken answer every fault is compared with."""
    return closed.generate(noise_image(0), PROMPT, max_new_tokens=MAX_NEW)


# ---------------------------------------------------------------- how to break each stage


def _nan(array: np.ndarray) -> np.ndarray:
    return np.full_like(array, np.nan)


def _inf(array: np.ndarray) -> np.ndarray:
    return np.full_like(array, np.inf)


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected fault\nsecond line of an ORT-style message")


def _detector(change: Callable[[dict], dict]) -> Install:
    """Pass the detector graph's outputs through `change` (detect() then reads them)."""

    def install(vlm: GuardedVLM, monkeypatch: pytest.MonkeyPatch) -> None:
        run = vlm.detector.run
        monkeypatch.setattr(vlm.detector, "run", lambda pixels: change(dict(run(pixels))))

    return install


def _detection(change: Callable[[object], object]) -> Install:
    """Pass detect()'s Detection through `change`."""

    def install(vlm: GuardedVLM, monkeypatch: pytest.MonkeyPatch) -> None:
        detect = vlm.detector.detect
        monkeypatch.setattr(vlm.detector, "detect", lambda image: change(detect(image)))

    return install


def _vision(change: Callable[[np.ndarray], np.ndarray]) -> Install:
    """Pass the vision encoder's features through `change`."""

    def install(vlm: GuardedVLM, monkeypatch: pytest.MonkeyPatch) -> None:
        features = vlm.engine.image_features
        monkeypatch.setattr(vlm.engine, "image_features", lambda pixels: change(features(pixels)))

    return install


class _NoOutputSession:
    """A session whose run returns no outputs at all."""

    def run(self, names: object, feeds: object) -> list:
        return []


def _vision_session_without_output(vlm: GuardedVLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vlm.engine.sessions, "vision_encoder", _NoOutputSession())


def _decoder(phase: str, change: Callable[[dict], dict], at_step: int = 2) -> Install:
    """Pass the decoder's outputs through `change` at the prefill or at decode step `at_step`.

    Only what GuardedVLM reads is changed; the KV state handed on stays the real one.
    """

    def install(vlm: GuardedVLM, monkeypatch: pytest.MonkeyPatch) -> None:
        run = vlm.engine.run_decoder
        steps = [0]

        def faulty(feeds, state):
            prefill = len(feeds["guard_positions"]) > 0
            steps[0] += not prefill
            outputs, state = run(feeds, state)
            if (phase == "prefill") == prefill and (prefill or steps[0] == at_step):
                outputs = change(dict(outputs))
            return outputs, state

        monkeypatch.setattr(vlm.engine, "run_decoder", faulty)

    return install


def _decoder_raises(phase: str) -> Install:
    """Make the decoder raise at the prefill or at the second decode step."""
    return _decoder(phase, _boom)


def _embedding(phase: str, change: Callable[[np.ndarray], np.ndarray]) -> Install:
    """Pass the token embeddings through `change` at the prefill or at the second decode step."""

    def install(vlm: GuardedVLM, monkeypatch: pytest.MonkeyPatch) -> None:
        embed = vlm.engine.embed
        steps = [0]

        def faulty(ids):
            prefill = ids.shape[1] > 1  # a decode step embeds one token per row
            steps[0] += not prefill
            embeds = embed(ids)
            if (phase == "prefill") == prefill and (prefill or steps[0] == 2):
                embeds = change(embeds)
            return embeds

        monkeypatch.setattr(vlm.engine, "embed", faulty)

    return install


def _stage_raises(guard: str) -> Install:
    """Make a guard stage's own check raise."""

    def install(vlm: GuardedVLM, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(vlm.stages[guard], "after_prefill", _boom)

    return install


def _pruned_mask_dropped_at_decode(vlm: GuardedVLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step hands on a pruned-key mask that unmasks every pruned key."""
    run = vlm.engine.run_decoder

    def faulty(feeds, state):
        outputs, state = run(feeds, state)
        if not len(feeds["guard_positions"]):
            mask = state.carried["ptr_past_pruned_mask"]
            state = dataclasses.replace(state, carried={"ptr_past_pruned_mask": 0 * mask})
        return outputs, state

    monkeypatch.setattr(vlm.engine, "run_decoder", faulty)


def _with(name: str, value: Callable[[np.ndarray], object]) -> Callable[[dict], dict]:
    """An output change: replace output `name` with value(original)."""
    return lambda outputs: outputs | {name: value(outputs[name])}


def _without(name: str) -> Callable[[dict], dict]:
    """An output change: drop output `name`."""
    return lambda outputs: {k: v for k, v in outputs.items() if k != name}


def _logit_faults(phase: str) -> list:
    """The same faults for the embeddings and logits of the prefill or of a decode step."""
    failed = "the guarded prefill failed" if phase == "prefill" else "a decode step failed"
    return [
        (phase, "embedding exception", _embedding(phase, _boom), "injected fault"),
        (phase, "embedding wrong shape", _embedding(phase, lambda e: e[..., :-1]), failed),
        (phase, "exception", _decoder_raises(phase), "injected fault"),
        (phase, "nan", _decoder(phase, _with("logits", _nan)), "non-finite logits"),
        (phase, "inf", _decoder(phase, _with("logits", _inf)), "non-finite logits"),
        (
            phase,
            "wrong shape",
            _decoder(phase, _with("logits", lambda a: a[:, -1])),
            "no usable logits (shape",
        ),
        (phase, "missing output", _decoder(phase, _without("logits")), "no usable logits (missing"),
        (
            phase,
            "wrong dtype",
            _decoder(phase, _with("logits", lambda a: a.astype(np.int64))),
            "int64",
        ),
    ]


REQUEST_FAULTS = [
    # stage, kind, how, a fragment of the refusal reason (which starts with "stage:")
    ("detector", "exception", _detector(_boom), "injected fault"),
    ("detector", "nan", _detector(_with("det_score_ot", _nan)), "non-finite detector score"),
    ("detector", "inf", _detector(_with("det_score_global", _inf)), "non-finite detector score"),
    (
        "detector",
        "wrong shape",
        _detector(_with("det_score_global", lambda a: np.zeros((len(a), 2), a.dtype))),
        "the detector failed",
    ),
    ("detector", "missing output", _detector(_without("det_score_ot")), "det_score_ot"),
    (
        "detector",
        "wrong dtype",
        _detector(_with("det_score_ot", lambda a: np.array(["unsafe"] * len(a)))),
        "the detector failed",
    ),
    (
        "detector",
        "non-number score",
        _detection(lambda d: dataclasses.replace(d, score_ot=None)),
        "the detector failed",
    ),
    ("vision_encoder", "exception", _vision(_boom), "injected fault"),
    ("vision_encoder", "nan", _vision(_nan), "non-finite features"),
    ("vision_encoder", "inf", _vision(_inf), "non-finite features"),
    ("vision_encoder", "wrong token count", _vision(lambda f: f[:, :-1]), "not shape (1, 16, 64)"),
    ("vision_encoder", "wrong width", _vision(lambda f: f[..., :-1]), "not shape (1, 16, 64)"),
    ("vision_encoder", "wrong rank", _vision(lambda f: f[0]), "not shape (1, 16, 64)"),
    ("vision_encoder", "missing output", _vision_session_without_output, "index out of range"),
    ("vision_encoder", "wrong dtype", _vision(lambda f: f.astype(np.int64)), "int64"),
    *_logit_faults("prefill"),
    ("ptr", "exception", _stage_raises("ptr"), "injected fault"),
    (
        "ptr",
        "nan",
        _decoder("prefill", _with("ptr_pruned_mask", lambda m: _nan(m.astype(np.float32)))),
        "no usable pruned-token mask",
    ),
    (
        "ptr",
        "wrong shape",
        _decoder("prefill", _with("ptr_pruned_mask", lambda m: m[:, 1:])),
        "no usable pruned-token mask",
    ),
    (
        "ptr",
        "wrong rank",
        _decoder("prefill", _with("ptr_pruned_mask", lambda m: m[0])),
        "no usable pruned-token mask",
    ),
    (
        "ptr",
        "missing output",
        _decoder("prefill", _without("ptr_pruned_mask")),
        "pruned-token mask (missing)",
    ),
    (
        "ptr",
        "wrong dtype",
        _decoder("prefill", _with("ptr_pruned_mask", lambda m: m.astype(np.float32))),
        "float32",
    ),
    (
        "ptr",
        "values not 0/1",
        _decoder("prefill", _with("ptr_pruned_mask", lambda m: m - 1)),
        "no usable pruned-token mask",
    ),
    ("ptr", "mask dropped at decode", _pruned_mask_dropped_at_decode, "pruned-key mask"),
    ("oh", "exception", _stage_raises("oh"), "injected fault"),
    ("oh", "nan", _decoder("prefill", _with("oh_angle", _nan)), "not finite"),
    ("oh", "inf", _decoder("prefill", _with("oh_angle", _inf)), "not finite"),
    (
        "oh",
        "wrong shape",
        _decoder("prefill", _with("oh_angle", lambda a: np.zeros(5, a.dtype))),
        "no usable oh_angle",
    ),
    ("oh", "missing output", _decoder("prefill", _without("oh_angle")), "no usable oh_angle"),
    (
        "oh",
        "wrong dtype",
        _decoder("prefill", _with("oh_angle", lambda a: np.array(["wide"] * len(a)))),
        "the guard stage failed",
    ),
    *_logit_faults("decode"),
]
REQUEST_IDS = [f"{stage}-{kind}" for stage, kind, _, _ in REQUEST_FAULTS]


def test_the_matrix_covers_every_stage_and_fault_kind():
    stages = {stage for stage, *_ in REQUEST_FAULTS}
    assert stages == {"detector", "vision_encoder", "prefill", "ptr", "oh", "decode"}
    for stage in stages:
        kinds = {kind for s, kind, *_ in REQUEST_FAULTS if s == stage}
        assert {"exception", "nan", "missing output", "wrong dtype"} <= kinds, stage
        assert any("shape" in kind or "rank" in kind for kind in kinds), stage
    assert len(REQUEST_IDS) == len(set(REQUEST_IDS))


def test_the_unbroken_request_is_answered_in_full(clean):
    assert not clean.report.refused and len(clean.token_ids) == MAX_NEW
    assert {"detector", "ptr", "oh"} <= set(clean.report.guards_ran)


@pytest.mark.parametrize("stage, kind, install, reason", REQUEST_FAULTS, ids=REQUEST_IDS)
def test_fail_closed(closed, monkeypatch, stage, kind, install, reason):
    install(closed, monkeypatch)
    result = closed.generate(noise_image(0), PROMPT, max_new_tokens=MAX_NEW)
    report = result.report
    assert report.refused, f"{stage} {kind} was answered: {result.text!r}"
    assert result.text == REFUSAL_TEXT and result.token_ids == []
    assert report.refusal_reason.startswith(f"{stage}: "), report.refusal_reason
    assert reason in report.refusal_reason, report.refusal_reason
    assert "\n" not in report.refusal_reason
    assert [d.action for d in report.decisions if d.stage == stage][-1] == "refuse"


@pytest.mark.parametrize("stage, kind, install, reason", REQUEST_FAULTS, ids=REQUEST_IDS)
def test_fail_open(opened, clean, monkeypatch, stage, kind, install, reason):
    install(opened, monkeypatch)
    if stage not in GUARD_STAGES:  # a model stage: there is no unguarded answer to give
        with pytest.raises(ModelRunError, match=f"^{stage}: ") as info:
            opened.generate(noise_image(0), PROMPT, max_new_tokens=MAX_NEW)
        assert reason in str(info.value) and "\n" not in str(info.value)
        return
    result = opened.generate(noise_image(0), PROMPT, max_new_tokens=MAX_NEW)
    assert not result.report.refused and result.token_ids
    skipped = [d for d in result.report.decisions if d.action == "fail_open"]
    assert [d.stage for d in skipped] == [stage] and reason in skipped[0].reason
    if kind != "mask dropped at decode":  # the model itself ran unchanged: the same answer
        assert (result.text, result.token_ids) == (clean.text, clean.token_ids)


# ---------------------------------------------------------------- sessions that cannot be made

LOAD_ERRORS = {
    "ort fail": lambda name: Fail(f"[ONNXRuntimeError] : 1 : FAIL : Load model {name} failed\nat"),
    "ort protobuf": lambda name: InvalidProtobuf(
        f"[ONNXRuntimeError] : 7 : INVALID_PROTOBUF\n{name}"
    ),
    "provider error": lambda name: RuntimeError("CUDA failure 100: no CUDA-capable device\nmore"),
}
ROLES = ["vision_encoder", "embed_tokens", "decoder", "detector"]
LOAD_FAULTS = [(role, error) for role in ROLES for error in LOAD_ERRORS]


def _graph_file(bundle: Path, role: str) -> str:
    """The file name of a role's graph (the detector's: the variant the CPU gets)."""
    manifest = read_manifest(bundle)
    if role == "detector":
        return Path(manifest["detector"]["files"]["int8"]).name
    return Path(manifest["graphs"][role]["file"]).name


def _failing_sessions(monkeypatch: pytest.MonkeyPatch, file: str, error: Exception) -> None:
    """ONNX Runtime raises `error` when asked for a session on `file`."""
    real = ort.InferenceSession

    def session(path, *args, **kwargs):
        if Path(path).name == file:
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)


@pytest.mark.parametrize(
    "role, error", LOAD_FAULTS, ids=[f"{role}-{error}" for role, error in LOAD_FAULTS]
)
@pytest.mark.parametrize("fail_open", [False, True], ids=["closed", "open"])
def test_a_session_that_cannot_be_created_fails_the_load_in_one_line(
    bundle, monkeypatch, role, error, fail_open
):
    file = _graph_file(bundle, role)
    _failing_sessions(monkeypatch, file, LOAD_ERRORS[error](file))
    policy = PASS | {"fail_open": fail_open}
    with pytest.raises(BundleError) as info:
        GuardedVLM.load(bundle, providers="cpu", policy=policy)
    message = str(info.value)
    assert f"cannot load {file}" in message and "\n" not in message


def test_the_cli_reports_a_session_failure_in_one_line(bundle, monkeypatch):
    file = _graph_file(bundle, "decoder")
    _failing_sessions(monkeypatch, file, LOAD_ERRORS["ort fail"](file))
    result = CliRunner().invoke(main, ["run", str(bundle), "--prompt", "Hi?", "--providers", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- beyond one request


def test_in_a_batch_only_the_broken_row_is_refused(closed, monkeypatch):
    requests = [(noise_image(0), PROMPT), (noise_image(1), "Describe the shapes here.")]
    alone = closed.generate(*requests[1], max_new_tokens=MAX_NEW)
    features = closed.engine.image_features
    monkeypatch.setattr(  # the first image's features turn to NaN, the second's stay
        closed.engine,
        "image_features",
        lambda feeds: np.where(
            np.arange(len(feeds["pixel_values"]))[:, None, None] == 0, np.nan, features(feeds)
        ),
    )
    broken, fine = closed.generate_batch(requests, max_new_tokens=MAX_NEW)
    assert broken.report.refused and broken.report.refusal_reason.startswith("vision_encoder")
    assert not fine.report.refused and fine.token_ids == alone.token_ids

    monkeypatch.undo()
    run = closed.engine.run_decoder

    def nan_row_zero(feeds, state):  # the first row's logits turn to NaN at a decode step
        outputs, state = run(feeds, state)
        if not len(feeds["guard_positions"]):
            outputs = dict(outputs)
            outputs["logits"] = outputs["logits"].copy()
            outputs["logits"][0] = np.nan
        return outputs, state

    monkeypatch.setattr(closed.engine, "run_decoder", nan_row_zero)
    sampled = Sampling(temperature=1.0, seed=3)  # NaN logits must not reach the sampler either
    broken, fine = closed.generate_batch(requests, max_new_tokens=MAX_NEW, sampling=sampled)
    assert broken.report.refused and broken.report.refusal_reason.startswith("decode")
    assert broken.token_ids == [] and not fine.report.refused and fine.token_ids


def test_a_stream_broken_mid_answer_ends_refused(closed, clean, monkeypatch):
    _decoder("decode", _with("logits", _nan), at_step=2)(closed, monkeypatch)
    stream = closed.stream(noise_image(0), PROMPT, max_new_tokens=MAX_NEW)
    pieces = list(stream)
    assert stream.report.refused and stream.report.refusal_reason.startswith("decode")
    assert stream.result.text == REFUSAL_TEXT and stream.result.token_ids == []
    assert clean.text.startswith("".join(pieces))  # nothing decoded after the fault


def test_a_bundle_without_guards_raises_on_a_model_fault(tiny_setup, monkeypatch):
    vlm = GuardedVLM.load(tiny_setup("clip", "llama").bundles["plain"], providers="cpu")
    run = vlm.engine.run_decoder

    def nan_logits(feeds, state):
        outputs, state = run(feeds, state)
        return outputs | {"logits": _nan(outputs["logits"])}, state

    monkeypatch.setattr(vlm.engine, "run_decoder", nan_logits)
    with pytest.raises(ModelRunError, match="^prefill: the decoder returned non-finite logits$"):
        vlm.generate(None, "Hello?", max_new_tokens=3)
