"""The native T5 against transformers on tiny random checkpoints: teacher-forced logits (whole-sequence and cached
step by step), greedy generation token for token, an untied lm_head, and loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from encoders_support import make_t5_checkpoint, t5_config, t5_tokenizer
from safetensors.torch import load_file, save_file

from llmasos import SamplingParams
from llmasos.errors import ModelLoadError
from llmasos.models.t5 import load_seq2seq
from llmasos.pipelines.seq2seq import Seq2SeqLM

TEXTS = ["translate English to French: To be, or not to be", "the quick brown fox jumps over the lazy dog " * 3]
VARIANTS = {"t5": {}, "t5-v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = make_t5_checkpoint(directory, t5_config(**VARIANTS[request.param]))
    return directory, reference


def reference_batch(texts=TEXTS):
    return t5_tokenizer()(texts, return_tensors="pt", padding=True)


def test_teacher_forced_logits_match_transformers(checkpoint):
    directory, reference = checkpoint
    model, _ = load_seq2seq(directory, dtype="float32")
    batch = reference_batch()
    decoder_ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    decoder_ids[:, 0] = 0
    with torch.no_grad():
        expected = reference(**batch, decoder_input_ids=decoder_ids).logits
        encoded = model.encode(batch["input_ids"], batch["attention_mask"])
        whole = model.decode_step(decoder_ids, model.new_cache(encoded, batch["attention_mask"]))
        cache = model.new_cache(encoded, batch["attention_mask"])
        stepped = torch.cat([model.decode_step(decoder_ids[:, i:i + 1], cache) for i in range(12)], dim=1)
    assert torch.allclose(whole, expected, atol=1e-4, rtol=0), (whole - expected).abs().max()
    assert torch.allclose(stepped, expected, atol=1e-4, rtol=0), (stepped - expected).abs().max()


def greedy_reference(reference, texts, max_new_tokens):
    """transformers' greedy ids (start token dropped), after checking no step was a near-tie either way could take."""
    batch = reference_batch(texts)
    with torch.no_grad():
        # use_cache=False: transformers' cache mis-sizes when the decoder has more layers than the encoder.
        out = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=False,
                                 output_scores=True, return_dict_in_generate=True)
    for scores in out.scores:
        top2 = scores.topk(2, dim=-1).values
        assert ((top2[:, 0] - top2[:, 1]) > 1e-4).all(), "near-tie in the reference: pick another seed"
    return [row[1:].tolist() for row in out.sequences]


def test_greedy_generation_equals_transformers(checkpoint):
    directory, reference = checkpoint
    seq2seq = Seq2SeqLM.load(directory, dtype="float32")
    expected = greedy_reference(reference, TEXTS, 16)
    outputs = seq2seq.generate(TEXTS, SamplingParams(max_tokens=16, temperature=0))
    tokenizer = t5_tokenizer()
    for output, ids in zip(outputs, expected, strict=True):
        ids = ids[:ids.index(1) + 1] if 1 in ids else ids  # rows that ended are padded after </s> by transformers
        assert output.token_ids == ids
        assert output.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert output.finish_reason == ("stop" if ids[-1] == 1 else "length")


def test_batched_and_single_generation_agree(checkpoint):
    directory, _ = checkpoint
    seq2seq = Seq2SeqLM.load(directory, dtype="float32")
    params = SamplingParams(max_tokens=10, temperature=0)
    batched = [o.token_ids for o in seq2seq.generate(TEXTS, params)]
    assert batched == [seq2seq.generate(text, params)[0].token_ids for text in TEXTS]


def test_sampling_is_seeded_and_returns_n_sequences(checkpoint):
    directory, _ = checkpoint
    seq2seq = Seq2SeqLM.load(directory, dtype="float32")
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=3, n=3, logprobs=0)
    first = seq2seq.generate(TEXTS[0], params)[0]
    again = seq2seq.generate(TEXTS[0], params)[0]
    assert len(first.outputs) == 3 and [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert all(len(o.logprobs) == len(o.token_ids) and all(lp[t] <= 0 for lp, t in zip(o.logprobs, o.token_ids,
                                                                                          strict=True))
               for o in first.outputs)


def test_sampling_is_the_engine_samplers(checkpoint):
    """Seeds per sequence (a choice does not depend on its batch), penalties honoured, deltas add up, max_tokens 0."""
    directory, _ = checkpoint
    seq2seq = Seq2SeqLM.load(directory, dtype="float32")
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=2)
    alone = seq2seq.generate(TEXTS[0], params)[0]
    batched = seq2seq.generate(TEXTS, params)[0]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in batched.outputs]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    plain = seq2seq.generate(TEXTS[0], greedy)[0].token_ids
    # Negative penalties reward repeats: the tokens already out win again (the old sampler ignored them).
    penalized = seq2seq.generate(TEXTS[0], SamplingParams(max_tokens=12, temperature=0, frequency_penalty=-2.0,
                                                          presence_penalty=-2.0))[0].token_ids
    assert len(set(penalized)) < len(set(plain))
    ids = seq2seq.tokenizer.encode(TEXTS[1])
    texts, tokens = ["", ""], [[], []]
    for groups in seq2seq.stream([ids], SamplingParams(max_tokens=9, temperature=1.0, seed=3, n=2, stop=["e"])):
        for out in groups[0].output(delta=True).outputs:
            texts[out.index] += out.text
            tokens[out.index] += out.token_ids
    whole = seq2seq.generate([ids], SamplingParams(max_tokens=9, temperature=1.0, seed=3, n=2, stop=["e"]))[0]
    assert texts == [o.text for o in whole.outputs] and tokens == [o.token_ids for o in whole.outputs]
    empty = seq2seq.generate(TEXTS[0], SamplingParams(max_tokens=0))[0].outputs[0]
    assert (empty.text, empty.token_ids, empty.finish_reason) == ("", [], "length")


def test_checkpoint_with_its_own_lm_head(tmp_path):
    """Hub T5 v1.1 checkpoints carry a separate lm_head and no output rescaling."""
    reference = make_t5_checkpoint(tmp_path, t5_config(feed_forward_proj="gated-gelu"))
    weights = load_file(tmp_path / "model.safetensors")
    weights["lm_head.weight"] = torch.randn(384, 64, generator=torch.Generator().manual_seed(5)) * 0.1
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    reference.lm_head.weight = torch.nn.Parameter(weights["lm_head.weight"])
    reference.config.scale_decoder_outputs = False
    model, config = load_seq2seq(tmp_path, dtype="float32")
    assert not config.tie_word_embeddings and not config.scale_decoder_outputs
    batch = reference_batch()
    decoder_ids = torch.tensor([[0, 5, 9, 11], [0, 7, 7, 3]])
    with torch.no_grad():
        expected = reference(**batch, decoder_input_ids=decoder_ids).logits
        ours = model.decode_step(decoder_ids, model.new_cache(model.encode(batch["input_ids"],
                                                                           batch["attention_mask"]),
                                                              batch["attention_mask"]))
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0)


def test_loading_errors_name_the_problem(tmp_path):
    make_t5_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "fancy-gelu"}))
    with pytest.raises(ModelLoadError, match="feed_forward_proj 'fancy-gelu'"):
        load_seq2seq(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_decoder_layers": 4}))
    with pytest.raises(ModelLoadError, match="missing weights: decoder.block.3"):
        load_seq2seq(tmp_path)
