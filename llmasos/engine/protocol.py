"""What crosses between the front end (text, HTTP) and the engine core (scheduler, KV cache, model): msgspec structs,
encoded as MessagePack on the ZeroMQ link to an engine process — plain data, never pickle."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from llmasos.sampling_params import SamplingParams

_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.init)


def sampling_to_dict(params: SamplingParams) -> dict[str, Any]:
    """Plain data (structured_outputs as its dict form); SamplingParams(**d) rebuilds the params on the other side."""
    fields = {name: getattr(params, name) for name in _SAMPLING_FIELDS}
    if params.structured_outputs is not None:
        fields["structured_outputs"] = params.structured_outputs.to_dict()
    return fields


class EngineCoreRequest(msgspec.Struct, tag="add", array_like=True):
    """One sequence to generate (a request with n > 1 is n of these, index 0..n-1, sharing the prompt)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    index: int = 0  # the choice number: seeds draw from seed + index

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class LoadLoRA(msgspec.Struct, tag="load_lora", array_like=True):
    """Serve the PEFT adapter at `path` as `name` (the front end has checked it against the base already)."""

    name: str
    path: str


class UnloadLoRA(msgspec.Struct, tag="unload_lora", array_like=True):
    """Refuse new requests for `name`; its requests in flight finish first."""

    name: str


EngineInput = EngineCoreRequest | AbortRequests | Shutdown | LoadLoRA | UnloadLoRA


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one sequence produced since the last output: new tokens, their logprobs, and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (EOS or stop token), "length", "abort"
    stop_reason: int | None = None  # the stop token id that ended it
    num_cached_tokens: int = 0
    # Per prompt position: (log p of the prompt token, {token: logprob} of the top alternatives); position 0 is None.
    prompt_logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    # finish_reason "stop" because the structured-output grammar is complete: the last token is text, not EOS
    stopped_by_grammar: bool = False


class EngineStats(msgspec.Struct, array_like=True):
    """Counters that travel with every batch of outputs, so readers never wait for the engine."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_hit_rate: float = 0.0
    num_generated_tokens: int = 0
    num_prompt_tokens: int = 0
    num_kv_blocks: int = 0
    num_threads: int = 0
    rss_bytes: int = 0
    num_constrained_requests: int = 0  # structured output: sequences admitted with a constraint
    num_grammars_compiled: int = 0
    grammar_compile_seconds: float = 0.0


class StepFailure(msgspec.Struct, array_like=True):
    """A model step raised: its requests were aborted (and the engine goes on)."""

    message: str
    request_ids: list[str]


class EngineCoreOutputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[EngineCoreOutput]
    stats: EngineStats
    failures: list[StepFailure] = []


class EngineInfo(msgspec.Struct, tag="ready", array_like=True):
    """Sent once when the engine has loaded its model: what the front end needs to validate and report."""

    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    num_parameters: int
    weight_bytes: int
    kv_cache_bytes: int
    dtype: str
    device: str
    eos_token_ids: list[int] = []
    pid: int = 0

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the engine could never run this prompt (see llmasos.engine.validation), or
        StructuredOutputError if its structured_outputs constraint cannot compile (checked before queueing)."""
        from llmasos.engine.validation import validate_prompt

        validate_prompt(token_ids, params.max_tokens, self.vocab_size, self.max_model_len, self.num_kv_blocks,
                        self.block_size)
        if params.structured_outputs is not None:
            from llmasos.engine.structured_output import check_constraint

            check_constraint(params.structured_outputs)


class EngineFailed(msgspec.Struct, tag="failed", array_like=True):
    """Sent instead of EngineInfo when the engine could not start (the message names why)."""

    message: str


EngineMessage = EngineCoreOutputs | EngineInfo | EngineFailed

input_encoder = msgspec.msgpack.Encoder()
input_decoder = msgspec.msgpack.Decoder(EngineInput)
output_encoder = msgspec.msgpack.Encoder()
output_decoder = msgspec.msgpack.Decoder(EngineMessage)
