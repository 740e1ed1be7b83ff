"""Encoder-decoder (T5) models behind POST /v1/completions: `Seq2SeqService` stands in a ServedModel's LLM and
AsyncLLM, as EmbeddingService does for an encoder, and streams as AsyncLLM does: the model's worker thread decodes one
request at a time (its prompts as one batch), first come first served, and every step's delta (RequestOutput) reaches
the caller's event loop at once, so the completion routes, Job, metering and streaming are the decoder-only ones."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from llmasos.engine.async_llm import EngineDeadError, merge_deltas
from llmasos.engine.validation import ContextLengthError, check_token_ids
from llmasos.outputs import RequestOutput
from llmasos.sampling_params import SamplingParams
from llmasos.server.embeddings_routes import OneAtATimeService
from llmasos.server.state import ServedModel

log = logging.getLogger(__name__)
SEQ2SEQ_TASK = "seq2seq"
DEFAULT_MAX_MODEL_LEN = 512  # T5's relative positions have no hard limit; its checkpoints were trained at 512
_UNBOUNDED = 1 << 20  # a length past this is a placeholder for "no limit", not a trained length


class Seq2SeqService(OneAtATimeService):
    """A Seq2SeqLM behind the server. `max_model_len` bounds the encoder's input and, separately, the tokens the decoder
    may generate (there is no shared context to split between them)."""

    def __init__(self, seq2seq, max_model_len: int) -> None:
        super().__init__()
        self.seq2seq = seq2seq
        self.model, self.tokenizer, self.config = seq2seq.model, seq2seq.tokenizer, seq2seq.config
        self.vocab_size: int = seq2seq.config.vocab_size
        self.max_model_len = max_model_len
        self._in_flight = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (sequences, decode, fail) in arrival order; None: stop
        self._worker = threading.Thread(target=self._work, name="llmasos-seq2seq", daemon=True)
        self._worker.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop: the request decoding now ends after its step, the ones waiting fail (EngineDeadError)."""
        super().shutdown(timeout)
        self._jobs.put(None)
        self._worker.join(timeout)

    @property
    def is_alive(self) -> bool:
        return not self._stopped and self._worker.is_alive()

    def _work(self) -> None:
        """The worker: each request's prompts in one batch, requests in arrival order."""
        while (job := self._jobs.get()) is not None:
            count, decode, fail = job
            with self._count_lock:
                self._waiting -= count
                self._running = count
            try:
                if self._stopped:  # nobody waits forever
                    raise EngineDeadError("the model was unloaded before this request ran")
                decode()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
                if not isinstance(exc, EngineDeadError):
                    log.exception("seq2seq generation failed")
                fail(exc)
            finally:
                self._running = 0

    @property
    def num_in_flight(self) -> int:
        """Requests accepted and not yet finished (waiting for the decoder or decoding)."""
        return self._in_flight

    def validate(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        """Raise a PromptError (ValueError) for a prompt this model can never run: bad ids, an encoder input or a
        max_tokens over max_model_len."""
        check_token_ids(prompt_token_ids, self.vocab_size)
        for what, count in (("the prompt (the encoder's input)", len(prompt_token_ids)),
                            ("max_tokens (the decoder's output)", max_tokens)):
            if count > self.max_model_len:
                raise ContextLengthError(f"This model's maximum context length is {self.max_model_len} tokens for "
                                         f"its encoder's input and, separately, for its decoder's output; {what} "
                                         f"asks for {count}. Please reduce the prompt or max_tokens.",
                                         len(prompt_token_ids), max_tokens, self.max_model_len)

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str,
                       beams: Any = None) -> AsyncIterator[RequestOutput]:
        """Yield deltas (new text and token ids of each of the n outputs) until the request finishes: AsyncLLM's
        `generate` for one prompt (see generate_many)."""
        async with aclosing(self.generate_many([prompt], params, [request_id], beams)) as stream:
            async for _, delta in stream:
                yield delta

    async def generate_many(self, prompts: list[list[int]], params: SamplingParams, request_ids: list[str],
                            beams: Any = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Decode the prompts of one request as one batch: yields (prompt index, delta) until every prompt has
        finished. With `beams` (BeamSettings, num_beams > 1) one delta per prompt at the end, since beam search knows
        its winners only then. Closing the stream early (a client that went away) stops the decoding after its
        current step."""
        if not self.is_alive:
            raise EngineDeadError("the model was unloaded")
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()  # (prompt index, RequestOutput), or an exception
        cancelled = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                cancelled.set()

        def decode() -> None:
            if cancelled.is_set():  # gone while it waited for its turn
                return
            if beams is not None:
                outputs = self.seq2seq.generate(prompts, params, beams=beams)
                for index, output in enumerate(outputs):
                    put((index, RequestOutput(request_ids[index], None, prompts[index], output.outputs, True)))
                return
            done = [False] * len(prompts)
            for groups in self.seq2seq.stream(prompts, params, request_ids):
                if self._stopped:
                    raise EngineDeadError("the model was unloaded while generating this request")
                for index, group in enumerate(groups):
                    if not done[index]:
                        delta = group.output(delta=True)
                        done[index] = delta.finished
                        put((index, delta))
                if cancelled.is_set():
                    return

        count = params.n * len(prompts)
        self._in_flight += len(prompts)
        with self._count_lock:
            self._waiting += count
        self._jobs.put((count, decode, put))
        unfinished, held = len(prompts), None
        try:
            while unfinished:
                item = held if held is not None else await deltas.get()
                held = None
                if isinstance(item, BaseException):
                    raise item
                index, delta = item
                # Deltas of a prompt that piled up while the caller was busy travel as one, as AsyncLLM's do.
                while not delta.finished and not deltas.empty():
                    following = deltas.get_nowait()
                    if isinstance(following, BaseException) or following[0] != index:
                        held = following
                        break
                    delta = merge_deltas(delta, following[1])
                yield index, delta
                if delta.finished:
                    unfinished -= 1
        finally:
            self._in_flight -= len(prompts)
            cancelled.set()


def context_length(seq2seq) -> int:
    """The length an encoder-decoder checkpoint says it was made for: config.json's n_positions, else 512."""
    value = seq2seq.config.raw.get("n_positions")
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _UNBOUNDED:
        return value
    return DEFAULT_MAX_MODEL_LEN


def load_seq2seq_model(model_id: str, spec) -> ServedModel:
    """A ServedModel for an encoder-decoder spec; engine options (KV cache, batch sizes) do not apply to it."""
    from llmasos.pipelines.seq2seq import Seq2SeqLM

    seq2seq = Seq2SeqLM.load(spec, dtype="float32" if spec.dtype in ("auto", None) else spec.dtype,
                             device=spec.device or "cpu")
    service = Seq2SeqService(seq2seq, context_length(seq2seq))
    return ServedModel(id=model_id, llm=service, async_llm=service, spec=seq2seq.spec, task=SEQ2SEQ_TASK)


def check_seq2seq_chat(served: ServedModel, body) -> None:
    """Chat on an encoder-decoder model: its chat template renders the encoder's input; without a template (T5's
    checkpoints have none) it is the 400 of a model that serves no chat. Tools and structured output are 400s."""
    from llmasos.server.app import wrong_kind_message
    from llmasos.server.protocol import APIError

    if served.task != SEQ2SEQ_TASK:
        return
    if not (served.chat_template or served.llm.tokenizer.chat_template):
        raise APIError(400, wrong_kind_message(served.id, served.task, ("generate",)), param="model",
                       code="model_not_supported")
    if body.tools:
        raise APIError(400, f"tools are served for decoder-only models, not for model {served.id!r} (an "
                       "encoder-decoder model)", param="tools")
    if body.max_completion_tokens == 0 or body.max_tokens == 0:
        raise APIError(400, f"max_tokens must be at least 1 for model {served.id!r}, an encoder-decoder model",
                       param="max_completion_tokens" if body.max_completion_tokens == 0 else "max_tokens")
    _check_structured(served, body)


def _check_structured(served: ServedModel, body) -> None:
    from llmasos.server.protocol import APIError

    if body.structured_outputs is not None or (body.response_format is not None
                                               and body.response_format.type != "text"):
        param = "structured_outputs" if body.structured_outputs is not None else "response_format"
        raise APIError(400, f"structured output is served for decoder-only models, not for model {served.id!r} "
                       "(an encoder-decoder model)", param=param)


def completion_beams(served: ServedModel, body) -> Any:
    """The BeamSettings a completion request asks for (None: greedy or sampled decoding), and a 400 for what an
    encoder-decoder model does not do here: echo (its prompt is the encoder's input, not the start of its text),
    max_tokens 0 (nothing to score), structured output."""
    from llmasos.pipelines.beam_search import BeamSettings
    from llmasos.server.protocol import APIError

    wants_beams = body.num_beams is not None and body.num_beams > 1
    if served.task != SEQ2SEQ_TASK:
        if wants_beams:
            raise APIError(400, f"beam search (num_beams) is served for encoder-decoder models; model {served.id!r} "
                           "decodes greedily (temperature 0) or by sampling", param="num_beams")
        return None
    if body.max_tokens is not None and body.max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1 for model {served.id!r}, an encoder-decoder model (it "
                       "cannot score its prompt)", param="max_tokens")
    if body.echo:
        raise APIError(400, f"echo is not supported by model {served.id!r}: an encoder-decoder model's prompt is its "
                       "encoder's input, not the start of its text", param="echo")
    _check_structured(served, body)
    if body.logprobs is not None and wants_beams:
        raise APIError(400, "logprobs are not returned with beam search", param="logprobs")
    if not wants_beams:
        return None
    if body.temperature not in (None, 0):
        raise APIError(400, "beam search is deterministic: leave temperature unset (or 0) with num_beams > 1",
                       param="temperature")
    if body.n > body.num_beams:
        raise APIError(400, f"n={body.n} is more sequences than num_beams={body.num_beams} beams can return",
                       param="n")
    return BeamSettings(body.num_beams, 1.0 if body.length_penalty is None else body.length_penalty,
                        False if body.early_stopping is None else body.early_stopping, body.n)
