"""What one semantic-search query costs end to end: embedding the query (MiniLM), the vector search, reading the hits'
chunks, in process (`SemanticIndex.query`) and over HTTP (POST /v1/indexes/{name}/query on a loopback server).

    python benchmarks/index_query.py                  # 1,000 Tiny Shakespeare lines, 100 queries, 1 torch thread
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1e3, ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-lines", type=int, default=1000)
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["LLMASOS_HOME"] = tempfile.mkdtemp(prefix="llmasos-bench-")
    import httpx
    import torch
    from encoders_support import minilm_dir

    from llmasos.search import SemanticIndex
    from llmasos.server.serving import Service, free_port, load_served_model
    from llmasos.server.state import ServerSettings

    torch.set_num_threads(args.threads)
    text = (REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if len(line.strip()) > 20))
    documents, queries = lines[:args.num_lines], lines[args.num_lines:args.num_lines + args.num_queries]
    start = time.perf_counter()
    index = SemanticIndex.create("bench", model="minilm", embedder=_embedder(minilm_dir()), documents=documents)
    print(f"indexed {len(documents)} lines in {time.perf_counter() - start:.1f} s", flush=True)
    embed_times, search_times, total_times = [], [], []
    index.query(queries[0], 10)  # warm
    for query in queries:
        start = time.perf_counter()
        vector, _ = index.embed_query(query)
        middle = time.perf_counter()
        index.search(vector, 10)
        end = time.perf_counter()
        embed_times.append(middle - start)
        search_times.append(end - middle)
        total_times.append(end - start)
    served = load_served_model(minilm_dir(), "minilm", dtype="float32")
    service = Service({served.id: served}, ServerSettings(host="127.0.0.1", port=free_port())).start()
    http_times = []
    try:
        with httpx.Client(base_url=service.base_url, timeout=60) as client:
            client.post("/v1/indexes/bench/query", json={"query": queries[0], "top_k": 10})  # warm
            for query in queries:
                start = time.perf_counter()
                response = client.post("/v1/indexes/bench/query", json={"query": query, "top_k": 10})
                http_times.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
    finally:
        service.stop()
    print("| part | p50 ms | p99 ms |")
    print("|---|---:|---:|")
    for label, values in (("embed the query (MiniLM, 1 thread)", embed_times),
                          ("vector search + chunk rows (exact scan)", search_times),
                          ("SemanticIndex.query, in process", total_times),
                          ("POST /v1/indexes/{name}/query, loopback", http_times)):
        p50, p99 = percentiles(values)
        print(f"| {label} | {p50:.2f} | {p99:.2f} |")


def _embedder(directory: Path):
    from llmasos.embeddings import Embedder

    return Embedder.load(directory)


if __name__ == "__main__":
    main()
