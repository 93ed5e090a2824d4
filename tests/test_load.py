"""Load: one GuardedVLM shared by 8 threads x 50 requests answers as it does one by one.

Resident memory over 1,000 requests is measured by tests/soak_memory.py (a script); the test
here only bounds gross growth over 200 requests.
"""

from __future__ import annotations

import gc
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from soak_memory import images, rss_mib, send
from support import noise_image

from vlmguard.runtime.guarded_vlm import GuardedVLM, Result
from vlmguard.runtime.policy import GuardPolicy
from vlmguard.runtime.sampling import Sampling

THREADS, PER_THREAD, MAX_NEW = 8, 50, 3
PROMPTS = [
    "What is in this picture?",
    "Describe the colours and the shapes you can see here, please.",
    "Is there anything dangerous here?",
    "Hello?",
    "Write one short sentence about the sea.",
    "Count the objects.",
]
IMAGES = [None, noise_image(0), noise_image(1, (64, 48)), noise_image(2, (20, 50)), None]
MODES = ["greedy", "greedy", "sampled", "stream", "batch"]


@dataclass(frozen=True)
class Request:
    """One request of the load: its inputs and how it is sent."""

    index: int
    image_at: int  # into IMAGES
    prompt: str
    mode: str  # greedy, sampled (seeded), stream, or batch (with a text-only companion)


def _requests() -> list[Request]:
    """THREADS x PER_THREAD requests mixing images, prompts and the ways to send them."""
    count = THREADS * PER_THREAD
    return [
        Request(i, i % len(IMAGES), PROMPTS[(i // 3) % len(PROMPTS)], MODES[(i // 2) % len(MODES)])
        for i in range(count)
    ]


def _outcome(result: Result) -> tuple:
    """Everything a request's answer and report decide (timings aside)."""
    report = result.report
    return (
        result.text,
        tuple(result.token_ids),
        report.refused,
        report.refusal_reason,
        tuple((d.stage, d.action, d.reason) for d in report.decisions),
        tuple(sorted(report.scores.items())),
        report.pruned_tokens,
    )


def _send(vlm: GuardedVLM, request: Request) -> tuple:
    """Send one request the way it says; the outcome(s) of its answer(s)."""
    image = IMAGES[request.image_at]
    if request.mode == "greedy":
        return (_outcome(vlm.generate(image, request.prompt, max_new_tokens=MAX_NEW)),)
    if request.mode == "sampled":
        sampled = vlm.generate(
            image, request.prompt, MAX_NEW, Sampling(0.9, 40, seed=request.index)
        )
        return (_outcome(sampled),)
    if request.mode == "stream":
        stream = vlm.stream(image, request.prompt, max_new_tokens=MAX_NEW)
        pieces = "".join(stream)
        return (_outcome(stream.result), pieces)
    pair = [(image, request.prompt), (None, PROMPTS[request.index % len(PROMPTS)])]
    return tuple(_outcome(r) for r in vlm.generate_batch(pair, max_new_tokens=MAX_NEW))


@pytest.fixture(scope="module")
def shared(detector_bundle) -> GuardedVLM:
    """A guarded bundle with a detector, its thresholds at the median of this load's scores.

    So that the load mixes detector flags and passes, and Oh refusal paths and passes.
    """
    observe = GuardedVLM.load(detector_bundle, providers="cpu")
    angles, scores = [], []
    for image in IMAGES[1:4] + [None]:
        for prompt in PROMPTS:
            report = observe.generate(image, prompt, max_new_tokens=1).report
            angles.append(report.scores["oh_angle"])
            if image is not None:
                scores.append(report.scores["detector_ot"])
    policy = GuardPolicy(
        oh_threshold=statistics.median(angles), detector_threshold=statistics.median(scores)
    )
    return GuardedVLM(observe.engine, policy)


def test_eight_threads_answer_as_one_by_one(shared, monkeypatch):
    requests = _requests()
    one_by_one = [_send(shared, request) for request in requests]

    run, lock = shared.engine.run_decoder, threading.Lock()
    in_flight, most = [0], [0]

    def counted(feeds, state):  # how many decoder runs overlap
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            return run(feeds, state)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(shared.engine, "run_decoder", counted)
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> list[tuple[int, tuple]]:
        start.wait()
        mine = requests[thread::THREADS]  # interleaved: neighbours run at the same time
        return [(request.index, _send(shared, request)) for request in mine]

    with ThreadPoolExecutor(THREADS) as pool:
        threaded = dict(pair for done in pool.map(worker, range(THREADS)) for pair in done)

    assert len(threaded) == THREADS * PER_THREAD and most[0] > 1
    mismatched = [i for i, want in enumerate(one_by_one) if threaded[i] != want]
    assert not mismatched, f"{len(mismatched)} requests differ, first {requests[mismatched[0]]}"

    # The load exercised every path it is meant to.
    outcomes = [o for sent in one_by_one for o in sent if isinstance(o, tuple)]
    actions = {(stage, action) for o in outcomes for stage, action, _ in o[4]}
    wanted = {
        ("detector", "flag"),
        ("detector", "pass"),
        ("align", "calibrate"),
        ("oh", "refusal_path"),
        ("oh", "pass"),
        ("ptr", "prune"),
    }
    assert wanted <= actions, wanted - actions
    assert len({o[1] for o in outcomes}) > 20, "answers should differ across the mix"


def test_resident_memory_stays_flat(detector_bundle):
    """A generous bound (a leak of 100 KiB a request trips it); the soak script measures."""
    vlm = GuardedVLM.load(detector_bundle, providers="cpu")
    pictures = images()
    for index in range(100):  # warm up: every shape of the mix, ORT's arenas grown
        send(vlm, index, pictures, MAX_NEW)
    gc.collect()
    before = rss_mib()
    for index in range(100, 300):
        send(vlm, index, pictures, MAX_NEW)
    gc.collect()
    assert rss_mib() - before < 16, f"RSS grew {rss_mib() - before:.1f} MiB over 200 requests"
