"""POST /v1/completions and /v1/chat/completions: validation, limits, generation through AsyncLLM, streaming as
server-sent events, and exact metering of what each key was served (streams and disconnects included)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llmasos.errors import TemplateError
from llmasos.sampling_params import SamplingParams
from llmasos.server.app import parse_body, served_model
from llmasos.server.auth import record_usage
from llmasos.server.formatting import chat_logprobs, completion_logprobs
from llmasos.server.metering import Admission
from llmasos.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from llmasos.server.state import ServedModel, ServerState


@dataclass
class Job:
    """One HTTP generation request: what it asked for and what it has been served so far."""

    state: ServerState
    served: ServedModel
    route: str
    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    admission: Admission
    started: float = field(default_factory=time.monotonic)
    completion_tokens: int = 0
    accounted: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def account(self) -> None:
        """Write usage for exactly the tokens served, then release the key's limits. Runs once, on every exit."""
        if self.accounted:
            return
        self.accounted = True
        model_id, metrics = self.served.id, self.state.metrics
        key = self.admission.key
        cost = self.state.settings.price_table.cost(model_id, self.served.num_parameters, self.prompt_tokens,
                                                    self.completion_tokens)
        try:
            record_usage(key.name if key else None, model_id, self.route, self.request_id, self.prompt_tokens,
                         self.completion_tokens, cost)
        finally:
            self.state.limiter.release(self.admission, self.prompt_tokens + self.completion_tokens)
            metrics.prompt_tokens.labels(model_id).inc(self.prompt_tokens)
            metrics.generation_tokens.labels(model_id).inc(self.completion_tokens)

    async def run(self) -> AsyncIterator[tuple[int, object]]:
        """Deltas of every prompt's request, as (prompt index, RequestOutput), interleaved as they come."""
        queue: asyncio.Queue = asyncio.Queue()
        engine = self.served.async_llm

        async def pump(index: int, prompt: list[int]) -> None:
            try:
                async with aclosing(engine.generate(prompt, self.params, f"{self.request_id}-{index}")) as stream:
                    async for delta in stream:
                        await queue.put((index, delta))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                await queue.put((index, exc))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(self.prompts)]
        open_streams = len(tasks)
        last = None
        try:
            while open_streams:
                index, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                now = time.monotonic()
                count = sum(len(o.token_ids) for o in item.outputs)
                if count:
                    histogram = self.state.metrics
                    if last is None:
                        histogram.ttft.labels(self.served.id).observe(now - self.started)
                    else:
                        histogram.itl.labels(self.served.id).observe((now - last) / count)
                    last = now
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _sampling(served: ServedModel, body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """Request fields over the model's defaults (Modelfile PARAMETERs, then generation_config)."""
    defaults = {**served.llm.default_sampling().__dict__, **served.default_params}
    pick = lambda name, value: defaults.get(name) if value is None else value  # noqa: E731
    stop = body.stop if body.stop is not None else defaults.get("stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature", body.temperature), top_p=pick("top_p", body.top_p),
            top_k=pick("top_k", body.top_k), min_p=pick("min_p", body.min_p), seed=body.seed, stop=stop,
            n=body.n, logprobs=logprobs, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=pick("repetition_penalty",
                                                                                body.repetition_penalty),
            min_tokens=min(body.min_tokens, max_tokens), ignore_eos=body.ignore_eos,
            logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


def _check_context(served: ServedModel, prompts: list[list[int]], max_tokens: int, param: str) -> None:
    vocab = served.llm.config.vocab_size
    for prompt in prompts:
        if not prompt:
            raise APIError(400, "the prompt is empty", param=param)
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param=param)
        if len(prompt) + max_tokens > served.max_model_len:
            raise APIError(400, f"This model's maximum context length is {served.max_model_len} tokens. However, "
                           f"you requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, "
                           f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           param=param, code="context_length_exceeded")


def _admit(state: ServerState, served: ServedModel, request: Request, prompts: list[list[int]], max_tokens: int,
           n: int) -> tuple[Admission, int]:
    """Limits and the queue: returns the admission and max_tokens capped by the key's remaining quota."""
    waiting = served.llm.engine.scheduler.waiting
    if len(waiting) >= state.settings.max_queue:
        raise APIError(503, f"the server is overloaded ({len(waiting)} requests waiting); retry shortly",
                       type="server_error", code="overloaded", headers={"Retry-After": "1"})
    admission = state.limiter.admit(request.state.key, sum(len(p) for p in prompts), max_tokens * n * len(prompts))
    if admission.max_completion_tokens is not None:
        max_tokens = min(max_tokens, admission.max_completion_tokens // (n * len(prompts)))
    return admission, max_tokens


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(job: Job) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def _normalize_prompts(prompt, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt, and its text (what echo returns: the prompt as sent, when it was text)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)], [tokenizer.decode(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return tokenizer.encode_batch(list(prompt)), list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt], [tokenizer.decode(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, token ids or a list of token-id lists",
                   param="prompt")


def add_generation_routes(router: APIRouter, state: ServerState) -> None:
    @router.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parse_body(request, CompletionRequest)
        return await _completions(state, request, body)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        return await _chat(state, request, body)


async def _completions(state: ServerState, request: Request, body: CompletionRequest):
    served = served_model(state, body.model, request.state.key)
    tokenizer = served.llm.tokenizer
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    prompts, prompt_texts = _normalize_prompts(body.prompt, tokenizer)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and body.stream:
        raise APIError(400, "max_tokens=0 cannot be streamed", param="max_tokens")
    _check_context(served, prompts, max_tokens, "prompt")
    params = _sampling(served, body, max_tokens, body.logprobs)
    admission, max_tokens = _admit(state, served, request, prompts, max_tokens, body.n)
    params.max_tokens = max_tokens
    request_id = f"cmpl-{uuid.uuid4().hex}"
    job = Job(state, served, "completions", request_id, prompts, params, admission)
    created = int(time.time())
    headers = state.limiter.headers(request.state.key)
    handed_to_stream = False
    try:
        prompt_entries = None
        if body.echo and body.logprobs is not None:
            prompt_entries = [await run_in_threadpool(served.llm.prompt_logprobs, p, body.logprobs) for p in prompts]
        if body.stream:
            handed_to_stream = True  # the stream accounts for itself when it ends
            return StreamingResponse(_stream_completions(job, body, created, prompt_entries, prompt_texts),
                                     headers=headers,
                                     media_type="text/event-stream")
        texts = [[""] * body.n for _ in prompts]
        tokens = [[[] for _ in range(body.n)] for _ in prompts]
        logprobs = [[[] for _ in range(body.n)] for _ in prompts]
        finish = [[None] * body.n for _ in prompts]
        if max_tokens > 0:
            async for index, delta in job.run():
                for out in delta.outputs:
                    texts[index][out.index] += out.text
                    tokens[index][out.index] += out.token_ids
                    logprobs[index][out.index] += out.logprobs or []
                    finish[index][out.index] = out.finish_reason
        job.completion_tokens = sum(len(t) for per_prompt in tokens for t in per_prompt)
        choices = []
        for p, prompt in enumerate(prompts):
            prompt_text = prompt_texts[p] if body.echo else ""
            for i in range(body.n):
                choice_logprobs = None
                if body.logprobs is not None:
                    ids, entries = list(tokens[p][i]), list(logprobs[p][i])
                    if body.echo:
                        ids, entries = prompt + ids, list(prompt_entries[p]) + entries
                    choice_logprobs = completion_logprobs(tokenizer, ids, entries)
                choices.append({"index": p * body.n + i, "text": prompt_text + texts[p][i],
                                "logprobs": choice_logprobs, "finish_reason": finish[p][i] or "length"})
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": served.id,
                             "choices": choices, "usage": _usage(job)}, headers=headers)
    finally:
        if not handed_to_stream:
            job.account()


async def _stream_completions(job: Job, body: CompletionRequest, created: int, prompt_entries, prompt_texts):
    tokenizer, n = job.served.llm.tokenizer, body.n
    base = {"id": job.request_id, "object": "text_completion", "created": created, "model": job.served.id}
    try:
        if body.echo:
            for p, prompt in enumerate(job.prompts):
                for i in range(n):
                    logprobs = (completion_logprobs(tokenizer, prompt, prompt_entries[p])
                                if prompt_entries is not None else None)
                    yield _sse({**base, "choices": [{"index": p * n + i, "text": prompt_texts[p],
                                                      "logprobs": logprobs, "finish_reason": None}]})
        async for index, delta in job.run():
            for out in delta.outputs:
                if not out.text and not out.token_ids and out.finish_reason is None:
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(tokenizer, out.token_ids, out.logprobs or [])
                job.completion_tokens += len(out.token_ids)
                yield _sse({**base, "choices": [{"index": index * n + out.index, "text": out.text,
                                                  "logprobs": logprobs, "finish_reason": out.finish_reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(job)})
        yield _sse("[DONE]")
    finally:
        job.account()


def _render_chat(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if served.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": served.system_prompt})
    try:
        return served.llm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, tokenize=True,
            chat_template=served.chat_template, **(body.chat_template_kwargs or {}))
    except TemplateError as exc:
        raise APIError(400, f"could not render the chat template: {exc}", param="messages") from None


async def _chat(state: ServerState, request: Request, body: ChatCompletionRequest):
    served = served_model(state, body.model, request.state.key)
    tokenizer = served.llm.tokenizer
    prompt = _render_chat(served, body)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is None:
        requested = served.default_params.get("max_tokens") or max(1, served.max_model_len - len(prompt))
    _check_context(served, [prompt], requested, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(served, body, requested, top)
    admission, max_tokens = _admit(state, served, request, [prompt], requested, body.n)
    params.max_tokens = max_tokens
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    job = Job(state, served, "chat.completions", request_id, [prompt], params, admission)
    created = int(time.time())
    headers = state.limiter.headers(request.state.key)
    if body.stream:
        return StreamingResponse(_stream_chat(job, body, created), headers=headers, media_type="text/event-stream")
    try:
        texts, tokens, entries = [""] * body.n, [[] for _ in range(body.n)], [[] for _ in range(body.n)]
        finish: list[str | None] = [None] * body.n
        async for _, delta in job.run():
            for out in delta.outputs:
                texts[out.index] += out.text
                tokens[out.index] += out.token_ids
                entries[out.index] += out.logprobs or []
                finish[out.index] = out.finish_reason
        job.completion_tokens = sum(len(t) for t in tokens)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": chat_logprobs(tokenizer, tokens[i], entries[i], top) if body.logprobs else None,
                    "finish_reason": finish[i] or "length"} for i in range(body.n)]
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": served.id,
                             "choices": choices, "usage": _usage(job)}, headers=headers)
    finally:
        job.account()


async def _stream_chat(job: Job, body: ChatCompletionRequest, created: int):
    tokenizer = job.served.llm.tokenizer
    top = (body.top_logprobs or 0) if body.logprobs else None
    base = {"id": job.request_id, "object": "chat.completion.chunk", "created": created, "model": job.served.id}
    try:
        for i in range(body.n):
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
        async for _, delta in job.run():
            for out in delta.outputs:
                if not out.text and not out.token_ids and out.finish_reason is None:
                    continue
                job.completion_tokens += len(out.token_ids)
                logprobs = chat_logprobs(tokenizer, out.token_ids, out.logprobs or [], top) if body.logprobs else None
                yield _sse({**base, "choices": [{"index": out.index, "delta": {"content": out.text} if out.text else {},
                                                  "logprobs": logprobs, "finish_reason": out.finish_reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(job)})
        yield _sse("[DONE]")
    finally:
        job.account()
