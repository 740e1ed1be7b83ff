"""bf16 linear layers packed for oneDNN on CPU: the engine's outputs are bit-identical to plain F.linear's for every
decoder family (the speed-up is measured in benchmarks/packed_linear.py, not here)."""

from __future__ import annotations

import pytest
import torch
from support import family_config, make_checkpoint

from llmasos import LLM, SamplingParams
from llmasos.models.packed_linear import PackedLinear, pack_linear_layers, packing_supported

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"]
pytestmark = pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU has no oneDNN bf16 support (the engine then runs plain F.linear)")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_bf16_engine_equals_plain_bf16(tmp_path, family):
    make_checkpoint(tmp_path, family_config(family, num_hidden_layers=2))
    packed = LLM.load(tmp_path, dtype="bfloat16", num_kv_blocks=64)
    plain = LLM.load(tmp_path, dtype="bfloat16", num_kv_blocks=64, pack_weights=False)
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    ids = list(range(5, 70))
    assert packed.prompt_logprobs(ids) == plain.prompt_logprobs(ids)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [ids[:7], ids[:40], ids]  # decode steps batch 1..3 rows
    assert [o.token_ids for o in packed.generate(prompts, greedy)] == \
        [o.token_ids for o in plain.generate(prompts, greedy)]
    assert packed.metrics()["weight_bytes"] >= plain.metrics()["weight_bytes"]  # packed weights are counted


def test_only_bf16_linear_layers_are_packed():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32).bfloat16(), torch.nn.Linear(32, 8), torch.nn.ReLU())
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    expected = model[0](x)
    assert pack_linear_layers(model) == 1
    assert isinstance(model[0], PackedLinear) and type(model[1]) is torch.nn.Linear
    assert torch.equal(model[0](x), expected)  # any leading shape, same numbers


def test_a_packed_engine_reports_every_parameter(tmp_path):
    """Packed weights are not torch parameters: the engine counts before packing, so prices and /api/ps see the
    model's real size (found by the startup banner: 1.1M where the model has 4.2M)."""
    directory = tmp_path / "tiny"
    make_checkpoint(directory, family_config("llama", num_hidden_layers=2))
    packed = LLM.load(directory, dtype="bfloat16")
    plain = LLM.load(directory, dtype="float32")
    try:
        assert packed.num_parameters == plain.num_parameters == plain.model.num_parameters()
    finally:
        packed.close()
        plain.close()
