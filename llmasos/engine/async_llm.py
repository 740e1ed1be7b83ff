"""AsyncLLM: the asyncio front of the engine. A background thread runs engine steps; callers await streams of
incremental outputs; cancelling a stream (a client that went away) aborts its request and frees its blocks at once."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmasos.outputs import RequestOutput
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
        self.error: BaseException | None = None
        self._counter = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmasos-engine", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

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
        self._pending.put(("add", request_id, token_ids, params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item}") from item
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
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_pending()
                if self.engine.scheduler.num_unfinished == 0 and not self.engine.groups:
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                for group in self.engine.step():
                    self._deliver(group.request_id, group.output(delta=True))
        except BaseException as exc:  # noqa: BLE001 - the thread must report any failure to every waiter
            log.exception("engine loop failed")
            self.error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, exc)
