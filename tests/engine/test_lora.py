"""LoRA adapters served unmerged (llmasos/engine/lora.py, llmasos/models/lora_linear.py): parity with PEFT's merged
model, batches mixing adapters and the base, the prefix cache keyed by adapter, run-time load/unload, bad adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import family_config, make_checkpoint

from llmasos import LLM
from llmasos.engine.lora import LoRAError
from llmasos.sampling_params import SamplingParams

PROMPTS = [[0, 5, 17, 33, 101, 7, 250], [0, 44, 12, 9], [0, 300, 301, 302, 303, 304, 305, 306, 307, 308, 12]]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def peft_adapter(base_dir: Path, out_dir: Path, r: int, targets: list[str], *, alpha: float = 16.0,
                 rslora: bool = False, seed: int = 1, fan_in_fan_out: bool = False) -> Path:
    """A PEFT LoRA adapter with random A and B (B is zero at PEFT's usual init, which would test nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                        init_lora_weights=False, fan_in_fan_out=fan_in_fan_out)
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir)
    return out_dir


def peft_merged(base_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


def greedy(max_tokens: int = 8, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("lora-base")
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=512))
    return directory


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-adapters")
    return {
        "small": peft_adapter(base_dir, root / "small", 2, ATTENTION, alpha=4, seed=1),
        "mid": peft_adapter(base_dir, root / "mid", 8, ALL_LINEAR, alpha=16, seed=2),
        "big": peft_adapter(base_dir, root / "big", 32, ["gate_proj", "up_proj", "down_proj", "q_proj"], alpha=8,
                            rslora=True, seed=3),
    }


def texts(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


def test_greedy_and_prompt_logprobs_match_peft_merged(base_dir, adapters):
    llm = LLM.load(base_dir, dtype="float32", lora_adapters=adapters)
    for name, directory in adapters.items():
        merged = peft_merged(base_dir, directory)
        for prompt in PROMPTS:
            expected = merged.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                       min_new_tokens=8)[0, len(prompt):].tolist()
            assert llm.generate([prompt], greedy(), lora=name)[0].outputs[0].token_ids == expected, name
            scored = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0, lora=name))[0]
            with torch.no_grad():
                reference = torch.log_softmax(merged(torch.tensor([prompt])).logits[0].float(), dim=-1)
            ours = torch.tensor([entry[0] for entry in scored.prompt_logprobs[1:]])
            theirs = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    base = llm.generate(PROMPTS, greedy())
    assert texts(base) != texts(llm.generate(PROMPTS, greedy(), lora="mid"))


@pytest.mark.parametrize("max_loras", [8, 2])
def test_mixed_batch_equals_each_request_alone(base_dir, adapters, max_loras):
    """Three adapters of ranks 2, 8 and 32 and the base in one batch; with max_loras=2 the third adapter waits for a
    slot (scheduler) and slots are evicted and refilled (LRU)."""
    llm = LLM.load(base_dir, dtype="float32", lora_adapters=adapters, max_loras=max_loras, max_cpu_loras=2)
    names = [None, "small", "mid", "big"]
    requests = [(prompt, names[(i + j) % 4]) for i, prompt in enumerate(PROMPTS) for j in range(4)]
    alone = [llm.generate([prompt], greedy(12, lora=name))[0].outputs[0].token_ids for prompt, name in requests]
    together = llm.generate([p for p, _ in requests], [greedy(12, lora=name) for _, name in requests])
    assert texts(together) == alone
    assert len({tuple(t) for t in alone}) > len(PROMPTS)  # the adapters really change the outputs


def test_prefix_cache_is_keyed_by_adapter(base_dir, adapters):
    prompt = [0] + [(7 * i) % 380 + 3 for i in range(100)]
    llm = LLM.load(base_dir, dtype="float32", lora_adapters=adapters, block_size=16)
    reference = LLM.load(base_dir, dtype="float32", lora_adapters=adapters, enable_prefix_caching=False)
    first = llm.generate([prompt], greedy(lora="small"))[0]
    assert first.num_cached_tokens == 0
    for lora in ("mid", None, "big"):
        output = llm.generate([prompt], greedy(lora=lora))[0]
        assert output.num_cached_tokens == 0, lora  # never another adapter's (or the base's) KV
        assert output.outputs[0].token_ids == reference.generate([prompt], greedy(lora=lora))[0].outputs[0].token_ids
    again = llm.generate([prompt], greedy(lora="small"))[0]
    assert again.num_cached_tokens == 96  # its own blocks are reused
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert first.outputs[0].token_ids == reference.generate([prompt], greedy(lora="small"))[0].outputs[0].token_ids


def test_adapter_from_our_trainer_matches_merged(base_dir, tmp_path):
    from llmasos.models.loader import load_model
    from llmasos.train.lora import adapter_config, add_lora, lora_layers, save_adapter

    model, _ = load_model(base_dir, dtype="float32")
    add_lora(model, r=4, alpha=8)
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.1)
    save_adapter(model.state_dict(), tmp_path / "ours", adapter_config(model, 4, 8, 0.0, str(base_dir)))
    unmerged = LLM.load(base_dir, dtype="float32", lora_adapters={"ours": tmp_path / "ours"})
    merged = LLM.load(LLM.load(base_dir, dtype="float32").spec.replace(adapters=(str(tmp_path / "ours"),)))
    assert texts(unmerged.generate(PROMPTS, greedy(lora="ours"))) == texts(merged.generate(PROMPTS, greedy()))


def test_gpt2_conv1d_adapter_matches_peft(tmp_path):
    base = tmp_path / "gpt2"
    make_checkpoint(base, family_config("gpt2", n_layer=2))
    adapter = peft_adapter(base, tmp_path / "a", 4, ["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    merged = peft_merged(base, adapter)
    llm = LLM.load(base, dtype="float32", lora_adapters={"a": adapter})
    for prompt in PROMPTS:
        expected = merged.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert llm.generate([prompt], greedy(6), lora="a")[0].outputs[0].token_ids == expected[0, len(prompt):].tolist()


def test_load_and_unload_at_run_time_with_requests_in_flight(base_dir, adapters):
    llm = LLM.load(base_dir, dtype="float32")
    expected = LLM.load(base_dir, dtype="float32", lora_adapters=adapters).generate(
        [PROMPTS[0]], greedy(10, lora="mid"))[0].outputs[0].token_ids
    assert llm.list_loras() == {}
    llm.load_lora("mid", adapters["mid"])
    assert llm.list_loras() == {"mid": str(adapters["mid"])}
    engine = llm.engine
    request_id = engine.add_request(PROMPTS[0], greedy(10, lora="mid"))
    engine.step()
    engine.step()
    llm.unload_lora("mid")  # the request in flight keeps its adapter to the end
    assert llm.list_loras() == {}
    with pytest.raises(LoRAError, match="unknown LoRA adapter 'mid'"):
        llm.generate([PROMPTS[1]], greedy(lora="mid"))
    done = engine.run_to_completion([request_id])
    assert done[request_id].outputs[0].token_ids == expected
    assert not engine.core.loras.paths and not engine.core.loras.slots  # then its weights went
    llm.load_lora("mid", adapters["mid"])  # loaded again: a new id, so no stale prefix blocks either
    assert llm.generate([PROMPTS[0]], greedy(10), lora="mid")[0].outputs[0].token_ids == expected


def test_engine_process_serves_adapters(base_dir, adapters):
    with LLM.load(base_dir, dtype="float32", engine_process=True, lora_adapters={"small": adapters["small"]}) as llm:
        local = LLM.load(base_dir, dtype="float32", lora_adapters=adapters)
        expected = texts(local.generate(PROMPTS, greedy(lora="small")))
        assert texts(llm.generate(PROMPTS, greedy(lora="small"))) == expected
        llm.load_lora("big", adapters["big"])
        assert set(llm.list_loras()) == {"small", "big"}
        assert texts(llm.generate(PROMPTS, greedy(), lora="big")) == texts(local.generate(PROMPTS, greedy(lora="big")))
        llm.unload_lora("small")
        with pytest.raises(LoRAError):
            llm.generate(PROMPTS, greedy(), lora="small")
        with pytest.raises(LoRAError, match="pickle"):
            bad = Path(adapters["big"]).parent / "pickled-mp"
            bad.mkdir()
            shutil.copy(adapters["big"] / "adapter_config.json", bad)
            (bad / "adapter_model.bin").write_bytes(b"\x80\x04")
            llm.load_lora("bad", bad)
        assert texts(llm.generate(PROMPTS, greedy(), lora="big")) == texts(local.generate(PROMPTS, greedy(lora="big")))


def test_bad_adapters_are_refused_with_clear_errors(base_dir, adapters, tmp_path):
    llm = LLM.load(base_dir, dtype="float32", max_lora_rank=16)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapters["small"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(LoRAError, match="adapter_model.bin .*pickle"):
        llm.load_lora("pickled", pickled)
    with pytest.raises(LoRAError, match="rank 32 .* over the limit of 16"):
        llm.load_lora("big", adapters["big"])
    other = tmp_path / "other-base"
    make_checkpoint(other, family_config("qwen2", num_hidden_layers=2, hidden_size=32, intermediate_size=48))
    foreign = peft_adapter(other, tmp_path / "foreign", 4, ATTENTION)
    with pytest.raises(LoRAError, match="another base model"):
        llm.load_lora("foreign", foreign)
    deeper = tmp_path / "deeper-base"
    make_checkpoint(deeper, family_config("qwen2", num_hidden_layers=3))
    with pytest.raises(LoRAError, match="another base model"):
        llm.load_lora("deeper", peft_adapter(deeper, tmp_path / "deeper", 4, ATTENTION))
    with pytest.raises(LoRAError, match="not found"):
        llm.load_lora("missing", tmp_path / "nowhere")
    with pytest.raises(LoRAError, match="unknown LoRA adapter 'nope'"):
        llm.generate(PROMPTS, greedy(), lora="nope")
    with pytest.raises(ValueError, match="max_lora_rank"):
        LLM.load(base_dir, dtype="float32", max_lora_rank=512)
    with pytest.raises(ValueError, match="lora must be"):
        SamplingParams(lora="")
    dora = tmp_path / "dora"
    shutil.copytree(adapters["small"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAError, match="DoRA"):
        llm.load_lora("dora", dora)
    assert llm.list_loras() == {}
    assert issubclass(LoRAError, ValueError)


def test_bf16_packed_base_runs_adapters(base_dir, adapters):
    """bf16 on CPU: the wrapped layers are oneDNN-packed; base rows of a mixed batch are the plain model's."""
    plain = LLM.load(base_dir, dtype="bfloat16")
    llm = LLM.load(base_dir, dtype="bfloat16", lora_adapters=adapters)
    mixed = llm.generate(PROMPTS * 2, [greedy()] * 3 + [greedy(lora="mid")] * 3)
    assert texts(mixed)[:3] == texts(plain.generate(PROMPTS, greedy()))
    assert texts(mixed)[3:] == texts(llm.generate(PROMPTS, greedy(lora="mid")))
