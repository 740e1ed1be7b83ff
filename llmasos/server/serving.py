"""Running the server: load the models, guard the bind address, run uvicorn with graceful shutdown; and the seeds'
`LLMServing` API, which runs the same server in a background thread of the calling process."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import h11
import httpx
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmasos.server.lifecycle import ModelManager
from llmasos.server.protocol import APIError
from llmasos.server.state import ServedModel, ServerSettings
from llmasos.spec import ModelSpec

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_served_model(name_or_path: str | Path | ModelSpec, served_name: str | None = None, *,
                      engine_process: bool = False, **options: Any) -> ServedModel:
    """Resolve a library model, checkpoint directory or spec once, and start its engine: an engine process of its
    own with `engine_process=True` (what `llmasos serve` does), else a thread of this process. `options` are
    resolve_spec's (dtype, device, quantization, engine options)."""
    from llmasos.engine.async_llm import AsyncLLM
    from llmasos.llm import LLM
    from llmasos.spec import resolve_spec

    spec = resolve_spec(name_or_path, **options)
    model_id = served_name or spec.name
    from llmasos.server.score_routes import is_classifier_directory, load_classifier_model

    if is_classifier_directory(spec.directory):  # *ForSequenceClassification: /classify, /v1/score, no engine
        return load_classifier_model(model_id, spec)
    if spec.kind == "seq2seq":  # an encoder-decoder (T5): /v1/completions, decoded by a Seq2SeqService
        from llmasos.server.seq2seq_serving import load_seq2seq_model

        return load_seq2seq_model(model_id, spec)
    if spec.kind == "encoder":  # served on /v1/embeddings, without an engine
        from llmasos.server.embeddings_routes import load_embedding_model

        return load_embedding_model(model_id, spec)
    llm = LLM.from_spec(spec, engine_process=engine_process)
    return ServedModel(id=model_id, llm=llm, async_llm=AsyncLLM(llm), spec=spec)


def check_bind(host: str, allow_unauthenticated: bool) -> None:
    from llmasos.server.auth import active_key_count

    if not is_loopback(host) and active_key_count() == 0 and not allow_unauthenticated:
        raise ValueError(f"refusing to serve on {host} without API keys: create one with `llmasos keys create "
                         "--name NAME`, bind 127.0.0.1, or pass --allow-unauthenticated")


MAX_HEADER_BYTES = 16 << 10  # h11's cap on an incomplete request head: headers past it are a 400


def _timeout_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps(APIError(status, message, code="request_timeout" if status == 408 else "too_many_connections")
                      .body()).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with what an ASGI app cannot see: a deadline on the request head (from the connection,
    or from the first byte of a kept-alive request), a deadline on the body, and a cap on the open connections of one
    client address (refused with 429 before any byte is read). uvicorn itself only times out idle kept-alive
    connections. Subclassed per server by `with_limits`, which gives the class its settings and its counts."""

    header_timeout = 10.0
    body_timeout = 60.0
    max_per_client = 0
    open_per_client: dict[str, int] = {}

    @classmethod
    def with_limits(cls, settings: ServerSettings) -> type[GuardedH11Protocol]:
        return type("GuardedH11Protocol", (cls,), {
            "header_timeout": settings.header_timeout, "body_timeout": settings.body_timeout,
            "max_per_client": settings.max_connections_per_client, "open_per_client": {}})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_phase: str | None = None
        self._counted: str | None = None
        address = self.client[0] if self.client else None
        if address is not None and self.max_per_client:
            if self.open_per_client.get(address, 0) >= self.max_per_client:
                transport.write(_timeout_response(429, "Too Many Requests", f"more than {self.max_per_client} open "
                                                  "connections from this address; reuse connections or close some"))
                transport.close()
                return
            self.open_per_client[address] = self.open_per_client.get(address, 0) + 1
            self._counted = address
        self._arm("head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        if self._counted is not None:
            left = self.open_per_client.get(self._counted, 1) - 1
            if left > 0:
                self.open_per_client[self._counted] = left
            else:
                self.open_per_client.pop(self._counted, None)
            self._counted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        their_state = self.conn.their_state
        if their_state is h11.IDLE:  # a request head under way (or bytes of the next one)
            self._arm("head")
        elif their_state is h11.SEND_BODY:
            self._arm("body")
        else:  # the request is all in
            self._arm(None)

    def on_response_complete(self) -> None:
        self._arm(None)  # waiting for the next request: uvicorn's keep-alive timeout, until its first byte
        super().on_response_complete()

    def _arm(self, phase: str | None) -> None:
        """Start the deadline of `phase` ('head' or 'body'), keep it if already running, or stop it (None)."""
        if phase == self._deadline_phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._deadline_phase = phase
        if phase is not None:
            seconds = self.header_timeout if phase == "head" else self.body_timeout
            self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _expired(self, phase: str, seconds: float) -> None:
        self._deadline, self._deadline_phase = None, None
        if self.transport.is_closing():
            return
        cycle = self.cycle if self.conn.their_state is h11.SEND_BODY else None
        if cycle is None or not cycle.response_started:
            what = "request headers" if phase == "head" else "request body"
            self.transport.write(_timeout_response(408, "Request Timeout", f"the {what} did not arrive within "
                                                   f"{seconds:g} s"))
        if cycle is not None:  # the app sees a disconnect and writes nothing more
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any model loads: a port in use is a clear error at once, not a uvicorn
    traceback minutes later. It listens only once uvicorn serves (asyncio calls listen()), so until the models are
    loaded a client is refused at once rather than left hanging."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        reason = "is already in use (another server runs there? pick another with --port)" \
            if exc.errno in (errno.EADDRINUSE, errno.EACCES) else f"cannot be bound: {exc.strerror or exc}"
        raise OSError(exc.errno, f"{host}:{port} {reason}") from None
    sock.set_inheritable(True)
    return sock


def startup_banner(manager: ModelManager, settings: ServerSettings) -> str:
    """What the operator needs at a glance: URL, models, device, keys."""
    from llmasos.server.auth import active_key_count
    from llmasos.server.lifecycle import describe_keep_alive, device_of

    loaded = manager.loaded()
    lines = [f"LLMasOS serving on http://{settings.host}:{settings.port}/v1",
             f"  web console: http://{settings.host}:{settings.port}/"]
    for model_id, served in loaded.items():
        lines.append(f"  model {model_id}: loaded on {device_of(served)}, "
                     f"{served.num_parameters / 1e6:.1f}M parameters")
    if manager.library:
        lines.append(f"  every library model is served by name, loaded on its first request and kept "
                     f"{describe_keep_alive(manager.keep_alive)} after its last (at most {manager.max_loaded} at once)")
    elif not loaded:
        lines.append("  no models")
    keys = active_key_count()
    if keys:
        lines.append(f"  auth: on ({keys} active API key{'s' if keys != 1 else ''}): clients send "
                     "'Authorization: Bearer <key>'")
    elif settings.allow_unauthenticated and not is_loopback(settings.host):
        lines.append("  auth: OFF on a public interface (--allow-unauthenticated): anyone who reaches it can use it")
    else:
        lines.append("  auth: off (no API keys; `llmasos keys create --name NAME` turns it on)")
    return "\n".join(lines)


def build_server(models: dict[str, ServedModel] | ModelManager, settings: ServerSettings,
                 log_level: str = "info", own_logging: bool = False) -> uvicorn.Server:
    """The uvicorn server. `own_logging`: configure the process's logging (uvicorn's and LLMasOS's loggers, in
    settings.log_format) — what `llmasos serve` wants, and no library embedding a Service does."""
    from llmasos.server.app import create_app
    from llmasos.server.logs import logging_config

    app = create_app(models, settings)
    protocol = GuardedH11Protocol.with_limits(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            log_config=logging_config(log_level, settings.log_format) if own_logging
                            else uvicorn.config.LOGGING_CONFIG,
                            timeout_graceful_shutdown=int(settings.shutdown_timeout), access_log=False,
                            http=protocol, timeout_keep_alive=settings.timeout_keep_alive,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, ws="none")  # no WebSocket routes
    return uvicorn.Server(config)


def run_server(models: dict[str, ServedModel] | ModelManager, settings: ServerSettings, log_level: str = "info",
               sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM/SIGINT: uvicorn stops accepting, drains in-flight requests up to the shutdown timeout,
    then the engines stop. `sock`: a socket bound already (bind_socket)."""
    check_bind(settings.host, settings.allow_unauthenticated)
    from llmasos.server.registry import ServerRecord

    server = build_server(models, settings, log_level, own_logging=True)
    manager = server.config.app.state.llmasos.models
    record = ServerRecord(f"http://{settings.host}:{settings.port}")  # `llmasos rm` asks it what is loaded
    manager.on_change = record.update
    record.update(manager.library_names())
    previous = None
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises SIGTERM once it has drained, to the handler that was there before it: make that a clean
        # exit (status 0, engines stopped below) rather than death by signal. It also covers a SIGTERM that arrives
        # before uvicorn listens.
        previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        manager.close()
        record.remove()
        if sock is not None:
            sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(_signum, _frame) -> None:
    raise SystemExit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """A server running in a background thread of this process, over loaded models or a ModelManager (which may
    serve the library and load on demand)."""

    def __init__(self, models: dict[str, ServedModel] | ModelManager, settings: ServerSettings) -> None:
        self.manager = models if isinstance(models, ModelManager) else ModelManager(models)
        self.models = self.manager.loaded()  # those loaded when the service was made; predict() uses the first
        self.settings = settings
        self.base_url = f"http://{settings.host}:{settings.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._state = None  # the running app's ServerState (instance id, internal token), once started

    def start(self, timeout: float = 60.0) -> Service:
        """Start serving and return once this server's own /health answers 200. Raises if the port is taken (even
        when another server answers there) or the server stops while starting."""
        check_bind(self.settings.host, self.settings.allow_unauthenticated)
        self._server = build_server(self.manager, self.settings, log_level="warning")
        self._state = self._server.config.app.state.llmasos
        self._thread = threading.Thread(target=self._serve, name="llmasos-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():  # uvicorn's thread ends when it cannot bind
                raise RuntimeError(f"the server failed to start on {self.base_url} (is the port in use?)")
            try:
                response = httpx.get(f"{self.base_url}/health", timeout=1.0)
                ours = response.headers.get("x-llmasos-instance") == self._state.instance_id
                if ours and response.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass  # not listening yet; a server that is not ours answering is ignored until our thread ends
            time.sleep(0.05)
        raise TimeoutError(f"the server did not become healthy within {timeout} s")

    def _serve(self) -> None:
        try:
            self._server.run()
        except SystemExit:  # uvicorn leaves its thread this way when it cannot bind; start() reports it
            pass

    def predict(self, text: str, api_key: str | None = None, **params: Any) -> str:
        """Complete `text` with the first served model; `params` are completion fields (max_tokens, temperature)."""
        if self._thread is None or not self._thread.is_alive():
            state = "is not started" if self._thread is None else "has stopped"
            raise RuntimeError(f"the service {state}: call service.start() (or use `with service:`) before predict()")
        model_id = next(iter(self.models))
        # Without a key of the caller's, the service's own process-local token: it works once keys exist, too.
        token = api_key or (self._state.internal_token if self._state is not None else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = httpx.post(f"{self.base_url}/v1/completions", json={"model": model_id, "prompt": text, **params},
                              headers=headers, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"prediction failed ({response.status_code}): {response.text}")
        return response.json()["choices"][0]["text"]

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.settings.shutdown_timeout + 5)
        self.manager.close()  # the models it loaded on demand too

    def __enter__(self) -> Service:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class LLMServing:
    """The seeds' serving API.

    >>> serving = LLMServing.from_pretrained("my_llm")
    >>> service = serving.create_service(port=8000)
    >>> service.start(); service.predict(text="Hello"); service.stop()
    """

    def __init__(self, name_or_path: str | Path | ModelSpec, served_name: str | None = None,
                 engine_process: bool = True, **load_options: Any) -> None:
        self.name_or_path = name_or_path
        self.served_name = served_name
        self.engine_process = engine_process
        self.load_options = load_options

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **load_options: Any) -> LLMServing:
        return cls(name_or_path, **load_options)

    def create_service(self, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> Service:
        """options: ServerSettings fields (max_queue, allow_unauthenticated, ...)."""
        served = load_served_model(self.name_or_path, self.served_name, engine_process=self.engine_process,
                                   **self.load_options)
        settings = ServerSettings(host=host, port=port or free_port(), **options)
        return Service({served.id: served}, settings)
