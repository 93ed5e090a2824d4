"""build_tiny_llava writes checkpoints that transformers loads and runs offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlmguard.export.tiny_model import (  # noqa: E402
    IMAGE_TOKEN,
    SHAPES,
    TEXT_MODELS,
    VISION_TOWERS,
    build_tiny_llava,
    tiny_llava_config,
)

COMBOS = [(vision, text) for vision in VISION_TOWERS for text in TEXT_MODELS]
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Build each (vision, text) checkpoint once per module, on demand."""
    cache: dict[tuple[str, str], Path] = {}

    def get(vision: str, text: str) -> Path:
        if (vision, text) not in cache:
            out = tmp_path_factory.mktemp(f"{vision}-{text}")
            cache[vision, text] = build_tiny_llava(out, vision=vision, text=text, force=True)
        return cache[vision, text]

    return get


def _image() -> Image.Image:
    """A non-square RGB image, so resizing and cropping are exercised."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _inputs(processor: LlavaProcessor, question: str = "What colour is the cup?"):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    return processor(images=_image(), text=prompt, return_tensors="pt")


@pytest.mark.parametrize("vision,text", COMBOS)
def test_checkpoint_loads_offline(checkpoint, vision: str, text: str) -> None:
    out = checkpoint(vision, text)
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(processor, LlavaProcessor)

    text_cfg = model.config.text_config
    assert text_cfg.model_type == text
    assert model.config.vision_config.model_type == f"{vision}_vision_model"
    assert text_cfg.num_key_value_heads < text_cfg.num_attention_heads
    assert text_cfg.vocab_size == len(tokenizer)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.vision_feature_layer == -2
    expected_strategy = "default" if vision == "clip" else "full"
    assert model.config.vision_feature_select_strategy == expected_strategy
    assert processor.vision_feature_select_strategy == expected_strategy
    assert tokenizer.padding_side == "left"
    if text == "mistral":
        assert text_cfg.sliding_window == 24
    if text == "qwen2":
        assert not text_cfg.use_sliding_window
        assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("vision,text", COMBOS)
def test_image_tokens_match_features_and_forward(checkpoint, vision: str, text: str) -> None:
    out = checkpoint(vision, text)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    inputs = _inputs(AutoProcessor.from_pretrained(out))

    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits
    assert n_image_tokens == features[0].shape[0] == model.config.image_seq_length == 16
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("vision,text", COMBOS)
def test_greedy_generation_varies(checkpoint, vision: str, text: str) -> None:
    out = checkpoint(vision, text)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    inputs = _inputs(AutoProcessor.from_pretrained(out))
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new_tokens) == 5
    assert len(set(new_tokens)) > 1, "random weights should not repeat one token every step"


@pytest.mark.parametrize("vision,text", COMBOS)
def test_same_seed_same_bytes(tmp_path: Path, vision: str, text: str) -> None:
    def build(name: str, seed: int) -> Path:
        return build_tiny_llava(tmp_path / name, vision=vision, text=text, seed=seed)

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_tokenizer_bos_and_single_image_token(checkpoint) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint("clip", "llama"))
    ids = tokenizer("USER: <image>\nWhat is this?<image>")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == 2
    assert tokenizer.convert_ids_to_tokens(ids).count(IMAGE_TOKEN) == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "USER: \nWhat is this?"
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<s>", "</s>", "<pad>")
    assert 900 <= len(tokenizer) <= 1100


def test_chat_template_llava_format(checkpoint) -> None:
    processor = AutoProcessor.from_pretrained(checkpoint("siglip", "llama"))
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And the colour?"},
    ]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is it? ASSISTANT: A cat. USER: And the colour? ASSISTANT:"
    plain = processor.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert plain == "USER: Hi "


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vision": "vit"},
        {"text": "gpt2"},
        {"shape": "huge"},
        {"shape": "small", "vision": "clip", "text": "llama"},
        {"shape": "small", "vision": "siglip", "text": "qwen2"},
    ],
)
def test_bad_choices_raise(tmp_path: Path, kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="choose one of|only built as"):
        build_tiny_llava(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_unknown_choice_names_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clip, siglip"):
        build_tiny_llava(tmp_path, vision="vit")
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        tiny_llava_config(text="gpt2")
    with pytest.raises(ValueError, match=", ".join(SHAPES)):
        tiny_llava_config(shape="medium")


def test_refuses_non_empty_dir_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="force=True"):
        build_tiny_llava(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    build_tiny_llava(tmp_path, force=True)
    assert (tmp_path / "model.safetensors").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_tiny_llava(empty) == empty


def test_small_shape_config() -> None:
    config = tiny_llava_config("siglip", "llama", "small")
    text_cfg, vision_cfg = config.text_config, config.vision_config
    assert (text_cfg.num_hidden_layers, text_cfg.hidden_size) == (30, 576)
    assert (text_cfg.num_attention_heads, text_cfg.num_key_value_heads) == (9, 3)
    assert (text_cfg.intermediate_size, text_cfg.vocab_size) == (1536, 49152)
    assert text_cfg.max_position_embeddings == 2048
    assert (vision_cfg.hidden_size, vision_cfg.num_hidden_layers) == (768, 12)
    assert (vision_cfg.image_size, vision_cfg.patch_size) == (224, 16)
    assert config.image_seq_length == 196
    assert config.vision_feature_select_strategy == "full"


@pytest.mark.slow
def test_small_shape_builds_and_matches_image_tokens(tmp_path: Path) -> None:
    out = build_tiny_llava(tmp_path, vision="siglip", text="llama", shape="small")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 30
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert 240e6 < model.num_parameters() < 270e6
    inputs = _inputs(AutoProcessor.from_pretrained(out))
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert n_image_tokens == features[0].shape[0] == 196
