"""The runtime's text side: chat template, tokenization, image-token expansion and padding.

`PromptBuilder` reproduces what a transformers processor does with a one-turn chat
(`processor.apply_chat_template(conversation, add_generation_prompt=True)` and then
`processor(text=..., images=...)`) from a bundle's files alone: the Jinja chat template is
rendered with jinja2 in the same sandbox settings transformers uses, the text is tokenized by
`tokenizers` from the bundle's tokenizer.json (its post-processor adds the BOS, unless the
rendered text already starts with it, as `apply_chat_template(tokenize=True)` decides), and each
image token becomes what the family's `expand_image` says (LLaVA: `tokens_per_image` copies).
It also reports which rows hold the image, the user's instruction and the safety prefix, which
the guards need. No torch, no transformers.

The user's text is data, never structure: a prompt that spells a special token (`<image>`,
`</s>`, `<|im_start|>`, ...) is tokenized as the plain text it is, so only the template places
special tokens and image rows. Control characters are kept and tokenized as text; a prompt
with a lone surrogate (invalid UTF-8 decoded with `surrogateescape`) raises PromptError.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Encoding, Tokenizer

from vlmguard.errors import BundleError, VlmguardError

__all__ = ["EncodedPrompt", "PromptBuilder", "PromptError"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Stands in for the user's text in a probe rendering that finds where the template puts it.
_PROBE = "\ue000vlmguard-user-text\ue001"
# transformers' decode(clean_up_tokenization_spaces=True) replacements, in its order.
_CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


class PromptError(VlmguardError, ValueError):
    """A prompt (or a guard text) that cannot be tokenized as text, said in one line."""


@dataclass(frozen=True)
class EncodedPrompt:
    """A tokenized prompt and the rows (unpadded positions) the guards need."""

    input_ids: list[int]
    image_rows: list[int]
    instruction_rows: list[int]
    prefix_rows: list[int]


@dataclass(frozen=True)
class _Rendered:
    """Rendered chat text and the character spans of the safety prefix and the user's prompt."""

    text: str
    prefix_span: tuple[int, int]
    prompt_span: tuple[int, int]
    user_span: tuple[int, int]  # prefix and prompt together: tokenized as text only


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        """Parse the block up to `endgeneration` and emit its body as is."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    """Template helper: abort rendering with the template's message."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Template filter: JSON without HTML escaping, as transformers' `tojson`."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    """Template helper: the current local time formatted with `fmt`."""
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox and with the settings transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    """A special token's text as tokenizer_config.json stores it (a string or an AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_token_strings(config: dict) -> dict[str, str]:
    """Named special tokens (bos_token, eos_token, image_token, ...) from tokenizer_config.json."""
    named = {key: _token_text(value) for key, value in config.items() if key.endswith("_token")}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        named.update({key: _token_text(value) for key, value in extra.items()})
    return {key: value for key, value in named.items() if value is not None}


def _required_file(bundle: Path, name: str) -> Path:
    """Path of a file the text side needs, or a BundleError naming it."""
    path = bundle / name
    if not path.is_file():
        raise BundleError(f"{bundle} has no {name}: re-export the bundle with `vlmguard export`")
    return path


def token_rows_in_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character offsets overlap `span` (empty ones never do)."""
    start, end = span
    if start >= end:
        return []
    return [i for i, (lo, hi) in enumerate(offsets) if lo < end and hi > start and hi > lo]


def _clip(span: tuple[int, int], bounds: tuple[int, int]) -> tuple[int, int]:
    """The part of a character span inside `bounds` (empty when they do not meet)."""
    start, end = max(span[0], bounds[0]), min(span[1], bounds[1])
    return (start, max(start, end))


def _check_text(name: str, value: Any, optional: bool = False) -> None:
    """Refuse a non-string prompt part, or one that is not valid Unicode, naming it."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        hint = "; decode it first, e.g. value.decode('utf-8')" if isinstance(value, bytes) else ""
        raise TypeError(f"{name} must be a str, got {type(value).__name__}{hint}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PromptError(
            f"{name} is not valid text: it has the lone surrogate {value[err.start]!r} at "
            f"character {err.start} (invalid UTF-8 decoded with 'surrogateescape'?); "
            "pass UTF-8 text"
        ) from None


def _text_tokenizer(data: dict) -> Tokenizer:
    """A tokenizer from tokenizer.json data that reads special tokens' strings as text."""
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.encode_special_tokens = True
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _never_prepend(node: Any) -> bool:
    """Switch every Metaspace prepend_scheme "first" under `node` to "never"; True if any."""
    changed = False
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
            changed = True
        for value in node.values():
            changed = _never_prepend(value) or changed
    elif isinstance(node, list):
        for value in node:
            changed = _never_prepend(value) or changed
    return changed


class PromptBuilder:
    """Renders, tokenizes, decodes and pads chat prompts from a bundle's tokenizer and template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        tokenizer_config: dict,
        manifest: dict,
        expand_image: Callable[[], tuple[list[int], list[bool]]] | None = None,
    ) -> None:
        """Wrap a loaded tokenizer and template; `from_bundle` is the usual way in.

        `expand_image` is the family's rule for what one image placeholder becomes (ids, and
        which of them are image rows); by default `tokens_per_image` copies of the token.
        """
        try:
            image = manifest["model"]["image"]
            special = manifest["special_tokens"]
            self.image_token: str = image["token"]
            self.image_token_id: int = int(image["token_id"])
            self.tokens_per_image: int = int(image["tokens_per_image"])
            eos = special["eos_token_id"]
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"the bundle manifest lacks image or special-token facts ({err!r}); "
                "re-export the bundle with `vlmguard export`"
            ) from err
        self.special_tokens = special_token_strings(tokenizer_config)
        added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
        missing = [text for text in self.special_tokens.values() if text not in added]
        if missing:  # as transformers adds named special tokens that tokenizer.json lacks
            tokenizer.add_special_tokens(
                [AddedToken(text, special=True, normalized=False) for text in missing]
            )
        tokenizer.encode_special_tokens = bool(tokenizer_config.get("split_special_tokens", False))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if tokenizer.token_to_id(self.image_token) != self.image_token_id:
            raise BundleError(
                f"tokenizer.json maps {self.image_token!r} to "
                f"{tokenizer.token_to_id(self.image_token)}, the manifest says "
                f"{self.image_token_id}: re-export the bundle with `vlmguard export`"
            )
        self.tokenizer = tokenizer
        self.expand_image = expand_image or (
            lambda: ([self.image_token_id] * self.tokens_per_image, [True] * self.tokens_per_image)
        )
        # Tokens the user's text must never spell: every special added token and the image
        # token, by id with their text (an <unk> the model gives an unknown character is fine).
        decoder = tokenizer.get_added_tokens_decoder()
        named = set(self.special_tokens.values()) | {self.image_token}
        self._special_text = {
            i: token.content
            for i, token in decoder.items()
            if token.special or token.content in named
        }
        self._special_ids = frozenset(self._special_text)
        self._text_tokenizers: tuple[Tokenizer, Tokenizer] | None = None  # built on first need
        self._text_tokenizer_lock = threading.Lock()
        self.template = compile_chat_template(chat_template)
        self.eos_token_ids: list[int] = [int(i) for i in (eos if isinstance(eos, list) else [eos])]
        bos = special.get("bos_token_id")
        self.bos_token_id: int | None = None if bos is None else int(bos)
        pad = special.get("pad_token_id")
        # No pad token (common for Llama tokenizers): pad with EOS, masked out anyway.
        self.pad_token_id: int = int(pad) if pad is not None else self.eos_token_ids[0]
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.clean_up_spaces = bool(tokenizer_config.get("clean_up_tokenization_spaces", False))

    @classmethod
    def from_bundle(
        cls,
        bundle: Path,
        manifest: dict,
        expand_image: Callable[[], tuple[list[int], list[bool]]] | None = None,
    ) -> PromptBuilder:
        """Load tokenizer.json, tokenizer_config.json and chat_template.jinja from a bundle."""
        bundle = Path(bundle)
        tokenizer_path = _required_file(bundle, TOKENIZER_FILE)
        template = _required_file(bundle, CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        config_path = bundle / TOKENIZER_CONFIG_FILE
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            config = json.loads(config_path.read_text("utf-8")) if config_path.is_file() else {}
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise BundleError(
                f"{tokenizer_path.parent} has an unreadable {TOKENIZER_FILE} or "
                f"{TOKENIZER_CONFIG_FILE} ({err}); re-export the bundle with `vlmguard export`"
            ) from err
        try:
            return cls(tokenizer, template, config, manifest, expand_image)
        except jinja2.TemplateSyntaxError as err:
            raise BundleError(
                f"{bundle / CHAT_TEMPLATE_FILE} is not a valid Jinja template (line {err.lineno}: "
                f"{err.message}); re-export the bundle with `vlmguard export`"
            ) from err

    def _render_user_text(self, text: str, with_image: bool) -> str:
        """The chat template applied to one user turn holding `text` (and the image)."""
        content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": text})
        return self.template.render(
            messages=[{"role": "user", "content": content}],
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **self.special_tokens,
        )

    def _layout(
        self, prompt: str, with_image: bool, safety_prefix: str | None, assistant_prefix: str
    ) -> _Rendered:
        """Render the chat text and find where the safety prefix and the prompt landed in it."""
        _check_text("prompt", prompt)
        _check_text("safety_prefix", safety_prefix, optional=True)
        _check_text("assistant_prefix", assistant_prefix)
        if not isinstance(with_image, bool):
            raise TypeError(f"with_image must be a bool, got {type(with_image).__name__}")
        # The guard texts come from the policy: a written image token there is a mistake. The
        # user's prompt may spell it; it is tokenized as text (see `_tokenize`).
        for name, part in (
            ("safety_prefix", safety_prefix),
            ("assistant_prefix", assistant_prefix),
        ):
            if part and self.image_token in part:
                raise PromptError(
                    f"{name} contains the image token {self.image_token!r}; remove it from "
                    "the policy's text (the image is placed by the chat template)"
                )
        prefix = safety_prefix or ""
        if prefix and not prefix[-1].isspace():
            prefix += " "
        user_text = prefix + prompt
        text = self._render_user_text(user_text, with_image) + assistant_prefix
        # Where the template puts the user's text: after the part a probe rendering shares.
        probe = self._render_user_text(_PROBE, with_image)
        head = probe[: probe.find(_PROBE)] if _PROBE in probe else ""
        search_from = len(head) if text.startswith(head) else 0
        start = text.find(user_text, search_from)
        shown = (start, start + len(user_text))  # the user's characters present in `text`
        if start < 0:  # the template trimmed the text: locate its stripped form
            core = user_text.strip()
            found = text.find(core, search_from) if core else search_from
            if found < 0:
                raise ValueError(
                    "the chat template rewrites the user's text, so its tokens cannot be located"
                )
            start = found - (len(user_text) - len(user_text.lstrip()))
            shown = (found, found + len(core))
        prompt_start = start + len(prefix)
        return _Rendered(
            text,
            prefix_span=_clip((start, start + len(safety_prefix or "")), shown),
            prompt_span=_clip((prompt_start, prompt_start + len(prompt)), shown),
            user_span=shown,
        )

    def render(
        self,
        prompt: str,
        with_image: bool,
        safety_prefix: str | None = None,
        assistant_prefix: str = "",
    ) -> str:
        """The chat text for one user turn, with the generation prompt and any forced opening.

        `safety_prefix` starts the user's text (a space joins it to the prompt unless it ends
        in whitespace); `assistant_prefix` is appended verbatim after the generation prompt.
        """
        return self._layout(prompt, with_image, safety_prefix, assistant_prefix).text

    def _tokenize(self, rendered: _Rendered) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of the rendered chat, the user's text tokenized as text.

        Special tokens are added unless the template itself starts the text with BOS. When the
        user's text spells a special token, `_encode_as_text` re-tokenizes it without it.
        """
        text, (start, end) = rendered.text, rendered.user_span
        bos = self.bos_token or ""
        user_wrote_bos = start < end and start < len(bos)
        template_bos = bool(bos) and text.startswith(bos) and not user_wrote_bos
        encoding = self.tokenizer.encode(text, add_special_tokens=not template_bos)
        if not self._special_in_span(text, encoding.ids, encoding.offsets, rendered.user_span):
            return encoding.ids, encoding.offsets
        ids, offsets = self._encode_as_text(text, encoding, rendered.user_span)
        if self._special_in_span(text, ids, offsets, rendered.user_span):  # never expected
            raise PromptError(
                "the tokenizer still reads a special token in the prompt's text; "
                "remove special-token strings from the prompt"
            )
        return ids, offsets

    def _special_in_span(
        self, text: str, ids: list[int], offsets: list[tuple[int, int]], span: tuple[int, int]
    ) -> bool:
        """Whether a special token read from its written text overlaps `span`."""
        start, end = span
        return any(
            lo < end and hi > start and self._spelled(text, token, lo, hi)
            for token, (lo, hi) in zip(ids, offsets, strict=True)
        )

    def _spelled(self, text: str, token: int, lo: int, hi: int) -> bool:
        """Whether `token` is a special token matched from its text at text[lo:hi]."""
        return token in self._special_text and self._special_text[token] in text[lo:hi]

    def _text_only_tokenizers(self) -> tuple[Tokenizer, Tokenizer]:
        """Copies of the tokenizer that read special tokens' strings as plain text.

        The first tokenizes a piece at the start of the text, the second one further in: a
        Metaspace pre-tokenizer that prepends its space to the first piece only must not
        prepend it to a piece that is on its own here but mid-text in the original.
        """
        with self._text_tokenizer_lock:
            if self._text_tokenizers is None:
                data = json.loads(self.tokenizer.to_str())
                for token in data.get("added_tokens", []):
                    if token.get("id") in self._special_ids:
                        token["special"] = True
                first = _text_tokenizer(data)
                later = first
                if _never_prepend(data.get("pre_tokenizer")):
                    later = _text_tokenizer(data)
                self._text_tokenizers = (first, later)
            return self._text_tokenizers

    def _encode_as_text(
        self, text: str, encoding: Encoding, span: tuple[int, int]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Re-tokenize `text` keeping only the special tokens outside `span`.

        The tokenizer cuts text at special tokens and tokenizes the pieces between them on
        their own, so cutting at the template's special tokens only and tokenizing each piece
        with special-token matching off reads the user's text as plain text. Tokens the
        post-processor added (BOS) are kept where it put them.
        """
        start, end = span
        rows = list(zip(encoding.ids, encoding.offsets, encoding.sequence_ids, strict=True))
        content = [i for i, row in enumerate(rows) if row[2] is not None]
        first, last = (content[0], content[-1] + 1) if content else (len(rows), len(rows))
        ids = [token for token, _, _ in rows[:first]]
        offsets = [(0, 0)] * first
        first_piece, later_piece = self._text_only_tokenizers()
        position = 0
        cuts = [
            (token, lo, hi)
            for token, (lo, hi), _ in rows[first:last]
            if self._spelled(text, token, lo, hi) and not (lo < end and hi > start)
        ]
        for token, lo, hi in [*cuts, (None, len(text), len(text))]:
            tokenizer = first_piece if position == 0 else later_piece
            piece = tokenizer.encode(text[position:lo], add_special_tokens=False)
            ids.extend(piece.ids)
            offsets.extend((a + position, b + position) for a, b in piece.offsets)
            if token is not None:
                ids.append(token)
                offsets.append((lo, hi))
            position = hi
        ids.extend(token for token, _, _ in rows[last:])
        offsets.extend([(0, 0)] * (len(rows) - last))
        return ids, offsets

    def encode(
        self,
        prompt: str,
        with_image: bool,
        safety_prefix: str | None = None,
        assistant_prefix: str = "",
    ) -> EncodedPrompt:
        """Token ids of the rendered prompt with the image token expanded, and the guard rows."""
        rendered = self._layout(prompt, with_image, safety_prefix, assistant_prefix)
        token_ids, offsets = self._tokenize(rendered)
        instruction = set(token_rows_in_span(offsets, rendered.prompt_span))
        prefix = set(token_rows_in_span(offsets, rendered.prefix_span))
        ids: list[int] = []
        image_rows: list[int] = []
        instruction_rows: list[int] = []
        prefix_rows: list[int] = []
        images = 0
        for index, token_id in enumerate(token_ids):
            if token_id == self.image_token_id:  # the family's expansion of one image
                expanded, rows = self.expand_image()
                image_rows.extend(len(ids) + i for i, row in enumerate(rows) if row)
                ids.extend(expanded)
                images += 1
                continue
            if index in instruction:
                instruction_rows.append(len(ids))
            if index in prefix:
                prefix_rows.append(len(ids))
            ids.append(token_id)
        if images != int(with_image):
            raise BundleError(
                f"the chat template placed {images} image tokens for with_image={with_image}; "
                "re-export the bundle with a template that renders one image item as one image "
                "token"
            )
        return EncodedPrompt(ids, image_rows, instruction_rows, prefix_rows)

    def token_count(
        self,
        prompt: str,
        with_image: bool,
        safety_prefix: str | None = None,
        assistant_prefix: str = "",
    ) -> int:
        """Number of prompt tokens (image tokens expanded), for length checks before a run."""
        return len(self.encode(prompt, with_image, safety_prefix, assistant_prefix).input_ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids, as the transformers tokenizer's `decode` gives it."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def pad_batch(self, prompts: list[EncodedPrompt]) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad prompts to one length: (input_ids, attention_mask), both int64 [B, T]."""
        if not prompts:
            raise ValueError("pad_batch needs at least one prompt")
        width = max(len(p.input_ids) for p in prompts)
        input_ids = np.full((len(prompts), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            start = width - len(prompt.input_ids)
            input_ids[row, start:] = prompt.input_ids
            attention_mask[row, start:] = 1
        return input_ids, attention_mask
