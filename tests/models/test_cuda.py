"""The runtime and engine on a CUDA GPU, against transformers on the CPU (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch
from support import family_config, make_checkpoint

from llmasos import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2", "gpt2"])
def test_prompt_logprobs_on_cuda_match_transformers(tmp_path, family):
    reference = make_checkpoint(tmp_path, family_config(family))
    llm = LLM.load(tmp_path, dtype="float32", device="cuda")
    ids = torch.randint(3, llm.config.vocab_size, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ours = torch.tensor(llm.prompt_logprobs(ids)[1:])
    assert torch.allclose(ours, expected, atol=1e-3, rtol=0)


def test_batched_engine_on_cuda_equals_cpu(tmp_path):
    make_checkpoint(tmp_path, family_config("qwen2"))
    cpu = LLM.load(tmp_path, dtype="float32")
    gpu = LLM.load(tmp_path, dtype="float32", device="cuda", num_kv_blocks=64)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 384, (int(n),), generator=generator).tolist() for n in torch.randint(4, 90, (20,))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in cpu.generate(prompts, params)]
    got = [o.token_ids for o in gpu.generate(prompts, params)]
    agree = sum(a == b for a, b in zip(got, expected, strict=True))
    assert agree >= len(prompts) - 1  # float32 on two devices may split one near-tie
    assert gpu.metrics()["kv_cache_usage"] == 0.0


def test_bfloat16_sampling_on_cuda(tmp_path):
    make_checkpoint(tmp_path, family_config("llama"))
    llm = LLM.load(tmp_path, dtype="bfloat16", device="cuda")
    outputs = llm.generate(["hello"] * 4, SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5))
    assert len({tuple(o.token_ids) for o in outputs}) == 1  # same seed, same output


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_cuda_graph_decode_equals_eager(tmp_path, family):
    make_checkpoint(tmp_path, family_config(family))
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 384, (int(n),), generator=generator).tolist() for n in torch.randint(4, 60, (13,))]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
    eager = LLM.load(tmp_path, dtype="float32", device="cuda", enforce_eager=True).generate(prompts, params)
    graphed_llm = LLM.load(tmp_path, dtype="float32", device="cuda")
    assert graphed_llm.engine.runner.graphs is not None
    graphed = graphed_llm.generate(prompts, params)
    for a, b in zip(eager, graphed, strict=True):
        assert a.token_ids == b.token_ids
        for token, x, y in zip(a.token_ids, a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert abs(x[token] - y[token]) < 1e-3


def test_auto_picks_the_gpu_and_its_bfloat16(tmp_path):
    make_checkpoint(tmp_path, family_config("qwen2"))  # stored in float32
    llm = LLM.load(tmp_path)
    assert llm.device.type == "cuda"
    assert llm.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert llm.generate("To be", SamplingParams(max_tokens=4, temperature=0))[0].token_ids
