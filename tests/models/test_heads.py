"""Task models (llmasos/models/heads.py) against transformers: BERT's sequence classifier, masked LM and QA heads
and the decoder families' sequence classifiers give transformers' logits on padded batches of tiny random models."""

from __future__ import annotations

import pytest
import torch
from support import VOCAB_SIZE, family_config

from llmasos.models.heads import load_task_model

BERT = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, pad_token_id=0)


def batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, VOCAB_SIZE, (3, 11), generator=generator)
    input_ids[1, 7:] = pad_id
    input_ids[2, 4:] = pad_id
    return input_ids, (input_ids != pad_id).long()


@pytest.mark.parametrize("task", ["classification", "mlm", "question-answering"])
def test_bert_heads_equal_transformers(task, tmp_path):
    import transformers as tf

    cls = {"classification": tf.BertForSequenceClassification, "mlm": tf.BertForMaskedLM,
           "question-answering": tf.BertForQuestionAnswering}[task]
    torch.manual_seed(0)
    reference = cls(tf.BertConfig(**BERT, num_labels=3 if task == "classification" else 2)).eval()
    reference.save_pretrained(tmp_path)
    ours, _ = load_task_model(tmp_path, task)
    input_ids, mask = batch(0)
    types = torch.zeros_like(input_ids)
    types[0, 6:] = 1
    with torch.no_grad():
        theirs = reference(input_ids=input_ids, attention_mask=mask, token_type_ids=types)
        out = ours(input_ids, mask, types)
    if task == "classification":
        assert torch.allclose(out, theirs.logits, atol=1e-5)
    elif task == "mlm":
        real = mask.bool()
        assert torch.allclose(ours.compute_logits(out)[real], theirs.logits[real], atol=1e-5)
    else:
        real = mask.bool()
        assert torch.allclose(out[0][real], theirs.start_logits[real], atol=1e-5)
        assert torch.allclose(out[1][real], theirs.end_logits[real], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_decoder_classifiers_equal_transformers(family, tmp_path):
    import transformers as tf

    overrides = {"rope_scaling": None} if family == "llama" else {}
    config = family_config(family, num_labels=4, **overrides)
    torch.manual_seed(0)
    reference = tf.AutoModelForSequenceClassification.from_config(config).eval()
    reference.save_pretrained(tmp_path)
    ours, data = load_task_model(tmp_path, "classification")
    assert data["architectures"][0].endswith("ForSequenceClassification")
    input_ids, mask = batch(config.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids, mask), reference(input_ids=input_ids, attention_mask=mask).logits,
                              atol=1e-5)


def test_a_checkpoint_without_the_head_is_a_clear_error(tmp_path):
    import transformers as tf

    tf.BertModel(tf.BertConfig(**BERT)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no question-answering head"):
        load_task_model(tmp_path, "question-answering")


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
@pytest.mark.parametrize("task", ["classification", "question-answering"])
def test_roberta_heads_equal_transformers(family, task, tmp_path):
    import transformers as tf

    config_class = {"roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig}[family]
    config = config_class(**{**BERT, "pad_token_id": 2, "max_position_embeddings": 64}, type_vocab_size=1,
                          num_labels=3 if task == "classification" else 2)
    torch.manual_seed(0)
    reference = (tf.AutoModelForSequenceClassification if task == "classification"
                 else tf.AutoModelForQuestionAnswering).from_config(config).eval()
    reference.save_pretrained(tmp_path)
    ours, _ = load_task_model(tmp_path, task)
    input_ids, mask = batch(2)
    with torch.no_grad():
        theirs = reference(input_ids=input_ids, attention_mask=mask)
        out = ours(input_ids, mask)
    if task == "classification":
        assert torch.allclose(out, theirs.logits, atol=1e-5)
    else:
        real = mask.bool()
        assert torch.allclose(out[0][real], theirs.start_logits[real], atol=1e-5)


def test_roberta_has_no_masked_lm_head_yet(tmp_path):
    import transformers as tf

    tf.RobertaForMaskedLM(tf.RobertaConfig(**{**BERT, "pad_token_id": 2, "max_position_embeddings": 64})
                          ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="the mlm head is implemented for bert checkpoints, not 'roberta'"):
        load_task_model(tmp_path, "mlm")
