"""`vlmguard bench`: its arithmetic, JSON schema and stage accounting (no timing asserts)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from vlmguard.cli import main
from vlmguard.export.bench_peers import language_model_checkpoint, torch_peer
from vlmguard.export.exporter import export_bundle
from vlmguard.manifest import Manifest
from vlmguard.runtime.bench import (
    STAGES,
    BenchError,
    BenchSettings,
    bench_bundle,
    bench_image,
    bench_prompt,
    percentiles,
    ratios,
)
from vlmguard.runtime.bench_env import decoder_weight_bytes, kv_bytes_per_token, roofline
from vlmguard.runtime.guarded_vlm import GuardedVLM

FAST = BenchSettings(prompt_tokens=12, new_tokens=4, image_size=48, runs=3, warmup=1)


@pytest.fixture(scope="module")
def detector_bundle(tiny_setup, tmp_path_factory):
    """The tiny clip-llama model, fully guarded, with the default safety detector."""
    out = tmp_path_factory.mktemp("bench") / "guarded-detector"
    return export_bundle(tiny_setup("clip", "llama").source, out, detector="default")


def test_percentiles_follow_linear_interpolation():
    figures = percentiles([4.0, 1.0, 3.0, 2.0, 10.0])
    assert figures["p50"] == 3.0
    assert figures["p90"] == pytest.approx(4.0 + 0.6 * 6.0)  # between 4 and 10 at 0.6
    assert figures["p99"] == pytest.approx(4.0 + 0.96 * 6.0)
    assert figures["mean"] == 4.0 and figures["n"] == 5
    with pytest.raises(BenchError):
        percentiles([])


def test_ratios_are_guarded_over_neutral_per_stage():
    def summary(prefill: float, decode_rate: float) -> dict:
        return {
            "stages": {"prefill": {"p50": prefill}, "decode": {"p50": 30.0}},
            "end_to_end": {"p50": prefill + 30.0},
            "ttft": {"p50": prefill},
            "decode_tokens_per_s": decode_rate,
        }

    out = ratios(summary(12.0, 50.0), summary(10.0, 100.0))
    assert out["prefill"] == pytest.approx(1.2)
    assert out["decode"] == pytest.approx(1.0)
    assert out["end_to_end"] == pytest.approx(42.0 / 40.0)
    assert out["decode_time_per_token"] == pytest.approx(2.0)  # half the rate: twice the time


@pytest.mark.parametrize(
    "field, value", [("runs", 0), ("new_tokens", 1), ("prompt_tokens", 0), ("warmup", -1)]
)
def test_settings_that_cannot_give_a_figure_are_refused(field, value):
    settings = BenchSettings(**{field: value})
    with pytest.raises(BenchError, match=field.replace("_", "-")):
        settings.validate()


def test_the_bench_prompt_has_the_asked_token_count(tiny_setup):
    vlm = GuardedVLM.load(tiny_setup("clip", "llama").bundles["guarded"])
    prompt = bench_prompt(vlm, 20)
    count = len(vlm.prompts.tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert 20 <= count <= 23  # whole words: at most one word's tokens over
    assert bench_image(40).size == (40, 40)


class _CountingTokenizer:
    """A tokenizer that counts its encodes (and the characters they read)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def encode(self, text, **kwargs):
        self.calls += 1
        return self.tokenizer.encode(text, **kwargs)


def test_the_bench_prompt_is_built_in_linear_time(tiny_setup):
    vlm = GuardedVLM.load(tiny_setup("clip", "llama").bundles["plain"])
    counting = _CountingTokenizer(vlm.prompts.tokenizer)
    vlm.prompts.tokenizer = counting
    prompt = bench_prompt(vlm, 5000)
    assert counting.calls <= 2  # one encode to cut, one to check (bisecting took 26)
    count = len(counting.tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert 5000 <= count <= 5003
    shorter = counting.tokenizer.encode(prompt.rsplit(" ", 1)[0], add_special_tokens=False)
    assert len(shorter.ids) < 5000  # the fewest whole words


def test_a_prompt_past_the_context_is_refused_before_it_is_built(tiny_setup, monkeypatch):
    import vlmguard.runtime.bench as bench

    def never(*args):
        raise AssertionError("the prompt was built before the context check")

    monkeypatch.setattr(bench, "bench_prompt", never)
    settings = BenchSettings(prompt_tokens=100_000, new_tokens=4, runs=1, warmup=0)
    with pytest.raises(BenchError, match="past the model's context of 512; at most 492"):
        bench_bundle(tiny_setup("clip", "llama").bundles["plain"], settings)


def test_stages_add_up_to_the_end_to_end_time(detector_bundle):
    record = bench_bundle(detector_bundle, FAST)
    for run in ("guarded", "neutral"):
        summary = record[run]
        # every stage that ran is timed; the untimed glue is under 5% of the request
        assert 0.95 <= summary["stage_sum_over_end_to_end"] <= 1.0 + 1e-9
        for figures in summary["stages"].values():
            assert figures["n"] == FAST.runs
            assert 0 < figures["p50"] <= figures["p90"] <= figures["p99"]
        assert summary["ttft"]["p50"] < summary["end_to_end"]["p50"]
        assert summary["decode_tokens_per_s"] > 0
    assert set(record["guarded"]["stages"]) == set(STAGES)  # detector ran on the guarded side
    assert "detector" not in record["neutral"]["stages"]  # and not on the neutral one
    assert set(record["detector_variants"]) == {"fp32", "int8"}
    assert record["prefill_tokens"] > FAST.prompt_tokens  # image rows and the chat template


def test_bench_cli_writes_the_documented_json(tiny_setup, tmp_path):
    setup = tiny_setup("clip", "llama")
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [
        "bench", str(setup.bundles["guarded"]), "--baseline", str(setup.bundles["plain"]),
        "--runs", "2", "--warmup", "0", "--max-new-tokens", "3", "--prompt-tokens", "8",
        "--image-size", "32", "--providers", "cpu", "--json", str(out), "--plot", str(plot),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    for key in ("stages", "decode_tokens_per_s", "guard_ratio", "peers", "roofline_fraction"):
        assert key in record
    assert {"p50", "p90", "p99"} <= set(record["stages"]["prefill"])
    assert record["environment"]["providers_used"]["decoder"] == ["CPUExecutionProvider"]
    assert record["environment"]["onnxruntime"]
    assert 0 < record["roofline_fraction"] < 1  # no decoder reads memory faster than a copy
    assert set(record["graph_ratio"]) >= {"prefill", "decode", "end_to_end"}
    assert record["peers"] == {}
    assert record["memory"]["peak_host_mib"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prefill" in result.output and "tokens/s" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runs", "0"], "--runs must be at least 1"),
        ([], "give either a BUNDLE or --model-shape"),
    ],
)
def test_bench_cli_bad_input_is_one_line(args, message):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "change, named",
    [
        ({"source": "elsewhere/another-llava"}, "source"),
        ({"model": {"hidden_size": 128}}, "model shapes"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_bench_refuses_a_baseline_of_another_model(tiny_setup, tmp_path, change, named):
    setup = tiny_setup("clip", "llama")
    foreign = tmp_path / "foreign"
    shutil.copytree(setup.bundles["plain"], foreign)
    manifest = json.loads((foreign / "guard_config.json").read_text())
    for key, value in change.items():
        manifest[key] = manifest[key] | value if isinstance(value, dict) else value
    (foreign / "guard_config.json").write_text(json.dumps(manifest))
    args = ["bench", str(setup.bundles["guarded"]), "--baseline", str(foreign), "--runs", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: --baseline ") and result.output.count("\n") == 1
    assert "not an export of the bundle's model" in result.output and named in result.output


def test_roofline_arithmetic(tiny_setup):
    bundle = tiny_setup("clip", "llama").bundles["plain"]
    manifest = Manifest.read(bundle)
    decoder = manifest.graphs["decoder"].file
    on_disk = sum(p.stat().st_size for p in bundle.rglob("*") if p.name.startswith(
        decoder.rsplit("/", 1)[-1]))  # fmt: skip
    assert decoder_weight_bytes(manifest) == on_disk
    model = manifest.model
    per_layer = 2 * model.num_key_value_heads * model.head_dim * 4  # K and V, fp32
    assert kv_bytes_per_token(manifest, 10) == 10 * per_layer * model.num_layers
    record = roofline(manifest, 10, 50.0, 1e9, "host")
    ceiling = 1e9 / (on_disk + kv_bytes_per_token(manifest, 10))
    assert record["roofline_tokens_per_s"] == pytest.approx(ceiling)
    assert record["fraction"] == pytest.approx(50.0 / ceiling)
    assert roofline(manifest, 10, 50.0, None, "device")["fraction"] is None


def test_genai_gets_the_same_language_model(tiny_setup, tmp_path):
    """The checkpoint fed to onnxruntime-genai's builder computes the VLM's text logits."""
    setup = tiny_setup("clip", "llama")
    lm_dir = language_model_checkpoint(setup.source, tmp_path / "lm")
    lm = transformers.AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected = setup.model(input_ids=ids).logits
        got = lm(input_ids=ids).logits
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


def test_torch_peer_reports_ttft_and_decode_rate(tiny_setup):
    setup = tiny_setup("clip", "llama")
    figures = torch_peer(setup.source, bench_image(32), "describe it", 3, runs=1, warmup=1)
    assert figures["ttft"]["p50"] < figures["end_to_end"]["p50"]
    assert figures["decode_tokens_per_s"] > 0
