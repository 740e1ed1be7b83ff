"""AsyncLLM: the asyncio front of the engine. A background thread runs engine steps; callers await streams of
incremental outputs; cancelling a stream (a client that went away) aborts its request and frees its blocks at once."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmasos.engine.llm_engine import StepError
from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an unexpected error; the process should be restarted."""


class AsyncLLM:
    """Wraps an `LLM` for concurrent use from asyncio.

    >>> async for delta in async_llm.generate("Hello", SamplingParams(max_tokens=8)):
    ...     print(delta.outputs[0].text, end="")
    """

    def __init__(self, llm) -> None:
        self.llm = llm
        self.engine = llm.engine
        self._streams: dict[str, _Stream] = {}
        self._pending: queue.SimpleQueue = queue.SimpleQueue()  # ("add", id, ids, params) | ("abort", id)
        self._wakeup = threading.Event()
        self._stopping = False
        self._finished = False  # the engine thread has left its loop; set before its last sweep of the streams
        self.error: BaseException | None = None
        self._counter = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmasos-engine", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping and not self._finished

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def new_request_id(self, prefix: str = "req") -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError now if the engine would refuse the request (context length, cache size, vocabulary)."""
        self.engine._validate(prompt_token_ids, params)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield deltas (new text and token ids of each of the n outputs) until the request finishes."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        params = params or SamplingParams()
        token_ids = self.llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(token_ids, params)
        request_id = request_id or self.new_request_id()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        if self._finished:  # checked after registering: the engine thread's last sweep either saw us or ended first
            self._streams.pop(request_id, None)
            raise EngineDeadError("the engine is not running")
        self._pending.put(("add", request_id, token_ids, params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                # Deltas that piled up while the caller was busy travel as one: under load, a client gets fewer,
                # larger chunks instead of the event loop falling further behind the engine.
                while not isinstance(item, BaseException) and not item.finished and not stream.queue.empty():
                    following = stream.queue.get_nowait()
                    item = following if isinstance(following, BaseException) else _merge(item, following)
                if isinstance(item, BaseException):
                    raise item  # a refused request (ValueError) or an EngineDeadError
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._pending.put(("abort", request_id))
        self._wakeup.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    # -- engine thread -----------------------------------------------------------------------------------------
    def _drain_pending(self) -> None:
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, request_id, token_ids, params = item
                if request_id not in self._streams:  # cancelled before it started
                    continue
                try:
                    self.engine.add_request(token_ids, params, request_id=request_id)
                except Exception as exc:  # validated already; report rather than kill the loop
                    self._deliver(request_id, exc)
            else:
                self.engine.abort(item[1])

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # that caller's event loop is closed: nobody is listening any more
                self._streams.pop(request_id, None)

    def _deliver_all(self, items: list[tuple[str, RequestOutput]]) -> None:
        """A step's outputs, handed to each event loop in one call: one wake-up per loop and step, not per request."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def _run(self) -> None:
        reason = "the engine was shut down"
        try:
            while not self._stopping:
                self._drain_pending()
                if self.engine.scheduler.num_unfinished == 0 and not self.engine.groups:
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                try:
                    groups = self.engine.step()
                except StepError as exc:  # that step's requests were aborted; the engine goes on serving
                    log.error("%s", exc)
                    for request_id in exc.request_ids:
                        self._deliver(request_id, RuntimeError(str(exc)))
                    continue
                self._deliver_all([(group.request_id, group.output(delta=True)) for group in groups])
        except BaseException as exc:  # noqa: BLE001 - the thread must report any failure to every waiter
            log.exception("engine loop failed")
            self.error = exc
            reason = f"the engine failed: {exc}"
        finally:
            # Nobody may wait forever: every stream still open (shutdown or failure) ends with EngineDeadError.
            self._finished = True
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(reason))


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream_queue, item in batch:
        stream_queue.put_nowait(item)


def _merge(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one delta."""
    earlier = {out.index: out for out in first.outputs}
    outputs = []
    for out in second.outputs:
        before = earlier.get(out.index)
        if before is None:
            outputs.append(out)
            continue
        logprobs = None if before.logprobs is None and out.logprobs is None else \
            (before.logprobs or []) + (out.logprobs or [])
        outputs.append(CompletionOutput(out.index, before.text + out.text, before.token_ids + out.token_ids,
                                        out.finish_reason, logprobs, out.stop_reason))
    return RequestOutput(second.request_id, second.prompt, second.prompt_token_ids, outputs, second.finished,
                         second.num_cached_tokens)
