"""The native BERT-family encoders against transformers on tiny random checkpoints: last hidden states of a padded
batch, checkpoints of task models (prefixed names, heads), and the errors a user can hit."""

from __future__ import annotations

import json

import pytest
import torch
from support import VOCAB_SIZE

from llmasos.errors import ModelLoadError
from llmasos.models.bert import ENCODER_FAMILIES, load_encoder

TINY = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


def reference_config(family: str, **overrides):
    import transformers as tf

    if family == "bert":
        return tf.BertConfig(**TINY, max_position_embeddings=128, pad_token_id=0, **overrides)
    classes = {"roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig}
    return classes[family](**TINY, max_position_embeddings=130, pad_token_id=1, type_vocab_size=1, **overrides)


def save_random(directory, config, head: str = "", seed: int = 0):
    """Save a random encoder (LayerNorms and biases perturbed so a bug there cannot hide); return it in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    cls = getattr(tf, "AutoModel" + head) if head else tf.AutoModel
    model = cls.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
    model.eval()
    model.save_pretrained(directory)
    return model


def padded_batch(pad_id: int, lengths=(7, 19, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.full((len(lengths), max(lengths)), pad_id)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, VOCAB_SIZE, (n,), generator=generator)
        mask[row, :n] = 1
    return ids, mask


def assert_same_hidden(ours: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    real = mask.bool()
    assert torch.allclose(ours[real], expected[real], atol=1e-5, rtol=0), (ours[real] - expected[real]).abs().max()


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
def test_hidden_states_match_transformers(tmp_path, family):
    config = reference_config(family)
    reference = save_random(tmp_path, config)
    model, ours_config = load_encoder(tmp_path, dtype="float32")
    assert type(model) is ENCODER_FAMILIES[family] and ours_config.model_type == family
    ids, mask = padded_batch(config.pad_token_id)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model(ids, mask)
    assert ours.shape == expected.shape
    assert_same_hidden(ours, expected, mask)


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_other_activations(tmp_path, activation):
    config = reference_config("bert", hidden_act=activation)
    reference = save_random(tmp_path, config, seed=3)
    model, _ = load_encoder(tmp_path, dtype="float32")
    ids, mask = padded_batch(0, lengths=(11,))
    with torch.no_grad():
        assert_same_hidden(model(ids, mask), reference(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def test_task_model_checkpoint_loads_its_encoder(tmp_path):
    """A BertForMaskedLM checkpoint has `bert.`-prefixed names and a head; the encoder part loads and matches."""
    config = reference_config("bert")
    reference = save_random(tmp_path, config, head="ForMaskedLM")
    model, _ = load_encoder(tmp_path, dtype="float32")
    ids, mask = padded_batch(0)
    with torch.no_grad():
        expected = reference.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_same_hidden(model(ids, mask), expected, mask)


def test_bfloat16_stays_close(tmp_path):
    config = reference_config("bert")
    reference = save_random(tmp_path, config)
    model, _ = load_encoder(tmp_path, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids, mask = padded_batch(0)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model(ids, mask).float()
    cosine = torch.nn.functional.cosine_similarity(ours[mask.bool()], expected[mask.bool()], dim=-1)
    assert cosine.min() > 0.99


def test_too_long_input_is_refused(tmp_path):
    save_random(tmp_path, reference_config("roberta"))
    model, _ = load_encoder(tmp_path, dtype="float32")
    assert model.max_length == 128
    with pytest.raises(ValueError, match="exceed this encoder's limit of 128"):
        model(torch.full((1, 129), 5))


def test_unsupported_family_and_missing_weights_are_named(tmp_path):
    save_random(tmp_path, reference_config("bert"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not a supported encoder.*bert"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="missing weights: encoder.layer.2"):
        load_encoder(tmp_path)
