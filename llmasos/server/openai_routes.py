"""POST /v1/completions and /v1/chat/completions: validation (all of it before queueing), limits, generation
through AsyncLLM, and the OpenAI response shapes, streamed as server-sent events or whole."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from llmasos.engine.validation import (
    ContextLengthError,
    PromptError,
    StructuredOutputError,
    check_token_ids,
    validate_prompt,
)
from llmasos.errors import TemplateError
from llmasos.sampling_params import SamplingParams, StructuredOutputsParams
from llmasos.server.app import parse_body, use_model
from llmasos.server.formatting import chat_logprobs, completion_logprobs
from llmasos.server.ledger_store import Entry
from llmasos.server.metering import Admission
from llmasos.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields, StructuredFields
from llmasos.server.seq2seq_serving import SEQ2SEQ_TASK, check_seq2seq_chat, completion_beams
from llmasos.server.state import ServedModel, ServerState
from llmasos.server.streaming import (
    ChunkFormat,
    ClientGone,
    Job,
    MeteredStream,
    admit_metered,
    cancel_on_disconnect,
    sse,
    usage_entry,
)
from llmasos.tool_calls import ToolCallParser, ToolError, ToolPlan, parse_output, plan_tools, prepare_messages

# Arguments of apply_chat_template that the request sets through its own fields, never through chat_template_kwargs.
_RESERVED_TEMPLATE_ARGS = {"messages", "add_generation_prompt", "tokenize", "chat_template", "special_tokens",
                           "special_tokens_in_content", "conversation", "return_dict"}
CLIENT_CLOSED = 499  # nginx's "client closed request": recorded in metrics, never seen by the client


def _sampling(served: ServedModel, body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The request's fields over the model's defaults, merged by the one rule (ModelSpec.sampling_params)."""
    min_tokens = body.min_tokens if body.min_tokens is not None else served.spec.sampling_defaults().get("min_tokens")
    _check_logit_bias(served, body.logit_bias)
    try:
        return served.spec.sampling_params(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            min_p=body.min_p, seed=body.seed, stop=body.stop, n=body.n, logprobs=logprobs,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
            min_tokens=None if min_tokens is None else min(min_tokens, max_tokens),
            logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


MAX_LOGIT_BIAS_ENTRIES = 1024  # OpenAI accepts up to 300; each entry costs work in every step of the request


def _check_logit_bias(served: ServedModel, logit_bias: dict[str, float] | None) -> None:
    """Up front: a bounded number of entries, each a token id of this model's vocabulary."""
    if not logit_bias:
        return
    if len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise APIError(400, f"logit_bias has {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed",
                       param="logit_bias")
    vocab = _vocab_size(served)
    for key in logit_bias:
        if not (key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab):
            shown = key if len(key) <= 20 else key[:20] + "..."
            raise APIError(400, f"logit_bias key {shown!r} is not a token id of this model (0..{vocab - 1})",
                           param="logit_bias")


def _vocab_size(served: ServedModel) -> int:
    return served.llm.vocab_size if served.task == SEQ2SEQ_TASK else served.llm.engine.info.vocab_size


def _check_prompts(served: ServedModel, prompts: list[list[int]], max_tokens: int, param: str) -> None:
    """Vocabulary, context length and KV-cache size: the engine's own check (validate_prompt), as OpenAI errors."""
    if served.task == SEQ2SEQ_TASK:  # encoder input and decoder output are bounded each on its own
        for prompt in prompts:
            try:
                served.llm.validate(prompt, max_tokens)
            except PromptError as exc:
                raise APIError(400, str(exc), param=param, code="context_length_exceeded"
                               if isinstance(exc, ContextLengthError) else None) from None
        return
    info = served.llm.engine.info
    for prompt in prompts:
        try:
            validate_prompt(prompt, max_tokens, info.vocab_size, info.max_model_len, info.num_kv_blocks,
                            info.block_size)
        except ContextLengthError as exc:
            raise APIError(400, f"This model's maximum context length is {exc.max_model_len} tokens. However, "
                           f"you requested {exc.num_prompt_tokens + exc.max_tokens} tokens ({exc.num_prompt_tokens} "
                           f"in the prompt, {exc.max_tokens} for the completion). Please reduce the prompt or "
                           "max_tokens.", param=param, code="context_length_exceeded") from None
        except PromptError as exc:
            raise APIError(400, str(exc), param=param) from None


def _check_engine(served: ServedModel) -> None:
    if not served.async_llm.is_alive:
        raise APIError(503, f"the engine of model {served.id!r} is not running (it may be restarting); retry "
                       "shortly", type="server_error", code="engine_unavailable", headers={"Retry-After": "1"})


async def _admit(state: ServerState, served: ServedModel, request: Request, prompts: list[list[int]],
                 max_tokens: int, n: int, entry: Entry) -> tuple[Admission, int]:
    """Limits and the queue: returns the admission and max_tokens capped by the key's remaining quota.

    Every sequence (prompts x n) counts against the queue, the key's concurrency and its fair share of the server;
    rpm counts requests (OpenAI's rule). A request that could never fit is a 400, one that cannot fit now a 429/503
    with Retry-After, so no single request can starve the others."""
    settings = state.settings
    sequences = len(prompts) * n
    if len(prompts) > settings.max_prompts_per_request:
        raise APIError(400, f"{len(prompts)} prompts in one request; at most {settings.max_prompts_per_request} are "
                       "allowed", param="prompt")
    if sequences > settings.max_sequences_per_request:
        raise APIError(400, f"the request asks for {sequences} sequences ({len(prompts)} prompts x n={n}); at most "
                       f"{settings.max_sequences_per_request} are allowed per request", param="n")
    stats = served.llm.metrics()  # as the engine last reported them: never waits for a step
    # Queued in the scheduler, or accepted by AsyncLLM but not yet handed to the engine (a lower bound when n > 1).
    waiting = max(stats["num_waiting"], served.async_llm.num_in_flight - stats["num_running"])
    if waiting + sequences > settings.max_queue:
        raise APIError(503, f"the server is overloaded ({waiting} sequences waiting, this request adds {sequences}); "
                       "retry shortly", type="server_error", code="overloaded", headers={"Retry-After": "1"})
    admission = await admit_metered(state, request.state.key, entry, max_tokens * sequences, sequences,
                                    settings.max_sequences_per_key)
    if admission.max_completion_tokens is not None:
        max_tokens = min(max_tokens, admission.max_completion_tokens // sequences)
    return admission, max_tokens


CHARS_PER_TOKEN_BOUND = 64  # no tokenizer we load makes tokens this long: text beyond this cannot fit the context


def _check_prompt_size(served: ServedModel, prompt) -> None:
    """Before tokenizing: text far longer than the context could ever be is refused at once (a 4 MB prompt would
    otherwise cost seconds of tokenizer time to learn that)."""
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)] \
        if isinstance(prompt, list) else []
    limit = served.max_model_len * CHARS_PER_TOKEN_BOUND
    for text in texts:
        if len(text) > limit:
            raise APIError(400, f"This model's maximum context length is {served.max_model_len} tokens; a prompt of "
                           f"{len(text)} characters cannot fit. Please reduce the prompt.", param="prompt",
                           code="context_length_exceeded")


def _normalize_prompts(served: ServedModel, prompt) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt, and its text (what echo returns: the prompt as sent, when it was text)."""
    tokenizer = served.llm.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return tokenizer.encode_batch(list(prompt)), list(prompt)
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    elif not all(isinstance(p, list) for p in prompt):
        raise APIError(400, "prompt must be a string, a list of strings, token ids or a list of token-id lists",
                       param="prompt")
    prompts = [list(p) for p in prompt]
    for ids in prompts:  # before decoding: the tokenizer must never see a bad id
        try:
            check_token_ids(ids, _vocab_size(served))
        except PromptError as exc:
            raise APIError(400, str(exc), param="prompt") from None
    return prompts, [tokenizer.decode(p) for p in prompts]


def _requested_constraint(body: StructuredFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """The output constraint a request asks for (OpenAI's response_format or vLLM's structured_outputs), and the
    field that asked for it."""
    fmt, structured = body.response_format, body.structured_outputs
    if structured is not None and fmt is not None and fmt.type != "text":
        raise APIError(400, "give either response_format or structured_outputs, not both", param="structured_outputs")
    try:
        if structured is not None:
            return StructuredOutputsParams.coerce(structured), "structured_outputs"
        if fmt is None or fmt.type == "text":
            return None, None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True), "response_format"
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema (a JSON schema)",
                           param="response_format.json_schema")
        return StructuredOutputsParams(json=fmt.json_schema.schema_), "response_format"
    except StructuredOutputError as exc:
        raise APIError(400, str(exc), param="structured_outputs" if structured is not None else "response_format") \
            from None


async def _check_constraint(state: ServerState, served: ServedModel, constraint: StructuredOutputsParams | None,
                            param: str | None) -> None:
    """Check (compile) the constraint before anything is queued: an invalid or unsupported schema, regex or grammar,
    or one that takes too long to compile, is the request's 400. Checked constraints are cached by key."""
    if constraint is None:
        return
    from llmasos.engine.structured_output import check_constraint

    started = time.perf_counter()
    try:
        await run_in_threadpool(check_constraint, constraint)
    except StructuredOutputError as exc:
        raise APIError(400, str(exc), param=param) from None
    finally:
        state.metrics.structured_compile.labels(served.id).observe(time.perf_counter() - started)
    state.metrics.structured_requests.labels(served.id, constraint.kind).inc()


def add_generation_routes(router: APIRouter, state: ServerState) -> None:
    @router.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parse_body(request, CompletionRequest)
        return await _completions(state, request, body)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        return await _chat(state, request, body)


async def _collect(job: Job, request: Request,
                   prompt_logprobs: dict[int, list] | None = None) -> dict[tuple[int, int], dict]:
    """Run a non-streamed job to the end: per (prompt, choice) its text, token ids, logprobs and finish reason
    (and, into `prompt_logprobs`, each prompt's scores when the job asked for them). A client that disconnects
    meanwhile raises ClientGone, and its engine requests are aborted."""
    results: dict[tuple[int, int], dict] = {}

    async def consume() -> None:
        async for index, delta in job.run():
            if prompt_logprobs is not None and delta.prompt_logprobs is not None:
                prompt_logprobs[index] = delta.prompt_logprobs
            for out in delta.outputs:
                entry = results.setdefault((index, out.index), {"text": "", "ids": [], "logprobs": [], "finish": None})
                entry["text"] += out.text
                entry["ids"] += out.token_ids
                entry["logprobs"] += out.logprobs or []
                entry["finish"] = out.finish_reason

    await cancel_on_disconnect(consume(), request.receive)
    empty = {"text": "", "ids": [], "logprobs": [], "finish": "length"}
    return {(p, i): results.get((p, i), empty) for p in range(len(job.prompts)) for i in range(job.params.n)}


async def _completions(state: ServerState, request: Request, body: CompletionRequest):
    served = await use_model(state, request, body.model, ("generate", SEQ2SEQ_TASK), body.keep_alive)
    beams = completion_beams(served, body)  # and the 400s of what an encoder-decoder model does not do
    tokenizer = served.llm.tokenizer
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    _check_prompt_size(served, body.prompt)
    prompts, prompt_texts = await run_in_threadpool(_normalize_prompts, served, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and body.stream:
        raise APIError(400, "max_tokens=0 cannot be streamed", param="max_tokens")
    _check_prompts(served, prompts, max_tokens, "prompt")
    params = _sampling(served, body, max_tokens, body.logprobs)
    params.lora = request.state.lora
    if beams is not None:  # deterministic: the beams' scores decide, not draws
        params.temperature = 0.0
    constraint, param = _requested_constraint(body)
    await _check_constraint(state, served, constraint, param)
    params.structured_outputs = constraint
    _check_engine(served)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    entry = usage_entry(state, served, request.state.key, "completions", request_id, sum(len(p) for p in prompts),
                        params.lora)
    admission, max_tokens = await _admit(state, served, request, prompts, max_tokens, body.n, entry)
    params.max_tokens = max_tokens
    scores_prompt = body.echo and body.logprobs is not None
    if scores_prompt:  # the prompt's logprobs come from the engine's own prefill of it, under its token budget
        params.prompt_logprobs = body.logprobs
    job = Job(state, served, "completions", request_id, prompts, params, admission, entry, lora=params.lora,
              beams=beams)
    request.state.job = job  # for the access log: its token counts once the response is sent
    created = int(time.time())
    headers = state.limiter.headers(request.state.key)
    handed_to_stream = False
    try:
        if body.stream:
            handed_to_stream = True  # the stream accounts for itself, however it ends
            return MeteredStream(job, _stream_completions(job, body, created, prompt_texts), headers)
        prompt_entries: dict[int, list] = {}
        try:
            results = await _collect(job, request, prompt_entries)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)  # nothing was sent, so no completion tokens are metered
        job.completion_tokens = sum(len(r["ids"]) for r in results.values())
        choices = []
        for (p, i), result in results.items():
            choice_logprobs = None
            if body.logprobs is not None:
                ids, entries = result["ids"], result["logprobs"]
                if body.echo:
                    ids, entries = prompts[p] + ids, list(prompt_entries[p]) + entries
                choice_logprobs = completion_logprobs(tokenizer, ids, entries)
            choices.append({"index": p * body.n + i, "text": (prompt_texts[p] if body.echo else "") + result["text"],
                            "logprobs": choice_logprobs, "finish_reason": result["finish"] or "length"})
        return JSONResponse({"id": job.request_id, "object": "text_completion", "created": created,
                             "model": job.model, "choices": choices, "usage": job.usage()}, headers=headers)
    finally:
        if not handed_to_stream:
            await job.finish()


async def _stream_completions(job: Job, body: CompletionRequest, created: int, prompt_texts):
    """(event, completion tokens in it) for MeteredStream, which counts the tokens once the event is sent. With echo,
    each prompt's chunk comes first — once the engine has scored the prompt, when logprobs were asked for."""
    tokenizer, n = job.served.llm.tokenizer, body.n
    base = {"id": job.request_id, "object": "text_completion", "created": created, "model": job.model}
    chunk = ChunkFormat(base)
    scores_prompt = job.params.prompt_logprobs is not None
    echoed: set[int] = set() if body.echo else set(range(len(job.prompts)))
    held: dict[int, list] = {}  # deltas of a prompt whose scores have not arrived yet
    offsets: dict[int, int] = {}  # per choice: text_offset of its next token, continuous across chunks

    def echo(p: int, entries) -> list[tuple[str, int]]:
        logprobs = completion_logprobs(tokenizer, job.prompts[p], entries) if entries is not None else None
        if logprobs is not None:
            for i in range(n):
                offsets[p * n + i] = _end_offset(logprobs)
        return [(chunk({"index": p * n + i, "text": prompt_texts[p], "logprobs": logprobs, "finish_reason": None}),
                 0) for i in range(n)]

    if body.echo and not scores_prompt:
        for p in range(len(job.prompts)):
            for event in echo(p, None):
                yield event
            echoed.add(p)
    async with aclosing(job.run()) as deltas:
        async for index, first in deltas:
            if index not in echoed:
                if first.prompt_logprobs is None:
                    held.setdefault(index, []).append(first)
                    continue
                for event in echo(index, first.prompt_logprobs):
                    yield event
                echoed.add(index)
            for delta in [*held.pop(index, []), first]:
                for out in delta.outputs:
                    if not out.text and not out.token_ids and out.finish_reason is None:
                        continue
                    logprobs = None
                    choice = index * n + out.index
                    if body.logprobs is not None:
                        logprobs = completion_logprobs(tokenizer, out.token_ids, out.logprobs or [],
                                                       offsets.get(choice, 0))
                        offsets[choice] = _end_offset(logprobs, offsets.get(choice, 0))
                    yield chunk({"index": choice, "text": out.text, "logprobs": logprobs,
                                 "finish_reason": out.finish_reason}), len(out.token_ids)
    if body.stream_options and body.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": job.usage()}), 0
    yield sse("[DONE]"), 0


def _end_offset(logprobs: dict, start: int = 0) -> int:
    """The text_offset after the last token of a completions-logprobs block."""
    if not logprobs["tokens"]:
        return start
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def _message(message) -> dict:
    out = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role == "tool":
        out["name"] = message.name
    return out


def _render_chat(served: ServedModel, body: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
    """The prompt's token ids. Tools in play (tool_choice other than none) go to the template's own `tools`, or, for a
    template without them, into the system message; earlier tool calls and results are rendered either way."""
    messages = [_message(m) for m in body.messages]
    if served.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": served.system_prompt})
    extra = dict(body.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_ARGS & extra.keys())
    if reserved:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}: use the request's own fields",
                       param="chat_template_kwargs")
    for name in ("tools", "documents"):
        value = extra.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise APIError(400, f"chat_template_kwargs.{name} must be a list of objects",
                           param=f"chat_template_kwargs.{name}")
    if plan.tools and "tools" in extra:
        raise APIError(400, "give tools in the request's tools field, not also in chat_template_kwargs",
                       param="chat_template_kwargs.tools")
    try:
        messages, template_tools = prepare_messages(served.llm.tokenizer, served.chat_template, messages, plan)
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    if template_tools is not None:
        extra["tools"] = template_tools
    try:
        return served.llm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, tokenize=True,
            chat_template=served.chat_template, special_tokens_in_content=False, **extra)
    except TemplateError as exc:
        raise APIError(400, f"could not render the chat template: {exc}", param="messages") from None


def _tools_of(state: ServerState, served: ServedModel, body: ChatCompletionRequest) -> ToolPlan:
    try:
        return plan_tools(served.llm.tokenizer, served.chat_template, body.tools, body.tool_choice,
                          body.parallel_tool_calls, state.settings.tool_call_parser)
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


async def _chat(state: ServerState, request: Request, body: ChatCompletionRequest):
    served = await use_model(state, request, body.model, ("generate", SEQ2SEQ_TASK), body.keep_alive)
    check_seq2seq_chat(served, body)  # a 400 unless it is decoder-only or has a chat template
    tokenizer = served.llm.tokenizer
    _check_prompt_size(served, [m.text() for m in body.messages])
    plan = _tools_of(state, served, body)
    parser, forced = plan.parser, plan.constraint
    constraint, param = _requested_constraint(body)
    if forced is not None and constraint is not None:
        raise APIError(400, f"{param} cannot be combined with tool_choice {body.tool_choice!r}: the output is then a "
                       "tool call; use tool_choice auto or none", param=param)
    if forced is not None:
        constraint, param = forced, "tools"
    await _check_constraint(state, served, constraint, param)
    prompt = await run_in_threadpool(_render_chat, served, body, plan)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is None and served.task == SEQ2SEQ_TASK:  # the decoder's own length, not shared with the prompt
        requested = served.spec.sampling_defaults().get("max_tokens") or served.max_model_len
    elif requested is None:  # as much as the context and the whole KV cache leave room for
        info = served.llm.engine.info
        room = min(info.max_model_len, info.num_kv_blocks * info.block_size) - len(prompt)
        requested = served.spec.sampling_defaults().get("max_tokens") or max(1, room)
    _check_prompts(served, [prompt], requested, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(served, body, requested, top)
    params.lora = request.state.lora
    params.structured_outputs = constraint
    _check_engine(served)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    entry = usage_entry(state, served, request.state.key, "chat.completions", request_id, len(prompt), params.lora)
    admission, max_tokens = await _admit(state, served, request, [prompt], requested, body.n, entry)
    params.max_tokens = max_tokens
    job = Job(state, served, "chat.completions", request_id, [prompt], params, admission, entry, lora=params.lora)
    request.state.job = job
    created = int(time.time())
    headers = state.limiter.headers(request.state.key)
    if body.stream:
        return MeteredStream(job, _stream_chat(job, body, created, parser, forced is not None), headers)
    try:
        try:
            results = await _collect(job, request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        job.completion_tokens = sum(len(r["ids"]) for r in results.values())
        choices = []
        for (_, i), r in results.items():
            message, finish = _assistant_message(r["text"], parser), r["finish"] or "length"
            if message.get("tool_calls"):
                finish = "tool_calls"
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": chat_logprobs(tokenizer, r["ids"], r["logprobs"], top) if body.logprobs
                            else None})
        return JSONResponse({"id": job.request_id, "object": "chat.completion", "created": created,
                             "model": job.model, "choices": choices, "usage": job.usage()}, headers=headers)
    finally:
        await job.finish()


def _assistant_message(text: str, parser: ToolCallParser | None) -> dict:
    content, calls = parse_output(ToolPlan([], None, parser, None), text)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


async def _stream_chat(job: Job, body: ChatCompletionRequest, created: int, parser: ToolCallParser | None = None,
                       forced: bool = False):
    """(event, completion tokens in it) for MeteredStream; the first event of each choice carries the role.

    With tools in play, text that may be a tool call is held back (all of it when calls are forced); once the choice
    ends, its calls go out in OpenAI's delta shape — per call its index, id and name, then its arguments — so that
    the deltas add up to the non-streamed message. Tokens of held text are counted with the event that sends them."""
    tokenizer = job.served.llm.tokenizer
    top = (body.top_logprobs or 0) if body.logprobs else None
    base = {"id": job.request_id, "object": "chat.completion.chunk", "created": created, "model": job.model}
    chunk = ChunkFormat(base)
    for i in range(body.n):
        yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}), 0
    texts: dict[int, str] = {}
    sent: dict[int, int] = {}  # characters of each choice's text sent as content
    held: dict[int, int] = {}  # tokens generated but not yet sent
    async with aclosing(job.run()) as deltas:
        async for _, delta in deltas:
            for out in delta.outputs:
                if not out.text and not out.token_ids and out.finish_reason is None:
                    continue
                logprobs = chat_logprobs(tokenizer, out.token_ids, out.logprobs or [], top) if body.logprobs else None
                if parser is None:
                    yield chunk({"index": out.index, "delta": {"content": out.text} if out.text else {},
                                 "logprobs": logprobs, "finish_reason": out.finish_reason}), len(out.token_ids)
                    continue
                i = out.index
                text = texts[i] = texts.get(i, "") + out.text
                tokens = held.pop(i, 0) + len(out.token_ids)
                if out.finish_reason is None:
                    safe = 0 if forced else parser.safe_prefix(text)
                    if text[:safe].strip() and safe > sent.get(i, 0):
                        piece, sent[i] = text[sent.get(i, 0):safe], safe
                        yield chunk({"index": i, "delta": {"content": piece}, "logprobs": logprobs,
                                     "finish_reason": None}), tokens
                    else:
                        held[i] = tokens
                    continue
                message = _assistant_message(text, parser)
                rest = (message["content"] or "")[sent.get(i, 0):]
                calls = message.get("tool_calls", [])
                if rest or not calls:
                    yield chunk({"index": i, "delta": {"content": rest} if rest else {}, "logprobs": logprobs,
                                 "finish_reason": None if calls else out.finish_reason}), tokens
                    tokens = 0
                for n, call in enumerate(calls):
                    head = {"index": n, "id": call["id"], "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""}}
                    yield chunk({"index": i, "delta": {"tool_calls": [head]}, "logprobs": None,
                                 "finish_reason": None}), tokens
                    tokens = 0
                    arguments = {"index": n, "function": {"arguments": call["function"]["arguments"]}}
                    yield chunk({"index": i, "delta": {"tool_calls": [arguments]}, "logprobs": None,
                                 "finish_reason": "tool_calls" if n == len(calls) - 1 else None}), 0
    if body.stream_options and body.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": job.usage()}), 0
    yield sse("[DONE]"), 0
