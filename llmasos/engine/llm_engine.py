"""LLMEngine: the front end of one engine — tokenize and validate requests, hand them to the engine core (in this
process or its own), turn the core's token outputs into text (OutputProcessor). step() -> the request groups that
changed. Synchronous; AsyncLLM drives it from a background thread for asyncio callers."""

from __future__ import annotations

import itertools
import threading
from typing import Any

from llmasos.engine.core_client import EngineDeadError, InprocClient, MPClient
from llmasos.engine.output_processor import OutputProcessor, RequestGroup
from llmasos.engine.protocol import EngineCoreOutputs
from llmasos.outputs import RequestOutput
from llmasos.sampling_params import SamplingParams


class StepError(RuntimeError):
    """One engine step failed; `request_ids` are the requests it aborted. The engine itself stays usable."""

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids


class LLMEngine:
    def __init__(self, client: InprocClient | MPClient, tokenizer) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)
        self._ids = itertools.count()
        # Serializes front-end state; with an in-process core it is held for a whole step (the step is the work).
        self.lock = threading.RLock()

    # -- what the engine is ------------------------------------------------------------------------------------
    @property
    def info(self):
        return self.client.info

    @property
    def max_model_len(self) -> int:
        return self.client.info.max_model_len

    @property
    def in_process(self) -> bool:
        return self.client.in_process

    @property
    def core(self):
        """The EngineCore object, for in-process engines (tests, profiling)."""
        if not self.client.in_process:
            raise AttributeError("the engine core runs in another process")
        return self.client.core

    # Shortcuts into an in-process core, for tests and benchmarks.
    scheduler = property(lambda self: self.core.scheduler)
    kv = property(lambda self: self.core.kv)
    runner = property(lambda self: self.core.runner)

    @property
    def groups(self) -> dict[str, RequestGroup]:
        return self.processor.groups

    # -- requests ----------------------------------------------------------------------------------------------
    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise a PromptError (a ValueError) now if the engine could never run this request, or a LoRAError if it
        names an adapter that is not loaded."""
        self.client.info.validate(token_ids, params)
        if params.lora is not None and params.lora not in self.client.list_loras():
            from llmasos.engine.lora import LoRAError

            raise LoRAError(f"unknown LoRA adapter {params.lora!r}; loaded adapters: "
                            f"{', '.join(sorted(self.client.list_loras())) or 'none'}")

    # -- LoRA adapters -----------------------------------------------------------------------------------------
    def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter directory `path` under `name` (requests select it with SamplingParams.lora). It is
        read and checked against the base now: a LoRAError (a ValueError) names what is wrong."""
        with self.lock:
            self.client.load_lora(name, str(path))

    def unload_lora(self, name: str) -> None:
        """Refuse new requests for `name` now; requests in flight with it finish first, then its weights go."""
        with self.lock:
            self.client.unload_lora(name)

    def list_loras(self) -> dict[str, str]:
        """Adapters that accept requests: name -> directory."""
        with self.lock:
            return self.client.list_loras()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        self.validate(token_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        with self.lock:
            core_requests = self.processor.add(request_id, text, token_ids, params)
            added: list[str] = []
            try:
                for core_request in core_requests:
                    self.client.add_request(core_request)
                    added.append(core_request.request_id)
            except Exception:  # an in-process core refused it (a constraint it cannot compile): leave no trace
                self.client.abort(added)
                self.processor.forget(request_id)
                raise
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; True if it was still known."""
        with self.lock:
            if request_id not in self.processor.groups:
                return False
            self.client.abort(self.processor.abort(request_id))
            return True

    def has_unfinished(self) -> bool:
        return bool(self.processor.groups)

    def wake(self) -> None:
        self.client.wake()

    # -- the loop ----------------------------------------------------------------------------------------------
    def step(self, timeout: float = 0.1) -> list[RequestGroup]:
        """One engine step (in process), or the next batch of outputs of the engine process (waiting at most
        `timeout` s). Returns the groups that made progress; finished ones are then forgotten. Raises StepError
        when a model step failed (its requests are aborted) and EngineDeadError when the engine process died."""
        if self.client.in_process:
            with self.lock:
                return self._apply(self.client.get_outputs())
        outputs = self.client.get_outputs(timeout)
        with self.lock:
            return self._apply(outputs)

    def _apply(self, outputs: EngineCoreOutputs | None) -> list[RequestGroup]:
        if outputs is None:
            return []
        groups, to_abort = self.processor.process(outputs.outputs)
        if to_abort:
            self.client.abort(to_abort)
        if outputs.failures:
            parents = []
            for failure in outputs.failures:
                for child_id in failure.request_ids:
                    parent = self.processor.parent_of(child_id)
                    if parent is not None and parent not in parents:
                        parents.append(parent)
            for parent in parents:
                self.abort(parent)
            raise StepError("; ".join(failure.message for failure in outputs.failures), parents)
        return groups

    def fail_all(self) -> list[str]:
        """After the engine died: forget every request in flight; returns their ids."""
        with self.lock:
            request_ids = list(self.processor.groups)
            for request_id in request_ids:
                self.processor.forget(request_id)
            return request_ids

    def run_to_completion(self, request_ids: list[str]) -> dict[str, RequestOutput]:
        """Step until every listed request finishes; a request aborted meanwhile is left out of the result."""
        wanted = set(request_ids)
        unknown = sorted(wanted - self.processor.groups.keys())
        if unknown:
            raise ValueError(f"unknown request id {unknown[0]!r}: it has finished already or was never added")
        done: dict[str, RequestOutput] = {}
        while len(done) < len(wanted):
            for group in self.step():
                if group.finished and group.request_id in wanted:
                    done[group.request_id] = group.output()
            if not (wanted - done.keys()) & self.processor.groups.keys():
                break  # the rest were aborted: waiting for them would never end
            if not self.client.is_alive:
                raise EngineDeadError("the engine process died")
        return done

    def metrics(self) -> dict[str, Any]:
        """The engine's counters as last reported (never waits for a step)."""
        stats = self.client.stats()
        info = self.client.info
        return {
            "num_preemptions": stats.num_preemptions,
            "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
            "kv_cache_usage": stats.kv_cache_usage,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "num_kv_blocks": info.num_kv_blocks,
            "num_generated_tokens": stats.num_generated_tokens,
            "num_prompt_tokens": stats.num_prompt_tokens,
            "num_threads": stats.num_threads,
            "weight_bytes": info.weight_bytes,
            "kv_cache_bytes": info.kv_cache_bytes,
            "rss_bytes": stats.rss_bytes,
            "num_constrained_requests": stats.num_constrained_requests,
            "num_grammars_compiled": stats.num_grammars_compiled,
            "grammar_compile_seconds": stats.grammar_compile_seconds,
        }

    def shutdown(self) -> None:
        self.client.shutdown()
