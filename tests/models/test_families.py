"""Every native family against transformers on tiny random checkpoints: prompt logprobs and greedy decoding."""

from __future__ import annotations

import pytest
import torch
from support import family_config, make_checkpoint

from llmasos import LLM, SamplingParams

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"]
# Longer than Llama-3's original_max_position_embeddings (64) and Gemma-2's / Mistral's sliding windows (40 / 48).
SEQ_LEN = 150
EXTRA_CONFIGS = {
    "llama-dynamic": ("llama", dict(max_position_embeddings=100, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama-linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 128})),
}


@pytest.fixture(scope="module", params=FAMILIES + list(EXTRA_CONFIGS))
def checkpoint(request, tmp_path_factory):
    name = request.param
    family, overrides = EXTRA_CONFIGS.get(name, (name, {}))
    directory = tmp_path_factory.mktemp(name)
    reference = make_checkpoint(directory, family_config(family, **overrides))
    return name, directory, reference


def reference_logprobs(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_prompt_logprobs_match_transformers(checkpoint):
    name, directory, reference = checkpoint
    llm = LLM.load(directory, dtype="float32")
    ids = torch.randint(3, llm.config.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = llm.prompt_logprobs(ids)
    expected = reference_logprobs(reference, ids)
    assert ours[0] is None
    expected_chosen = expected[torch.arange(SEQ_LEN - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(ours[1:]), expected_chosen, atol=1e-4, rtol=0), name


def _greedy_reference(reference, prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
    """transformers' greedy tokens, and how many of them are trustworthy (up to the first near-tie)."""
    reference.generation_config.eos_token_id = None  # like ignore_eos: nothing stops early, nothing is masked
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=2)
    tokens = out.sequences[0, len(prompt):].tolist()
    trusted = len(tokens)
    for step, scores in enumerate(out.scores):
        top2 = scores[0].float().topk(2).values
        if (top2[0] - top2[1]).item() < 1e-3:
            trusted = step + 1  # the tie step itself may go either way; everything before it must agree
            break
    return tokens, trusted


def test_greedy_generation_matches_transformers(checkpoint):
    name, directory, reference = checkpoint
    llm = LLM.load(directory, dtype="float32")
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, llm.config.vocab_size, (n,), generator=generator).tolist() for n in (5, 33, 70)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        expected, trusted = _greedy_reference(reference, prompt, 24)
        assert output.token_ids[:trusted - 1] == expected[:trusted - 1], (name, len(prompt))
        assert len(output.token_ids) == 24 and output.finish_reason == "length"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_stays_close(tmp_path, dtype):
    reference = make_checkpoint(tmp_path, family_config("qwen2"))
    llm = LLM.load(tmp_path, dtype=dtype)
    assert next(llm.model.parameters()).dtype == getattr(torch, dtype)
    ids = list(range(3, 60))
    ours = torch.tensor(llm.prompt_logprobs(ids)[1:])
    expected = reference_logprobs(reference, ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (ours - expected).abs().max() < 0.1


def test_auto_dtype_follows_checkpoint(tmp_path):
    make_checkpoint(tmp_path, family_config("llama"), dtype=torch.bfloat16)
    llm = LLM.load(tmp_path)  # dtype="auto"
    assert next(llm.model.parameters()).dtype == torch.bfloat16
