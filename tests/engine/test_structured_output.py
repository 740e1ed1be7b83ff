"""Structured output in the engine: a tiny random model, constrained by llguidance token masks, always produces
output that parses and validates (JSON schemas, regex, choice, json_object, Lark grammars); constraints that cannot
compile are refused before anything is queued; unconstrained neighbours, preemption, n > 1 and the engine process
are unaffected."""

from __future__ import annotations

import json
import re
import threading
import zlib

import jsonschema
import msgspec
import pytest
import torch
from json_schemas import SCHEMAS

from llmasos import LLM, SamplingParams
from llmasos.engine.core import EngineCore
from llmasos.engine.llm_engine import StepError
from llmasos.engine.protocol import EngineCoreRequest, input_decoder, input_encoder, sampling_to_dict
from llmasos.engine.structured_output import apply_bitmask, check_constraint
from llmasos.engine.validation import StructuredOutputError, StructuredOutputTimeoutError
from llmasos.sampling_params import StructuredOutputsParams

NUM_SAMPLES = 20


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=400, max_num_seqs=64)


def sampled(constraint: dict, n: int = NUM_SAMPLES, seed: int = 0, max_tokens: int = 160, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, n=n, structured_outputs=constraint,
                          **kwargs)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_outputs_parse_and_validate_against_each_json_schema(llm, name):
    schema = SCHEMAS[name]
    seed = zlib.crc32(name.encode()) % 1000  # the same in every process (str hash() is salted per process)
    output = llm.generate("Give me JSON:", sampled({"json": schema}, seed=seed))[0]
    assert len(output.outputs) == NUM_SAMPLES
    texts = set()
    for choice in output.outputs:
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), schema)
        texts.add(choice.text)
    assert len(texts) > 1  # each of the n sequences has its own matcher and draws


def test_a_schema_given_as_a_string_is_the_same_constraint(llm):
    schema = SCHEMAS["person"]
    as_dict = llm.generate("x", sampled({"json": schema}, n=3, seed=4))[0]
    as_text = llm.generate("x", sampled({"json": json.dumps(schema)}, n=3, seed=4))[0]
    assert [c.text for c in as_dict.outputs] == [c.text for c in as_text.outputs]


def test_regex_and_choice_outputs_always_match(llm):
    pattern = r"[a-z]{2,5}-\d{1,3}( [A-Z][a-z]{1,4})?"
    output = llm.generate("Code:", sampled({"regex": pattern}, seed=1))[0]
    for choice in output.outputs:
        assert re.fullmatch(pattern, choice.text), choice.text
        assert choice.finish_reason == "stop"
    options = ["yes", "no", "maybe so", 'say "hi"\n']
    output = llm.generate("Answer:", sampled({"choice": options}, seed=2))[0]
    assert {c.text for c in output.outputs} <= set(options)
    assert len({c.text for c in output.outputs}) > 1
    greedy = llm.generate("Answer:", SamplingParams(max_tokens=20, temperature=0,
                                                     structured_outputs={"choice": options}))[0]
    assert greedy.outputs[0].text in options and greedy.outputs[0].finish_reason == "stop"


def test_eos_is_allowed_only_where_the_grammar_accepts(llm):
    # EOS pushed up by +100: it wins as soon as the mask lets it through, which must not be before [a-z]{3,} holds.
    eos = {token: 100.0 for token in llm.eos_token_ids}
    output = llm.generate("Word:", sampled({"regex": "[a-z]{3,}"}, seed=6, logit_bias=eos))[0]
    for choice in output.outputs:
        assert re.fullmatch("[a-z]{3,}", choice.text), choice.text
        assert choice.finish_reason == "stop" and choice.token_ids[-1] in llm.eos_token_ids
    unconstrained = llm.generate("Word:", SamplingParams(max_tokens=5, temperature=1.0, seed=6, logit_bias=eos))[0]
    assert unconstrained.outputs[0].token_ids == [unconstrained.outputs[0].token_ids[0]]  # EOS at once otherwise
    assert unconstrained.outputs[0].token_ids[0] in llm.eos_token_ids


def test_json_object_always_parses_to_an_object(llm):
    # Any object admits strings of any length, which a random model never closes: favour the closing characters.
    closing = {llm.tokenizer.encode(c)[-1]: 4.0 for c in ('"', "}")}
    output = llm.generate("JSON:", sampled({"json_object": True}, seed=3, max_tokens=300, logit_bias=closing))[0]
    for choice in output.outputs:
        assert choice.finish_reason == "stop", choice.text
        assert isinstance(json.loads(choice.text), dict)


def test_a_lark_grammar_is_enforced(llm):
    grammar = 'start: "(" expr ")"\nexpr: NUMBER (OP NUMBER)*\nNUMBER: /[0-9]{1,3}/\nOP: "+" | "-" | "*"\n'
    output = llm.generate("Math:", sampled({"grammar": grammar}, seed=5))[0]
    for choice in output.outputs:
        assert re.fullmatch(r"\([0-9]{1,3}([-+*][0-9]{1,3})*\)", choice.text), choice.text


def test_temperature_top_p_top_k_and_greedy_all_respect_the_mask(llm):
    schema = SCHEMAS["enums"]
    for extra in (dict(temperature=0), dict(temperature=1.5, top_p=0.5), dict(temperature=0.7, top_k=5),
                  dict(temperature=1.0, min_p=0.1)):
        params = SamplingParams(max_tokens=80, seed=7, n=4 if extra["temperature"] else 1,
                                structured_outputs={"json": schema}, **extra)
        for choice in llm.generate("Pick:", params)[0].outputs:
            jsonschema.validate(json.loads(choice.text), schema)


def test_unconstrained_requests_in_a_mixed_batch_are_identical_to_running_alone(llm):
    prompts = ["The quick brown fox", "To be, or not to be", "operating systems schedule", "héllo wörld"]
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free)]
    mixed_prompts, mixed_params = [], []
    for index, prompt in enumerate(prompts):
        mixed_prompts += [prompt, prompt]
        mixed_params += [free, sampled({"json": SCHEMAS[sorted(SCHEMAS)[index]]}, n=2, seed=index)]
    mixed = llm.generate(mixed_prompts, mixed_params)
    assert [o.outputs[0].token_ids for o in mixed[0::2]] == alone
    for index, output in enumerate(mixed[1::2]):
        for choice in output.outputs:
            jsonschema.validate(json.loads(choice.text), SCHEMAS[sorted(SCHEMAS)[index]])


def test_a_batch_without_constraints_computes_no_masks(llm):
    runner = llm.engine.runner
    before = len(runner.mask_seconds)
    llm.generate(["a b c", "d e f"], SamplingParams(max_tokens=8, temperature=0.8, seed=1))
    assert len(runner.mask_seconds) == before
    llm.generate("a b c", sampled({"json": SCHEMAS["person"]}, n=2))
    assert len(runner.mask_seconds) > before


def test_masks_computed_during_or_after_the_forward_give_the_same_outputs(llm):
    runner = llm.engine.runner
    params = sampled({"json": SCHEMAS["order"]}, n=4, seed=11)
    runner.overlap_masks = False
    try:
        after = [c.text for c in llm.generate("Order:", params)[0].outputs]
    finally:
        runner.overlap_masks = True
    during = [c.text for c in llm.generate("Order:", params)[0].outputs]
    assert during == after


@pytest.mark.parametrize("constraint, message", [
    ({"json": {"type": "objekt"}}, "invalid JSON schema.*objekt"),
    ({"json": {"type": "object", "properties": {"a": {"type": "string"}}, "dependentRequired": {"a": ["b"]}}},
     "dependentRequired"),
    ({"json": {"type": "string", "format": "no-such-format"}}, "no-such-format"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "a(b"}, "invalid regex.*unclosed group"),
    ({"grammar": "start: missing_rule\n"}, "invalid grammar.*missing_rule"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"choice": []}, "non-empty list"),
    ({"jsonschema": {}}, "unknown field 'jsonschema'"),
])
def test_a_constraint_that_cannot_compile_is_refused_before_anything_is_queued(llm, constraint, message):
    with pytest.raises(StructuredOutputError, match=message):
        llm.generate("hi", SamplingParams(max_tokens=5, structured_outputs=constraint))
    assert not llm.engine.has_unfinished()
    assert not llm.engine.scheduler.waiting and not llm.engine.scheduler.running
    assert issubclass(StructuredOutputError, ValueError)
    assert llm.generate("hi", SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids  # still fine


def test_one_bad_constraint_in_a_batch_leaves_nothing_queued(llm):
    good = sampled({"json": SCHEMAS["person"]}, n=2)
    bad = SamplingParams(max_tokens=5, structured_outputs={"json": {"type": "integer", "minimum": "zero"}})
    with pytest.raises(StructuredOutputError, match="JSON schema"):
        llm.generate(["first", "second", "third"], [good, good, bad])
    assert not llm.engine.has_unfinished() and not llm.engine.core.requests
    assert not llm.engine.scheduler.waiting and not llm.engine.scheduler.running


def test_the_engine_core_refuses_a_bad_constraint_synchronously_in_add_request(llm):
    core: EngineCore = llm.engine.core
    bad = SamplingParams(max_tokens=5, structured_outputs={"regex": "(("})
    with pytest.raises(StructuredOutputError, match="regex"):
        core.add_request(EngineCoreRequest("bad-1", [5, 6, 7], sampling_to_dict(bad)))
    assert "bad-1" not in core.requests and not core.scheduler.waiting


def test_compile_time_is_bounded(llm):
    # A large schema that is not cached yet cannot be checked in a microsecond: refused with the timeout error.
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "pattern": f"^[a-z]{{{i}}}[0-9]+$"}
                                               for i in range(1, 200)}}
    with pytest.raises(StructuredOutputTimeoutError, match="did not compile within"):
        check_constraint(StructuredOutputsParams(json=schema), timeout=1e-6)


def test_compiled_grammars_are_cached_by_key(llm):
    grammars = llm.engine.core.grammars
    schema = {"type": "object", "properties": {"cache_probe": {"type": "boolean"}}, "required": ["cache_probe"],
              "additionalProperties": False}
    llm.generate("x", sampled({"json": schema}, n=2))
    compiled = grammars.num_compiled
    reordered = dict(reversed(list(schema.items())))  # the same schema, keys in another order
    llm.generate("y", sampled({"json": reordered}, n=3))
    assert grammars.num_compiled == compiled
    metrics = llm.metrics()
    assert metrics["num_grammars_compiled"] == compiled and metrics["grammar_compile_seconds"] > 0
    assert metrics["num_constrained_requests"] >= 5


def test_apply_bitmask_masks_only_the_constrained_rows_and_the_vocabulary_padding():
    logits = torch.zeros(3, 70)  # 70 model rows, a 64-token bitmask: ids 64..69 are padding, never allowed
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # row 0 allows tokens 0 and 2
    bitmask[1, 1] = -(2 ** 31)  # row 2 allows token 63 only (the sign bit)
    apply_bitmask(logits, [0, 2], bitmask)
    allowed = {(row, token) for row, token in (logits == 0).nonzero().tolist()}
    assert allowed == {(0, 0), (0, 2), (2, 63)} | {(1, token) for token in range(70)}
    every = torch.zeros(2, 64)
    apply_bitmask(every, [0, 1], bitmask)  # all rows constrained: the in-place path
    assert {tuple(x) for x in (every == 0).nonzero().tolist()} == {(0, 0), (0, 2), (1, 63)}


def test_the_constraint_crosses_the_process_boundary_as_plain_data():
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    request = EngineCoreRequest("r", [1, 2], sampling_to_dict(params))
    decoded = input_decoder.decode(input_encoder.encode(request))
    assert decoded.sampling_params().structured_outputs == params.structured_outputs
    assert msgspec.msgpack.decode(input_encoder.encode(request))  # plain MessagePack, no pickle


def test_preempted_constrained_requests_keep_their_matcher_in_step(tiny_checkpoint):
    """A cache of 12 blocks of 16 tokens cannot hold 8 sequences of ~100 tokens: requests are preempted and their
    outputs recomputed; the matchers, which consumed every kept output token, stay right."""
    schemas = [SCHEMAS[name] for name in ("order", "array_of_objects", "nested_address", "tags_array")]
    params = [sampled({"json": schema}, n=2, seed=20 + i, max_tokens=120) for i, schema in enumerate(schemas)]
    prompts = [f"Request number {i}: give JSON" for i in range(len(schemas))]
    small = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=12, max_num_seqs=8)
    squeezed = small.generate(prompts, params)
    assert small.metrics()["num_preemptions"] > 0
    roomy = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=400, max_num_seqs=8).generate(prompts, params)
    for output, reference, schema in zip(squeezed, roomy, schemas, strict=True):
        for choice in output.outputs:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.text), schema)
        assert [c.text for c in output.outputs] == [c.text for c in reference.outputs]


def test_chat_honours_the_constraint(llm):
    schema = SCHEMAS["person"]
    output = llm.chat([{"role": "user", "content": "Who are you?"}], sampled({"json": schema}, n=3))[0]
    for choice in output.outputs:
        jsonschema.validate(json.loads(choice.text), schema)


def test_the_engine_process_enforces_constraints_and_refuses_bad_ones_before_sending(tiny_checkpoint, llm):
    remote = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=400, max_num_seqs=64, engine_process=True)
    try:
        schema = SCHEMAS["array_of_objects"]
        params = sampled({"json": schema}, n=4, seed=9)
        got = remote.generate("Points:", params)[0]
        for choice in got.outputs:
            jsonschema.validate(json.loads(choice.text), schema)
        assert [c.text for c in got.outputs] == [c.text for c in llm.generate("Points:", params)[0].outputs]
        choice = remote.chat([{"role": "user", "content": "ok?"}], sampled({"choice": ["yes", "no"]}, n=2))[0]
        assert {c.text for c in choice.outputs} <= {"yes", "no"}
        with pytest.raises(StructuredOutputError, match="Unimplemented keys"):
            remote.generate("x", SamplingParams(structured_outputs={"json": {"type": "object",
                                                                             "dependentSchemas": {}}}))
        assert not remote.engine.has_unfinished()
        assert remote.generate("x", sampled({"regex": "[0-9]{3}"}, n=1))[0].outputs[0].text.isdigit()
    finally:
        remote.close()


def test_async_llm_checks_constraints_off_the_event_loop_and_refuses_bad_ones(llm):
    import asyncio

    from llmasos.engine.async_llm import AsyncLLM

    async_llm = AsyncLLM(llm)

    async def collect(params: SamplingParams) -> str:
        text = ""
        async for delta in async_llm.generate("Say:", params):
            text += delta.outputs[0].text
        return text

    async def main() -> tuple[str, BaseException | None]:
        text = await collect(sampled({"json": SCHEMAS["any_of"]}, n=1, seed=3))
        try:
            await collect(SamplingParams(structured_outputs={"regex": "[a-"}))
        except StructuredOutputError as exc:
            return text, exc
        return text, None

    try:
        text, error = asyncio.run(main())
    finally:
        async_llm.shutdown()  # an in-process engine only goes idle: the module's LLM stays usable
    jsonschema.validate(json.loads(text), SCHEMAS["any_of"])
    assert isinstance(error, StructuredOutputError) and "regex" in str(error)


def test_the_first_constraint_waits_for_the_tokenizer_while_other_requests_run(tiny_checkpoint, monkeypatch):
    """The llguidance tokenizer (~1 s for a 150k vocabulary) builds in the background on the engine's first
    constraint: the engine goes on stepping the others, and a request aborted while it waits simply goes away."""
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=100)
    engine, core = llm.engine, llm.engine.core
    release = threading.Event()
    build = core.grammars._load
    monkeypatch.setattr(core.grammars, "_load", lambda: (release.wait(60), build()))
    free_id = engine.add_request("The quick", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    json_id = engine.add_request("JSON:", sampled({"json": SCHEMAS["person"]}, n=1))
    doomed = engine.add_request("Digits:", sampled({"regex": "[0-9]+"}, n=1))
    assert len(core._awaiting_grammar) == 2 and core.stats().num_waiting == 3  # with the free one
    done = {}
    for _ in range(50):
        done.update({g.request_id: g.output() for g in engine.step() if g.finished})
        if free_id in done:
            break
    assert len(done[free_id].outputs[0].token_ids) == 6 and not core.grammars.tokenizer_ready
    engine.abort(doomed)
    assert [r.request_id for r in core._awaiting_grammar] == [json_id]
    release.set()
    result = engine.run_to_completion([json_id])[json_id]
    jsonschema.validate(json.loads(result.outputs[0].text), SCHEMAS["person"])
    assert not core.requests and not core.has_work


def test_a_tokenizer_llguidance_cannot_read_fails_the_request_not_the_engine(tiny_checkpoint, tmp_path):
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=100)
    grammars = llm.engine.core.grammars
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    grammars.tokenizer_json = tmp_path / "tokenizer.json"
    with pytest.raises(StepError, match="cannot read this model's tokenizer.json"):
        llm.generate("x", sampled({"regex": "[a-z]+"}, n=1))
    assert not llm.engine.has_unfinished() and not llm.engine.core.requests
    grammars.tokenizer_json = None  # no tokenizer at all: refused at once, in add_request
    fresh = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=100)
    fresh.engine.core.grammars.tokenizer_json = None
    with pytest.raises(StructuredOutputError, match="needs the model's tokenizer.json"):
        fresh.generate("x", sampled({"regex": "[a-z]+"}, n=1))
    assert not fresh.engine.has_unfinished()
    assert fresh.generate("x", SamplingParams(max_tokens=3))[0].outputs[0].token_ids
