"""LLM: the in-process API. Load a model (library name, checkpoint directory or ModelSpec), then generate, chat and
score with the engine — which runs in this process by default, or in an engine process of its own
(`engine_process=True`, what the server uses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmasos.engine.core_client import make_client
from llmasos.engine.llm_engine import LLMEngine
from llmasos.engine.validation import ContextLengthError, check_token_ids
from llmasos.models.loader import read_config
from llmasos.outputs import RequestOutput
from llmasos.sampling_params import SamplingParams
from llmasos.spec import ModelSpec, resolve_spec
from llmasos.tokenizer import Tokenizer


class LLM:
    """A loaded model with its tokenizer and engine.

    >>> llm = LLM.load("path/to/checkpoint")
    >>> llm.generate("Once upon a time", SamplingParams(max_tokens=20, temperature=0))[0].text
    """

    def __init__(self, spec: ModelSpec, engine: LLMEngine, tokenizer: Tokenizer, config) -> None:
        self.spec = spec
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def load(cls, model: str | Path | ModelSpec, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None, *, quantization: str | None = None,
             quantization_group_size: int | None = None, engine_process: bool = False,
             lora_adapters: dict[str, str | Path] | None = None, **engine_options: Any) -> LLM:
        """Load a library model by name (`llmasos list`), a Hugging Face checkpoint directory (config.json,
        safetensors, tokenizer.json) or a ModelSpec. A library model's adapter, chat template, system prompt and
        default parameters apply. `quantization` ("int8" or "int4") quantizes the weights at load.
        `engine_options` are EngineOptions fields (num_kv_blocks, kv_cache_memory, max_num_seqs, ...). device
        None or "auto" is a CUDA GPU when there is one, else the CPU; dtype "auto" keeps a bf16/fp16 checkpoint's dtype
        and runs a float32 one in bfloat16 where the device supports it (llmasos.models.loader.resolve_dtype). For a
        spec, None keeps its own. `lora_adapters` ({name: PEFT adapter directory}) are served unmerged on this base:
        a request picks one with `generate(..., lora=name)` or SamplingParams(lora=name) (see docs/lora.md)."""
        spec = resolve_spec(model, dtype=dtype, device=device, quantization=quantization,
                            quantization_group_size=quantization_group_size, **engine_options)
        if lora_adapters:
            spec = spec.replace(lora_adapters={**spec.lora_adapters, **{k: str(v) for k, v in lora_adapters.items()}})
        return cls.from_spec(spec, engine_process=engine_process)

    @classmethod
    def from_spec(cls, spec: ModelSpec, engine_process: bool = False) -> LLM:
        if spec.kind != "decoder":
            raise ValueError(f"{spec.name} is {'an' if spec.kind == 'encoder' else 'a'} {spec.kind} model; LLM runs "
                             "decoder-only models (use llmasos.pipeline for it)")
        config = read_config(spec.directory)  # first: a directory without config.json is named as such
        tokenizer = Tokenizer.from_dir(spec.directory)
        if spec.template is not None:
            tokenizer.chat_template = spec.template
        engine = LLMEngine(make_client(spec, engine_process), tokenizer)
        return cls(spec, engine, tokenizer, config)

    # -- what was loaded ---------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.spec.directory

    @property
    def system_prompt(self) -> str | None:
        return self.spec.system

    @property
    def default_parameters(self) -> dict[str, Any]:
        """The Modelfile PARAMETERs (request defaults that win over generation_config)."""
        return dict(self.spec.parameters)

    @property
    def model(self):
        """The model module (None when the engine runs in another process)."""
        return self.engine.core.model if self.engine.in_process else None

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.engine.info.dtype)

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.info.device)

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end generation: generation_config's, config.json's and the tokenizer's EOS."""
        return set(self.engine.info.eos_token_ids)

    @property
    def num_parameters(self) -> int:
        return self.engine.info.num_parameters

    def close(self) -> None:
        """Stop the engine (ends an engine process; an in-process engine just goes idle)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- generation --------------------------------------------------------------------------------------------
    def default_sampling(self, **overrides) -> SamplingParams:
        """SamplingParams from the model's defaults (ModelSpec.sampling_params), then `overrides`."""
        return self.spec.sampling_params(**overrides)

    # -- LoRA adapters -----------------------------------------------------------------------------------------
    def load_lora(self, name: str, path: str | Path) -> None:
        """Serve the PEFT adapter directory `path` as `name` from now on (LoRAError, a ValueError, if unusable)."""
        self.engine.load_lora(name, str(path))

    def unload_lora(self, name: str) -> None:
        """Stop serving `name`: new requests for it are refused at once, requests in flight finish first."""
        self.engine.unload_lora(name)

    def list_loras(self) -> dict[str, str]:
        """Adapters served on this base: name -> directory."""
        return self.engine.list_loras()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling: SamplingParams | list[SamplingParams] | None = None, *,
                 lora: str | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids); all prompts run together in one batch. `lora`
        names a loaded LoRA adapter for every prompt (else each SamplingParams' own `lora`, None: the base)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling, list):
            if len(sampling) != len(prompts):
                raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
            params_list = sampling
        else:
            params_list = [sampling or self.default_sampling()] * len(prompts)
        if lora is not None:
            import dataclasses

            params_list = [dataclasses.replace(params, lora=lora) for params in params_list]
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
             sampling: SamplingParams | list[SamplingParams] | None = None, *, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None, parallel_tool_calls: bool = True,
             **template_kwargs) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation (a list of messages) or to each of several.

        With OpenAI `tools` (and `tool_choice`: "auto", "none", "required" or {"type": "function", "function":
        {"name"}}), the tools go to the chat template, "required" and named choices are forced by a grammar, and
        each output's `tool_calls` and `content` hold what was parsed from its text."""
        from llmasos.tool_calls import parse_output, plan_tools, prepare_messages

        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if self.system_prompt:
            from llmasos.library import with_system_prompt

            conversations = [with_system_prompt(messages, self.system_prompt) for messages in conversations]
        chat_template = template_kwargs.get("chat_template")
        plan = plan_tools(self.tokenizer, chat_template, tools, tool_choice, parallel_tool_calls)
        if plan.constraint is not None:
            sampling = self._forced(sampling, len(conversations), plan.constraint)
        prompts = []
        for messages in conversations:
            messages, template_tools = prepare_messages(self.tokenizer, chat_template, messages, plan)
            extra = {**template_kwargs, **({"tools": template_tools} if template_tools is not None else {})}
            prompts.append(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              **extra))
        outputs = self.generate(prompts, sampling)
        if plan.parser is not None:
            for output in outputs:
                for completion in output.outputs:
                    completion.content, completion.tool_calls = parse_output(plan, completion.text)
        return outputs

    def _forced(self, sampling, count: int, constraint) -> list[SamplingParams]:
        """Copies of the sampling params that force tool calls; a constraint of the caller's own is a conflict."""
        import copy

        given = sampling if isinstance(sampling, list) else [sampling] * count
        forced = []
        for params in given:
            params = copy.copy(params) if params is not None else self.default_sampling()
            if params.structured_outputs is not None:
                raise ValueError("structured_outputs cannot be combined with tool_choice required or a named "
                                 "function: the output is then a tool call")
            params.structured_outputs = constraint
            forced.append(params)
        return forced

    # -- scoring -----------------------------------------------------------------------------------------------
    def prompt_logprobs(self, token_ids: list[int], top_k: int = 0) -> list:
        """[None, log p(t1|t0), log p(t2|t0,t1), ...]; with top_k > 0, each entry is instead
        (logprob, {token_id: logprob} of the top_k alternatives). Runs as an ordinary scheduled prefill."""
        token_ids = list(token_ids)
        if not token_ids:
            return []
        check_token_ids(token_ids, self.config.vocab_size)
        if len(token_ids) > self.engine.max_model_len:
            raise ContextLengthError(f"{len(token_ids)} tokens exceed the model's context of "
                                     f"{self.engine.max_model_len}", len(token_ids), 0, self.engine.max_model_len)
        params = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=top_k)
        entries = self.generate([token_ids], params)[0].prompt_logprobs
        if top_k:
            return [None] + [(logprob, dict(top)) for logprob, top in entries[1:]]
        return [None] + [logprob for logprob, _ in entries[1:]]

    def metrics(self) -> dict[str, Any]:
        """Engine counters: num_preemptions, prefix_cache_hit_rate, kv_cache_usage, num_running, num_waiting,
        weight_bytes, kv_cache_bytes, rss_bytes, ..."""
        return self.engine.metrics()
