"""Where one keyed request's database time goes on PostgreSQL, one client, no contention: the key lookup, the
admission (the key's row lock, its window, the admission row and the ledger's usage row in one transaction), and the
wait for the ledger's final write (which also releases the admission). 300 requests, the first 50 not counted.

    python benchmarks/metering_breakdown.py     # starts a throwaway PostgreSQL (tests/support_postgres.py)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))
REQUESTS, WARMUP = 300, 50


def main() -> None:
    from support_postgres import start_postgres

    server = start_postgres()
    try:
        url = server.create_database("breakdown")
        os.environ["LLMASOS_DATABASE_URL"] = url
        os.environ["LLMASOS_HOME"] = tempfile.mkdtemp(prefix="breakdown-home-")
        from llmasos.db import dispose_all, upgrade
        from llmasos.server.auth import create_key, lookup_key
        from llmasos.server.ledger import Ledger
        from llmasos.server.ledger_store import Entry
        from llmasos.server.metering import Limiter

        upgrade(url)
        secret = create_key("bench", token_quota=10**12, rpm=10**9, tpm=10**12, max_concurrency=10**6)
        limiter = Limiter()
        ledger = Ledger(journal_directory=Path(tempfile.mkdtemp(prefix="breakdown-journal-")),
                        on_released=limiter.forget)
        parts: dict[str, list[float]] = {"key lookup": [], "admission": [], "final write": [], "total": []}
        for i in range(REQUESTS):
            started = time.perf_counter()
            key = lookup_key(secret)
            looked_up = time.perf_counter()
            entry = Entry(record_id=f"r{i}", key_name=key.name, model="bench", route="completions",
                          request_id=f"r{i}", prompt_tokens=8)
            admission = limiter.admit(key, 8, 1, entry=entry)
            admitted = time.perf_counter()
            ledger.open(entry, written=True)
            ledger.update(entry, completion_tokens=1)
            limiter.release_here(admission, 9)
            ledger.finish(entry).result(timeout=60)
            finished = time.perf_counter()
            if i >= WARMUP:
                for name, seconds in (("key lookup", looked_up - started), ("admission", admitted - looked_up),
                                      ("final write", finished - admitted), ("total", finished - started)):
                    parts[name].append(seconds)
        ledger.close()
        dispose_all()
    finally:
        server.stop()
    print("| part | p50 ms | p99 ms |\n|---|---:|---:|")
    for name, values in parts.items():
        ordered = sorted(values)
        print(f"| {name} | {1000 * statistics.median(values):.2f} | {1000 * ordered[int(0.99 * len(ordered))]:.2f} |")


if __name__ == "__main__":
    main()
