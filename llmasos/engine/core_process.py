"""The engine process: `python -m llmasos.engine.core_process` reads a ModelSpec (JSON) from stdin, loads the model,
then runs the engine core in a busy loop — requests in and outputs out over ZeroMQ — until told to stop or its parent
goes away (stdin closes, or the parent pid changes), so a parent killed with -9 leaves no orphan behind."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import zmq

from llmasos.engine.protocol import (
    AbortRequests,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineFailed,
    LoadLoRA,
    Shutdown,
    StepFailure,
    UnloadLoRA,
    input_decoder,
    output_encoder,
)
from llmasos.spec import ModelSpec

log = logging.getLogger("llmasos.engine")
PARENT_CHECK_SECONDS = 1.0


def _exit_when_parent_goes(parent_pid: int) -> None:
    """Reading stdin blocks until the parent closes it or dies (EOF either way): then leave at once."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os._exit(0)

    threading.Thread(target=watch, name="llmasos-parent-watch", daemon=True).start()
    if sys.platform.startswith("linux"):  # belt and braces: the kernel kills us with the parent
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:
                os._exit(0)
        except OSError:
            pass


def serve(spec: ModelSpec, input_address: str, output_address: str, parent_pid: int) -> int:
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.LINGER, 1000)
    outputs.connect(output_address)
    try:
        from llmasos.engine.core import EngineCore
        from llmasos.threads import count_as_own

        count_as_own(parent_pid)  # the server's work is part of ours, not a neighbour's (llmasos.threads)
        core = EngineCore.from_spec(spec)
    except Exception as exc:  # noqa: BLE001 - the front end shows the reason, the process ends
        outputs.send(output_encoder.encode(EngineFailed(f"could not load {spec.name}: {exc}")))
        outputs.close()
        context.term()
        return 1
    outputs.send(output_encoder.encode(core.info))
    last_parent_check = time.monotonic()
    while True:
        changed = False
        failures: list[StepFailure] = []
        failed_outputs: list[EngineCoreOutput] = []
        if inputs.poll(0 if core.has_work else int(PARENT_CHECK_SECONDS * 1000)):
            while True:
                try:
                    message = input_decoder.decode(inputs.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                changed = True
                if isinstance(message, EngineCoreRequest):
                    try:
                        core.add_request(message)
                    except ValueError as exc:  # the front end validates first; report rather than die
                        failures.append(StepFailure(str(exc), [message.request_id]))
                        failed_outputs.append(EngineCoreOutput(message.request_id, [], finish_reason="abort"))
                elif isinstance(message, AbortRequests):
                    core.abort(message.request_ids)
                elif isinstance(message, (LoadLoRA, UnloadLoRA)):
                    try:  # checked by the front end first: a failure here is a file changed since
                        if isinstance(message, LoadLoRA):
                            core.load_lora(message.name, message.path)
                        else:
                            core.unload_lora(message.name)
                    except ValueError as exc:
                        log.error("%s", exc)
                elif isinstance(message, Shutdown):
                    outputs.close()
                    context.term()
                    return 0
        now = time.monotonic()
        if now - last_parent_check > PARENT_CHECK_SECONDS:
            last_parent_check = now
            if os.getppid() != parent_pid:
                log.warning("the server process %d went away; the engine exits", parent_pid)
                return 0
        if core.has_work:
            result = core.step()
            result.outputs.extend(failed_outputs)
            result.failures.extend(failures)
            outputs.send(output_encoder.encode(result))
        elif changed:  # aborts free blocks: the front end's counters should show it without waiting for a step
            outputs.send(output_encoder.encode(EngineCoreOutputs(failed_outputs, core.stats(), failures)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    # The server decides when the engine stops (it drains first): Ctrl-C or SIGTERM sent to the whole process group
    # must not kill the engine under requests still being drained. A dead parent still ends us (see above).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    spec = ModelSpec.from_json(sys.stdin.buffer.readline().decode())
    _exit_when_parent_goes(args.parent_pid)
    return serve(spec, args.input, args.output, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
