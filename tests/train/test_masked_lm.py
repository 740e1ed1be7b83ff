"""Masked-LM pretraining of BERT (objective="mlm": llmasos/train/tasks.py, models/heads.py) against transformers'
BertForMaskedLM and DataCollatorForLanguageModeling, and the WordPiece tokenizer trainer, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from encoders_support import bert_tokenizer
from support import CORPUS, VOCAB_SIZE

from llmasos.tokenizer import Tokenizer
from llmasos.train import LLMTrainer, TrainingArguments
from llmasos.train.tasks import MaskedLMLoss, mask_tokens, masked_lm_objective

SENTENCES = [sentence.strip() for sentence in CORPUS.replace(";", ".").split(".") if sentence.strip()]
TINY_BERT = dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128)


def hf_bert_mlm(directory, seed: int = 0):
    import transformers as tf

    config = tf.BertConfig(vocab_size=VOCAB_SIZE, **{k: v for k, v in TINY_BERT.items() if k != "model_type"},
                           pad_token_id=0)
    torch.manual_seed(seed)
    model = tf.BertForMaskedLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    bert_tokenizer().save_pretrained(directory)
    return model.eval()


def test_masking_is_transformers_collators_draw_for_draw(tmp_path):
    """The same RNG state masks the same tokens, with the same replacements, as DataCollatorForLanguageModeling."""
    import transformers as tf

    hf_bert_mlm(tmp_path)
    hf_tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path)
    collator = tf.DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.15, return_tensors="pt")
    ours = Tokenizer.from_dir(tmp_path)
    objective = masked_lm_objective(sorted(ours.all_special_ids), ours.mask_token_id, ours.vocab_size, 0.15)
    from llmasos.train.dataset import Example

    examples = [Example(ours.encode(text), []) for text in SENTENCES * 4]
    torch.manual_seed(3)
    theirs = collator([{"input_ids": example.input_ids} for example in examples])
    torch.manual_seed(3)
    input_ids, attention_mask, _, labels = objective.collate(examples, ours.pad_token_id, torch.device("cpu"))
    assert torch.equal(input_ids, theirs["input_ids"]) and torch.equal(labels, theirs["labels"])
    assert torch.equal(attention_mask, theirs["attention_mask"])


def test_80_10_10_rule():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 100), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    masked, labels = mask_tokens(ids, special, mask_id=4, vocab_size=1000, probability=0.15, generator=generator)
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert chosen.float().mean().item() == pytest.approx(0.15 * 99 / 100, abs=0.005)
    assert torch.equal(labels[chosen], ids[chosen])
    as_mask = (masked == 4) & chosen
    kept = (masked == ids) & chosen
    assert as_mask.sum() / chosen.sum() == pytest.approx(0.8, abs=0.02)
    assert kept.sum() / chosen.sum() == pytest.approx(0.1 + 0.1 / 1000, abs=0.015)  # random draws can hit the same id
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_loss_on_a_fixed_masked_batch_equals_bert_for_masked_lm(tmp_path):
    import transformers as tf

    reference = hf_bert_mlm(tmp_path)
    trainer = LLMTrainer.from_pretrained(tmp_path)
    from llmasos.train.task_setup import to_task_model

    trainer.model = to_task_model(trainer, TrainingArguments(objective="mlm", progress_bar=False))
    hf_tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    batch = tf.DataCollatorForLanguageModeling(hf_tokenizer, return_tensors="pt")(
        [{"input_ids": hf_tokenizer(text)["input_ids"]} for text in SENTENCES])
    with torch.no_grad():
        theirs = reference(**batch).loss
        summed = MaskedLMLoss(trainer.model.eval())(batch["input_ids"], batch["attention_mask"],
                                                    torch.zeros_like(batch["input_ids"]), batch["labels"])
    assert (summed / (batch["labels"] != -100).sum()).item() == pytest.approx(theirs.item(), abs=1e-5)


def test_pretrain_from_scratch_then_continue_load_in_auto_model_for_masked_lm(tmp_path):
    """A WordPiece tokenizer trained here, a BERT from a config, MLM training; the output is a BertForMaskedLM
    (same logits in transformers); training it further continues from the saved head."""
    import transformers as tf

    from llmasos.train.tokenizer_trainer import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer([CORPUS * 10], vocab_size=200)
    assert [tokenizer.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.save(tmp_path / "tokenizer")
    hf_tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert hf_tokenizer("To be, or not")["input_ids"] == tokenizer.encode("To be, or not")
    assert hf_tokenizer.mask_token == "[MASK]" and hf_tokenizer.cls_token_id == 2

    trainer = LLMTrainer.from_config(TINY_BERT, tmp_path / "tokenizer", seed=1)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), objective="mlm", max_steps=30, learning_rate=2e-3,
                             per_device_train_batch_size=8, max_seq_length=32, save_steps=None, logging_steps=5,
                             progress_bar=False, seed=3)
    result = trainer.train(SENTENCES * 8, args=args)
    assert result.log_history[-1]["loss"] < result.log_history[0]["loss"]
    trainer.save_pretrained(tmp_path / "mlm")
    config = json.loads((tmp_path / "mlm" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["vocab_size"] == tokenizer.vocab_size
    reference = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    batch = hf_tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = reference(**batch).logits
        ours = trainer.model.compute_logits(trainer.model(batch["input_ids"], batch["attention_mask"],
                                                          batch["token_type_ids"]))
    mask = batch["attention_mask"].bool()
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-5)

    again = LLMTrainer.from_pretrained(tmp_path / "mlm")
    again.evaluate(SENTENCES, TrainingArguments(objective="mlm", progress_bar=False))
    trained = trainer.model.state_dict()
    for name, tensor in again.model.state_dict().items():  # the trained head came back, not a fresh one
        assert torch.equal(tensor, trained[name]), name
    again.train(SENTENCES * 8, args=TrainingArguments(**{**args.to_dict(), "output_dir": str(tmp_path / "run2"),
                                                         "max_steps": 5}))
    again.save_pretrained(tmp_path / "mlm2")
    assert tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm2") is not None


def test_objective_must_fit_the_model(tmp_path, tiny_llama):
    hf_bert_mlm(tmp_path)
    with pytest.raises(ValueError, match="BERT encoder: train it with objective='mlm'"):
        LLMTrainer.from_pretrained(tmp_path).train(SENTENCES, args=TrainingArguments(
            output_dir=str(tmp_path / "run"), progress_bar=False))
    with pytest.raises(ValueError, match="objective='mlm' is BERT's masked language modelling"):
        LLMTrainer.from_pretrained(tiny_llama).train(SENTENCES, args=TrainingArguments(
            output_dir=str(tmp_path / "run"), objective="mlm", progress_bar=False))


def test_cli_wordpiece_tokenizer_then_mlm_pretraining(tmp_path):
    import transformers as tf
    from click.testing import CliRunner

    from llmasos.cli.main import cli

    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(SENTENCES * 20), encoding="utf-8")
    result = CliRunner().invoke(cli, ["tokenizer", "train", "--wordpiece", "--data", str(data), "--vocab-size", "150",
                                      "--output", str(tmp_path / "tok")])
    assert result.exit_code == 0 and "WordPiece tokenizer of 150 tokens" in result.output, result.output
    (tmp_path / "config.json").write_text(json.dumps(TINY_BERT))
    result = CliRunner().invoke(cli, ["train", "--model-config", str(tmp_path / "config.json"), "--tokenizer",
                                      str(tmp_path / "tok"), "--objective", "mlm", "--data", str(data),
                                      "--max-seq-length", "32", "--max-steps", "4", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    model = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "final")
    assert type(model).__name__ == "BertForMaskedLM"


def test_resumed_mlm_run_masks_and_ends_like_the_uninterrupted_one(tmp_path):
    hf_bert_mlm(tmp_path / "source")
    settings = dict(objective="mlm", per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3, seed=3,
                    save_steps=3, progress_bar=False, logging_steps=1, max_seq_length=16)
    whole = LLMTrainer.from_pretrained(tmp_path / "source")
    whole.train(SENTENCES * 3, args=TrainingArguments(output_dir=str(tmp_path / "whole"), **settings))
    resumed = LLMTrainer.from_pretrained(tmp_path / "source")
    result = resumed.train(SENTENCES * 3, args=TrainingArguments(output_dir=str(tmp_path / "part"), **settings),
                           resume_from_checkpoint=tmp_path / "whole" / "checkpoint-3")
    assert result.log_history[-1]["loss"] == pytest.approx(whole.state.log_history[-1]["loss"], abs=1e-5)
    expected = whole.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name


def test_whole_word_masking_is_transformers_collators(tmp_path):
    """Word boundaries from character offsets and whole words masked as DataCollatorForLanguageModeling(
    whole_word_mask=True) does, draw for draw; then a whole-word MLM run trains."""
    import transformers as tf

    from llmasos.train.dataset import Example, word_start_flags

    hf_bert_mlm(tmp_path)
    hf_tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    texts = [sentence + " héllo wörld, don't stop" for sentence in SENTENCES] * 3
    features = [hf_tokenizer(text, return_offsets_mapping=True) for text in texts]
    length = max(len(feature["input_ids"]) for feature in features)
    padded = [{"input_ids": f["input_ids"] + [0] * (length - len(f["input_ids"])),
               "attention_mask": [1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])),
               "offset_mapping": [list(o) for o in f["offset_mapping"]] + [[0, 0]] * (length - len(f["input_ids"]))}
              for f in features]  # padded here: the collator cannot pad offsets itself
    with pytest.warns(UserWarning, match="Random token replacement is not supported"):  # all chosen become [MASK]
        collator = tf.DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.3, whole_word_mask=True,
                                                      return_tensors="pt")
    objective = masked_lm_objective(sorted(ours.all_special_ids), ours.mask_token_id, ours.vocab_size, 0.3,
                                    whole_word=True)
    examples = []
    for text in texts:
        ids, starts = word_start_flags(ours, text)
        examples.append(Example(ids, [], word_starts=starts))
    torch.manual_seed(5)
    theirs = collator(padded)
    torch.manual_seed(5)
    input_ids, _, _, labels = objective.collate(examples, ours.pad_token_id, torch.device("cpu"))
    assert torch.equal(input_ids, theirs["input_ids"]) and torch.equal(labels, theirs["labels"])
    assert 0.1 < (labels != -100).float().mean() < 0.4

    trainer = LLMTrainer.from_pretrained(tmp_path)
    result = trainer.train(texts, args=TrainingArguments(output_dir=str(tmp_path / "run"), objective="mlm",
                                                         mlm_whole_word=True, max_steps=3, save_steps=None,
                                                         progress_bar=False, max_seq_length=24))
    assert result.global_step == 3 and result.train_loss > 0
