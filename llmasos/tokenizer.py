"""Tokenizer: text <-> token ids from a checkpoint's tokenizer.json, matching transformers' AutoTokenizer exactly.

Also renders chat templates (see `chat_template.py`) and streams generated ids back to text with
`IncrementalDetokenizer`, which never emits half a UTF-8 character.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from llmasos.chat_template import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    DEFAULT_TEMPLATE_NAME,
    load_chat_templates,
    render_chat_template,
    select_chat_template,
)
from llmasos.errors import ModelLoadError, TemplateError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# transformers' named special tokens, in its order; model-specific `*_token` keys (image_token, ...) follow them.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Keys of tokenizer_config.json that `save` rewrites or drops because tokenizer.json now carries what they said.
_CONFIG_KEYS_NOT_SAVED = frozenset(
    "chat_template added_tokens_decoder additional_special_tokens extra_special_tokens auto_map add_bos_token"
    " add_eos_token tokenizer_file name_or_path special_tokens_map_file fast_tokenizer_files".split()
)
# Tokens of prompt context the incremental detokenizer decodes with the first generated tokens (as vLLM does).
_PROMPT_CONTEXT_TOKENS = 5


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); restore it from the original checkpoint.") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object, not {type(data).__name__}.")
    return data


def _token_content(value: Any) -> str | None:
    """The text of a special token given as a string, an AddedToken or a serialized AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, AddedToken):
        return value.content
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_added_token(value: Any, force_special: bool) -> AddedToken:
    if isinstance(value, Mapping):
        properties = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        if force_special:
            properties["special"] = True
        return AddedToken(value["content"], **properties)
    return AddedToken(str(value), special=True)


def _merge_special_tokens_map(config: dict[str, Any], special_map: Mapping[str, Any]) -> None:
    """Fold a legacy special_tokens_map.json into the config the way transformers does (the map wins)."""
    for key, value in special_map.items():
        if key == "extra_special_tokens" and isinstance(value, list):
            existing = list(config.get("extra_special_tokens") or [])
            existing += [token for token in value if token not in existing]
            value = existing
        config[key] = value
    if isinstance(config.get("extra_special_tokens"), dict):
        config.update(config.pop("extra_special_tokens"))


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat templates; byte-for-byte the same ids as transformers."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self._literal_backend: tokenizers.Tokenizer | None = None  # special-token text as plain text
        self._config = dict(config or {})
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        config = self._config
        padding = backend.padding
        # transformers turns truncation and padding off for every plain encode call.
        backend.no_truncation()
        backend.no_padding()

        # Resolve special tokens the way transformers 5 does: named ones, then model-specific `*_token` keys.
        if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
            config["extra_special_tokens"] = config.pop("additional_special_tokens")
        extra = config.get("extra_special_tokens")
        raw_tokens: dict[str, Any] = {name: config.get(name) for name in NAMED_SPECIAL_TOKENS}
        if raw_tokens["pad_token"] is None and padding is not None:
            raw_tokens["pad_token"] = padding.get("pad_token")
        for key, value in config.items():
            if key.endswith("_token") and key not in raw_tokens and _token_content(value) is not None:
                raw_tokens[key] = value
        if isinstance(extra, Mapping):
            raw_tokens.update(extra)
            extra = None
        self.special_tokens: dict[str, str] = {
            name: content for name, value in raw_tokens.items() if (content := _token_content(value)) is not None
        }
        extra_tokens = [token for token in (extra or []) if _token_content(token) is not None]
        self.extra_special_tokens: list[str] = [_token_content(token) for token in extra_tokens]
        self._add_missing_tokens(raw_tokens, extra_tokens)

        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # transformers 5 skips the clean-up for BPE models (it corrupts their text) unless this flag forces it.
        self._clean_up_on_decode = self.clean_up_tokenization_spaces and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        )
        self.split_special_tokens = bool(config.get("split_special_tokens", False))
        backend.encode_special_tokens = self.split_special_tokens

        added = backend.get_added_tokens_decoder()
        self.all_special_ids: set[int] = {token_id for token_id, token in added.items() if token.special}

    def _add_missing_tokens(self, raw_tokens: Mapping[str, Any], extra_tokens: list[Any]) -> None:
        """Add config-declared tokens that tokenizer.json lacks, in transformers' order, so ids agree with it."""
        present = {token.content for token in self._backend.get_added_tokens_decoder().values()}
        to_add: list[AddedToken] = []
        declared = self._config.get("added_tokens_decoder")
        if isinstance(declared, Mapping):
            for _, value in sorted(declared.items(), key=lambda item: int(item[0])):
                content = _token_content(value)
                if content is not None and content not in present:
                    to_add.append(_as_added_token(value, force_special=False))
                    present.add(content)
        for value in [*raw_tokens.values(), *extra_tokens]:
            content = _token_content(value)
            if content is not None and content not in present:
                to_add.append(_as_added_token(value, force_special=True))
                present.add(content)
        if to_add:
            self._backend.add_tokens(to_add)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json plus tokenizer_config.json, special_tokens_map.json and the chat template(s)."""
        directory = Path(path)
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"{tokenizer_file} is missing: LLMasOS reads tokenizers in the `tokenizers` library's tokenizer.json "
                "format. Load the model's tokenizer with transformers and call `save_pretrained` to create it."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust loader raises plain Exception on malformed files
            raise ModelLoadError(
                f"{tokenizer_file} could not be loaded ({error}); restore it from the original checkpoint."
            ) from error
        config = _read_json(directory / TOKENIZER_CONFIG_FILE)
        if "added_tokens_decoder" not in config:  # transformers only reads the legacy map for legacy configs
            _merge_special_tokens_map(config, _read_json(directory / SPECIAL_TOKENS_MAP_FILE))
        return cls(backend, config, load_chat_templates(directory, config))

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for offsets, token strings and other low-level needs)."""
        return self._backend

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get(DEFAULT_TEMPLATE_NAME)

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is None:
            self.chat_templates.pop(DEFAULT_TEMPLATE_NAME, None)
        else:
            self.chat_templates[DEFAULT_TEMPLATE_NAME] = template

    def _special_token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_token_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_token_id("unk_token")

    @property
    def mask_token(self) -> str | None:
        return self.special_tokens.get("mask_token")

    @property
    def mask_token_id(self) -> int | None:
        return self._special_token_id("mask_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the post-processor adds BOS/EOS as tokenizer.json says."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts at once (in parallel inside `tokenizers`); no padding."""
        return [
            encoding.ids for encoding in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ]

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, with transformers' clean-up of spaces before punctuation when the config asks for it."""
        token_ids = [ids] if isinstance(ids, int) else [int(token_id) for token_id in ids]
        text = self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_on_decode else text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        continue_final_message: bool | str = False,
        special_tokens_in_content: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render `messages` with the chat template; return the text, or its ids (no extra BOS: the template has it).

        `chat_template` is a template name or a full template; extra `kwargs` become template variables. With
        `special_tokens_in_content=False` (what the server does), special-token text inside message content is
        encoded as plain text, so a user cannot type another role's control tokens; the template's own stay special.
        transformers' behaviour (and the default here) parses them everywhere.
        """
        template = select_chat_template(self.chat_templates, chat_template, tools)
        literals: dict[str, str] = {}
        if tokenize and not special_tokens_in_content:
            messages = [self._escape_specials(message, literals) for message in messages]
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            special_tokens=self.special_tokens,
            **kwargs,
        )
        if not tokenize:
            return text
        return self._encode_with_literals(text, literals) if literals else self.encode(text, add_special_tokens=False)

    def _escape_specials(self, message: Any, literals: dict[str, str]) -> Any:
        """A copy of `message` whose content has each special token's text replaced by a unique placeholder."""
        if not isinstance(message, dict):
            return message
        specials = [token.content for token in self._backend.get_added_tokens_decoder().values()
                    if token.special and token.content]

        def escape(text: str) -> str:
            for special in specials:
                if special in text:
                    marker = f"\ue000{secrets.token_hex(8)}\ue001"
                    literals[marker] = special
                    text = text.replace(special, marker)
            return text

        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": escape(content)}
        if isinstance(content, list):
            parts = [{**part, "text": escape(part["text"])} if isinstance(part, dict) and isinstance(
                part.get("text"), str) else part for part in content]
            return {**message, "content": parts}
        return message

    def _encode_with_literals(self, text: str, literals: dict[str, str]) -> list[int]:
        """Encode rendered text whose placeholders stand for special-token text typed by a user: that text is
        encoded as ordinary text (a second backend with special-token matching off), the rest as usual."""
        if self._literal_backend is None:
            literal = tokenizers.Tokenizer.from_str(self._backend.to_str())
            literal.encode_special_tokens = True
            self._literal_backend = literal
        pattern = "(" + "|".join(re.escape(marker) for marker in literals) + ")"
        ids: list[int] = []
        for piece in re.split(pattern, text):
            if not piece:
                continue
            if piece in literals:
                ids.extend(self._literal_backend.encode(literals[piece], add_special_tokens=False).ids)
            else:
                ids.extend(self._backend.encode(piece, add_special_tokens=False).ids)
        return ids

    def incremental_detokenizer(
        self, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the chat template(s).

        transformers' AutoTokenizer loads the result as a plain `TokenizersBackend` that encodes exactly like this.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / TOKENIZER_FILE))

        config = {key: value for key, value in self._config.items() if key not in _CONFIG_KEYS_NOT_SAVED}
        for key in NAMED_SPECIAL_TOKENS:
            config.pop(key, None)
        config.update(self.special_tokens)
        if self.extra_special_tokens:
            config["extra_special_tokens"] = list(self.extra_special_tokens)
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        config["split_special_tokens"] = self.split_special_tokens
        # A model-specific class (LlamaTokenizer, ...) rebuilds the pipeline; the plain backend uses tokenizer.json.
        config["tokenizer_class"] = "TokenizersBackend"
        config["backend"] = "tokenizers"
        _write_json(out / TOKENIZER_CONFIG_FILE, config)
        special_map: dict[str, Any] = dict(self.special_tokens)
        if self.extra_special_tokens:
            special_map["extra_special_tokens"] = list(self.extra_special_tokens)
        _write_json(out / SPECIAL_TOKENS_MAP_FILE, special_map)

        default_file = out / CHAT_TEMPLATE_FILE
        extra_dir = out / CHAT_TEMPLATE_DIR
        if self.chat_template is not None:
            default_file.write_text(self.chat_template, encoding="utf-8")
        elif default_file.exists():  # a stale template would otherwise become this tokenizer's template
            default_file.unlink()
        for name, template in self.chat_templates.items():
            if name == DEFAULT_TEMPLATE_NAME:
                continue
            if not name or Path(name).name != name or name.startswith("."):
                raise TemplateError(f"Cannot save a chat template named {name!r}: names must be plain file names.")
            extra_dir.mkdir(exist_ok=True)
            (extra_dir / f"{name}.jinja").write_text(template, encoding="utf-8")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the spaces WordPiece-style decoders put before punctuation."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class IncrementalDetokenizer:
    """Turn a stream of generated ids into text deltas, O(1) per token, never splitting a UTF-8 character.

    Uses the prefix/read offsets of vLLM and TGI: each step decodes only the tokens since the last emitted chunk, plus
    that chunk as context, and emits the new text once it no longer ends in U+FFFD (an incomplete character).
    Without `prompt_ids`, the concatenated deltas plus `flush()` equal `decode(generated ids)`. With `prompt_ids`, the
    last few prompt tokens are decoding context, so text reads as a continuation of the prompt (the same for byte-level
    tokenizers; SentencePiece-style ones keep the leading space of the first word).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids)
        self.text = ""

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, hold_incomplete: bool) -> str:
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or (hold_incomplete and new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        self.text += delta
        return delta

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is still incomplete)."""
        self._token_ids.append(int(token_id))
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes to U+FFFD, as `decode` does)."""
        return self._emit(hold_incomplete=False)
