"""LLM: the in-process API. Load a checkpoint directory, then generate, chat and score with the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmasos.engine.llm_engine import EngineConfig, LLMEngine
from llmasos.models.loader import load_model, read_json_file
from llmasos.outputs import RequestOutput
from llmasos.sampling_params import SamplingParams
from llmasos.tokenizer import Tokenizer

# generation_config.json keys that become request defaults (vLLM's behaviour).
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_generation_config(directory: Path) -> dict[str, Any]:
    return read_json_file(directory / "generation_config.json", required=False)


def _as_id_set(value) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else {v for v in value if isinstance(v, int)}


class LLM:
    """A loaded model with its tokenizer and engine.

    >>> llm = LLM.load("path/to/checkpoint")
    >>> llm.generate("Once upon a time", SamplingParams(max_tokens=20, temperature=0))[0].text
    """

    def __init__(self, model, config, tokenizer: Tokenizer, generation_config: dict, dtype: torch.dtype,
                 device: torch.device, engine_config: EngineConfig, path: Path | None = None) -> None:
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.dtype = dtype
        self.device = device
        self.path = path
        # Set by `load` for a library model (its Modelfile SYSTEM and PARAMETERs); plain directories have none.
        self.system_prompt: str | None = None
        self.default_parameters: dict[str, Any] = {}
        self.eos_token_ids = (_as_id_set(generation_config.get("eos_token_id")) | set(config.eos_token_ids)
                              | _as_id_set(tokenizer.eos_token_id))
        self.engine = LLMEngine(model, tokenizer, self.eos_token_ids, dtype, device, engine_config)

    @classmethod
    def load(cls, path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", *,
             num_kv_blocks: int | None = None, kv_cache_memory: int | str | None = None, block_size: int = 16,
             max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
             max_model_len: int | None = None, enforce_eager: bool = False) -> LLM:
        """Load a library model by name (`llmasos list`) or a Hugging Face checkpoint directory (config.json,
        safetensors, tokenizer.json). A library model's chat template, system prompt and default parameters apply."""
        from llmasos.library import resolve_model

        resolved = resolve_model(path)
        path = resolved.path
        engine_config = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                                     kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens,
                                     enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                                     enforce_eager=enforce_eager)
        model, config = load_model(path, dtype=dtype, device=device)
        if resolved.adapter is not None:  # a Modelfile ADAPTER: merged into the weights once, at load
            from llmasos.train.lora import apply_adapter

            apply_adapter(model, resolved.adapter)
        directory = Path(path).expanduser()
        tokenizer = Tokenizer.from_dir(directory)
        if resolved.template is not None:
            tokenizer.chat_template = resolved.template
        generation_config = read_generation_config(directory)
        param = next(model.parameters())
        llm = cls(model, config, tokenizer, generation_config, param.dtype, param.device, engine_config, directory)
        llm.system_prompt, llm.default_parameters = resolved.system, dict(resolved.parameters)
        return llm

    # -- generation --------------------------------------------------------------------------------------------
    def default_sampling(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config defaults, then `overrides`."""
        values: dict[str, Any] = {k: self.generation_config[k] for k in _GENERATION_DEFAULTS
                                  if isinstance(self.generation_config.get(k), (int, float))}
        if self.generation_config.get("do_sample") is False:
            values["temperature"] = 0.0
        if values.get("top_k") == 0:
            values["top_k"] = -1
        values.update(self.default_parameters)
        values.update(overrides)
        return SamplingParams(**values)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids); all prompts run together in one batch."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling, list):
            if len(sampling) != len(prompts):
                raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
            params_list = sampling
        else:
            params_list = [sampling or self.default_sampling()] * len(prompts)
        with self.engine.lock:
            ids = []
            try:
                for prompt, params in zip(prompts, params_list, strict=True):
                    ids.append(self.engine.add_request(prompt, params))
            except Exception:
                for request_id in ids:
                    self.engine.abort(request_id)
                raise
            done = self.engine.run_to_completion(ids)
        return [done[request_id] for request_id in ids]

    def chat(self, conversations: list[dict] | list[list[dict]],
             sampling: SamplingParams | list[SamplingParams] | None = None, **template_kwargs) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation (a list of messages) or to each of several."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if self.system_prompt:
            from llmasos.library import with_system_prompt

            conversations = [with_system_prompt(messages, self.system_prompt) for messages in conversations]
        prompts = [self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      **template_kwargs) for messages in conversations]
        return self.generate(prompts, sampling)

    # -- scoring -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[int], top_k: int = 0) -> list:
        """[None, log p(t1|t0), log p(t2|t0,t1), ...]; with top_k > 0, each entry is instead
        (logprob, {token_id: logprob} of the top_k alternatives)."""
        token_ids = list(token_ids)
        if not token_ids:
            return []
        if len(token_ids) > self.engine.max_model_len:
            raise ValueError(f"{len(token_ids)} tokens exceed the model's context of {self.engine.max_model_len}")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"token ids must be in 0..{vocab - 1}")
        from llmasos.models.attention import AttentionMetadata, sdpa_backends

        with self.engine.lock, sdpa_backends(self.device):
            ids = torch.tensor(token_ids, device=self.device)
            hidden = self.model(ids, torch.arange(len(token_ids), device=self.device),
                                AttentionMetadata.for_prompts([len(token_ids)]))
        results: list = [None]
        chunk = 1024
        for start in range(0, len(token_ids) - 1, chunk):
            end = min(start + chunk, len(token_ids) - 1)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[start:end]), dim=-1)
            chosen = logprobs.gather(1, ids[start + 1:end + 1].unsqueeze(1)).squeeze(1).tolist()
            if top_k:
                values, indices = logprobs.topk(top_k, dim=-1)
                for lp, vals, idx in zip(chosen, values.tolist(), indices.tolist(), strict=True):
                    results.append((lp, dict(zip(idx, vals, strict=True))))
            else:
                results.extend(chosen)
        return results

    def metrics(self) -> dict[str, float | int]:
        """Engine counters: num_preemptions, prefix_cache_hit_rate, kv_cache_usage, num_running, num_waiting."""
        return self.engine.metrics()
