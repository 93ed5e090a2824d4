"""The bundle as a whole: vision and embedding graphs, guard_config.json, CLI and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from support import COMBO_IDS, COMBOS, make_prompt
from transformers import LlamaConfig, LlamaForCausalLM

from vlmguard import __version__
from vlmguard.cli import main
from vlmguard.errors import OutputExistsError, SourceError, UnsupportedModelError, UsageError
from vlmguard.export.exporter import export_bundle
from vlmguard.export.graphs import decoder_io
from vlmguard.guards import GuardSettings, clip_window, parse_defenses, resolve_settings
from vlmguard.manifest import read_manifest, sha256_file


def _session(bundle, role: str) -> ort.InferenceSession:
    """A CPU session for one graph of a bundle."""
    file = read_manifest(bundle)["graphs"][role]["file"]
    return ort.InferenceSession(str(bundle / file), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_vision_and_embedding_graphs_match_transformers(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    bundle = setup.bundles["plain"]
    prompt = make_prompt(setup, 2)
    (features,) = _session(bundle, "vision_encoder").run(
        None, {"pixel_values": prompt.pixel_values.numpy()}
    )
    (embeds,) = _session(bundle, "embed_tokens").run(None, {"input_ids": prompt.input_ids.numpy()})
    with torch.no_grad():
        want = torch.stack(list(setup.model.get_image_features(prompt.pixel_values).pooler_output))
        want_embeds = setup.model.get_input_embeddings()(prompt.input_ids)
    assert features.shape == tuple(want.shape)
    np.testing.assert_allclose(features, want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(embeds, want_embeds.numpy())
    image_rows = (prompt.input_ids == setup.model.config.image_token_id).sum(-1)
    assert (image_rows == features.shape[1]).all()


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_guard_config_describes_the_bundle(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    bundle = setup.bundles["guarded"]
    manifest = read_manifest(bundle)
    assert manifest["model"]["family"] == "llava"
    assert manifest["model"]["num_key_value_heads"] < manifest["model"]["num_attention_heads"]
    tokenizer = setup.processor.tokenizer
    assert manifest["special_tokens"]["image_token_id"] == tokenizer.convert_tokens_to_ids(
        "<image>"
    )
    assert manifest["special_tokens"]["pad_token_id"] == tokenizer.pad_token_id
    assert manifest["model"]["image"]["tokens_per_image"] == 16
    assert manifest["guards"]["defenses"] == ["oh", "ptr", "align"]
    assert manifest["guards"]["ptr"]["window"] == [1, 3]
    assert (manifest["guards"]["oh"]["layer"], manifest["guards"]["oh"]["head"]) == (2, 1)
    for role, record in manifest["graphs"].items():
        session = _session(bundle, role)
        assert [i.name for i in session.get_inputs()] == [s["name"] for s in record["inputs"]]
        assert [o.name for o in session.get_outputs()] == [s["name"] for s in record["outputs"]]
        for spec, actual in zip(record["inputs"], session.get_inputs(), strict=True):
            assert [d if isinstance(d, int) else str(d) for d in actual.shape] == spec["shape"]
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"guard_config.json"}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (bundle / name).stat().st_size
        assert entry["sha256"] == sha256_file(bundle / name)
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert name in manifest["files"]


def test_unexported_guards_add_no_inputs_or_outputs(tiny_setup):
    setup = tiny_setup("clip", "llama")
    text = setup.model.config.text_config
    plain_in, plain_out = decoder_io(text, GuardSettings())
    session = _session(setup.bundles["plain"], "decoder")
    assert [i.name for i in session.get_inputs()] == [s.name for s in plain_in]
    assert [o.name for o in session.get_outputs()] == [s.name for s in plain_out]
    extra = {
        "align": (["align_gamma", "align_prefix_mask"], []),
        "oh": (["guard_positions"], ["oh_angle"]),
        "ptr": (
            [
                "guard_positions",
                "ptr_image_mask",
                "ptr_instruction_mask",
                "ptr_k_fraction",
                "ptr_past_pruned_mask",
            ],
            ["ptr_pruned_mask"],
        ),
    }
    for defense, (inputs, outputs) in extra.items():
        settings = GuardSettings(
            align=defense == "align",
            ptr_window=(1, 3) if defense == "ptr" else None,
            oh_layer=1 if defense == "oh" else None,
            oh_head=0 if defense == "oh" else None,
        )
        ins, outs = decoder_io(text, settings)
        assert [s.name for s in ins[len(plain_in) :]] == inputs
        assert [s.name for s in outs[len(plain_out) :]] == outputs


def test_default_window_is_clipped_to_the_model_depth():
    assert clip_window((7, 9), 32) == (7, 9)
    assert clip_window((7, 9), 4) == (2, 4)
    assert clip_window((7, 9), 1) == (0, 1)
    with pytest.raises(ValueError, match="start < end"):
        clip_window((3, 3), 8)
    assert parse_defenses("none") == frozenset()
    assert parse_defenses("oh, ptr") == {"oh", "ptr"}
    with pytest.raises(ValueError, match="unknown defense"):
        parse_defenses("oh,shield")


def test_unsupported_model_type_names_the_supported_families(tmp_path):
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (tmp_path / "llama" / name).write_text("{}")
    with pytest.raises(UnsupportedModelError, match=r"'llama' is not supported.*llava \(vision"):
        export_bundle(tmp_path / "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source_files_are_named(tiny_setup, tmp_path):
    source = tmp_path / "broken"
    shutil.copytree(tiny_setup("clip", "llama").source, source)
    (source / "tokenizer.json").unlink()
    (source / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="missing tokenizer.json, model.safetensors"):
        export_bundle(source, tmp_path / "out")
    with pytest.raises(SourceError, match="does not exist"):
        export_bundle(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(SourceError, match="Hugging Face cache"):
        export_bundle("someone/not-a-cached-model", tmp_path / "out")


def test_an_explicit_window_outside_the_model_is_refused_like_the_oh_layer():
    guards = frozenset({"ptr", "oh"})
    assert resolve_settings(guards, 4, 4).ptr_window == (2, 4)  # the default shifts to fit
    assert resolve_settings(guards, 4, 4, ptr_window=(1, 3)).ptr_window == (1, 3)
    assert resolve_settings(guards, 4, 4, ptr_window=(0, 4)).ptr_window == (0, 4)
    for window in ((0, 99), (3, 5), (7, 9)):
        with pytest.raises(UsageError, match=f"--ptr-window {window[0]}:{window[1]} is outside"):
            resolve_settings(guards, 4, 4, ptr_window=window)
    with pytest.raises(UsageError, match="--oh-layer 99 is outside"):
        resolve_settings(guards, 4, 4, oh_layer=99)


def test_non_empty_output_is_refused_without_force(tiny_setup, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--force"):
        export_bundle(tiny_setup("clip", "llama").source, out, frozenset())
    assert (out / "keep.txt").read_text() == "precious"


def test_cli_version_help_and_one_line_errors(tmp_path):
    runner = CliRunner()
    assert __version__ in runner.invoke(main, ["--version"]).output
    help_text = runner.invoke(main, ["export", "--help"]).output
    for option in ("--out", "--defenses", "--dtype", "--force", "--ptr-window", "--oh-layer"):
        assert option in help_text
    result = runner.invoke(
        main, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["export", "x", "--out", "y", "--defenses", "oh,nope"])
    assert result.exit_code == 1 and "unknown defense" in result.output


def test_cli_builds_and_exports_a_tiny_model(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["tiny-model", str(tmp_path / "m"), "--vision", "siglip", "--text", "qwen2", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        [
            "export",
            str(tmp_path / "m"),
            "--out",
            str(tmp_path / "b"),
            "--defenses",
            "oh",
            "--oh-layer",
            "1",
            "--oh-head",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "guard_config.json").read_text())
    assert manifest["guards"]["defenses"] == ["oh"]
    assert manifest["model"]["text_model_type"] == "qwen2"
    result = runner.invoke(main, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "--force" in result.output


def test_fp16_bundle_runs_and_stays_close_to_fp32(tiny_setup, tmp_path):
    from support import OrtDecoder, base_feeds, neutral_guards

    setup = tiny_setup("clip", "llama")
    bundle = export_bundle(setup.source, tmp_path / "fp16", dtype="fp16")
    manifest = read_manifest(bundle)
    assert manifest["dtype"] == "float16"
    assert manifest["graphs"]["decoder"]["file"] == "onnx/decoder_model_merged_fp16.onnx"
    assert not (bundle / "onnx/decoder_model_merged.onnx").exists()
    decoder = OrtDecoder(bundle)
    prompt = make_prompt(setup, 2)
    batch, seq = prompt.input_ids.shape
    feeds = base_feeds(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids)
    feeds["inputs_embeds"] = feeds["inputs_embeds"].astype(np.float16)
    feeds |= decoder.empty_past(batch) | neutral_guards(decoder, batch, seq, seq, prefill=True)
    feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    out = decoder.run(feeds)
    assert out["logits"].dtype == np.float16
    with torch.no_grad():
        want = (
            setup.model(
                inputs_embeds=prompt.inputs_embeds,
                attention_mask=prompt.attention_mask,
                position_ids=prompt.position_ids,
            )
            .logits[:, -1]
            .numpy()
        )
    np.testing.assert_allclose(out["logits"][:, -1].astype(np.float32), want, atol=5e-2, rtol=0)
    assert (out["logits"][:, -1].argmax(-1) == want.argmax(-1)).all()
