"""Training data: every accepted shape, the loss masks, and clear errors (file and line) or skip counts for bad data."""

from __future__ import annotations

import json

import pytest
from support import hf_tokenizer

from llmasos.errors import TrainingDataError
from llmasos.tokenizer import Tokenizer
from llmasos.train.data import hold_out, read_records
from llmasos.train.dataset import (
    IGNORE_INDEX,
    SKIP_NO_ASSISTANT,
    SKIP_TOO_LONG,
    DataOrder,
    build_examples,
    end_of_turn_token_id,
    rank_micro_batches,
    render_conversation,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("tok")
    hf_tokenizer().save_pretrained(directory)
    return Tokenizer.from_dir(directory)


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_every_input_shape_is_read(tmp_path):
    items = ["plain", {"text": "t"}, {"prompt": "p", "completion": "c"}, {"messages": CONVERSATION}]
    assert [r.kind for r in read_records(items)] == ["text", "text", "prompt", "chat"]
    jsonl = write_jsonl(tmp_path / "d.jsonl", items[1:])
    records = read_records(str(jsonl))
    assert [r.kind for r in records] == ["text", "prompt", "chat"]
    assert records[2].source == f"{jsonl} line 3"
    (tmp_path / "d.json").write_text(json.dumps(items[1:]))
    assert [r.kind for r in read_records(tmp_path / "d.json")] == ["text", "prompt", "chat"]
    (tmp_path / "d.txt").write_text("a whole document\nof two lines\n")
    assert read_records(tmp_path / "d.txt")[0].text == "a whole document\nof two lines\n"


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("  \n\n", "is empty"),
])
def test_empty_file_is_an_error_naming_it(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(TrainingDataError, match=f"{path}.*{message}"):
        read_records(path)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", '{"text": "unterminated}', {"text": "ok"}])
    with pytest.raises(TrainingDataError, match=r"bad\.jsonl line 3: not valid JSON"):
        read_records(path)


def test_unknown_shapes_and_missing_files_are_clear(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "fine"}, {"question": "?", "answer": "!"}])
    with pytest.raises(TrainingDataError, match=r"odd\.jsonl line 2: unknown example shape \(keys: answer, question\)"):
        read_records(path)
    with pytest.raises(TrainingDataError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(TrainingDataError, match="unsupported data format '.csv'"):
        read_records(tmp_path / "data.csv")
    with pytest.raises(TrainingDataError, match=r"train_data\[1\]: 'completion' must be a string"):
        read_records([{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(TrainingDataError, match=r"messages\[0\] has no 'role'"):
        read_records([{"messages": [{"content": "hi"}]}])
    with pytest.raises(TrainingDataError, match="is empty"):
        read_records([])


def test_chat_mask_covers_exactly_the_assistant_replies(tokenizer):
    ids, mask = render_conversation(tokenizer, CONVERSATION)
    # The whole sequence is the template's rendering, and the context up to each reply is token for token what
    # LLM.chat sends for that turn (the template with add_generation_prompt=True).
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    first_prompt = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    assert ids[:len(first_prompt)] == first_prompt and not any(mask[:len(first_prompt)])
    trained = tokenizer.decode([token for token, keep in zip(ids, mask, strict=True) if keep])
    assert trained == "Blue.<|im_end|>\nGreen.<|im_end|>\n"


def test_prompt_completion_trains_on_the_completion_only(tokenizer):
    examples, report = build_examples(read_records([{"prompt": "Say hi:", "completion": " hi"}]), tokenizer, 64)
    (example,) = examples
    prompt_len = len(tokenizer.encode("Say hi:"))
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == tokenizer.encode(" hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert report.num_loss_tokens == len(example.labels) - prompt_len


def test_text_is_packed_into_blocks_with_eos_between_documents(tokenizer):
    docs = ["To be, or not to be, that is the question. " * 4, "The quick brown fox jumps over the lazy dog. " * 3]
    examples, report = build_examples(read_records(docs), tokenizer, 16)
    stream = [t for doc in docs for t in tokenizer.encode(doc) + [tokenizer.eos_token_id]]
    assert [t for e in examples for t in e.input_ids] == stream
    assert all(len(e.input_ids) == 16 for e in examples[:-1]) and all(e.labels == e.input_ids for e in examples)


def test_bad_examples_are_skipped_and_counted(tokenizer, tmp_path):
    long_reply = "word " * 200
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_reply}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
    ])
    examples, report = build_examples(read_records(path), tokenizer, 128)
    assert len(examples) == 1 and report.num_skipped == 3
    assert report.skipped[SKIP_NO_ASSISTANT] == [f"{path} line 2", f"{path} line 4"]
    assert report.skipped[SKIP_TOO_LONG][0].startswith(f"{path} line 3: ")
    summary = report.skip_summary()
    assert summary.startswith("skipped 3 of 4 examples: 2 without an assistant turn (first: ")
    assert "1 longer than the context" in summary


def test_nothing_usable_is_an_error_with_the_reasons(tokenizer):
    with pytest.raises(TrainingDataError, match="train_data has no usable examples.*1 without an assistant turn"):
        build_examples(read_records([{"messages": [{"role": "user", "content": "hi"}]}]), tokenizer, 64)


def test_end_of_turn_token_is_found(tokenizer):
    assert end_of_turn_token_id(tokenizer) == tokenizer.token_to_id("<|im_end|>")


def test_hold_out_splits_text_at_a_line_and_records_at_the_end():
    text = "".join(f"line {i}\n" for i in range(100))
    train, evaluation = hold_out(read_records([text]), 0.1)
    assert train[0].text + evaluation[0].text == text and evaluation[0].text.startswith("line 9")
    assert 0.08 < len(evaluation[0].text) / len(text) < 0.12
    train, evaluation = hold_out(read_records([{"text": str(i)} for i in range(20)]), 0.1)
    assert [r.text for r in evaluation] == ["18", "19"] and len(train) == 18


def test_data_order_is_seeded_permutations_cut_into_batches():
    order = DataOrder(5, seed=3)
    first_epoch = order.step_indices(0, 5)
    assert sorted(first_epoch) == list(range(5))
    # An epoch is ceil(5 / 3) = 2 steps, the second one short (no example repeated or dropped within an epoch).
    steps = [DataOrder(5, seed=3).step_indices(step, 3) for step in range(4)]
    assert [len(batch) for batch in steps] == [3, 2, 3, 2] and order.steps_per_epoch(3) == 2
    assert sorted(steps[0] + steps[1]) == list(range(5)) and sorted(steps[2] + steps[3]) == list(range(5))
    assert DataOrder(5, seed=3).step_indices(2, 3) == steps[2]  # the position is the step: exact resume
    assert [order.epochs_done(n, 3) for n in range(5)] == [0, 0.6, 1, 1.6, 2]
    assert DataOrder(2, seed=3).step_indices(0, 8) == DataOrder(2, seed=3).step_indices(0, 2)  # never 4 passes
    assert DataOrder(5, seed=4).step_indices(0, 5) != first_epoch
    # Two ranks with two micro-batches each cover the global batch exactly once.
    parts = [rank_micro_batches(list(range(8)), 2, rank, 2, 2) for rank in (0, 1)]
    assert sorted(i for rank in parts for micro in rank for i in micro) == list(range(8))
    assert parts[0] == [[0, 1], [4, 5]]
    # A short batch is spread over the slots as evenly as it goes; extra slots are empty.
    short = [rank_micro_batches(list(range(3)), 2, rank, 2, 2) for rank in (0, 1)]
    assert short == [[[0], [2]], [[1], []]]
