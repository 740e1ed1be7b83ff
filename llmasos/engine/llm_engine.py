"""LLMEngine: the kernel loop. add_request -> step() (schedule, run, sample, detokenize) -> outputs; abort frees
a request's blocks at once. Synchronous; AsyncLLM drives it from a background thread."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch

from llmasos.engine.kv_cache import KVCacheManager, bytes_per_block, default_kv_memory, parse_bytes
from llmasos.engine.model_runner import ModelRunner
from llmasos.engine.request import Request, RequestStatus
from llmasos.engine.scheduler import Scheduler
from llmasos.models import CausalLM
from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.sampling_params import SamplingParams


class StepError(RuntimeError):
    """One engine step failed; `request_ids` are the requests it aborted. The engine itself stays usable."""

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    enforce_eager: bool = False  # no CUDA graphs for decode steps

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be a positive integer, got {self.num_kv_blocks!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):  # checked here: the cache is sized from them
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)


class RequestGroup:
    """The n sequences of one user request, and how much of each has been reported."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], children: list[Request]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.children = children
        self._reported_tokens = [0] * len(children)

    @property
    def finished(self) -> bool:
        return all(child.finished for child in self.children)

    def output(self, delta: bool = False) -> RequestOutput:
        """The whole output so far, or (delta=True) only what is new since the last delta."""
        outputs = []
        for i, child in enumerate(self.children):
            if delta:
                start = self._reported_tokens[i]
                self._reported_tokens[i] = len(child.output_token_ids)
                text, token_ids = child.take_delta(), child.output_token_ids[start:]
                logprobs = child.logprobs[start:] if child.logprobs is not None else None
            else:
                text, token_ids, logprobs = child.text, list(child.output_token_ids), child.logprobs
            outputs.append(CompletionOutput(child.index, text, list(token_ids), child.finish_reason,
                                            None if logprobs is None else list(logprobs), child.stop_reason))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             self.children[0].num_cached_tokens)


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer, eos_token_ids: set[int], dtype: torch.dtype, device: torch.device,
                 config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.config = config = config or EngineConfig()
        model_config = model.config
        if config.max_model_len is not None and not (
                isinstance(config.max_model_len, int) and 0 < config.max_model_len <= model_config.max_context_length):
            # Longer would run past the model's positions (GPT-2's learned table fails mid-generation).
            raise ValueError(f"max_model_len must be an integer from 1 to this model's context length "
                             f"({model_config.max_context_length}), got {config.max_model_len!r}")
        self.max_model_len = config.max_model_len or model_config.max_context_length
        per_block = bytes_per_block(model_config, config.block_size, dtype)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            budget = config.kv_cache_memory or default_kv_memory(device)
            useful = -(-self.max_model_len // config.block_size) * config.max_num_seqs
            num_blocks = min(budget // per_block, useful)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory {budget} bytes is smaller than one KV block ({per_block} bytes)")
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv, dtype, device, config.enforce_eager, self.max_model_len)
        self.groups: dict[str, RequestGroup] = {}
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.lock = threading.RLock()
        self.num_generated_tokens = 0

    # -- requests ----------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        self._validate(token_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        with self.lock:
            if request_id in self.groups:
                raise ValueError(f"request id {request_id!r} is already in use")
            children = []
            for index in range(params.n):
                child_id = request_id if params.n == 1 else f"{request_id}#{index}"
                detok = (self.tokenizer.incremental_detokenizer(token_ids, params.skip_special_tokens)
                         if self.tokenizer is not None else None)
                child = Request(child_id, token_ids, params, self.eos_token_ids, detok, request_id, index,
                                next(self._arrivals))
                children.append(child)
            self.groups[request_id] = RequestGroup(request_id, text, token_ids, children)
            for child in children:
                self._requests[child.request_id] = child
                if params.max_tokens == 0:
                    child.finish_reason = "length"
                    child.status = RequestStatus.FINISHED
                else:
                    self.scheduler.add(child)
        return request_id

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary (0..{vocab - 1})")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request needs {total} "
                f"({len(token_ids)} in the prompt + {params.max_tokens} max_tokens)")
        blocks = self.kv.blocks_needed(total)
        if blocks > self.kv.num_blocks:
            raise ValueError(
                f"the request needs {blocks} KV blocks ({total} tokens) but the whole cache has {self.kv.num_blocks}; "
                "raise kv_cache_memory / num_kv_blocks or shorten the prompt or max_tokens")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; True if it was still known."""
        with self.lock:
            group = self.groups.pop(request_id, None)
            if group is None:
                return False
            for child in group.children:
                self._requests.pop(child.request_id, None)
                if not child.finished:
                    child.finish_reason = "abort"
                if child.status != RequestStatus.FINISHED:
                    self.scheduler.finish(child)
            return True

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or any(g.finished for g in self.groups.values())

    # -- the loop ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestGroup]:
        """One scheduling step. Returns the groups that made progress (finished ones are then forgotten)."""
        with self.lock:
            touched: dict[str, RequestGroup] = {}
            out = self.scheduler.schedule()
            if out.scheduled:
                try:
                    results = self.runner.execute(out.scheduled)
                except Exception as exc:
                    raise self._fail_step(out, exc) from exc
                self.scheduler.update(out)
                for request, token_id, logprobs in results:
                    request.append_token(token_id, logprobs)
                    self.num_generated_tokens += 1
                    if request.finished:
                        self.scheduler.finish(request)
                    touched[request.parent_id] = self.groups[request.parent_id]
            for request_id, group in list(self.groups.items()):  # max_tokens=0 requests finish without a step
                if group.finished:
                    touched[request_id] = group
            for request_id, group in touched.items():
                if group.finished:
                    self.groups.pop(request_id, None)
                    for child in group.children:
                        self._requests.pop(child.request_id, None)
            return list(touched.values())

    def _fail_step(self, out, exc: Exception) -> StepError:
        """A forward that raised (out of memory, say) leaves its requests half computed and may have registered
        prefix blocks whose contents were never written: end those requests, forget the prefix cache, keep going."""
        self.kv.pool.reset_prefix_cache()
        parents = []
        for request, _ in out.scheduled:
            group = self.groups.get(request.parent_id)
            if group is not None and request.parent_id not in parents:
                parents.append(request.parent_id)
        for parent in parents:
            self.abort(parent)
        return StepError(f"a model step failed and its {len(parents)} request(s) were aborted: {exc}", parents)

    def run_to_completion(self, request_ids: list[str]) -> dict[str, RequestOutput]:
        """Step until every listed request finishes; a request aborted meanwhile is left out of the result."""
        wanted = set(request_ids)
        with self.lock:
            unknown = sorted(wanted - self.groups.keys())
        if unknown:
            raise ValueError(f"unknown request id {unknown[0]!r}: it has finished already or was never added")
        done: dict[str, RequestOutput] = {}
        while len(done) < len(wanted):
            for group in self.step():
                if group.finished and group.request_id in wanted:
                    done[group.request_id] = group.output()
            with self.lock:
                if not (wanted - done.keys()) & self.groups.keys():
                    break  # the rest were aborted: waiting for them would never end
        return done

    def metrics(self) -> dict[str, float | int]:
        with self.lock:
            return {
                "num_preemptions": self.scheduler.num_preemptions,
                "prefix_cache_hit_rate": self.scheduler.prefix_cache_hit_rate,
                "kv_cache_usage": self.kv.usage,
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "num_kv_blocks": self.kv.num_blocks,
                "num_generated_tokens": self.num_generated_tokens,
            }
