"""Sequence classification fine-tuning (llmasos/train/labels.py, task_setup.py, models/heads.py) against
transformers' Trainer and AutoModelForSequenceClassification, and PEFT for LoRA adapters, on tiny random models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from encoders_support import bert_classifier, qwen2_classifier
from support import VOCAB_SIZE, hf_tokenizer

from llmasos.errors import TrainingDataError
from llmasos.train import LLMTrainer, TrainingArguments

POSITIVE = ["the quick brown fox", "to be or not to be", "operating systems schedule processes", "the question",
            "whether tis nobler in the mind", "brown fox jumps", "sea of troubles", "manage memory with pages"]
NEGATIVE = ["outrageous fortune", "slings and arrows", "the lazy dog", "take arms against", "hello world",
            "suffer the slings", "arrows of fortune", "lazy lazy dog"]
DATA = [{"text": t, "label": "pos"} for t in POSITIVE] + [{"text": t, "label": "neg"} for t in NEGATIVE]
PAIRS = [{"text": a, "text_pair": b, "label": i % 2}
         for i, (a, b) in enumerate(zip(POSITIVE, NEGATIVE, strict=True))]
STEPS = 6
LEARNING_RATE = 1e-2


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def roberta_classifier(directory: Path, num_labels: int = 2, seed: int = 0) -> Path:
    import transformers as tf

    config = tf.RobertaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64, type_vocab_size=1,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
                              bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    tf.RobertaForSequenceClassification(config).save_pretrained(directory)
    hf_tokenizer(add_bos=True).save_pretrained(directory)
    return directory


BUILDERS = {"bert": bert_classifier, "qwen2": qwen2_classifier, "roberta": roberta_classifier}
ARCHITECTURES = {"bert": "BertForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                 "roberta": "RobertaForSequenceClassification"}


def hf_trainer_run(directory: Path, rows: list[dict], output: Path, label_names: list[str]):
    """transformers' Trainer on the same data, one batch holding all of it (so the data order cannot matter)."""
    import transformers as tf
    from datasets import Dataset

    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    model = tf.AutoModelForSequenceClassification.from_pretrained(directory)
    is_bert = model.config.model_type == "bert"  # the test tokenizer leaves out BERT's segment ids unless asked
    encoded = [dict(tokenizer(row["text"], row.get("text_pair"), return_token_type_ids=is_bert),
                    labels=label_names.index(row["label"]) if isinstance(row["label"], str) else row["label"])
               for row in rows]
    args = tf.TrainingArguments(output_dir=str(output), per_device_train_batch_size=len(rows), max_steps=STEPS,
                                learning_rate=LEARNING_RATE, logging_steps=1, seed=7, report_to=[], use_cpu=True,
                                save_strategy="no", disable_tqdm=True, optim="adamw_torch")
    trainer = tf.Trainer(model=model, args=args, train_dataset=Dataset.from_list(encoded),
                         data_collator=tf.DataCollatorWithPadding(tokenizer))
    trainer.train()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(**{k: torch.tensor([v]) for k, v in row.items() if k != "labels"}).logits
                            for row in encoded])
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], logits


def our_run(directory: Path, data, output: Path, **overrides) -> tuple[LLMTrainer, list[float]]:
    trainer = LLMTrainer.from_pretrained(directory)
    settings = dict(output_dir=str(output), objective="classification", per_device_train_batch_size=len(DATA),
                    max_steps=STEPS, learning_rate=LEARNING_RATE, logging_steps=1, seed=7, save_steps=None,
                    progress_bar=False)
    result = trainer.train(data, args=TrainingArguments(**{**settings, **overrides}))
    return trainer, [entry["loss"] for entry in result.log_history if "loss" in entry]


def hf_logits(directory: Path, rows: list[dict]) -> torch.Tensor:
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    model = tf.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    batch = tokenizer([row["text"] for row in rows], [row["text_pair"] for row in rows] if "text_pair" in rows[0]
                      else None, padding=True, return_tensors="pt",
                      return_token_type_ids=model.config.model_type == "bert")
    with torch.no_grad():
        return model(**batch).logits


def our_logits(trainer: LLMTrainer, rows: list[dict]) -> torch.Tensor:
    from llmasos.train.tasks import pad_batch

    examples, _ = trainer.prepare_data(rows, TrainingArguments(objective="classification", progress_bar=False),
                                       "eval_data")
    with torch.no_grad():
        return torch.cat([trainer.model(*pad_batch([example], trainer._pad_id(), torch.device("cpu")))
                          for example in examples])


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return float((logits.argmax(-1) == torch.tensor(labels)).float().mean())


@pytest.mark.parametrize("family", ["bert", "qwen2", "roberta"])
def test_full_fine_tuning_matches_transformers_trainer(family, tmp_path):
    """Same checkpoint, data, seed and optimizer: the loss of every step, the saved model's logits (read back by
    AutoModelForSequenceClassification) and the accuracy agree with transformers' Trainer."""
    source = BUILDERS[family](tmp_path / "source")
    reference, reference_logits = hf_trainer_run(source, DATA, tmp_path / "hf", ["neg", "pos"])
    trainer, losses = our_run(source, write_jsonl(tmp_path / "train.jsonl", DATA), tmp_path / "run")
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference, abs=1e-4)
    assert losses[-1] < losses[0]
    trainer.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["architectures"] == [ARCHITECTURES[family]]
    theirs = hf_logits(tmp_path / "out", DATA)
    ours = our_logits(trainer, DATA)
    assert torch.allclose(ours, theirs, atol=1e-5)
    labels = [1] * len(POSITIVE) + [0] * len(NEGATIVE)
    # the same accuracy as the model transformers' Trainer trained (to the example; the brief allowed one)
    assert abs(accuracy(ours, labels) - accuracy(reference_logits, labels)) * len(labels) < 1
    assert torch.allclose(ours, reference_logits, atol=1e-4)


def test_pairs_with_label_ids(tmp_path):
    source = bert_classifier(tmp_path / "source")
    reference, _ = hf_trainer_run(source, PAIRS, tmp_path / "hf", [])
    trainer, losses = our_run(source, PAIRS, tmp_path / "run")
    assert losses == pytest.approx(reference, abs=1e-4)
    trainer.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["id2label"] == {"0": "LABEL_0",
                                                                                       "1": "LABEL_1"}
    assert torch.allclose(our_logits(trainer, PAIRS), hf_logits(tmp_path / "out", PAIRS), atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "qwen2", "roberta"])
def test_lora_classifier_loads_in_peft(family, tmp_path):
    """LoRA on the layers, the head trained in full and saved as modules_to_save: PEFT gives our logits."""
    import transformers as tf
    from peft import PeftModel

    source = BUILDERS[family](tmp_path / "source", num_labels=3)
    rows = [{**row, "label": ["a", "b", "c"][i % 3]} for i, row in enumerate(DATA)]
    trainer, losses = our_run(source, rows, tmp_path / "run", method="lora", learning_rate=5e-3, lora_r=4)
    assert losses[-1] < losses[0]
    trainer.save_pretrained(tmp_path / "adapter")
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    head = "score" if family == "qwen2" else "classifier"
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == [head]
    base = tf.AutoModelForSequenceClassification.from_pretrained(source)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(source)
    batch = tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    ours = our_logits(trainer, rows)
    assert torch.allclose(ours, theirs, atol=1e-5)
    trainer.save_pretrained(tmp_path / "merged", merge=True)  # the merged classifier is a plain checkpoint
    assert torch.allclose(hf_logits(tmp_path / "merged", rows), ours, atol=1e-5)


def test_bad_labels_are_clear_errors(tmp_path):
    source = bert_classifier(tmp_path / "source")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), objective="classification", max_steps=1,
                             save_steps=None, progress_bar=False)
    trainer = LLMTrainer.from_pretrained(source)
    with pytest.raises(TrainingDataError, match="mixes label names and label ids"):
        trainer.train([{"text": "a", "label": "pos"}, {"text": "b", "label": 1}], args=args)
    with pytest.raises(TrainingDataError, match=r"line 2: no 'label'"):
        trainer.train(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b"}]), args=args)
    with pytest.raises(TrainingDataError, match=r"line 2: 'label' is null"):  # not "no 'label' (keys: label, text)"
        trainer.train(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": None}]),
                      args=args)
    trainer.train(DATA, args=args)
    with pytest.raises(TrainingDataError, match="unknown label 'maybe'"):
        trainer.evaluate([{"text": "a", "label": "maybe"}], args)
    assert math.isfinite(trainer.evaluate(DATA, args)["eval_loss"])


def test_cli_train_then_eval_classification(tmp_path):
    """`llmasos train --task classification` then `llmasos eval classification`: accuracy and macro-F1; bad eval
    data is one `error:` line."""
    from click.testing import CliRunner

    from llmasos.cli.main import cli

    source = bert_classifier(tmp_path / "source")
    data = write_jsonl(tmp_path / "train.jsonl", DATA)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--model", str(source), "--task", "classification", "--data",
                                      str(data), "--eval-data", str(data), "--output", str(out), "--max-steps", "20",
                                      "--learning-rate", "5e-3", "--batch-size", "16", "--save-steps", "10"])
    assert result.exit_code == 0, result.output
    assert re.search(r"eval loss [\d.]+, accuracy 1\.0000, macro-F1 1\.0000", result.output), result.output
    result = CliRunner().invoke(cli, ["eval", "classification", "--model", str(out / "final"), "--data", str(data),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["metrics"]["accuracy"] == 1.0 and report["metrics"]["macro_f1"] == 1.0
    assert report["num_examples"] == len(DATA)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*DATA[:2], {"text": "x", "label": "maybe"}])
    result = CliRunner().invoke(cli, ["eval", "classification", "--model", str(out / "final"), "--data", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (f"error: {bad} line 3: unknown label 'maybe'; the model's "
                                                      "labels are 'neg', 'pos'")
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"sentence": "x", "label": "pos"}])
    result = CliRunner().invoke(cli, ["train", "--model", str(source), "--task", "classification", "--data",
                                      str(missing), "--output", str(tmp_path / "run2")])
    assert result.exit_code == 1 and "line 1: 'text' must be a string" in result.output


def test_macro_f1_equals_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    from llmasos.eval.classification import accuracy_and_macro_f1

    references = [0, 1, 2, 2, 1, 0, 0, 3]
    predictions = [0, 2, 2, 2, 1, 1, 0, 0]
    result = accuracy_and_macro_f1(predictions, references)
    assert result.accuracy == pytest.approx(accuracy_score(references, predictions))
    assert result.macro_f1 == pytest.approx(f1_score(references, predictions, average="macro"))


def test_resumed_classification_run_ends_like_the_uninterrupted_one(tmp_path):
    source = bert_classifier(tmp_path / "source")
    settings = dict(objective="classification", per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3,
                    seed=3, save_steps=2, progress_bar=False, logging_steps=1)
    whole = LLMTrainer.from_pretrained(source)
    whole.train(DATA, args=TrainingArguments(output_dir=str(tmp_path / "whole"), **settings))
    resumed = LLMTrainer.from_pretrained(source)
    resumed.train(DATA, args=TrainingArguments(output_dir=str(tmp_path / "part"), **{**settings, "max_steps": 6}),
                  resume_from_checkpoint=tmp_path / "whole" / "checkpoint-2")
    expected = whole.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name


def test_decoder_causal_checkpoint_gets_a_new_score_head(tiny_qwen2, tmp_path):
    """A causal-LM checkpoint (no classifier yet): the score head is initialised, the output is a classifier."""
    trainer, losses = our_run(tiny_qwen2, DATA, tmp_path / "run")
    assert losses[-1] < losses[0]
    trainer.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["pad_token_id"] == 2
    assert torch.allclose(our_logits(trainer, DATA), hf_logits(tmp_path / "out", DATA), atol=1e-5)
