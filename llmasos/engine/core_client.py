"""How the front end reaches an engine core: in this process (InprocClient: each call to get_outputs runs one step),
or in an engine process of its own (MPClient: ZeroMQ sockets carrying MessagePack, a busy loop on the other side).
Both have one interface, so LLM, AsyncLLM and the server never know which one they drive."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import zmq

from llmasos.engine.core import EngineCore
from llmasos.engine.protocol import (
    AbortRequests,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineFailed,
    EngineInfo,
    EngineStats,
    LoadLoRA,
    Shutdown,
    UnloadLoRA,
    input_encoder,
    output_decoder,
)
from llmasos.errors import LLMasOSError
from llmasos.spec import ModelSpec

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine stopped (its process died, or its loop failed); requests in flight on it are lost."""


class EngineStartError(LLMasOSError, RuntimeError):
    """The engine process could not load its model; the message says why (the process's exception, e.g. a
    ModelLoadError, arrives as text, so this is the error users see: the CLI prints it as one line)."""


class InprocClient:
    """The engine core in the caller's process: get_outputs runs one step (the caller's thread does the work)."""

    in_process = True

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.info: EngineInfo = core.info

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> InprocClient:
        return cls(EngineCore.from_spec(spec))

    @property
    def is_alive(self) -> bool:
        return True

    def add_request(self, request: EngineCoreRequest) -> None:
        self.core.add_request(request)

    def abort(self, request_ids: list[str]) -> None:
        self.core.abort(request_ids)

    def has_work(self) -> bool:
        return self.core.has_work

    def load_lora(self, name: str, path: str) -> None:
        self.core.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self.core.unload_lora(name)

    def list_loras(self) -> dict[str, str]:
        return self.core.list_loras()

    def get_outputs(self, timeout: float = 0.0) -> EngineCoreOutputs | None:
        return self.core.step() if self.core.has_work else None

    def stats(self) -> EngineStats:
        return self.core.stats()

    def wake(self) -> None:
        pass

    def restart(self) -> None:
        raise EngineDeadError("an in-process engine cannot be restarted")

    def shutdown(self, timeout: float = 5.0) -> None:
        pass


class MPClient:
    """An engine process: started with `python -m llmasos.engine.core_process`, the spec on its stdin (which stays
    open: the engine exits when it closes, so a parent killed with -9 leaves no orphan), ZeroMQ for everything else.
    """

    in_process = False

    def __init__(self, spec: ModelSpec, startup_timeout: float = 600.0) -> None:
        self.spec = spec
        self.startup_timeout = startup_timeout
        self._send_lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._stats = EngineStats()
        self._closed = False
        # Adapters the engine serves (name -> path), kept here so a restarted engine process gets them back.
        self._loras: dict[str, str] = {}
        self._lora_targets: dict | None = None
        try:
            for name, path in spec.lora_adapters.items():
                self._check_lora(name, path)
                self._loras[name] = str(path)
            self._start()
        except BaseException:
            self._close_wake_pipe()
            raise

    def _close_wake_pipe(self) -> None:
        self._closed = True
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)

    # -- life cycle --------------------------------------------------------------------------------------------
    def _start(self) -> None:
        self._directory = tempfile.mkdtemp(prefix="llmasos-engine-")
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(f"ipc://{self._directory}/input")
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(f"ipc://{self._directory}/output")
        self._poller = zmq.Poller()
        self._poller.register(self._output, zmq.POLLIN)
        self._poller.register(self._wake_read, zmq.POLLIN)
        from llmasos.threads import engine_process_env

        env = {**os.environ, **engine_process_env()}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmasos.engine.core_process", "--input", f"ipc://{self._directory}/input",
             "--output", f"ipc://{self._directory}/output", "--parent-pid", str(os.getpid())],
            stdin=subprocess.PIPE, env=env)
        spec = self.spec.replace(lora_adapters=self._loras)
        self.process.stdin.write(json.dumps(spec.to_dict()).encode() + b"\n")
        self.process.stdin.flush()
        self._last_check = time.monotonic()
        try:
            self.info = self._wait_ready()
        except BaseException:
            self._stop_process(kill=True)
            raise
        log.info("engine process %d serves %s", self.process.pid, self.spec.name)

    def _wait_ready(self) -> EngineInfo:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._output.poll(100):
                message = output_decoder.decode(self._output.recv())
                if isinstance(message, EngineInfo):
                    return message
                if isinstance(message, EngineFailed):
                    raise EngineStartError(message.message)
            elif self.process.poll() is not None:
                raise EngineStartError(f"the engine process for {self.spec.name} exited with status "
                                       f"{self.process.returncode} while loading (see its log above)")
        raise EngineStartError(f"the engine process for {self.spec.name} did not start within "
                               f"{self.startup_timeout:.0f} s")

    @property
    def is_alive(self) -> bool:
        return not self._closed and self.process.poll() is None

    def restart(self) -> None:
        """Replace a dead engine process with a fresh one (its requests are lost; the caller has failed them)."""
        self._stop_process(kill=True)
        self._start()

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        try:
            with self._send_lock:
                self._input.send(input_encoder.encode(Shutdown()), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._stop_process(kill=False, timeout=timeout)
        self._close_wake_pipe()

    def _stop_process(self, kill: bool, timeout: float = 5.0) -> None:
        process = getattr(self, "process", None)
        if process is not None:
            if not kill:
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    kill = True
            if kill and process.poll() is None:
                process.kill()
                process.wait()
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        self._context.destroy(linger=0)
        shutil.rmtree(self._directory, ignore_errors=True)

    # -- requests ----------------------------------------------------------------------------------------------
    def _send(self, message) -> None:
        data = input_encoder.encode(message)
        with self._send_lock:
            while True:  # a PUSH socket whose peer is gone would block forever: never block, check the peer
                try:
                    self._input.send(data, zmq.NOBLOCK)
                    return
                except zmq.Again:
                    self._check_alive()
                    time.sleep(0.001)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(request)

    def _check_lora(self, name: str, path: str) -> None:
        """Read and check an adapter here against the base's layer shapes (from config.json, on the meta device),
        so a bad adapter is this caller's LoRAError rather than a log line in the engine process."""
        from llmasos.engine.lora import LoRAError, checkpoint_targets, read_lora_adapter

        if not isinstance(name, str) or not name:
            raise LoRAError(f"a LoRA adapter needs a non-empty name, got {name!r}")
        if name in self._loras and self._loras[name] != str(path):
            raise LoRAError(f"a LoRA adapter named {name!r} is already loaded (from {self._loras[name]}); unload it "
                            "first")
        if self._lora_targets is None:
            self._lora_targets = checkpoint_targets(self.spec.directory)
        read_lora_adapter(path, self._lora_targets, self.spec.engine.max_lora_rank, name)

    def load_lora(self, name: str, path: str) -> None:
        from pathlib import Path

        path = str(Path(path).expanduser())
        self._check_lora(name, path)
        if self._loras.get(name) == path:
            return
        self._send(LoadLoRA(name, path))
        self._loras[name] = path

    def unload_lora(self, name: str) -> None:
        from llmasos.engine.lora import LoRAError

        if name not in self._loras:
            raise LoRAError(f"no LoRA adapter named {name!r} is loaded (loaded: {', '.join(self._loras) or 'none'})")
        self._send(UnloadLoRA(name))
        del self._loras[name]

    def list_loras(self) -> dict[str, str]:
        return dict(self._loras)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(AbortRequests(list(request_ids)))

    def has_work(self) -> bool:
        return True  # the process decides; outputs arrive when there are any

    def wake(self) -> None:
        """Make a get_outputs that is waiting return now (the caller has requests to hand over)."""
        if self._closed:  # its descriptors may already belong to another file
            return
        try:
            os.write(self._wake_write, b"x")
        except (BlockingIOError, OSError):
            pass

    def get_outputs(self, timeout: float = 0.1) -> EngineCoreOutputs | None:
        """The engine's next batch of outputs, or None after `timeout` seconds or a wake(). Raises EngineDeadError
        once the engine process is gone."""
        events = dict(self._poller.poll(int(timeout * 1000)))
        if self._wake_read in events:
            try:
                os.read(self._wake_read, 4096)
            except BlockingIOError:
                pass
        if self._output in events:
            message = output_decoder.decode(self._output.recv())
            if isinstance(message, EngineCoreOutputs):
                self._stats = message.stats
                now = time.monotonic()
                if now - self._last_check > 0.2:  # under steady output, still notice a death within a second
                    self._last_check = now
                    self._check_alive()
                return message
            return None
        self._last_check = time.monotonic()
        self._check_alive()
        return None

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise EngineDeadError(f"the engine process of {self.spec.name} died (exit status "
                                  f"{self.process.returncode})")

    def stats(self) -> EngineStats:
        return self._stats


def make_client(spec: ModelSpec, engine_process: bool = False) -> InprocClient | MPClient:
    """The one option that picks where the engine runs."""
    return MPClient(spec) if engine_process else InprocClient.from_spec(spec)
