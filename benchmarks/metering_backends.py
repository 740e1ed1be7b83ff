"""What auth + limits + metering add per request, SQLite against PostgreSQL, at 64 concurrent clients, max_tokens=1.

Two measurements per database:
  * direct: one request's database work (look the key up, admit it against rpm/tpm/concurrency/quota opening its
    usage row, write its final usage through the metering ledger, which releases it) back to back in 1 thread (its
    own cost), then in 64 threads sharing one key: requests/s and p50/p99 of that work;
  * end to end: a real `llmasos serve --model DIR` (tiny random model) answering 64 concurrent clients, once with no
    key in the database (no auth, nothing metered by key) and once with a key that has every limit set (high enough
    never to refuse): requests/s and p50/p99 latency of each; "added" is keyed minus keyless.

    python benchmarks/metering_backends.py                       # both databases (starts a throwaway PostgreSQL)
    python benchmarks/metering_backends.py --requests 4000 --skip-http
    python benchmarks/metering_backends.py --postgres-url postgresql+psycopg://user@host/db   # an existing server

The PostgreSQL server is Debian's `postgresql` package started on a temporary directory (tests/support_postgres.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))
CLIENTS = 64
LIMITS = dict(token_quota=10**12, rpm=10**9, tpm=10**12, max_concurrency=10**6)  # checked, never reached


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float], seconds: float) -> dict:
    return {"requests": len(latencies), "rps": round(len(latencies) / seconds, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * percentile(latencies, .99), 2)}


def direct(url: str, num_requests: int, clients: int = CLIENTS) -> dict:
    """`clients` threads doing one request's database work each, back to back, all with one key."""
    os.environ["LLMASOS_DATABASE_URL"] = url
    from llmasos.db import dispose_all
    from llmasos.server.auth import create_key, lookup_key
    from llmasos.server.ledger import Ledger
    from llmasos.server.ledger_store import Entry
    from llmasos.server.metering import Limiter

    dispose_all()
    tag = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    secret = create_key(tag, **LIMITS)
    limiter = Limiter()
    ledger = Ledger(journal_directory=Path(tempfile.mkdtemp(prefix="bench-journal-")), on_released=limiter.forget)
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = num_requests // clients

    def work(thread: int) -> None:
        """What the server does per request: the admission opens the usage row, the ledger's writer writes the
        final counts (batched with other threads' requests) and releases the admission; the request waits for it."""
        mine = []
        for i in range(per_thread):
            started = time.perf_counter()
            key = lookup_key(secret)
            record_id = f"{tag}-{thread}-{i}"
            entry = Entry(record_id=record_id, key_name=key.name, model="bench", route="completions",
                          request_id=record_id, prompt_tokens=8)
            admission = limiter.admit(key, 8, 1, entry=entry)
            ledger.open(entry, written=True)
            ledger.update(entry, completion_tokens=1)
            limiter.release_here(admission, 9)
            ledger.finish(entry).result(timeout=60)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = summary(latencies, time.perf_counter() - started)
    ledger.close()
    dispose_all()
    return result


async def drive(base_url: str, secret: str | None, num_requests: int) -> dict:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    body = {"model": "tiny", "prompt": "to be or not to be", "max_tokens": 1}
    latencies: list[float] = []
    remaining = [num_requests]
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                started = time.perf_counter()
                response = await client.post("/v1/completions", json=body, headers=headers)
                assert response.status_code == 200, response.text
                latencies.append(time.perf_counter() - started)

        for _ in range(2):  # warm up: the first requests compile and fill caches
            await asyncio.gather(*(client.post("/v1/completions", json=body, headers=headers) for _ in range(CLIENTS)))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
        return summary(latencies, time.perf_counter() - started)


def end_to_end(url: str, checkpoint: Path, keyed: bool, num_requests: int) -> dict:
    from llmasos.db import dispose_all
    from llmasos.server.serving import free_port

    home = Path(tempfile.mkdtemp(prefix="bench-home-"))
    env = {**os.environ, "LLMASOS_HOME": str(home), "LLMASOS_DATABASE_URL": url}
    secret = None
    if keyed:
        os.environ["LLMASOS_DATABASE_URL"] = url
        from llmasos.server.auth import create_key

        dispose_all()
        secret = create_key(f"http-{time.monotonic_ns()}", **LIMITS)
        dispose_all()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", "--model", str(checkpoint), "--port",
                               str(port), "--served-model-name", "tiny", "--log-level", "warning",
                               "--max-connections-per-client", "0"], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        return asyncio.run(drive(base, secret, num_requests))
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3200)
    parser.add_argument("--http-requests", type=int, default=1600)
    parser.add_argument("--postgres-url", default=None)
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()
    from support_postgres import start_postgres

    from llmasos.db import upgrade

    postgres = None if args.postgres_url else start_postgres()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        def new_database(name: str) -> str:
            if name == "sqlite":
                return f"sqlite:///{work / f'{time.monotonic_ns()}.db'}"
            url = args.postgres_url or postgres.create_database("bench")
            upgrade(url)
            return url

        results: dict[str, dict] = {}
        for name in ("sqlite", "postgresql"):
            results[name] = {"direct_1_client": direct(new_database(name), args.requests // 8, clients=1),
                             "direct": direct(new_database(name), args.requests)}
            print(name, "direct", json.dumps(results[name]), flush=True)
        if not args.skip_http:
            from support import family_config, make_checkpoint

            checkpoint = work / "tiny"
            make_checkpoint(checkpoint, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=256))
            for name in ("sqlite", "postgresql"):
                for keyed in (False, True):
                    run = end_to_end(new_database(name), checkpoint, keyed, args.http_requests)
                    results[name]["keyed" if keyed else "keyless"] = run
                    print(name, "keyed" if keyed else "keyless", json.dumps(run), flush=True)
                results[name]["added_p99_ms"] = round(results[name]["keyed"]["p99_ms"]
                                                      - results[name]["keyless"]["p99_ms"], 2)
        print(json.dumps(results, indent=2))
    finally:
        if postgres is not None:
            postgres.stop()


if __name__ == "__main__":
    main()
