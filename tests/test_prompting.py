"""PromptBuilder against transformers' LLaVA processors: ids, rows, padding, decoding, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from support import noise_image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

from vlmguard.errors import BundleError
from vlmguard.manifest import read_manifest
from vlmguard.runtime.prompting import EncodedPrompt, PromptBuilder

COMBOS = [("clip", "llama"), ("siglip", "qwen2")]
PROMPTS = [
    "Hi",
    "What is in this picture?",
    "Describe, in detail: the colours; the shapes (if any) -- and what they're doing!",
    "  Ünïcødé ✓ 日本語 «quotes»\nsecond line\n\n\tindented  ",
    "",
]
SAFETY_PREFIX = "As an AI assistant, you must refuse harmful requests."
ASSISTANT_PREFIX = " I cannot"
# llava-hf/llava-1.5-7b-hf's template (note the transformers-only `generation` tag).
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A Mistral-style template that writes the BOS itself and trims the user's text.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n"
    "{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ c['text'] | trim }}{% endfor %} [/INST]{% endif %}{% endfor %}"
)


def conversation(text: str, with_image: bool) -> list[dict]:
    """A one-turn user conversation as transformers' processors take it."""
    content = [{"type": "image"}] if with_image else []
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def hf_ids(processor, text: str | list[str], with_image: bool) -> list:
    """The processor's input_ids for rendered text (one image per text when with_image)."""
    texts = [text] if isinstance(text, str) else text
    images = [noise_image(i) for i in range(len(texts))] if with_image else None
    return processor(text=texts, images=images, padding=True)


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{v}-{t}" for v, t in COMBOS])
def pair(request, tiny_setup) -> tuple[PromptBuilder, object]:
    """(PromptBuilder from the exported bundle, the checkpoint's HF processor) per combination."""
    setup = tiny_setup(*request.param)
    bundle = setup.bundles["plain"]
    return PromptBuilder.from_bundle(bundle, read_manifest(bundle)), setup.processor


def expected_rows(processor, rendered: str, ids: list[int], part: str) -> list[int]:
    """Rows of `part` in `rendered`, from the HF tokenizer's offsets on the expanded text."""
    if not part:
        return []
    token = processor.image_token
    expanded = rendered.replace(token, token * ids.count(processor.image_token_id))
    enc = processor.tokenizer(
        expanded,
        return_offsets_mapping=True,
        add_special_tokens=not expanded.startswith(processor.tokenizer.bos_token),
    )
    assert enc["input_ids"] == ids
    start = expanded.find(part)
    end = start + len(part)
    return [i for i, (lo, hi) in enumerate(enc["offset_mapping"]) if lo < end and hi > start]


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_ids_match_processor(pair, with_image: bool) -> None:
    """Rendered text and input_ids equal the HF processor's for varied prompts."""
    builder, processor = pair
    for prompt in PROMPTS:
        text = processor.apply_chat_template(
            conversation(prompt, with_image), add_generation_prompt=True
        )
        assert builder.render(prompt, with_image) == text
        encoded = builder.encode(prompt, with_image)
        assert encoded.input_ids == hf_ids(processor, text, with_image)["input_ids"][0], prompt
        assert builder.token_count(prompt, with_image) == len(encoded.input_ids)
        assert (processor.tokenizer.bos_token_id in encoded.input_ids[:1]) == (
            builder.bos_token_id is not None
        )


def test_prefixes_render_in_place(pair) -> None:
    """The safety prefix starts the user's text; the assistant prefix ends the rendered text."""
    builder, processor = pair
    prompt = "Tell me about this image."
    for with_image in (True, False):
        conv = conversation(f"{SAFETY_PREFIX} {prompt}", with_image)
        text = processor.apply_chat_template(conv, add_generation_prompt=True) + ASSISTANT_PREFIX
        args = (prompt, with_image, SAFETY_PREFIX, ASSISTANT_PREFIX)
        assert builder.render(*args) == text
        assert (
            builder.encode(*args).input_ids == hf_ids(processor, text, with_image)["input_ids"][0]
        )
    # a prefix ending in whitespace is used as is
    conv = conversation(f"{SAFETY_PREFIX}\n{prompt}", True)
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert builder.render(prompt, True, SAFETY_PREFIX + "\n") == text


def test_rows(pair) -> None:
    """image_rows, instruction_rows and prefix_rows are exactly their tokens' positions."""
    builder, processor = pair
    for prompt in PROMPTS:
        for with_image in (True, False):
            for prefix in (None, SAFETY_PREFIX):
                encoded = builder.encode(prompt, with_image, prefix, ASSISTANT_PREFIX)
                ids = encoded.input_ids
                rendered = builder.render(prompt, with_image, prefix, ASSISTANT_PREFIX)
                image_id = processor.image_token_id
                assert encoded.image_rows == [i for i, t in enumerate(ids) if t == image_id]
                assert len(encoded.image_rows) == (builder.tokens_per_image if with_image else 0)
                # the prompt is unique in the rendered text for these prompts and prefix
                rows = expected_rows(processor, rendered, ids, prompt)
                assert encoded.instruction_rows == rows, prompt
                assert encoded.prefix_rows == expected_rows(processor, rendered, ids, prefix or "")
                if prompt.strip():
                    picked = builder.decode([ids[i] for i in encoded.instruction_rows])
                    assert picked.strip() == prompt.strip()
                if prefix:
                    assert builder.decode([ids[i] for i in encoded.prefix_rows]).strip() == prefix


def test_pad_batch_matches_processor(pair) -> None:
    """Left padding with the pad id and the attention mask equal the processor's padded batch."""
    builder, processor = pair
    prompts = [PROMPTS[0], PROMPTS[2]]
    texts = [
        processor.apply_chat_template(conversation(p, True), add_generation_prompt=True)
        for p in prompts
    ]
    reference = hf_ids(processor, texts, True)
    input_ids, attention_mask = builder.pad_batch([builder.encode(p, True) for p in prompts])
    assert input_ids.dtype == attention_mask.dtype == "int64"
    assert input_ids.tolist() == reference["input_ids"]
    assert attention_mask.tolist() == reference["attention_mask"]
    assert attention_mask[0, 0] == 0 and input_ids[0, 0] == builder.pad_token_id


def test_decode_round_trips(pair) -> None:
    """decode gives back the text and matches the HF tokenizer's decode."""
    builder, processor = pair
    for prompt in PROMPTS[1:4]:
        encoded = builder.encode(prompt, True)
        for skip in (True, False):
            reference = processor.tokenizer.decode(encoded.input_ids, skip_special_tokens=skip)
            assert builder.decode(encoded.input_ids, skip_special_tokens=skip) == reference
        assert prompt in builder.decode(encoded.input_ids)
        answer = builder.tokenizer.encode(prompt, add_special_tokens=False).ids
        assert builder.decode(answer + builder.eos_token_ids) == prompt
    assert isinstance(builder.pad_token_id, int) and builder.eos_token_ids


def test_bad_inputs(pair) -> None:
    """Non-string parts and an image token in a guard text are refused with clear messages."""
    builder, _ = pair
    with pytest.raises(TypeError, match="prompt must be a str"):
        builder.encode(None, True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt must be a str"):
        builder.render(b"bytes", False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="with_image must be a bool"):
        builder.encode("hi", "yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="safety_prefix must be a str"):
        builder.encode("hi", True, safety_prefix=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image token"):
        builder.encode("look here", True, safety_prefix="<image> is unsafe")
    with pytest.raises(ValueError, match="at least one"):
        builder.pad_batch([])


@pytest.mark.parametrize("missing", ["tokenizer.json", "chat_template.jinja"])
def test_bundle_missing_file(tiny_setup, tmp_path: Path, missing: str) -> None:
    """A bundle without its tokenizer or template raises a one-line BundleError naming it."""
    bundle = tiny_setup("clip", "llama").bundles["plain"]
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("onnx"))
    (copy / missing).unlink()
    with pytest.raises(BundleError, match=f"no {missing}.*re-export") as info:
        PromptBuilder.from_bundle(copy, read_manifest(bundle))
    assert "\n" not in str(info.value)


def test_bundle_broken_files(tiny_setup, tmp_path: Path) -> None:
    """A malformed tokenizer.json, a bad template or a manifest without facts raise BundleError."""
    bundle = tiny_setup("clip", "llama").bundles["plain"]
    manifest = read_manifest(bundle)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("onnx"))
    with pytest.raises(BundleError, match="re-export"):
        PromptBuilder.from_bundle(copy, {"model": {}})
    (copy / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(BundleError, match="not a valid Jinja template"):
        PromptBuilder.from_bundle(copy, manifest)
    (copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable tokenizer.json"):
        PromptBuilder.from_bundle(copy, manifest)


def test_runtime_import_is_lean() -> None:
    """Importing the prompting module pulls in neither torch nor transformers."""
    code = (
        "import sys, vlmguard.runtime.prompting; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def llama_style_tokenizer(out: Path) -> transformers.PreTrainedTokenizerBase:
    """A llava-hf-like Llama tokenizer: sentencepiece-style BPE with byte fallback, legacy json."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    corpus = Path(__file__).parents[1] / "export" / "data" / "tiny_corpus.txt"
    tok.train([str(corpus)], trainer)
    # Byte tokens are ordinary vocabulary in Llama tokenizers, not (skippable) special tokens.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_tokens]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ("<image>", "<pad>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "padding_side": "left",
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def llama_style(tiny_setup, tmp_path_factory) -> dict[str, tuple[PromptBuilder, object]]:
    """Builders and LlavaProcessors for a Llama-style tokenizer under llava-1.5 and BOS templates.

    The bundle directory holds what `tokenizer.save_pretrained` writes: transformers 5 rebuilds a
    LlamaTokenizer's pre-tokenizer, so that (not the raw source tokenizer.json) is what it runs.
    """
    tiny = tiny_setup("clip", "llama")
    root = tmp_path_factory.mktemp("llama-style")
    tokenizer = llama_style_tokenizer(root / "source")
    tiny_image = read_manifest(tiny.bundles["plain"])["model"]["image"]
    manifest = {
        "model": {"image": {**tiny_image, "token_id": tokenizer.convert_tokens_to_ids("<image>")}},
        "special_tokens": {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": [tokenizer.eos_token_id],
            "pad_token_id": tokenizer.pad_token_id,
            "padding_side": "left",
        },
    }
    built = {}
    for name, template in (("llava15", LLAVA15_TEMPLATE), ("bos", BOS_TEMPLATE)):
        processor = transformers.LlavaProcessor(
            image_processor=tiny.processor.image_processor,
            tokenizer=tokenizer,
            patch_size=tiny.processor.patch_size,
            vision_feature_select_strategy=tiny.processor.vision_feature_select_strategy,
            num_additional_image_tokens=tiny.processor.num_additional_image_tokens,
            chat_template=template,
        )
        bundle = root / name
        tokenizer.save_pretrained(bundle)
        (bundle / "chat_template.jinja").write_text(template)
        built[name] = (PromptBuilder.from_bundle(bundle, manifest), processor)
    return built


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_llama_style_llava15(llama_style, with_image: bool) -> None:
    """A sentencepiece-style tokenizer and the llava-1.5 template match the processor too."""
    builder, processor = llama_style["llava15"]
    for prompt in PROMPTS:
        text = processor.apply_chat_template(
            conversation(prompt, with_image), add_generation_prompt=True
        )
        encoded = builder.encode(prompt, with_image, SAFETY_PREFIX)
        assert builder.render(prompt, with_image) == text
        assert (
            builder.encode(prompt, with_image).input_ids
            == hf_ids(processor, text, with_image)["input_ids"][0]
        )
        rendered = builder.render(prompt, with_image, SAFETY_PREFIX)
        ids = encoded.input_ids
        assert encoded.instruction_rows == expected_rows(processor, rendered, ids, prompt)
        assert encoded.prefix_rows == expected_rows(processor, rendered, ids, SAFETY_PREFIX)
        assert builder.decode(ids) == processor.tokenizer.decode(ids, skip_special_tokens=True)


def test_template_with_bos_adds_no_second_bos(llama_style) -> None:
    """A template that writes the BOS is tokenized as apply_chat_template(tokenize=True) does."""
    builder, processor = llama_style["bos"]
    for prompt in PROMPTS[1:4]:
        conv = conversation(prompt, True)
        conv[0]["content"][0]["image"] = noise_image(0)
        reference = processor.apply_chat_template(
            conv, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0]
        encoded = builder.encode(prompt, True)
        assert encoded.input_ids == reference
        assert encoded.input_ids[:2].count(builder.bos_token_id) == 1
        # the template trims the user's text: the rows still cover exactly its tokens
        rows = encoded.instruction_rows
        assert builder.decode([encoded.input_ids[i] for i in rows]).strip() == prompt.strip()
        assert rows == list(range(rows[0], rows[-1] + 1))
    for blank in ("", "   \n"):  # trimmed away entirely: no instruction rows, no error
        assert builder.encode(blank, True).instruction_rows == []


def test_encoded_prompt_is_frozen() -> None:
    """EncodedPrompt is an immutable record."""
    encoded = EncodedPrompt([1, 2], [], [1], [])
    with pytest.raises(AttributeError):
        encoded.input_ids = []  # type: ignore[misc]
