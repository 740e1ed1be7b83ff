"""Server overhead: one greedy workload (mixed prompt lengths, fixed max_tokens with ignore_eos) run in process with
LLM.generate and through a real `llmasos serve` process with concurrent streaming HTTP clients. Prints the tokens/s
of each and their ratio; the HTTP layer should cost at most 10%.

    python benchmarks/server_overhead.py                 # a mid-size random model: hidden 512, 8 layers
    python benchmarks/server_overhead.py --tiny          # a quick run on a tiny model
    python benchmarks/server_overhead.py --threads 1      # leave the other cores to the HTTP layer and clients
    python benchmarks/server_overhead.py --device cuda --dtype bfloat16

On CPU, torch uses every core by default, so the server's HTTP work and the clients (on the same machine here)
preempt its threads; give both paths fewer threads than cores to measure the HTTP layer rather than that contention.
The random checkpoint is written with transformers (a test-only dependency) through tests/support.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=384),
    "mid": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=32000),
}


def make_checkpoint(directory: Path, size: str) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    try:
        from support import family_config
        from support import make_checkpoint as write
    except ImportError as exc:
        raise SystemExit(f"error: writing a random checkpoint needs transformers ({exc}); "
                         "pip install -e '.[test]' or pass --checkpoint DIR") from None
    write(directory, family_config("qwen2", max_position_embeddings=2048, **SIZES[size]))
    return directory


def prompt_sets(num_sets: int, num_requests: int, min_len: int, max_len: int, seed: int) -> list[list[list[int]]]:
    """Independent token-id prompts per run (so no run profits from another's prefix cache); ids avoid 0-4, the
    test tokenizer's special tokens."""
    rng = random.Random(seed)
    return [[[rng.randrange(5, 384) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_requests)]
            for _ in range(num_sets)]


class InProcess:
    """The reference path: LLM.generate on all prompts at once."""

    def __init__(self, checkpoint: Path, max_tokens: int, device: str, dtype: str, kv_cache_memory: str) -> None:
        from llmasos import LLM, SamplingParams

        self.llm = LLM.load(checkpoint, dtype=dtype, device=device, kv_cache_memory=kv_cache_memory)
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def run(self, prompts: list[list[int]]) -> tuple[int, float]:
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, self.params)
        return sum(len(o.token_ids) for o in outputs), time.perf_counter() - start


async def _one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, stream: bool) -> int:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


async def _fire(base_url: str, prompts: list[list[int]], max_tokens: int, stream: bool) -> tuple[int, float]:
    """All prompts at once, one concurrent client connection each; time from the first send to the last byte."""
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=base_url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(_one(client, p, max_tokens, stream) for p in prompts))
        return sum(counts), time.perf_counter() - start


class ThroughServer:
    """The measured path: a real `llmasos serve` process, driven by concurrent streaming HTTP clients."""

    def __init__(self, checkpoint: Path, max_tokens: int, device: str, dtype: str, kv_cache_memory: str,
                 stream: bool, threads: int | None) -> None:
        from llmasos.server.serving import free_port

        self.max_tokens, self.stream = max_tokens, stream
        port = free_port()
        home = tempfile.mkdtemp(prefix="llmasos-bench-")
        command = [sys.executable, "-m", "llmasos", "serve", "--model", str(checkpoint), "--served-model-name",
                   "bench", "--port", str(port), "--device", device, "--dtype", dtype,
                   "--kv-cache-memory", kv_cache_memory, "--log-level", "warning"]
        env = {**os.environ, "LLMASOS_HOME": home}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"error: the server exited with status {self.process.returncode}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("error: the server did not become healthy in 10 minutes")
            time.sleep(0.2)

    def run(self, prompts: list[list[int]]) -> tuple[int, float]:
        return asyncio.run(_fire(self.base_url, prompts, self.max_tokens, self.stream))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure(direct: InProcess, served: ThroughServer, sets) -> tuple[list, list]:
    """Warm both paths up with a whole untimed run (first-touch of the KV cache's pages, allocator growth), then run
    each prompt set through both, alternating which goes first, so that a change in the machine's load during the
    benchmark weighs on both alike."""
    direct.run(sets[0])
    served.run(sets[0])
    direct_runs, served_runs = [], []
    for number, prompts in enumerate(sets[1:]):
        pair = [(direct, direct_runs), (served, served_runs)]
        for path, runs in pair if number % 2 == 0 else pair[::-1]:
            runs.append(path.run(prompts))
    return direct_runs, served_runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, 8 requests of 32 tokens: a quick check")
    parser.add_argument("--checkpoint", type=Path, default=None, help="use this checkpoint instead of a random one")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 32, --tiny 8)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 128, --tiny 32)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path, alternating")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of each path (default: torch's, one per core)")
    parser.add_argument("--kv-cache-memory", default="1GiB", help="KV cache of each path (the same for both)")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="non-streamed requests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    requests = args.requests or (8 if args.tiny else 32)
    max_tokens = args.max_tokens or (32 if args.tiny else 128)
    min_len, max_len = (8, 64) if args.tiny and args.prompt_len == (16, 512) else args.prompt_len

    with tempfile.TemporaryDirectory(prefix="llmasos-bench-model-") as scratch:
        size = "tiny" if args.tiny else "mid"
        checkpoint = args.checkpoint or make_checkpoint(Path(scratch) / f"random-{size}", size)
        sets = prompt_sets(args.repeats + 1, requests, min_len, max_len, args.seed)
        print(f"model {checkpoint.name}: {requests} requests, prompts of {min_len}-{max_len} tokens, "
              f"{max_tokens} new tokens each, greedy, ignore_eos, {args.device} {args.dtype}, "
              f"{'streamed' if args.stream else 'non-streamed'}, {args.repeats} runs of each path, "
              f"{args.threads or 'default'} torch threads on {os.cpu_count()} cores", flush=True)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        served = ThroughServer(checkpoint, max_tokens, args.device, args.dtype, args.kv_cache_memory, args.stream,
                               args.threads)
        try:
            direct = InProcess(checkpoint, max_tokens, args.device, args.dtype, args.kv_cache_memory)
            direct_runs, served_runs = measure(direct, served, sets)
        finally:
            served.stop()
    if [tokens for tokens, _ in direct_runs] != [tokens for tokens, _ in served_runs]:
        raise SystemExit(f"error: the two paths generated different token counts ({direct_runs} vs {served_runs})")
    rate = lambda run: run[0] / run[1]  # noqa: E731
    for number, (d, s) in enumerate(zip(direct_runs, served_runs, strict=True)):
        print(f"run {number + 1}: in process {rate(d):9.1f} tokens/s, through the server {rate(s):9.1f} tokens/s, "
              f"ratio {rate(s) / rate(d):.3f}")
    best_direct, best_served = max(map(rate, direct_runs)), max(map(rate, served_runs))
    ratios = sorted(rate(s) / rate(d) for d, s in zip(direct_runs, served_runs, strict=True))
    median = statistics.median(ratios)
    print(f"best in process (LLM.generate):         {best_direct:9.1f} tokens/s")
    print(f"best through the server ({requests} clients): {best_served:9.1f} tokens/s")
    verdict = "within" if median >= 0.9 else "OVER"
    print(f"server/in-process: best {best_served / best_direct:.3f}, median of runs {median:.3f} "
          f"(HTTP overhead {100 * (1 - median):.1f}%, {verdict} the 10% budget)")


if __name__ == "__main__":
    main()
