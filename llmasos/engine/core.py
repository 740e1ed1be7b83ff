"""EngineCore: the kernel loop at token level — add requests, step (schedule, run the model, sample), report new
tokens with the engine's counters. No text: the front end detokenizes and matches stop strings. The same object runs
inside the caller's process (InprocClient) or in an engine process of its own (core_process)."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import time
from pathlib import Path

import psutil
import torch

from llmasos.engine.kv_cache import KVCacheManager, bytes_per_block, default_kv_memory
from llmasos.engine.lora import LoRAManager
from llmasos.engine.model_runner import ModelRunner
from llmasos.engine.protocol import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineInfo,
    EngineStats,
    StepFailure,
)
from llmasos.engine.request import Request, RequestStatus
from llmasos.engine.scheduler import Scheduler
from llmasos.engine.structured_output import GrammarCompiler, check_constraint
from llmasos.engine.validation import StructuredOutputError, validate_prompt
from llmasos.models import CausalLM
from llmasos.models.packed_linear import packed_bytes
from llmasos.spec import EngineOptions, ModelSpec

log = logging.getLogger(__name__)


def _as_id_set(value) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else {v for v in value if isinstance(v, int)}


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as held in memory (parameters and buffers, quantized ones included)."""
    seen, total = set(), 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.data_ptr() in seen:  # tied embeddings count once
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def load_for_engine(spec: ModelSpec) -> tuple[CausalLM, set[int]]:
    """The decoder of a spec as the engine runs it: weights loaded, adapters merged, quantized; and its EOS ids."""
    from llmasos.models.loader import load_model, read_json_file
    from llmasos.tokenizer import Tokenizer

    if spec.kind != "decoder":
        raise ValueError(f"{spec.name} is {'an' if spec.kind == 'encoder' else 'a'} {spec.kind} model; the engine runs "
                         "decoder-only models")
    model, config = load_model(spec.path, dtype=spec.dtype, device=spec.device)
    stored_quantized = isinstance(config.raw.get("quantization_config"), dict)
    if spec.adapters:
        if stored_quantized:
            raise ValueError(f"{spec.name}: a LoRA adapter cannot be merged into weights stored quantized; create "
                             "the quantized model from the base with the ADAPTER line instead")
        from llmasos.train.lora import apply_adapter

        for adapter in spec.adapters:
            apply_adapter(model, adapter)
    if spec.quantization is not None and not stored_quantized:
        from llmasos.models.quantization import quantize_model

        quantize_model(model, spec.quantization, spec.quantization_group_size)
    generation_config = read_json_file(spec.directory / "generation_config.json", required=False)
    eos = _as_id_set(generation_config.get("eos_token_id")) | set(config.eos_token_ids)
    if (spec.directory / "tokenizer.json").is_file() or (spec.directory / "tokenizer_config.json").is_file():
        eos |= _as_id_set(Tokenizer.from_dir(spec.directory).eos_token_id)
    return model, eos


class EngineCore:
    def __init__(self, model: CausalLM, eos_token_ids: set[int], options: EngineOptions | None = None,
                 tokenizer_json: str | Path | None = None) -> None:
        self.model = model
        self.eos_token_ids = set(eos_token_ids)
        self.options = options = options or EngineOptions()
        param = next(model.parameters())
        dtype, device = self.dtype, self.device = _activation_dtype(model), param.device
        num_parameters = model.num_parameters()  # before packing: packed weights are no longer parameters
        self._pack_weights()
        model_config = model.config
        if options.max_model_len is not None and options.max_model_len > model_config.max_context_length:
            # Longer would run past the model's positions (GPT-2's learned table fails mid-generation).
            raise ValueError(f"max_model_len must be an integer from 1 to this model's context length "
                             f"({model_config.max_context_length}), got {options.max_model_len!r}")
        self.max_model_len = options.max_model_len or model_config.max_context_length
        per_block = bytes_per_block(model_config, options.block_size, dtype)
        if options.num_kv_blocks is not None:
            num_blocks = options.num_kv_blocks
        else:
            budget = options.kv_cache_memory or default_kv_memory(device)
            useful = -(-self.max_model_len // options.block_size) * options.max_num_seqs
            num_blocks = min(budget // per_block, useful)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory {budget} bytes is smaller than one KV block ({per_block} bytes)")
        self.kv = KVCacheManager(num_blocks, options.block_size, options.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, options.max_num_seqs, options.max_num_batched_tokens, options.max_loras)
        self.loras = LoRAManager(model, options.max_loras, options.max_cpu_loras or max(32, options.max_loras),
                                 options.max_lora_rank, dtype, device)
        # Structured output: grammars compiled here on first use (the tokenizer is only read then).
        # On a CPU one mask thread keeps up (a 32-row step takes ~0.4 ms against a ~300 ms forward) and takes no
        # core from torch; a GPU's short steps want the rows spread over a few threads.
        mask_threads = 1 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) // 2))
        self.grammars = GrammarCompiler(tokenizer_json, model_config.vocab_size, self.eos_token_ids,
                                        mask_threads=mask_threads)
        self.runner = ModelRunner(model, self.kv, dtype, device, options.enforce_eager, self.max_model_len,
                                  self.grammars, self.loras)
        self.requests: dict[str, Request] = {}
        self._finished_unreported: list[Request] = []  # finished without a step (max_tokens=0, aborted mid-prefill)
        self._arrivals = itertools.count()
        self.num_generated_tokens = 0
        self.num_prompt_tokens_computed = 0
        self.num_constrained_requests = 0
        self._awaiting_grammar: list[Request] = []  # constrained requests waiting for the llguidance tokenizer
        self._process = psutil.Process()
        self._rss = (0.0, 0)
        self.governor = None
        self._stepping_thread: int | None = None
        if device.type == "cpu":  # as many torch threads as there are idle cores, re-checked between steps
            from llmasos.threads import ThreadGovernor

            self.governor = ThreadGovernor(options.num_threads)
            self.governor.apply()
        kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.runner.kv_tensors)
        self.info = EngineInfo(
            vocab_size=model_config.vocab_size, max_model_len=self.max_model_len, num_kv_blocks=num_blocks,
            block_size=options.block_size, num_parameters=num_parameters,
            weight_bytes=module_bytes(model) + packed_bytes(model),
            kv_cache_bytes=kv_bytes, dtype=str(dtype).removeprefix("torch."), device=str(device),
            eos_token_ids=sorted(self.eos_token_ids), pid=os.getpid())

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> EngineCore:
        model, eos = load_for_engine(spec)
        core = cls(model, eos, spec.engine, spec.directory / "tokenizer.json")
        for name, path in spec.lora_adapters.items():
            core.load_lora(name, path)
        return core

    def _pack_weights(self) -> None:
        from llmasos.models.packed_linear import pack_linear_layers, packing_supported

        if self.options.pack_weights and packing_supported(self.dtype, self.device):
            pack_linear_layers(self.model)

    # -- requests ----------------------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        params = request.sampling_params()
        validate_prompt(request.prompt_token_ids, params.max_tokens, self.info.vocab_size, self.max_model_len,
                        self.kv.num_blocks, self.kv.block_size)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        lora_id = self.loras.lora_id(params.lora) if params.lora is not None else None  # LoRAError if unknown
        core_request = Request(request.request_id, request.prompt_token_ids, params, self.eos_token_ids,
                               request.index, next(self._arrivals))
        core_request.lora_id = lora_id
        awaits_grammar = False
        if params.structured_outputs is not None:  # an invalid one raises StructuredOutputError: nothing is queued
            if self.grammars.tokenizer_ready:
                core_request.matcher = self.grammars.matcher(params.structured_outputs)
            else:  # the engine's first constraint: its tokenizer builds in the background while the engine steps
                self.grammars.check_tokenizer()
                check_constraint(params.structured_outputs, self.grammars.timeout)
                self.grammars.load_tokenizer_in_background()
                awaits_grammar = True
            self.num_constrained_requests += 1
        self.requests[request.request_id] = core_request
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            core_request.finish_reason = "length"
            core_request.status = RequestStatus.FINISHED
            self._finished_unreported.append(core_request)
        elif awaits_grammar:
            self._awaiting_grammar.append(core_request)
        else:
            self.scheduler.add(core_request)

    # -- LoRA adapters (llmasos.engine.lora) --------------------------------------------------------------------
    def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter at `path` as `name` from now on (read and checked now: LoRAError if unusable)."""
        self.loras.load(name, path)

    def unload_lora(self, name: str) -> None:
        """New requests for `name` are refused at once; its requests in flight finish with it first."""
        self.loras.unload(name)
        self._collect_loras()

    def list_loras(self) -> dict[str, str]:
        return self.loras.list()

    def _collect_loras(self) -> None:
        if self.loras.retiring:
            self.loras.collect({r.lora_id for r in self.requests.values() if r.lora_id is not None})

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests now and free their blocks; unknown ids (already finished) are ignored."""
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if not request.finished:
                request.finish_reason = "abort"
            if request in self._awaiting_grammar:
                self._awaiting_grammar.remove(request)
            if request.status != RequestStatus.FINISHED:
                self.scheduler.finish(request)
        self._collect_loras()

    @property
    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._finished_unreported) or bool(self._awaiting_grammar)

    # -- the loop ----------------------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """One scheduling step: every scheduled request advances; returns what each reported request produced."""
        if self.governor is not None:
            if self._stepping_thread != threading.get_ident():  # torch's thread count is a per-thread setting
                self._stepping_thread = threading.get_ident()
                torch.set_num_threads(self.governor.num_threads)
            self.governor.maybe_adjust()
        touched: dict[str, Request] = {r.request_id: r for r in self._finished_unreported}
        self._finished_unreported.clear()
        failures: list[StepFailure] = []
        if self._awaiting_grammar:
            self._admit_awaiting_grammar(touched, failures)
        out = self.scheduler.schedule()
        if out.scheduled:
            try:
                if self.loras.names or self.loras.retiring:
                    self.loras.activate(self.scheduler.running_loras())
                results = self.runner.execute(out.scheduled)
            except Exception as exc:  # noqa: BLE001 - reported to the front end; the engine goes on
                failures.append(self._fail_step(out, exc))
            else:
                self.scheduler.update(out)
                for request, num_new in out.scheduled:
                    self.num_prompt_tokens_computed += max(0, min(request.num_computed_tokens,
                                                                  request.num_prompt_tokens)
                                                           - max(0, request.num_computed_tokens - num_new))
                    if request.prompt_logprobs is not None and not request.wants_prompt_logprobs:
                        touched[request.request_id] = request  # its prompt was just scored
                    if request.params.max_tokens == 0 and request.num_computed_tokens >= request.num_tokens:
                        request.finish_reason = "length"
                        self.scheduler.finish(request)
                        touched[request.request_id] = request
                for request, token_id, logprobs in results:
                    request.append_token(token_id, logprobs)
                    self.num_generated_tokens += 1
                    if request.finished:
                        self.scheduler.finish(request)
                    touched[request.request_id] = request
        outputs = [self._output(request) for request in touched.values()]
        for request in touched.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
        self._collect_loras()
        return EngineCoreOutputs(outputs, self.stats(), failures)

    def _admit_awaiting_grammar(self, touched: dict[str, Request], failures: list[StepFailure]) -> None:
        """Constrained requests that arrived before the llguidance tokenizer was built join the scheduler once it
        is; with nothing else to run, wait for it a little rather than spin."""
        loading = self.grammars.load_tokenizer_in_background()
        if not loading.done() and not self.scheduler.num_unfinished:
            concurrent.futures.wait([loading], timeout=0.05)
        if not loading.done():
            return
        awaiting, self._awaiting_grammar = self._awaiting_grammar, []
        for request in awaiting:
            try:
                request.matcher = self.grammars.matcher(request.params.structured_outputs)
            except StructuredOutputError as exc:  # a tokenizer llguidance cannot read: those requests fail
                request.finish_reason = "abort"
                self.scheduler.finish(request)
                touched[request.request_id] = request
                failures.append(StepFailure(str(exc), [request.request_id]))
            else:
                self.scheduler.add(request)

    def _output(self, request: Request) -> EngineCoreOutput:
        start = request.num_reported
        request.num_reported = len(request.output_token_ids)
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not request.wants_prompt_logprobs:
            prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None  # sent once
        return EngineCoreOutput(
            request.request_id, request.output_token_ids[start:],
            request.logprobs[start:] if request.logprobs is not None else None, request.finish_reason,
            request.stop_reason, request.num_cached_tokens, prompt_logprobs, request.stopped_by_grammar)

    def _fail_step(self, out, exc: Exception) -> StepFailure:
        """A forward that raised (out of memory, say) leaves its requests half computed and may have registered
        prefix blocks whose contents were never written: end those requests, forget the prefix cache, keep going."""
        log.error("a model step failed: %s", exc)
        self.kv.pool.reset_prefix_cache()
        request_ids = list(dict.fromkeys(request.request_id for request, _ in out.scheduled))
        self.abort(request_ids)
        return StepFailure(f"a model step failed and its {len(request_ids)} request(s) were aborted: {exc}",
                           request_ids)

    def stats(self) -> EngineStats:
        now = time.monotonic()
        if now - self._rss[0] > 0.5:
            self._rss = (now, self._process.memory_info().rss)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._awaiting_grammar),
            kv_cache_usage=self.kv.usage, num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=self.scheduler.prefix_cache_hit_rate,
            num_generated_tokens=self.num_generated_tokens, num_prompt_tokens=self.num_prompt_tokens_computed,
            num_kv_blocks=self.kv.num_blocks, num_threads=torch.get_num_threads(), rss_bytes=self._rss[1],
            num_constrained_requests=self.num_constrained_requests,
            num_grammars_compiled=self.grammars.num_compiled, grammar_compile_seconds=self.grammars.compile_seconds)


def _activation_dtype(model: CausalLM) -> torch.dtype:
    """The dtype activations and the KV cache use: that of the floating-point weights (quantized ones are int)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
