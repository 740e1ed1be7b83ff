"""Parity tests for llmasos.tokenizer: tiny tokenizers trained here, compared with transformers' AutoTokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llmasos.chat_template import compile_chat_template
from llmasos.errors import ModelLoadError, TemplateError
from llmasos.tokenizer import Tokenizer

CORPUS = """
The quick brown fox jumps over the lazy dog. It's a truth universally acknowledged, isn't it? I'm sure we've
all read that line; they're fond of it. Numbers like 12345, 3.14159 and 2024-07-26 appear in logs and tables.
héllo wörld! Ünïcödé text is naïve about café crème brûlée, and señor Müller drinks Straßenbahn coffee.
日本語のテキストも少し入れておきます。東京は大きな都市です。中文也可以：你好，世界。한국어 문장도 있어요.
Emoji are fun 🙂 😀 👍 and so are symbols like € £ ¥ © ® ™ → ← ∑ ∞ ≈ ≠.
def main(argv):\n    for i in range(10):\n        print(i * 2)  # a comment\n\treturn 0
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows
of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. To die, to sleep.
Operating systems schedule processes, manage memory with pages, and expose system calls to programs.
A language model predicts the next token; a tokenizer turns text into tokens and back again, byte by byte.
"""

# fmt: off
TEXTS = [
    "", " ", "  ", "\n", "hello", " hello", "Hello world!", "  leading and trailing  ", "tabs\tand\nnew\n\nlines\r\n",
    "héllo wörld 日本語 🙂", "emoji 🦀🦀 crab 𝄞 clef", "I'm sure it's fine , isn't it ? Yes . They 're here !",
    "<s>in text</s>", "<|im_end|> and <|endoftext|>", "a<|eot_id|>b<|begin_of_text|>", "[CLS] x [SEP] [MASK]",
    "numbers 12345 3.14159", "\u00a0non-breaking\u2009spaces", "ｆｕｌｌ ｗｉｄｔｈ", "combining e\u0301 vs é",
    CORPUS, CORPUS * 3,
]
# fmt: on

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOOLS = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}" + CHATML
)
LLAMA3 = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if date_string is defined %}{{ 'Today Date: ' + date_string + '\\n\\n' }}{% endif %}
{%- if tools is not none %}{{ tools | tojson(indent=4) }}{% endif %}
{{- ns.system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": "héllo wörld 日本語 🙂"}],
    [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4", "tool_calls": None},
        {"role": "user", "content": "And <|im_end|> or <|eot_id|> inside text?"},
    ],
]


def _byte_level_bpe(special_tokens: list[str]) -> BackendTokenizer:
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        [CORPUS] * 4,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
        ),
    )
    return tok


def _sentencepiece_like_bpe() -> BackendTokenizer:
    """A Llama-2 / Mistral style BPE: Metaspace, byte fallback, BOS added by the post-processor."""
    tok = BackendTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(
        [CORPUS] * 4, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    data = json.loads(tok.to_str())
    for byte in range(256):
        data["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(data["model"]["vocab"]))
    data["model"]["byte_fallback"] = True
    tok = BackendTokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _wordpiece() -> BackendTokenizer:
    """A BERT-like WordPiece, whose config asks for transformers' clean-up of spaces before punctuation."""
    tok = BackendTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        [CORPUS] * 4, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return tok


def _move_template_into_config(directory: Path, template: object) -> None:
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    built = {
        # add_bos_token=True makes transformers write a TemplateProcessing that adds BOS into tokenizer.json.
        "llama3": PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_bpe(llama_specials),
            add_bos_token=True,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            chat_template=LLAMA3,
        ),
        "qwen": PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            chat_template=CHATML,
        ),
        "gpt2": PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_bpe(["<|endoftext|>"]),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        ),
        "spm": PreTrainedTokenizerFast(
            tokenizer_object=_sentencepiece_like_bpe(),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            chat_template=CHATML,
        ),
        "bert": PreTrainedTokenizerFast(
            tokenizer_object=_wordpiece(),
            unk_token="[UNK]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            mask_token="[MASK]",
            clean_up_tokenization_spaces=True,
        ),
    }
    paths = {}
    for name, hf in built.items():
        hf.save_pretrained(root / name)
        paths[name] = root / name
    for legacy, source, template in (
        ("llama3_legacy", "llama3", LLAMA3),
        (
            "qwen_legacy",
            "qwen",
            [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": CHATML_TOOLS}],
        ),
    ):
        shutil.copytree(paths[source], root / legacy)
        _move_template_into_config(root / legacy, template)
        paths[legacy] = root / legacy
    return paths


@pytest.fixture(scope="module")
def pairs(dirs: dict[str, Path]) -> dict[str, tuple[Tokenizer, object]]:
    return {name: (Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)) for name, path in dirs.items()}


def test_fixture_tokenizers_behave_as_intended(dirs: dict[str, Path], pairs: dict) -> None:
    saved = json.loads((dirs["llama3"] / "tokenizer.json").read_text())
    assert "<|begin_of_text|>" in json.dumps(saved["post_processor"])
    assert "add_bos_token" not in json.loads((dirs["llama3"] / "tokenizer_config.json").read_text())
    hf_llama, hf_gpt2 = pairs["llama3"][1], pairs["gpt2"][1]
    assert hf_llama.encode("hi")[0] == hf_llama.bos_token_id
    assert hf_gpt2.bos_token_id not in hf_gpt2.encode("hi")
    assert pairs["llama3_legacy"][1].chat_template == LLAMA3  # transformers still reads the legacy config field
    assert set(pairs["qwen_legacy"][1].chat_template) == {"default", "tool_use"}
    assert any("\ufffd" in pairs["llama3"][0].decode([i]) for i in pairs["llama3"][0].encode("🦀"))


@pytest.mark.parametrize("name", ["llama3", "qwen", "gpt2", "spm", "bert", "llama3_legacy"])
def test_encode_decode_match_transformers(pairs: dict, name: str) -> None:
    ours, hf = pairs[name]
    assert ours.vocab_size == len(hf)
    for attr in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, attr) == getattr(hf, attr), attr
    assert ours.all_special_ids == {i for i, token in hf.added_tokens_decoder.items() if token.special}
    for add_special in (True, False):
        expected = [hf.encode(text, add_special_tokens=add_special) for text in TEXTS]
        assert [ours.encode(text, add_special_tokens=add_special) for text in TEXTS] == expected
        assert ours.encode_batch(TEXTS, add_special_tokens=add_special) == expected
    for ids in [hf.encode(text) for text in TEXTS] + _random_id_lists(len(hf)):
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert ours.decode(5) == hf.decode(5)


def _random_id_lists(vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab_size) for _ in range(rng.randrange(1, 30))] for _ in range(40)]


def test_clean_up_tokenization_applies_like_transformers(pairs: dict) -> None:
    ours, hf = pairs["bert"]
    ids = ours.encode("hello , world . isn't it ?")
    assert (
        ours.decode(ids, skip_special_tokens=True)
        == hf.decode(ids, skip_special_tokens=True)
        == "hello, world. isn't it?"
    )


@pytest.mark.parametrize("name", ["llama3", "llama3_legacy", "qwen", "qwen_legacy", "spm"])
def test_apply_chat_template_matches_transformers(pairs: dict, name: str) -> None:
    ours, hf = pairs[name]
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert text == hf.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            ids = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
            expected = hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
            assert ids == expected["input_ids"]
    kwargs = {"tools": [{"type": "function", "function": {"name": "now", "parameters": {}}}], "date_string": "1 Jan"}
    assert ours.apply_chat_template(CONVERSATIONS[1], tokenize=False, **kwargs) == hf.apply_chat_template(
        CONVERSATIONS[1], tokenize=False, **kwargs
    )
    prefill = [*CONVERSATIONS[0], {"role": "assistant", "content": "Sure, "}]
    assert (
        ours.apply_chat_template(prefill, continue_final_message=True)
        == hf.apply_chat_template(prefill, continue_final_message=True, tokenize=True)["input_ids"]
    )


def test_llama3_template_renders_one_bos_and_the_system_message(pairs: dict) -> None:
    ours, _ = pairs["llama3"]
    ids = ours.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id
    assert "You are terse.<|eot_id|>" in ours.decode(ids)
    with pytest.raises(TemplateError, match="alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_named_templates_and_explicit_template(pairs: dict) -> None:
    ours, hf = pairs["qwen_legacy"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools, tokenize=False) == hf.apply_chat_template(
        CONVERSATIONS[0], tools=tools, tokenize=False
    )
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template="tool_use", tokenize=False).startswith(
        "<|im_start|>"
    )
    custom = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template=custom, tokenize=False) == "[user]Hello!<|im_end|>"


def test_no_chat_template_raises_with_help(pairs: dict) -> None:
    with pytest.raises(TemplateError, match="no chat template.*chat_template.jinja"):
        pairs["gpt2"][0].apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('touch MARKER') }}",
        "{{ joiner.__init__.__globals__['os'].system('touch MARKER') }}",
        "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
        "{{ namespace.__init__.__globals__.os.system('touch MARKER') }}",
        "{% set ns = namespace(_x=1) %}{{ ns._x }}",
        "{{ messages.append({'role': 'user'}) }}",
        "{{ raise_exception('boom') }}",
        "{% for %}",
    ],
)
def test_hostile_or_broken_templates_raise_template_error(pairs: dict, tmp_path: Path, template: str) -> None:
    marker = tmp_path / "pwned"
    template = template.replace("MARKER", str(marker))
    with pytest.raises(TemplateError):
        pairs["qwen"][0].apply_chat_template(CONVERSATIONS[0], chat_template=template, tokenize=False)
    assert not marker.exists()


def test_compiled_templates_are_cached() -> None:
    assert compile_chat_template(CHATML) is compile_chat_template(CHATML)


@pytest.mark.parametrize("name", ["llama3", "spm", "bert"])
def test_incremental_detokenizer_matches_decode(pairs: dict, name: str) -> None:
    ours, _ = pairs[name]
    text = "crab 🦀 clef 𝄞, 日本語 and ünïcödé! " * 3 + " end"
    eos = ours.eos_token_id if ours.eos_token_id is not None else ours.all_special_ids.copy().pop()
    generated = ours.encode(text, add_special_tokens=False) + [eos] + ours.encode(" more 🙂", add_special_tokens=False)
    for skip in (True, False):
        detokenizer = ours.incremental_detokenizer(skip_special_tokens=skip)
        deltas = [detokenizer.push(token_id) for token_id in generated]
        assert all("\ufffd" not in delta for delta in deltas)
        deltas.append(detokenizer.flush())
        assert "".join(deltas) == detokenizer.text == ours.decode(generated, skip_special_tokens=skip)


def test_incremental_detokenizer_with_prompt_and_incomplete_tail(pairs: dict) -> None:
    ours, _ = pairs["llama3"]
    prompt_ids = ours.encode("Say 日本語:")
    generated = ours.encode(" 🦀 yes 𝄞", add_special_tokens=False)
    detokenizer = ours.incremental_detokenizer(prompt_ids=prompt_ids)
    streamed = "".join(detokenizer.push(token_id) for token_id in generated) + detokenizer.flush()
    assert streamed == ours.decode(generated, skip_special_tokens=True)
    cut = generated[:-1]  # the last character's final byte never arrives
    detokenizer = ours.incremental_detokenizer()
    held = "".join(detokenizer.push(token_id) for token_id in cut)
    assert "\ufffd" not in held and (held + detokenizer.flush()) == ours.decode(cut, skip_special_tokens=True)


def test_incremental_detokenizer_cost_per_token_is_constant(pairs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    ours, _ = pairs["llama3"]
    generated = ours.encode(CORPUS * 4, add_special_tokens=False)
    detokenizer = ours.incremental_detokenizer()
    windows: list[int] = []
    original = Tokenizer.decode
    monkeypatch.setattr(
        Tokenizer, "decode", lambda self, ids, **kw: windows.append(len(ids)) or original(self, ids, **kw)
    )
    for token_id in generated:
        detokenizer.push(token_id)
    assert len(generated) > 1000 and max(windows) <= 16


def test_special_tokens_declared_only_in_config_are_added_like_transformers(dirs: dict, tmp_path: Path) -> None:
    directory = tmp_path / "qwen_extra"
    shutil.copytree(dirs["qwen"], directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    # "T" is a base-vocabulary token: transformers makes it a special added token, so "The" splits after it.
    config.update({"sep_token": "<sep>", "image_token": "<|image|>", "cls_token": "T"})
    config["extra_special_tokens"] = ["<|extra|>"]
    config["clean_up_tokenization_spaces"] = True  # transformers 5 ignores it for BPE models
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.vocab_size == len(hf)
    assert ours.token_to_id("T") in ours.all_special_ids
    for text in ("x<sep>y<|image|>z<|extra|> The", *TEXTS[:12]):
        assert ours.encode(text) == hf.encode(text)
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text))
    template = "{{ image_token }}{{ sep_token }}{{ messages[0]['content'] }}"
    assert (
        ours.apply_chat_template(CONVERSATIONS[0], chat_template=template)
        == hf.apply_chat_template(CONVERSATIONS[0], chat_template=template)["input_ids"]
    )


def test_legacy_special_tokens_map(dirs: dict, tmp_path: Path) -> None:
    directory = tmp_path / "gpt2_legacy"
    shutil.copytree(dirs["gpt2"], directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "unk_token"):
        config.pop(key)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    eot = {"content": "<|endoftext|>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": eot, "eos_token": "<|endoftext|>"}))
    ours, hf = Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(directory)
    assert (ours.bos_token, ours.eos_token, ours.eos_token_id) == (hf.bos_token, hf.eos_token, hf.eos_token_id)
    assert ours.bos_token == "<|endoftext|>"


@pytest.mark.parametrize("name", ["llama3", "llama3_legacy", "qwen_legacy", "gpt2", "spm", "bert"])
def test_save_round_trips_through_transformers(pairs: dict, tmp_path: Path, name: str) -> None:
    ours, hf = pairs[name]
    ours.save(tmp_path / "saved")
    reloaded_hf = AutoTokenizer.from_pretrained(tmp_path / "saved")
    reloaded = Tokenizer.from_dir(tmp_path / "saved")
    for text in TEXTS:
        assert reloaded_hf.encode(text) == reloaded.encode(text) == hf.encode(text)
    ids = hf.encode(CORPUS)
    assert reloaded_hf.decode(ids) == reloaded.decode(ids) == hf.decode(ids)
    assert reloaded.chat_templates == ours.chat_templates
    assert (reloaded_hf.bos_token, reloaded_hf.eos_token, reloaded_hf.pad_token) == (
        hf.bos_token,
        hf.eos_token,
        hf.pad_token,
    )
    if ours.chat_template is not None:
        for conversation in CONVERSATIONS:
            assert reloaded_hf.apply_chat_template(conversation, tokenize=False) == ours.apply_chat_template(
                conversation, tokenize=False
            )


def test_missing_or_corrupt_files_raise_model_load_error(dirs: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(dirs["gpt2"] / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
