"""Small random-weight LLaVA checkpoints, built offline, for tests and benchmarks.

`build_tiny_llava` writes a complete Hugging Face checkpoint directory (model, tokenizer,
processor, chat template) that `transformers` loads with no network access. Weights are random
(seeded); the byte-level BPE tokenizer is trained on `data/tiny_corpus.txt` next to this file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)
from transformers.image_processing_backends import PilBackend

from vlmguard.errors import OutputExistsError, UsageError

VISION_TOWERS: tuple[str, ...] = ("clip", "siglip")
TEXT_MODELS: tuple[str, ...] = ("llama", "mistral", "qwen2")
SHAPES: tuple[str, ...] = ("tiny", "small")
IMAGE_TOKEN = "<image>"

CORPUS_PATH = Path(__file__).parent / "data" / "tiny_corpus.txt"
TOKENIZER_VOCAB_SIZE = 1000
# Trained first, so they get ids 0..4 in this order.
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))

# LLaVA-1.5 prompt format as in llava-hf's processors ("USER: <image>\n... ASSISTANT:"), written
# for plain jinja2 (no transformers-only tags). `content` may be a string or a list of items.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_VISION_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    ),
    # SigLIP-B/16 at 224 px: 14 x 14 = 196 image tokens.
    "small": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
    ),
}
_TEXT_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    ),
    # SmolLM-135M-shaped decoder, as in SmolVLM-256M.
    "small": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        max_position_embeddings=2048,
    ),
}
_SMALL_VOCAB_SIZE = 49152
_VISION_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    "clip": CLIPVisionConfig,
    "siglip": SiglipVisionConfig,
}
_TEXT_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
}
# Extra text settings for the tiny shape. With the default initializer_range (0.02) the logits
# are near zero and greedy decoding often repeats one token for every step; 0.2 gives varied
# tokens. Mistral's window is short so that short prompts already hit the sliding-window mask.
_TINY_TEXT_INIT_RANGE = 0.2
_TINY_TEXT_EXTRAS: dict[str, dict[str, object]] = {
    "llama": {},
    "mistral": {"sliding_window": 24},
    "qwen2": {"use_sliding_window": False},
}


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise UsageError (a ValueError) if `value` is not one of `choices`."""
    if value not in choices:
        raise UsageError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def _check_choices(vision: str, text: str, shape: str) -> None:
    """Validate a (vision, text, shape) combination."""
    _check_choice("vision tower", vision, VISION_TOWERS)
    _check_choice("text model", text, TEXT_MODELS)
    _check_choice("shape", shape, SHAPES)
    if shape == "small" and (vision, text) != ("siglip", "llama"):
        raise UsageError(
            f"shape 'small' is only built as vision='siglip', text='llama' "
            f"(got vision={vision!r}, text={text!r})"
        )


def train_tokenizer(corpus: str | Path = CORPUS_PATH) -> PreTrainedTokenizerFast:
    """Train the deterministic byte-level BPE tokenizer used by the tiny models."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    # Prepend BOS like Llama tokenizers; kept in tokenizer.json for runtimes without transformers.
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def _vision_config(vision: str, shape: str) -> PreTrainedConfig:
    """Vision tower config for `vision` at `shape`."""
    return _VISION_CONFIGS[vision](**_VISION_SHAPES[shape])


def _text_config(text: str, shape: str, vocab_size: int) -> PreTrainedConfig:
    """Grouped-query-attention decoder config for `text` at `shape`."""
    extras: dict[str, object] = {}
    if shape == "tiny":
        extras = {"initializer_range": _TINY_TEXT_INIT_RANGE, **_TINY_TEXT_EXTRAS[text]}
    return _TEXT_CONFIGS[text](
        **_TEXT_SHAPES[shape],
        **extras,
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _select_strategy(vision: str) -> str:
    """LLaVA feature selection: CLIP drops its CLS token ("default"), SigLIP has none ("full")."""
    return "default" if vision == "clip" else "full"


def _num_image_tokens(shape: str) -> int:
    """Image features per image after feature selection: one per patch."""
    spec = _VISION_SHAPES[shape]
    return (spec["image_size"] // spec["patch_size"]) ** 2


def _vocab_size(shape: str, tokenizer_size: int) -> int:
    """Text vocab size: the tokenizer's for tiny; SmolLM's 49152 for small (extra rows unused)."""
    return max(_SMALL_VOCAB_SIZE, tokenizer_size) if shape == "small" else tokenizer_size


def tiny_llava_config(
    vision: str = "clip", text: str = "llama", shape: str = "tiny", vocab_size: int | None = None
) -> LlavaConfig:
    """Return the LlavaConfig `build_tiny_llava` uses, without building weights."""
    _check_choices(vision, text, shape)
    if vocab_size is None:
        vocab_size = _vocab_size(shape, len(train_tokenizer()))
    return LlavaConfig(
        vision_config=_vision_config(vision, shape),
        text_config=_text_config(text, shape, vocab_size),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=_num_image_tokens(shape),
        vision_feature_select_strategy=_select_strategy(vision),
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def _image_processor(vision: str, image_size: int) -> PilBackend:
    """CLIP (shortest edge + center crop) or SigLIP (square resize) preprocessing."""
    if vision == "clip":
        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def _processor(
    vision: str, config: LlavaConfig, tokenizer: PreTrainedTokenizerFast
) -> LlavaProcessor:
    """LlavaProcessor whose `<image>` expansion matches the model's number of image features."""
    vision_config = config.vision_config
    return LlavaProcessor(
        image_processor=_image_processor(vision, vision_config.image_size),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        # CLIP emits a CLS token that strategy "default" removes again; SigLIP emits none.
        num_additional_image_tokens=1 if vision == "clip" else 0,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Create `out_dir`, refusing to write into a non-empty one unless `force`."""
    # With force, files of the same name are overwritten and any other files are left alone.
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(
            f"{out_dir} exists and is not empty; pass force=True (CLI: --force) to overwrite"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def build_tiny_llava(
    out_dir: str | Path,
    vision: str = "clip",
    text: str = "llama",
    seed: int = 0,
    shape: str = "tiny",
    force: bool = False,
) -> Path:
    """Write a complete Hugging Face checkpoint directory for a small random-weight LLaVA model."""
    _check_choices(vision, text, shape)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, force)

    tokenizer = train_tokenizer()
    config = tiny_llava_config(vision, text, shape, _vocab_size(shape, len(tokenizer)))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)

    processor = _processor(vision, config, tokenizer)
    processor.save_pretrained(out_dir)
    # transformers 5 keeps the image processor inside processor_config.json; also write the
    # classic preprocessor_config.json for loaders that look for it.
    processor.image_processor.save_pretrained(out_dir)
    return out_dir
