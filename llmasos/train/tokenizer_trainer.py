"""Train a tokenizer with the `tokenizers` library, saved as tokenizer.json + tokenizer_config.json that transformers
and we both load: a byte-level BPE (GPT-2 style, with special tokens and an optional chat template) for decoders, or
a lower-casing WordPiece with [CLS] ... [SEP] (BERT's) for encoders (`train_wordpiece_tokenizer`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmasos.tokenizer import Tokenizer

DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# A minimal template: one header token per role, <|end|> closes every turn (and stops generation).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MIN_VOCAB_SIZE = 256 + 1  # the 256 byte symbols plus at least one special token


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, special_tokens: list[str] | None = None,
                    min_frequency: int = 2, chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
                    eos_token: str | None = None, bos_token: str | None = None, pad_token: str | None = None,
                    model_max_length: int | None = None, show_progress: bool = False) -> Tokenizer:
    """Learn a byte-level BPE vocabulary of `vocab_size` ids (special tokens included) from `texts`.

    The first special token is the end-of-text token (EOS, and BOS unless given), `<|pad|>` the padding token when
    present. No BOS is prepended on encode (GPT-2 behaviour); documents are separated by EOS in training."""
    special_tokens = list(special_tokens or DEFAULT_SPECIAL_TOKENS)
    if not special_tokens:
        raise ValueError("a tokenizer needs at least one special token (the end-of-text token)")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens must be distinct, got {special_tokens}")
    if vocab_size < MIN_VOCAB_SIZE + len(special_tokens) - 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte symbols plus "
                         f"{len(special_tokens)} special tokens")
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    backend.train_from_iterator(_non_empty(texts), trainer)
    eos_token = eos_token or special_tokens[0]
    config: dict = {"eos_token": eos_token, "bos_token": bos_token or eos_token,
                    "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    if pad_token or "<|pad|>" in special_tokens:
        config["pad_token"] = pad_token or "<|pad|>"
    if model_max_length:
        config["model_max_length"] = model_max_length
    for token in (config["eos_token"], config["bos_token"], config.get("pad_token")):
        if token is not None and token not in special_tokens:
            raise ValueError(f"{token!r} is not one of the special tokens {special_tokens}")
    extra = [token for token in special_tokens if token not in (eos_token, bos_token, config.get("pad_token"))]
    if extra:
        config["extra_special_tokens"] = extra
    templates = {"default": chat_template} if chat_template else {}
    return Tokenizer(backend, config, templates)


BERT_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                       "mask_token": "[MASK]"}


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, *, lowercase: bool = True,
                              min_frequency: int = 2, model_max_length: int | None = 512,
                              show_progress: bool = False) -> Tokenizer:
    """Learn a BERT WordPiece vocabulary of `vocab_size` ids: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, then
    the learnt pieces ("##" marks a continuation); inputs become [CLS] A [SEP] (B [SEP], segment 1), as
    BertTokenizerFast makes them. What masked-LM pretraining (`objective="mlm"`) needs."""
    special_tokens = list(BERT_SPECIAL_TOKENS.values())
    if vocab_size < len(special_tokens) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for the {len(special_tokens)} special tokens")
    backend = BackendTokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=special_tokens, show_progress=show_progress)
    backend.train_from_iterator(_non_empty(texts), trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    config: dict = {**BERT_SPECIAL_TOKENS, "do_lower_case": lowercase, "clean_up_tokenization_spaces": True,
                    "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    if model_max_length:
        config["model_max_length"] = model_max_length
    return Tokenizer(backend, config, {})


def _non_empty(texts: Iterable[str]) -> Iterable[str]:
    seen = False
    for text in texts:
        if text:
            seen = True
            yield text
    if not seen:
        raise ValueError("no text to train the tokenizer on")


def train_tokenizer_from_files(files: list[str | Path], vocab_size: int, output_dir: str | Path | None = None,
                               **options) -> Tokenizer:
    """Train on .txt / .jsonl / .json files (the text of every example) and, with output_dir, save the result."""
    from llmasos.train.data import read_records, texts_of

    texts: list[str] = []
    for file in files:
        texts.extend(texts_of(read_records(Path(file))))
    wordpiece = options.pop("wordpiece", False)
    tokenizer = (train_wordpiece_tokenizer if wordpiece else train_tokenizer)(texts, vocab_size, **options)
    if output_dir is not None:
        tokenizer.save(output_dir)
    return tokenizer
