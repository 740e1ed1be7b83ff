"""Our byte-level BPE tokenizer trainer: transformers loads the result and encodes exactly as we do."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from llmasos.cli.main import cli
from llmasos.tokenizer import Tokenizer
from llmasos.train.tokenizer_trainer import train_tokenizer

SAMPLES = ["To be, or not to be, that is the question:", "  leading spaces and\ttabs\n\nnewlines",
           "héllo wörld 日本語 🙂", "<|user|>\nhi<|end|>\n", "KING RICHARD II:\nGood morrow."]


def test_trained_tokenizer_matches_transformers(tmp_path, shakespeare_text):
    tokenizer = train_tokenizer([shakespeare_text[:200_000]], 1024)
    tokenizer.save(tmp_path)
    assert tokenizer.vocab_size == 1024
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    for text in SAMPLES:
        assert reference(text)["input_ids"] == ours.encode(text), text
        assert ours.decode(ours.encode(text)) == text  # byte-level: lossless for any text
    assert ours.eos_token == "<|endoftext|>" and ours.pad_token == "<|pad|>"
    assert ours.encode("<|end|>", add_special_tokens=False) == [ours.token_to_id("<|end|>")]
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        "<|user|>\nhi<|end|>\n<|assistant|>\n"
    # Frequent words of the corpus became single tokens.
    assert len(ours.encode(" the")) == 1 and len(ours.encode(" thou")) == 1


def test_tokenizer_cli_and_errors(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    result = CliRunner().invoke(cli, ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--output",
                                      str(tmp_path / "tok"), "--special-tokens", "<eos>,<pad>"])
    assert result.exit_code == 0, result.output
    tokenizer = Tokenizer.from_dir(tmp_path / "tok")
    assert tokenizer.eos_token == "<eos>" and tokenizer.vocab_size <= 300
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = CliRunner().invoke(cli, ["tokenizer", "train", "--data", str(empty), "--vocab-size", "300", "--output",
                                      str(tmp_path / "tok2")])
    assert result.exit_code == 1 and f"error: {empty} is empty" in result.output
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        train_tokenizer(["abc"], 100)
