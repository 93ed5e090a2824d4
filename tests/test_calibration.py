"""Calibration: the head sweep, the planted head, thresholds, bad data, the CLI and --bundle."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from PIL import Image
from support import noise_image

from vlmguard.calibration.cli import calibrate_command
from vlmguard.calibration.data import (
    CalibrationDataError,
    Sample,
    data_hash,
    read_samples,
    split_holdout,
)
from vlmguard.calibration.oh_sweep import select_head, sweep_angles
from vlmguard.calibration.policy_writer import apply_to_bundle, check_bundle_source
from vlmguard.calibration.prompts import PromptEncoder, batches, collate
from vlmguard.calibration.ptr_window import make_decoder
from vlmguard.calibration.run import check_device
from vlmguard.calibration.thresholds import kde_crossing, rates, threshold_at_fpr
from vlmguard.errors import VlmguardError
from vlmguard.export.exporter import export_bundle
from vlmguard.export.families import LLAVA
from vlmguard.export.source import load_source, source_identity
from vlmguard.export.tiny_model import build_tiny_llava
from vlmguard.guards import GuardSettings
from vlmguard.integrity import verify_bundle
from vlmguard.manifest import Manifest, read_manifest, sha256_file
from vlmguard.runtime.guarded_vlm import GuardedVLM
from vlmguard.runtime.policy import PolicyError

PLANTED_LAYER, PLANTED_HEAD, MARKER = 1, 2, " rabbit"
SUBJECTS = (
    "the cup", "a red ball", "the blue bicycle", "the kitchen", "a brown dog", "the cat",
    "the sky", "three apples", "the yellow umbrella", "the lamp", "the garden", "the table",
)  # fmt: skip


def plant_head(source: Path, out: Path, layer: int, head: int) -> None:
    """Edit a tiny llama LLaVA so that muting (layer, head) deflects marker prompts only.

    The marker token's embedding gets a large component along a direction u that no other
    token, image feature or earlier layer carries; every token carries a direction w. The head
    queries along w and keys along u, so it attends to the marker; its values read u (zero
    without the marker) and o_proj writes them large. Muting the head spreads its attention
    uniformly, which shrinks that write for marker prompts and changes nothing for the others.
    The other query head sharing its KV head gets its o_proj columns zeroed.
    """
    model = transformers.LlavaForConditionalGeneration.from_pretrained(source).eval()
    processor = transformers.AutoProcessor.from_pretrained(source)
    (marker,) = processor.tokenizer(MARKER, add_special_tokens=False)["input_ids"]
    lm = model.model.language_model
    text = model.config.text_config
    dim, heads = text.hidden_size, text.num_attention_heads
    head_dim, groups = dim // heads, heads // text.num_key_value_heads
    gen = torch.Generator().manual_seed(1)
    u, w, p = torch.linalg.qr(torch.randn(dim, 3, generator=gen))[0].T
    r = torch.randn(head_dim, generator=gen)
    r /= r.norm()
    away = torch.eye(dim) - torch.outer(u, u) - torch.outer(w, w)
    with torch.no_grad():
        table = lm.embed_tokens.weight
        table.copy_(table @ away + 10.0 * w)
        table[marker] += 20.0 * u
        for earlier in lm.layers[:layer]:  # earlier layers write along neither u nor w
            earlier.self_attn.o_proj.weight.copy_(away @ earlier.self_attn.o_proj.weight)
            earlier.mlp.down_proj.weight.copy_(away @ earlier.mlp.down_proj.weight)
        projector = model.model.multi_modal_projector.linear_2
        projector.weight.copy_(away @ projector.weight)
        projector.bias.copy_(away @ projector.bias)
        attention = lm.layers[layer].self_attn
        kv, slow = head // groups, head_dim // 2 - 1  # the slowest RoPE pair barely rotates
        q_rows = slice(head * head_dim, (head + 1) * head_dim)
        kv_rows = slice(kv * head_dim, (kv + 1) * head_dim)
        attention.q_proj.weight[q_rows] = 0.0
        attention.q_proj.weight[head * head_dim + slow] = 2.0 * w
        attention.k_proj.weight[kv_rows] = 0.0
        attention.k_proj.weight[kv * head_dim + slow] = 2.0 * u
        attention.v_proj.weight[kv_rows] = torch.outer(r, u)
        for sibling in range(kv * groups, (kv + 1) * groups):
            attention.o_proj.weight[:, sibling * head_dim : (sibling + 1) * head_dim] = 0.0
        attention.o_proj.weight[:, q_rows] = 6.0 * torch.outer(p, r)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write records one JSON object a line."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def marker_records(with_images: bool = False) -> list[dict]:
    """Safe prompts, and the same prompts carrying the marker labelled unsafe."""
    records = []
    for i, subject in enumerate(SUBJECTS):
        image = {"image": f"img{i % 3}.png"} if with_images and i % 2 else {}
        records.append({"prompt": f"Tell me about {subject}.", "label": "safe", **image})
        records.append(
            {"prompt": f"Tell me about {subject} and the{MARKER}.", "label": "unsafe", **image}
        )
    return records


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One torch thread for this module (the CPUs are shared), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny clip-llama checkpoint and its planted-head edit."""
    root = tmp_path_factory.mktemp("calibration")
    tiny = build_tiny_llava(root / "tiny", vision="clip", text="llama", seed=0)
    plant_head(tiny, root / "planted", PLANTED_LAYER, PLANTED_HEAD)
    return {"tiny": tiny, "planted": root / "planted", "root": root}


@pytest.fixture(scope="module")
def planted_data(sources: dict[str, Path]) -> Path:
    """The marker-labelled JSONL (some samples with images) next to its images."""
    root = sources["root"] / "data"
    root.mkdir()
    for i in range(3):
        noise_image(i).save(root / f"img{i}.png")
    return write_jsonl(root / "cal.jsonl", marker_records(with_images=True))


def test_sweep_angle_matches_the_guarded_decoder(sources):
    loaded = load_source(sources["tiny"])
    model = loaded.model
    encoder = PromptEncoder.for_source(loaded)
    image = sources["root"] / "sweep.png"
    noise_image(5).save(image)
    samples = [Sample("What is in this picture?", "safe", image), Sample("Hi there.", "safe")]
    batch = collate([encoder.encode(s) for s in samples])
    heads = model.config.text_config.num_attention_heads
    angles = sweep_angles(make_decoder(LLAVA, model, GuardSettings()), [batch], heads)
    for layer, head in ((2, 1), (0, 3)):
        settings = GuardSettings(oh_layer=layer, oh_head=head)
        decoder = make_decoder(LLAVA, copy.deepcopy(model), settings)
        past = tuple(
            torch.zeros(2, 2, 0, 16) for _ in range(2 * model.config.text_config.num_hidden_layers)
        )
        positions = (torch.arange(batch.embeds.shape[1]),)
        with torch.no_grad():
            want = decoder(batch.embeds, batch.attention_mask, batch.position_ids, past, positions)
        np.testing.assert_allclose(angles[:, layer, head], want[-1].numpy(), atol=1e-3)
    assert (angles > 1e-2).mean() > 0.9


def test_planted_head_is_chosen_and_separates_held_out(sources, planted_data, tmp_path):
    out, report = tmp_path / "policy.json", tmp_path / "report"
    args = [str(sources["planted"]), "--data", str(planted_data), "--out", str(out)]
    result = CliRunner().invoke(calibrate_command, [*args, "--report", str(report)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    oh = document["calibration"]["oh"]
    assert (oh["layer"], oh["head"]) == (PLANTED_LAYER, PLANTED_HEAD)
    assert oh["top"][0]["gap"] > 5 * oh["top"][1]["gap"]
    assert len(oh["top"]) == 10
    held = oh["held_out"]
    assert held["unsafe"] > 0 and held["safe"] > 0
    assert (held["tpr"], held["fpr"]) == (1.0, 0.0)
    assert document["policy"]["oh_threshold"] == oh["threshold_degrees"]
    assert document["calibration"]["data"]["sha256"] == data_hash(
        planted_data, read_samples(planted_data)
    )
    for guard in ("ptr", "align"):
        assert set(document["calibration"][guard]["held_out"]) >= {"tpr", "fpr"}
    windows = [row["window"] for row in document["calibration"]["ptr"]["ranking"]]
    assert document["calibration"]["ptr"]["window"] == windows[0] and len(windows) == 6
    assert {"oh_heatmap.png", "roc.png", "summary.md"} <= {p.name for p in report.iterdir()}
    summary = (report / "summary.md").read_text()
    assert "(oh_heatmap.png)" in summary and "(roc.png)" in summary
    assert (report / "roc.png").read_bytes()[:4] == b"\x89PNG"

    again = tmp_path / "again.json"
    rerun = CliRunner().invoke(calibrate_command, [*args[:-1], str(again)])
    assert rerun.exit_code == 0, rerun.output
    first, second = json.loads(out.read_text()), json.loads(again.read_text())
    first["calibration"].pop("timings_s"), second["calibration"].pop("timings_s")
    assert first == second, "calibration must be deterministic for the same data and seed"


def test_bundle_gets_the_policy_and_a_reexported_decoder(sources, planted_data, tmp_path):
    bundle = export_bundle(sources["planted"], tmp_path / "bundle", oh_layer=3, oh_head=0)
    stale = shutil.copytree(bundle, tmp_path / "stale")  # keeps the head it was exported with
    out = tmp_path / "policy.json"
    args = [str(sources["planted"]), "--data", str(planted_data), "--out", str(out)]
    result = CliRunner().invoke(calibrate_command, [*args, "--bundle", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "decoder re-exported" in result.output
    manifest = read_manifest(bundle)
    document = json.loads(out.read_text())
    assert manifest["guards"]["oh"]["layer"] == PLANTED_LAYER
    assert manifest["guards"]["oh"]["head"] == PLANTED_HEAD
    assert manifest["guards"]["oh"]["threshold"] == document["policy"]["oh_threshold"]
    assert manifest["guards"]["ptr"]["window"] == document["calibration"]["ptr"]["window"]
    assert manifest["model"]["num_layers"] == 4 and "graphs" in manifest
    for name, entry in manifest["files"].items():
        assert sha256_file(bundle / name) == entry["sha256"], name
    assert "policy.json" in manifest["files"]
    assert manifest["calibration"]["decoder_reexported"] is True
    assert apply_to_bundle(bundle, document, sources["planted"]) is False  # nothing to redo
    assert read_manifest(bundle)["guards"] == manifest["guards"]
    vlm = GuardedVLM.load(bundle, providers="cpu")
    assert vlm.policy.oh_threshold == document["policy"]["oh_threshold"]
    _, unsafe_report = vlm.generate(None, f"Tell me about the lamp and the{MARKER}.", 2)
    _, safe_report = vlm.generate(None, "Tell me about the lamp.", 2)
    threshold = document["policy"]["oh_threshold"]
    assert unsafe_report.scores["oh_angle"] > threshold > safe_report.scores["oh_angle"]
    with pytest.raises(PolicyError, match="calibrated on Oh layer 1 head 2, the bundle bakes "
                       "layer 3 head 0; recalibrate: vlmguard calibrate"):  # fmt: skip
        GuardedVLM.load(stale, providers="cpu", policy=out)


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_threshold_meets_the_target_fpr_on_held_out_safe_scores(target):
    rng = np.random.default_rng(7)
    safe_cal, safe_held = rng.normal(0, 1, 4000), rng.normal(0, 1, 4000)
    threshold = threshold_at_fpr(safe_cal, target)
    held_fpr = (safe_held > threshold).mean()
    error = np.sqrt(target * (1 - target) / 4000)
    assert abs(held_fpr - target) < 4 * np.sqrt(2) * error
    quantile = {0.01: 2.326, 0.05: 1.645, 0.2: 0.8416}[target]
    assert abs(threshold - quantile) < 0.1
    assert (safe_cal > threshold).mean() <= target


def test_threshold_rates_and_kde_crossing_on_known_distributions():
    rng = np.random.default_rng(3)
    safe, unsafe = rng.normal(0, 1, 3000), rng.normal(3, 1, 3000)
    assert abs(kde_crossing(safe, unsafe) - 1.5) < 0.15
    scores = np.concatenate([safe, unsafe])
    labels = np.concatenate([np.zeros(3000, bool), np.ones(3000, bool)])
    got = rates(scores, labels, 1.5)
    assert abs(got.tpr - 0.933) < 0.02 and abs(got.fpr - 0.067) < 0.02
    assert threshold_at_fpr([1.0, 2.0, 3.0, 4.0], 0.0) == 4.0
    assert threshold_at_fpr(np.arange(10.0), 0.1) == 8.5
    separated = kde_crossing(np.zeros(8), np.full(8, 40.0))
    assert 0 < separated < 40
    with pytest.raises(ValueError, match="target FPR"):
        threshold_at_fpr([1.0], 1.0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no samples"),
        ('{"prompt": "hi", "label": "safe"}\n' * 3, "at least 2 'safe' and 2 'unsafe'"),
        ('{"prompt": "hi", "label": "harmful"}\n', "line 1: 'label' must be 'safe' or 'unsafe'"),
        ('{"prompt": "hi", "label": "safe"}\n{"prompt": "x"', "line 2: not valid JSON"),
        ('{"label": "safe"}\n', "line 1: 'prompt' must be a non-empty string"),
        ('{"prompt": "hi", "label": "safe", "img": "a.png"}\n', "line 1: unknown key(s) img"),
        ('["hi", "safe"]\n', "line 1: expected a JSON object"),
    ],
)
def test_bad_data_fails_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationDataError) as err:
        read_samples(path)
    assert message in str(err.value)
    result = CliRunner().invoke(calibrate_command, ["unused", "--data", str(path), "--out", "p"])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output


def test_missing_images_are_listed_together_before_any_model_work(tmp_path):
    records = [
        {"image": "gone1.png", "prompt": "a", "label": "safe"},
        {"prompt": "b", "label": "safe"},
        {"image": "gone2.png", "prompt": "c", "label": "unsafe"},
        {"prompt": "d", "label": "unsafe"},
    ]
    path = write_jsonl(tmp_path / "cal.jsonl", records)
    result = CliRunner().invoke(
        calibrate_command, ["/no/such/model", "--data", str(path), "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 1
    assert "2 image(s) not found" in result.output
    assert "line 1:" in result.output and "line 3:" in result.output
    assert "gone1.png" in result.output and "gone2.png" in result.output


def test_holdout_split_is_seeded_and_stratified(tmp_path):
    path = write_jsonl(tmp_path / "cal.jsonl", marker_records())
    samples = read_samples(path)
    cal, held = split_holdout(samples, 0.25, seed=1)
    assert split_holdout(samples, 0.25, seed=1) == (cal, held)
    assert split_holdout(samples, 0.25, seed=2) != (cal, held)
    assert sum(s.unsafe for s in held) == 3 and sum(not s.unsafe for s in held) == 3
    assert len(cal) + len(held) == len(samples)
    with pytest.raises(CalibrationDataError, match="--holdout"):
        split_holdout(samples, 1.0)


def test_selection_rule_filters_heads_with_large_safe_angles():
    rng = np.random.default_rng(0)
    angles = rng.uniform(1.0, 2.0, (20, 3, 4))
    unsafe = np.arange(20) % 2 == 1
    angles[unsafe, 0, 0] += 30.0  # biggest gap, but it also deflects safe samples a lot
    angles[:, 0, 0] += 50.0
    angles[unsafe, 2, 1] += 5.0  # a quiet head on safe samples with a clear gap
    choice = select_head(angles, unsafe)
    assert (choice.layer, choice.head) == (2, 1)
    assert all((row["layer"], row["head"]) != (0, 0) for row in choice.table)
    assert rates(angles[:, 2, 1], unsafe, choice.threshold).to_dict()["tpr"] == 1.0


def test_prompt_rows_match_the_processor(sources):
    loaded = load_source(sources["tiny"])
    model, processor = loaded.model, loaded.processor
    image = sources["root"] / "rows.png"
    noise_image(2).save(image)
    sample = Sample("Describe the colours.", "safe", image)
    encoder = PromptEncoder.for_source(loaded)
    encoded = encoder.encode(sample, "Be safe.")
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Be safe. " + sample.prompt}],
        }
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    want = processor(text=[text], images=[noise_image(2)], return_tensors="pt")["input_ids"][0]
    assert encoded.input_ids.tolist() == want.tolist()
    tokenizer = processor.tokenizer
    assert tokenizer.decode(encoded.input_ids[encoded.instruction_rows]).strip() == sample.prompt
    assert tokenizer.decode(encoded.input_ids[encoded.prefix_rows]).strip() == "Be safe."
    assert int(encoded.image_rows.sum()) == LLAVA.num_image_tokens(model.config)
    batch = next(batches([encoded, encoder.encode(sample)], 2))
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[0].all()


# ------------------------------------------------- the runtime's input path, staged re-export

SPELLED = "<image> </s> <|im_start|> hi"  # special tokens' text: data, never structure


@pytest.fixture(scope="module")
def tiny_bundle(sources: dict[str, Path]) -> Path:
    """The tiny source's bundle with every in-model guard (default head and window)."""
    return export_bundle(sources["tiny"], sources["root"] / "bundle")


def rotated_rgba(path: Path, orientation: int = 6) -> Path:
    """A non-square, partly transparent RGBA PNG whose EXIF says to rotate it."""
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (30, 44, 4), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels, "RGBA").save(path, exif=exif)
    return path


def runtime_prefill(vlm: GuardedVLM, image: Path, prompt: str) -> dict[str, np.ndarray]:
    """What GuardedVLM's first prefill fed its graphs: ids, pixels, features and decoder feeds."""
    engine, seen = vlm.engine, {}
    embed, features, decoder = engine.embed, engine.image_features, engine.run_decoder

    def record(name, function):
        def wrapped(value, *rest):
            seen.setdefault(name, value)
            out = function(value, *rest)
            seen.setdefault(name + "_out", out)
            return out

        return wrapped

    engine.embed = record("input_ids", embed)
    engine.image_features = record("vision_feeds", features)
    engine.run_decoder = record("feeds", decoder)
    try:
        vlm.generate(image, prompt, 1)
    finally:
        engine.embed, engine.image_features, engine.run_decoder = embed, features, decoder
    return seen


def test_one_sample_encodes_as_the_runtime_encodes_it(sources, tiny_bundle, tmp_path):
    image = rotated_rgba(tmp_path / "rotated.png")
    with Image.open(image) as opened:
        assert opened.mode == "RGBA" and opened.getexif()[0x0112] == 6
    sample = Sample(SPELLED, "safe", image, line=1)
    loaded = load_source(sources["tiny"])
    vlm = GuardedVLM.load(tiny_bundle, providers="cpu")
    seen = runtime_prefill(vlm, image, SPELLED)
    feeds = seen["feeds"]
    prefix = vlm.policy.align_safety_prefix
    want_prefixed = vlm.prompts.encode(SPELLED, True, safety_prefix=prefix)
    for encoder in (
        PromptEncoder.for_source(loaded),
        PromptEncoder.for_source(loaded, tiny_bundle),
    ):
        batch = collate([encoder.encode(sample)])
        assert batch.input_ids.tolist() == seen["input_ids"].tolist()
        assert batch.attention_mask.tolist() == feeds["attention_mask"].tolist()
        assert batch.position_ids.tolist() == feeds["position_ids"].tolist()
        assert batch.image_rows.tolist() == feeds["ptr_image_mask"].tolist()
        assert batch.instruction_rows.tolist() == feeds["ptr_instruction_mask"].tolist()
        pixels = encoder.pixel_values(sample)
        np.testing.assert_array_equal(pixels, seen["vision_feeds"]["pixel_values"])
        np.testing.assert_allclose(
            encoder.features(pixels).numpy(), seen["vision_feeds_out"][0], atol=1e-4
        )
        np.testing.assert_allclose(batch.embeds.numpy(), feeds["inputs_embeds"], atol=1e-4)
        prefixed = encoder.encode(sample, prefix)
        assert prefixed.input_ids.tolist() == want_prefixed.input_ids
        for rows in ("image_rows", "instruction_rows", "prefix_rows"):
            got = torch.nonzero(getattr(prefixed, rows)).flatten().tolist()
            assert got == getattr(want_prefixed, rows), rows
    # The spelled tokens stayed text: one image's rows, and the instruction decodes to the prompt.
    assert int(batch.image_rows.sum()) == vlm.prompts.tokens_per_image
    instruction = batch.input_ids[0][batch.instruction_rows[0].bool()].tolist()
    assert vlm.prompts.decode(instruction, skip_special_tokens=False).strip() == SPELLED
    # What the old path did differs on this sample: the HF tokenizer reads "<image>" as the
    # image token, and PIL's convert("RGB") skips the EXIF rotation and the white background.
    image_id = vlm.prompts.image_token_id
    assert image_id in loaded.tokenizer(SPELLED, add_special_tokens=False)["input_ids"]
    old = loaded.processor.image_processor(
        images=[Image.open(image).convert("RGB")], return_tensors="np"
    )["pixel_values"]
    assert np.abs(old - pixels).max() > 0.1


def test_unreadable_image_names_the_sample(sources, tmp_path):
    records = marker_records()[:4]
    records[2]["image"] = "notes.png"
    (tmp_path / "notes.png").write_text("not an image\n")
    path = write_jsonl(tmp_path / "cal.jsonl", records)
    args = [str(sources["tiny"]), "--data", str(path), "--out", str(tmp_path / "p.json")]
    result = CliRunner().invoke(calibrate_command, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "sample on line 3" in result.output and "notes.png" in result.output
    encoder = PromptEncoder.for_source(load_source(sources["tiny"]))
    with pytest.raises(VlmguardError, match=r"sample on line 3: .*notes\.png is not a readable"):
        encoder.encode(read_samples(path)[2])


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("foo", "--device 'foo' is not a torch device"),
        pytest.param(
            "cuda",
            "--device cuda: torch",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_unusable_device_is_one_line(tmp_path, device, message):
    path = write_jsonl(tmp_path / "cal.jsonl", marker_records()[:4])
    args = ["/no/such/model", "--data", str(path), "--out", str(tmp_path / "p.json")]
    result = CliRunner().invoke(calibrate_command, [*args, "--device", device])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(VlmguardError, match=message):
        check_device(device)


@pytest.mark.parametrize("failing", ["export_onnx", "write_manifest"])
def test_failed_reexport_leaves_the_bundle_as_it_was(sources, tiny_bundle, tmp_path, failing):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = read_manifest(bundle)
    layers, heads = manifest["model"]["num_layers"], manifest["model"]["num_attention_heads"]
    oh = manifest["guards"]["oh"]
    document = {
        "policy": {"oh_threshold": 12.5},
        "calibration": {
            "model": {"layers": layers, "heads": heads},
            "oh": {"layer": (oh["layer"] + 1) % layers, "head": oh["head"]},
            "ptr": {"window": manifest["guards"]["ptr"]["window"]},
            "data": {"sha256": "0" * 64},
        },
    }
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    neighbours = sorted(p.name for p in tmp_path.iterdir())

    def fail(*args, **kwargs):
        raise OSError(f"injected failure in {failing}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(f"vlmguard.calibration.policy_writer.{failing}", fail)
        with pytest.raises(OSError, match="injected failure"):
            apply_to_bundle(bundle, document, sources["tiny"])
    after = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == neighbours  # no staging left behind
    verify_bundle(bundle, "sha256")


def test_calibrate_refuses_a_bundle_exported_from_another_model(sources, tiny_bundle, tmp_path):
    bundle = tmp_path / "foreign"
    shutil.copytree(tiny_bundle, bundle)  # the tiny model's bundle: as many layers as planted
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    data = write_jsonl(tmp_path / "cal.jsonl", marker_records())
    args = [str(sources["planted"]), "--data", str(data), "--out", str(tmp_path / "p.json")]
    result = CliRunner().invoke(calibrate_command, [*args, "--bundle", str(bundle)])
    assert result.exit_code == 1, result.output
    assert "is not the model" in result.output and "model.safetensors" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    with pytest.raises(VlmguardError, match="is not the model"):
        apply_to_bundle(bundle, {}, sources["planted"])  # the library path refuses as well
    after = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    assert after == before


def test_a_bundle_without_a_source_identity_needs_the_override(sources, tiny_bundle):
    manifest = Manifest.read(tiny_bundle)
    identity = manifest.source_identity
    manifest = dataclasses.replace(manifest, source_identity=None)
    assert identity == source_identity(sources["tiny"])
    with pytest.raises(VlmguardError, match="records no source identity.*--assume-same-source"):
        check_bundle_source(manifest, identity, sources["tiny"], tiny_bundle)
    check_bundle_source(manifest, identity, sources["tiny"], tiny_bundle, assume_same_source=True)


def _fitted(manifest: dict, **changes: object) -> dict:
    """A calibrated policy whose record matches the bundle, with `changes` to the record."""
    guards = manifest["guards"]
    window = guards["ptr"]["window"]
    record = {
        "source_identity": manifest["source_identity"]["sha256"],
        "num_layers": manifest["model"]["num_layers"],
        "oh": {"layer": guards["oh"]["layer"], "head": guards["oh"]["head"],
               "ptr_window": window, "ptr_k_fraction": 0.1},
        "ptr": {"window": window},
    }  # fmt: skip
    return {"oh_threshold": 10.0, "ptr_k_fraction": 0.1, "calibrated_for": record | changes}


def test_runtime_refuses_a_policy_calibrated_for_another_head_window_or_model(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    GuardedVLM.load(tiny_bundle, providers="cpu", policy=_fitted(manifest))  # it fits
    GuardedVLM.load(tiny_bundle, providers="cpu", policy={"oh_threshold": 10.0})  # hand-written
    oh = manifest["guards"]["oh"]
    start, end = manifest["guards"]["ptr"]["window"]
    other_head = {"layer": oh["layer"], "head": oh["head"] + 1, "ptr_window": [start, end],
                  "ptr_k_fraction": 0.1}  # fmt: skip
    cases = {
        "Oh layer .* head .*, the bundle bakes layer": {"oh": other_head},
        r"SafePTR window \[0, 2\), the bundle bakes": {"ptr": {"window": [0, 2]}},
        r"pruning \[0, 2\) at K 0.1, here .*pruning \[": {"oh": {**other_head, "head": oh["head"],
                                                             "ptr_window": [0, 2]}},
        "calibrated on another model": {"source_identity": "f" * 64},
        "calibrated on a 5-layer model": {"num_layers": 5},
    }  # fmt: skip
    for message, change in cases.items():
        with pytest.raises(PolicyError, match=f"does not fit .*{message}.*vlmguard calibrate"):
            GuardedVLM.load(tiny_bundle, providers="cpu", policy=_fitted(manifest, **change))
    observing = _fitted(manifest, oh=other_head) | {"oh_threshold": None}  # nothing acts on it
    GuardedVLM.load(tiny_bundle, providers="cpu", policy=observing)


def test_a_head_that_does_not_separate_held_out_stays_observe_only(sources, tmp_path):
    records = marker_records()
    samples = [Sample(r["prompt"], r["label"]) for r in records]
    _, held = split_holdout(samples, 0.3, 0)
    for index in (i for i, s in enumerate(samples) if s in held):  # held out: labels swapped
        pair = index + 1 if index % 2 == 0 else index - 1
        records[index] = {**records[index], "prompt": marker_records()[pair]["prompt"]}
    data = write_jsonl(tmp_path / "swapped.jsonl", records)
    out, report = tmp_path / "policy.json", tmp_path / "report"
    args = [str(sources["planted"]), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(calibrate_command, [*args, "--report", str(report)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    cal = document["calibration"]
    assert (cal["oh"]["layer"], cal["oh"]["head"]) == (PLANTED_LAYER, PLANTED_HEAD)
    assert cal["oh"]["separation_degrees"] < 0 and cal["oh"]["held_out"]["fpr"] == 1.0
    assert document["policy"]["oh_threshold"] is None
    assert document["policy"]["calibrated_for"]["oh"] is None
    assert "held-out separation" in cal["observe_only"]["oh"]
    assert "oh: left observe-only: held-out separation -" in result.output
    assert "oh: layer 1 head 2 observe-only" in result.output
    summary = (report / "summary.md").read_text()
    assert "## Guards left observe-only" in summary and cal["observe_only"]["oh"] in summary
    for guard in ("ptr", "align"):  # each either on with a positive separation, or off
        separation = cal[guard]["separation"]
        assert (guard in cal["observe_only"]) == (separation is None or separation <= 0)
    if "ptr" in cal["observe_only"]:
        assert document["policy"]["ptr_k_fraction"] == 0.0
    if "align" in cal["observe_only"]:
        assert document["policy"]["align_gamma"] == [0.0] * 4
    start, end = cal["align"]["layers"]
    assert f"on layers [{start}, {end}); " in result.output  # the report's half-open notation
    assert f"[{start}, {end})" in summary
