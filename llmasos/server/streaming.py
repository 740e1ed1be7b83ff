"""One generation job of the HTTP API and how it reaches the client: the engine streams behind a request, the
server-sent-event response that meters tokens only once their chunk was handed to the connection, and the
disconnect watch that aborts the engine's work for a client that went away (streamed or not)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from llmasos.sampling_params import SamplingParams
from llmasos.server.auth import KeyInfo
from llmasos.server.ledger_store import Entry
from llmasos.server.metering import Admission
from llmasos.server.state import ServedModel, ServerState

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long a request that ended waits for its final usage write (database or journal) before its response ends
# anyway: normally milliseconds; during an outage the writer keeps the bill and the client is not kept waiting.
FINAL_WRITE_WAIT = 2.0


def usage_entry(state: ServerState, served: ServedModel, key: KeyInfo | None, route: str, request_id: str,
                prompt_tokens: int, model: str | None = None) -> Entry:
    """A request's ledger entry, before admission: its prompt tokens and their cost."""
    model = model or served.id
    cost = state.settings.price_table.cost(model, served.num_parameters, prompt_tokens, 0, base=served.id)
    return Entry(record_id=request_id, key_name=key.name if key else None, model=model, route=route,
                 request_id=request_id, prompt_tokens=prompt_tokens, cost=cost)


async def admit_metered(state: ServerState, key: KeyInfo | None, entry: Entry, max_tokens: int, sequences: int = 1,
                        max_sequences_per_key: int | None = None) -> Admission:
    """Admit the request (off the event loop: a database transaction, which also opens its usage row) and hand its
    entry to the ledger."""
    admission = await run_in_threadpool(state.limiter.admit, key, entry.prompt_tokens, max_tokens, sequences,
                                        max_sequences_per_key, entry)
    state.ledger.open(entry, written=admission.admission_id is not None)
    return admission


async def settle(state: ServerState, admission: Admission, entry: Entry) -> None:
    """The request ended: its final usage goes to the ledger, its limits are given back here, and the response
    waits (a little) for the final write. Never raises: a bill not written yet stays with the ledger's writer."""
    try:
        future = state.ledger.finish(entry)
        state.limiter.release_here(admission, entry.prompt_tokens + entry.completion_tokens)
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), FINAL_WRITE_WAIT)
    except asyncio.TimeoutError:
        log.debug("the usage of request %s is not written yet; the metering writer keeps it", entry.request_id)
    except Exception:  # noqa: BLE001 - a delivered response is never turned into an error by its bill
        log.exception("metering request %s failed", entry.request_id)


class ClientGone(Exception):
    """The client disconnected before its answer could be sent."""


@dataclass
class Job:
    """One HTTP generation request: what it asked for and how many completion tokens were sent for it."""

    state: ServerState
    served: ServedModel
    route: str
    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    admission: Admission
    entry: Entry  # its usage in the ledger, opened at admission
    started: float = field(default_factory=time.monotonic)
    completion_tokens: int = 0  # tokens sent to the client: the amount metered
    accounted: bool = False
    lora: str | None = None  # the LoRA adapter the request named as its model (served unmerged on `served`)
    beams: Any = None  # BeamSettings of an encoder-decoder model's beam search (Seq2SeqService.generate)

    @property
    def model(self) -> str:
        """The model id the request named and the response, usage row and metrics carry: the adapter's, or the
        served model's."""
        return self.lora or self.served.id

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def metered(self) -> None:
        """The tokens sent so far, for the ledger's next flush (memory only: safe on the event loop)."""
        cost = self.state.settings.price_table.cost(self.model, self.served.num_parameters, self.prompt_tokens,
                                                    self.completion_tokens, base=self.served.id)
        self.state.ledger.update(self.entry, self.prompt_tokens, self.completion_tokens, cost)

    async def finish(self) -> None:
        """Final usage for exactly the tokens sent, and the key's limits given back. Runs once, on every exit; never
        raises (see `settle`)."""
        if self.accounted:
            return
        self.accounted = True
        model_id, metrics = self.model, self.state.metrics
        try:
            self.metered()
        finally:
            metrics.prompt_tokens.labels(model_id).inc(self.prompt_tokens)
            metrics.generation_tokens.labels(model_id).inc(self.completion_tokens)
            await settle(self.state, self.admission, self.entry)

    async def run(self) -> AsyncIterator[tuple[int, object]]:
        """Deltas of every prompt's request, as (prompt index, RequestOutput), interleaved as they come. Closing
        this iterator early aborts the engine requests still running."""
        last = None
        ttft, itl = self.state.metrics.ttft.labels(self.model), self.state.metrics.itl.labels(self.model)
        async with aclosing(self._deltas()) as deltas:
            async for index, item in deltas:
                count = sum(len(o.token_ids) for o in item.outputs)
                if count:
                    now = time.monotonic()
                    if last is None:
                        ttft.observe(now - self.started)
                    else:
                        itl.observe((now - last) / count)
                    last = now
                yield index, item

    async def _deltas(self) -> AsyncIterator[tuple[int, object]]:
        engine = self.served.async_llm
        options = {"beams": self.beams} if self.beams is not None else {}
        if len(self.prompts) == 1:  # the usual case: read the engine stream directly, no task or queue in between
            async with aclosing(engine.generate(self.prompts[0], self.params, f"{self.request_id}-0",
                                                **options)) as stream:
                async for delta in stream:
                    yield 0, delta
            return
        if hasattr(engine, "generate_many"):  # an encoder-decoder's service: the prompts decode as one batch
            async with aclosing(engine.generate_many(self.prompts, self.params, [
                    f"{self.request_id}-{index}" for index in range(len(self.prompts))], **options)) as stream:
                async for index, delta in stream:
                    yield index, delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt: list[int]) -> None:
            try:
                async with aclosing(engine.generate(prompt, self.params, f"{self.request_id}-{index}",
                                                    **options)) as stream:
                    async for delta in stream:
                        await queue.put((index, delta))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                await queue.put((index, exc))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(self.prompts)]
        open_streams = len(tasks)
        try:
            while open_streams:
                index, item = await queue.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()  # each pump's engine stream then aborts its request
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)


# Characters that some clients' line splitters (Python's str.splitlines, which httpx's aiter_lines has used) take as
# line ends although SSE ends lines at CR and LF only: inside an event's JSON they are written escaped, so that a
# model that generates one never cuts an event in two. (JSON already escapes every control character below 0x20.)
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def event_json(data: dict) -> str:
    """JSON for one server-sent event: UTF-8 as is, except the characters that break lines for some clients."""
    return json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKERS)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else event_json(data)}\n\n"


DONE = sse("[DONE]")  # the last event of every stream; it carries no tokens


class ChunkFormat:
    """The events of one stream share everything but their choice: serialise that common part once."""

    def __init__(self, base: dict) -> None:
        self.head = "data: " + event_json({**base, "choices": []})[:-2]  # ends with '['

    def __call__(self, choice: dict) -> str:
        return f"{self.head}{event_json(choice)}]}}\n\n"


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(work: Awaitable[T], receive) -> T:
    """Await `work` (a non-streamed generation); if the client disconnects first, cancel it — which aborts its engine
    requests — and raise ClientGone."""
    gone = False
    result: T | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            nonlocal gone
            await _until_disconnect(receive)
            gone = True
            group.cancel_scope.cancel()

        group.start_soon(watch)
        result = await work
        group.cancel_scope.cancel()
    if gone:
        raise ClientGone
    return result  # type: ignore[return-value]


class MeteredStream(StreamingResponse):
    """Server-sent events of one job. `events` yields (event text, completion tokens in it). A chunk's tokens count
    once the chunk has been handed to the open connection — not when generated — so a client that disconnects pays
    for exactly what was sent; the disconnect cancels the events, which aborts the engine requests; and the job is
    accounted however the response ends (even if it never started)."""

    def __init__(self, job: Job, events: AsyncIterator[tuple[str, int]], headers: dict[str, str]) -> None:
        super().__init__(events, headers=headers, media_type="text/event-stream")
        self.job, self.events = job, events
        self.disconnected = False

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    await _until_disconnect(receive)
                    self.disconnected = True
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await self._send_events(send)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
                await self.job.finish()

    async def _send_events(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for text, num_tokens in self.events:
                if text == DONE:  # usage is written first: a client that stops reading at "[DONE]" finds it
                    with anyio.CancelScope(shield=True):
                        await self.job.finish()
                # One pass of the event loop first: a disconnect the server already saw cancels us here, unsent.
                await anyio.lowlevel.checkpoint()
                await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": True})
                if self.disconnected:  # the connection went away while the chunk waited to be written
                    return
                if num_tokens:
                    self.job.completion_tokens += num_tokens
                    self.job.metered()
        except Exception:  # noqa: BLE001 - the status line is gone; report in the stream, details only in the log
            log.exception("generation failed during a stream")
            error = {"message": "internal server error: generation stopped", "type": "server_error", "param": None,
                     "code": None}
            await send({"type": "http.response.body", "body": sse({"error": error}).encode(), "more_body": True})
        # Usage is written before the response ends (already done before a "[DONE]"; finish runs once).
        with anyio.CancelScope(shield=True):
            await self.job.finish()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
