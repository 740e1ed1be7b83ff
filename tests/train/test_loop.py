"""The training loop's bookkeeping (issue 13): an epoch is ceil(examples / global batch) optimizer steps that see every
example once, the log's epoch counts passes truthfully, and the logged learning rate is the one the step used."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llmasos import LLMTrainer, TrainingArguments
from llmasos.cli.main import cli

LEARNING_RATE = 1e-3
PROMPTS = [{"prompt": f"Question {i}: why " + "so " * (i % 4), "completion": " because" * (1 + i % 3)}
           for i in range(20)]


def run_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=LEARNING_RATE,
                  max_seq_length=64, save_steps=None, logging_steps=1, progress_bar=False)
    return TrainingArguments(**{**values, **overrides})


def metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("per_device, accumulation", [(8, 1), (4, 2), (1, 8)])
def test_one_epoch_is_ceil_examples_over_batch_steps_each_example_once(tiny_llama, tmp_path, per_device,
                                                                       accumulation):
    model = LLMTrainer.from_pretrained(tiny_llama)
    examples, _ = model.prepare_data(PROMPTS, run_args(tmp_path))
    result = model.train(PROMPTS, args=run_args(tmp_path, per_device_train_batch_size=per_device,
                                                gradient_accumulation_steps=accumulation))
    assert result.global_step == 3  # ceil(20 / 8): 8, 8, then the 4 left
    assert result.num_train_tokens == sum(len(example.input_ids) for example in examples)  # each one exactly once
    records = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["epoch"] for r in records] == [0.4, 0.8, 1.0]
    # the rate each step trained with (linear decay from the first step), never the 0 that follows the last one
    assert [r["learning_rate"] for r in records] == pytest.approx([LEARNING_RATE * (1 - k / 3) for k in range(3)])


def test_more_examples_wanted_than_there_are(tiny_llama, tmp_path, capsys):
    """The reported case: 20 short texts are packed into one block; 1 epoch is one step over it, not 4 passes."""
    texts = [f"text number {i} is short" for i in range(20)]
    model = LLMTrainer.from_pretrained(tiny_llama)
    examples, _ = model.prepare_data(texts, run_args(tmp_path))
    assert len(examples) < 8
    result = model.train(texts, args=run_args(tmp_path, logging_steps=10))
    assert result.global_step == 1 and result.num_train_tokens == sum(len(e.input_ids) for e in examples)
    [record] = metrics(tmp_path)
    assert record["epoch"] == 1.0 and record["learning_rate"] == LEARNING_RATE
    shown = capsys.readouterr().err
    assert "epoch=1 " in shown and "learning_rate=0 " not in shown
    assert f"20 records, {len(examples)} example" in shown and "1 step per epoch" in shown


def test_two_epochs_see_every_example_twice(tiny_llama, tmp_path):
    model = LLMTrainer.from_pretrained(tiny_llama)
    examples, _ = model.prepare_data(PROMPTS, run_args(tmp_path))
    result = model.train(PROMPTS, args=run_args(tmp_path, num_train_epochs=2, logging_steps=3))
    assert result.global_step == 6
    assert result.num_train_tokens == 2 * sum(len(example.input_ids) for example in examples)
    assert [(r["step"], r["epoch"]) for r in metrics(tmp_path) if "loss" in r] == [(3, 1.0), (6, 2.0)]
    assert all(r["learning_rate"] > 0 for r in metrics(tmp_path) if "loss" in r)


def test_cli_one_epoch_log(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", str(data), "--output",
                                      str(tmp_path / "run"), "--epochs", "1", "--method", "lora"])
    assert result.exit_code == 0, result.output
    assert "for 3 steps" in result.output
    [record] = metrics(tmp_path)  # logging_steps 10: the last step is logged
    assert record["step"] == 3 and record["epoch"] == 1.0 and record["learning_rate"] > 0
