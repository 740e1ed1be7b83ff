"""AsyncLLM: the asyncio front of an engine. A background thread drives the engine (runs in-process steps, or
receives an engine process's outputs and detokenizes them); callers await streams of incremental outputs; cancelling a
stream (a client that went away) aborts its request at once. An engine process that dies fails the requests in flight
and is restarted (a bounded number of times)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmasos.engine.core_client import EngineDeadError
from llmasos.engine.llm_engine import StepError
from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.sampling_params import SamplingParams

log = logging.getLogger(__name__)
MAX_RESTARTS = 3  # engine process restarts within RESTART_WINDOW seconds before the engine is given up
RESTART_WINDOW = 600.0

__all__ = ["AsyncLLM", "EngineDeadError"]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    """Wraps an `LLM` for concurrent use from asyncio.

    >>> async for delta in async_llm.generate("Hello", SamplingParams(max_tokens=8)):
    ...     print(delta.outputs[0].text, end="")
    """

    def __init__(self, llm, max_restarts: int = MAX_RESTARTS) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.max_restarts = max_restarts
        self.restarts: list[float] = []  # when the engine process was restarted
        self._streams: dict[str, _Stream] = {}
        self._pending: queue.SimpleQueue = queue.SimpleQueue()  # ("add", id, ids, params) | ("abort", id)
        self._wakeup = threading.Event()
        self._stopping = False
        self._restarting = False
        self._finished = False  # the engine thread has left its loop; set before its last sweep of the streams
        self.error: BaseException | None = None
        self._counter = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmasos-engine", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return (self._thread.is_alive() and self.error is None and not self._stopping and not self._finished
                and not self._restarting and self.engine.client.is_alive)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def new_request_id(self, prefix: str = "req") -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise a PromptError (ValueError) now if the engine would refuse the request."""
        self.engine.validate(prompt_token_ids, params)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield deltas (new text and token ids of each of the n outputs) until the request finishes."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        params = params or SamplingParams()
        token_ids = self.llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if params.structured_outputs is not None:  # a schema not seen before compiles off the event loop
            from llmasos.engine.structured_output import check_constraint

            await asyncio.to_thread(check_constraint, params.structured_outputs)
        self.validate(token_ids, params)
        request_id = request_id or self.new_request_id()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        if self._finished:  # checked after registering: the engine thread's last sweep either saw us or ended first
            self._streams.pop(request_id, None)
            raise EngineDeadError("the engine is not running")
        self._pending.put(("add", request_id, token_ids, params))
        self._wake()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                # Deltas that piled up while the caller was busy travel as one: under load, a client gets fewer,
                # larger chunks instead of the event loop falling further behind the engine.
                while not isinstance(item, BaseException) and not item.finished and not stream.queue.empty():
                    following = stream.queue.get_nowait()
                    item = following if isinstance(following, BaseException) else merge_deltas(item, following)
                if isinstance(item, BaseException):
                    raise item  # a refused request (ValueError), a failed step or an EngineDeadError
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
        self._wake()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout)
        self.engine.shutdown()

    def _wake(self) -> None:
        self._wakeup.set()
        self.engine.wake()

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
                except EngineDeadError:
                    raise
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
                try:
                    self._drain_pending()
                    if self.engine.in_process and not self.engine.has_unfinished():
                        self._wakeup.wait(timeout=0.5)
                        self._wakeup.clear()
                        continue
                    self._wakeup.clear()
                    groups = self.engine.step()
                except StepError as exc:  # that step's requests were aborted; the engine goes on serving
                    log.error("%s", exc)
                    for request_id in exc.request_ids:
                        self._deliver(request_id, RuntimeError(str(exc)))
                    continue
                except EngineDeadError as exc:
                    if self._stopping:
                        break
                    self._recover(exc)
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

    def _recover(self, exc: EngineDeadError) -> None:
        """The engine process died: fail what was in flight at once, then start a new process (bounded)."""
        self._restarting = True
        log.error("%s; failing %d request(s) in flight", exc, len(self.engine.groups))
        for request_id in self.engine.fail_all():
            self._deliver(request_id, EngineDeadError(f"the engine stopped while generating: {exc}"))
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW]
        if len(self.restarts) >= self.max_restarts:
            raise EngineDeadError(f"{exc}; it was restarted {len(self.restarts)} times in the last "
                                  f"{RESTART_WINDOW:.0f} s, giving up") from exc
        self.restarts.append(now)
        log.warning("restarting the engine process (restart %d of at most %d)", len(self.restarts),
                    self.max_restarts)
        self.engine.client.restart()
        log.warning("the engine process is back (pid %d)", self.engine.client.process.pid)
        # Requests that arrived meanwhile were queued; the ones already handed to the dead engine were failed.
        self._restarting = False


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream_queue, item in batch:
        stream_queue.put_nowait(item)


def merge_deltas(first: RequestOutput, second: RequestOutput) -> RequestOutput:
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
    prompt_logprobs = first.prompt_logprobs if second.prompt_logprobs is None else second.prompt_logprobs
    return RequestOutput(second.request_id, second.prompt, second.prompt_token_ids, outputs, second.finished,
                         second.num_cached_tokens, prompt_logprobs)
