"""/health latency under load: a real `llmasos serve` process (engine in its own process, or in the server's with
--engine-in-process), 32 streaming clients, /metrics polled every 100 ms, /health timed every 20 ms. Prints p50/p95/p99.

    python benchmarks/health_latency.py                       # the bundled model, engine process
    python benchmarks/health_latency.py --engine-in-process   # the old layout, for comparison
    python benchmarks/health_latency.py --heavy               # plus 3 clients sending 3-4 MB hostile requests
    python benchmarks/health_latency.py --checkpoint DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import percentile, print_table

REPO_ROOT = Path(__file__).resolve().parents[1]


HEAVY_BODIES = [  # issue 12's hostile cases: each must be refused cheaply, off the event loop where it costs
    {"prompt": "to be or not to be " * 180_000, "max_tokens": 1},  # 3.4 MB prompt
    {"prompt": "x", "max_tokens": 1, "logit_bias": {str(10 ** 6 + i): 1 for i in range(150_000)}},
    {"messages": [{"role": "user", "content": "to be " * 600_000}]},  # 3.6 MB chat message
]


async def run_load(base: str, model: str, streams: int, max_tokens: int, heavy: bool = False) -> list[float]:
    latencies: list[float] = []
    done = asyncio.Event()
    body = {"model": model, "prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def stream() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for _ in response.aiter_lines():
                    pass

        async def poll_metrics() -> None:
            while not done.is_set():
                await client.get("/metrics")
                await asyncio.sleep(0.1)

        async def time_health() -> None:
            while not done.is_set():
                start = time.perf_counter()
                (await client.get("/health")).raise_for_status()
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

        # Heavy bodies are encoded once and sent from threads: encoding 2-4 MB of JSON in this event loop would delay
        # our own /health timer and be counted against the server.
        encoded = [("/v1/chat/completions" if "messages" in body else "/v1/completions",
                    json.dumps({"model": model, **body}).encode()) for body in HEAVY_BODIES]
        statuses: list[int] = []

        def send_heavy() -> None:
            with httpx.Client(base_url=base, timeout=600) as heavy_client:
                while not done.is_set():
                    for path, content in encoded:
                        statuses.append(heavy_client.post(path, content=content, headers={
                            "Content-Type": "application/json"}).status_code)

        senders = [threading.Thread(target=send_heavy) for _ in range(3 if heavy else 0)]
        for sender in senders:
            sender.start()
        watchers = [asyncio.create_task(poll_metrics()), asyncio.create_task(time_health())]
        try:
            await asyncio.gather(*(stream() for _ in range(streams)))
        finally:
            done.set()
            for sender in senders:
                sender.join()
        if heavy:
            print(f"{len(statuses)} heavy requests, statuses {sorted(set(statuses))}")
        await asyncio.gather(*watchers)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="shakespeare:tiny")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=240, help="per stream (the bundled model's context: 256)")
    parser.add_argument("--engine-in-process", action="store_true")
    parser.add_argument("--heavy", action="store_true", help="3 clients also send issue 12's heavy hostile requests")
    args = parser.parse_args()
    from llmasos.server.serving import free_port

    port = free_port()
    env = {**os.environ, "LLMASOS_HOME": tempfile.mkdtemp(prefix="llmasos-bench-")}
    command = [sys.executable, "-m", "llmasos", "serve", "--model", args.checkpoint, "--served-model-name", "bench",
               "--port", str(port), "--log-level", "warning"]
    if args.engine_in_process:
        command.append("--engine-in-process")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("error: the server did not start")
            time.sleep(0.2)
        latencies = asyncio.run(run_load(base, "bench", args.streams, args.max_tokens, args.heavy))
    finally:
        process.terminate()
        process.wait(timeout=60)
    layout = "engine in the server process" if args.engine_in_process else "engine process"
    if args.heavy:
        layout += ", with heavy hostile requests"
    print_table(f"/health latency, {args.streams} streams + /metrics every 100 ms ({layout})", [
        ("samples", str(len(latencies))),
        ("p50 (ms)", f"{percentile(latencies, 50) * 1e3:.1f}"),
        ("p95 (ms)", f"{percentile(latencies, 95) * 1e3:.1f}"),
        ("p99 (ms)", f"{percentile(latencies, 99) * 1e3:.1f}"),
        ("max (ms)", f"{max(latencies) * 1e3:.1f}"),
    ])


if __name__ == "__main__":
    main()
