"""Which vector-index library backs `llmasos index`: usearch, faiss-cpu, hnswlib and sqlite-vec measured on one data
set against exact search (numpy brute force): recall@10, single-query latency p50/p99, build time, memory.

Two data sets: N random unit vectors of 384 dimensions (the hard case for graph indexes: no cluster structure), and
real all-MiniLM-L6-v2 embeddings of Tiny Shakespeare lines (../shared/data/tinyshakespeare.txt), queried with other
lines of the same text.

    python benchmarks/vector_index.py                           # 100,000 random vectors + 3,000 MiniLM lines
    python benchmarks/vector_index.py --num-vectors 20000 --num-lines 1000 --skip slow   # a quick look
    python benchmarks/vector_index.py --num-vectors 0 --num-lines 20000   # real embeddings at a larger scale
"""

from __future__ import annotations

import argparse
import gc
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread for numpy's scans: a single query is what is timed, and a multi-threaded team on a busy machine
# stalls at every barrier (llmasos/threads.py). Set before numpy loads its BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))
K = 10


@dataclass
class Result:
    name: str
    recall: float
    p50_ms: float
    p99_ms: float
    build_s: float
    memory_mb: float  # RSS growth while building (and holding) the index
    file_mb: float  # the index saved to disk (nan: not saved)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Ground truth: the k largest inner products (cosine: the rows are unit vectors), best first."""
    scores = queries @ data.T  # (num_queries, num_vectors)
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    hits = [len(set(map(int, row)) & set(map(int, expected))) for row, expected in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / K


def measure(name: str, build: Callable[[], object], variants: list[tuple[str, Callable[[object, np.ndarray], object]]],
            save: Callable[[object, Path], None] | None, queries: np.ndarray, truth: np.ndarray) -> list[Result]:
    """Build once, then time each search variant (e.g. HNSW search breadths) one query at a time."""
    before = rss()
    start = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - start
    memory = (rss() - before) / 1e6
    file_mb = float("nan")
    if save is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save(index, Path(tmp) / "index")
            file_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 1e6
    results = []
    for label, search in variants:
        search(index, queries[0])  # warm
        found, times = [], []
        for query in queries:
            start = time.perf_counter()
            found.append(np.asarray(search(index, query)))
            times.append(time.perf_counter() - start)
        times_ms = np.array(times) * 1e3
        results.append(Result(f"{name}{label}", recall(found, truth), float(np.percentile(times_ms, 50)),
                              float(np.percentile(times_ms, 99)), build_s, memory, file_mb))
    del index
    return results


def numpy_search(data: np.ndarray, query: np.ndarray) -> np.ndarray:
    scores = data @ query  # (num_vectors,)
    top = np.argpartition(-scores, K)[:K]
    return top[np.argsort(-scores[top])]


def candidates(data: np.ndarray, threads: int, connectivity: int, ef_values: list[int], skip: set[str]):
    """(name, build, [(setting, search)], save) of each library; each index is built once."""
    dim = data.shape[1]
    keys = np.arange(len(data), dtype=np.uint64)
    graph = f"HNSW (M={connectivity}, ef_construction=128"
    yield "numpy exact (matvec + argpartition)", lambda: data, [("", numpy_search)], None

    import usearch.index as us

    yield ("usearch exact (exact=True)", lambda: data,
           [("", lambda d, q: us.search(d, q, K, us.MetricKind.IP, exact=True, threads=1).keys)], None)

    def build_usearch():
        index = us.Index(ndim=dim, metric="ip", dtype="f32", connectivity=connectivity, expansion_add=128)
        index.add(keys, data, threads=threads)
        return index

    def usearch_at(ef):
        def search(index, q):
            index.expansion_search = ef
            return index.search(q, K, threads=1).keys
        return search
    yield (f"usearch {graph}", build_usearch, [(f", ef={ef})", usearch_at(ef)) for ef in ef_values],
           lambda i, p: i.save(str(p)))

    from llmasos.search.vectors import GraphSettings, VectorIndex

    def build_ours():
        index = VectorIndex(dim, GraphSettings(connectivity=connectivity))
        index.add(keys, data, threads=threads)
        index.tune()
        print(f"  llmasos VectorIndex tuned: {index.settings}", flush=True)
        return index
    yield ("llmasos VectorIndex (usearch, breadth tuned at build)", build_ours,
           [("", lambda index, q: index.search(q, K)[0])], lambda index, p: index.save(p.parent))

    import faiss

    faiss.omp_set_num_threads(threads)

    def build_flat():
        index = faiss.IndexFlatIP(dim)
        index.add(data)
        return index
    def search_flat(index, q):
        faiss.omp_set_num_threads(1)
        return index.search(q[None], K)[1][0]
    yield ("faiss exact (IndexFlatIP)", build_flat, [("", search_flat)],
           lambda i, p: faiss.write_index(i, str(p)))
    if "slow" not in skip:
        def build_faiss():
            faiss.omp_set_num_threads(threads)
            index = faiss.IndexHNSWFlat(dim, connectivity, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 128
            index.add(data)
            faiss.omp_set_num_threads(1)  # one query at a time, as the server asks
            return index

        def faiss_at(ef):
            def search(index, q):
                index.hnsw.efSearch = ef
                return index.search(q[None], K)[1][0]
            return search
        yield (f"faiss {graph}", build_faiss, [(f", ef={ef})", faiss_at(ef)) for ef in ef_values],
               lambda i, p: faiss.write_index(i, str(p)))

    import hnswlib

    def build_hnswlib():
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=len(data), ef_construction=128, M=connectivity)
        index.add_items(data, keys.astype(np.int64), num_threads=threads)
        return index

    def hnswlib_at(ef):
        def search(index, q):
            index.set_ef(ef)
            return index.knn_query(q, K, num_threads=1)[0][0]
        return search
    yield (f"hnswlib {graph}", build_hnswlib, [(f", ef={ef})", hnswlib_at(ef)) for ef in ef_values],
           lambda i, p: i.save_index(str(p)))

    import sqlite_vec

    if not hasattr(sqlite3.Connection, "enable_load_extension"):
        print("  sqlite-vec: not measured: this Python's sqlite3 is built without loadable extensions "
              "(Connection.enable_load_extension is missing)", flush=True)
        return

    def build_sqlite_vec():
        connection = sqlite3.connect(":memory:", check_same_thread=False)
        connection.enable_load_extension(True)
        sqlite_vec.load(connection)
        connection.execute(f"create virtual table items using vec0(embedding float[{dim}] distance_metric=cosine)")
        connection.executemany("insert into items(rowid, embedding) values (?, ?)",
                               ((i, row.tobytes()) for i, row in enumerate(data)))
        connection.commit()
        return connection

    def search_sqlite_vec(connection, q):
        rows = connection.execute("select rowid from items where embedding match ? and k = ? order by distance",
                                  (q.tobytes(), K)).fetchall()
        return np.array([row[0] for row in rows])
    yield "sqlite-vec exact (vec0)", build_sqlite_vec, [("", search_sqlite_vec)], None


def run(title: str, data: np.ndarray, queries: np.ndarray, threads: int, connectivity: int, ef_values: list[int],
        skip: set[str], max_sqlite_queries: int) -> list[Result]:
    truth = exact_top_k(data, queries)
    results = []
    for name, build, variants, save in candidates(data, threads, connectivity, ef_values, skip):
        if "sqlite" in skip and name.startswith("sqlite"):
            continue
        chosen = queries[:max_sqlite_queries] if name.startswith("sqlite") else queries
        for result in measure(name, build, variants, save, chosen, truth[:len(chosen)]):
            print(f"  {result.name}: recall {result.recall:.4f}, p50 {result.p50_ms:.3f} ms, build "
                  f"{result.build_s:.1f} s", flush=True)
            results.append(result)
    show(title, results)
    return results


def show(title: str, results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    base = results[0]
    table = Table(title=title)
    for column in ("library", "recall@10", "p50 ms", "p99 ms", "p50 / numpy", "build s", "RSS +MB", "file MB"):
        table.add_column(column, justify="left" if column == "library" else "right")
    for r in results:
        table.add_row(r.name, f"{r.recall:.4f}", f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.p50_ms / base.p50_ms:.3f}",
                      f"{r.build_s:.2f}", f"{r.memory_mb:.0f}", "" if np.isnan(r.file_mb) else f"{r.file_mb:.1f}")
    Console(width=140).print(table)
    print("markdown:")
    print("| library | recall@10 | p50 ms | p99 ms | p50 / numpy | build s | RSS +MB | file MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.name} | {r.recall:.4f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.p50_ms / base.p50_ms:.3f} | "
              f"{r.build_s:.2f} | {r.memory_mb:.0f} | {'' if np.isnan(r.file_mb) else f'{r.file_mb:.1f}'} |")


def exact_sizes(data: np.ndarray, queries: np.ndarray, sizes: list[int]) -> None:
    """usearch's exact scan at growing index sizes: where it stops meeting the 2 ms goal (GraphSettings.exact_below)."""
    import usearch.index as us

    rows = []
    for size in sizes:
        subset = np.ascontiguousarray(data[:size])
        times = []
        for query in queries[:100]:
            start = time.perf_counter()
            us.search(subset, query, K, us.MetricKind.IP, exact=True, threads=1)
            times.append(time.perf_counter() - start)
        times_ms = np.array(times) * 1e3
        rows.append((size, float(np.percentile(times_ms, 50)), float(np.percentile(times_ms, 99))))
    print("usearch exact scan by size:")
    print("| vectors | p50 ms | p99 ms |")
    print("|---:|---:|---:|")
    for size, p50, p99 in rows:
        print(f"| {size:,} | {p50:.3f} | {p99:.3f} |")


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def minilm_data(num_lines: int, num_queries: int, cache: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Unit MiniLM vectors of the first num_lines distinct lines, and of the num_queries lines after them (kept in
    `cache`, an .npy file, when given: embedding 20,000 lines takes minutes on a busy 2-core machine)."""
    if cache and Path(cache).is_file():
        vectors = np.load(cache)
        if len(vectors) >= num_lines + num_queries:
            return vectors[:num_lines].copy(), vectors[num_lines:num_lines + num_queries].copy()
    from encoders_support import minilm_dir

    from llmasos.embeddings import Embedder

    text = (REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if len(line.strip()) > 20))
    chosen = lines[:num_lines + num_queries]
    embedder = Embedder.load(minilm_dir())
    start = time.perf_counter()
    vectors = embedder.encode(chosen, batch_size=64, normalize=True).numpy()
    print(f"  embedded {len(chosen)} lines in {time.perf_counter() - start:.1f} s", flush=True)
    if cache:
        np.save(cache, vectors)
    return vectors[:num_lines].copy(), vectors[num_lines:].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-vectors", type=int, default=100_000, help="random vectors (0: skip that data set)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--num-queries", type=int, default=300)
    parser.add_argument("--num-lines", type=int, default=3000, help="MiniLM-embedded lines (0: skip)")
    parser.add_argument("--embeddings-cache", default=None, help="an .npy file keeping the MiniLM vectors")
    parser.add_argument("--threads", type=int, default=2, help="threads for building; queries run on one")
    parser.add_argument("--connectivity", type=int, default=32, help="HNSW graph degree (M)")
    parser.add_argument("--ef", default="64,256,512", help="HNSW search breadths to try")
    parser.add_argument("--skip", default="", help="comma list: slow (faiss HNSW), sqlite")
    parser.add_argument("--exact-sizes", default="2000,5000,10000,20000,50000",
                        help="index sizes at which to time usearch's exact scan (empty: skip)")
    parser.add_argument("--max-sqlite-queries", type=int, default=50, help="sqlite-vec scans everything: fewer")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    ef_values = [int(v) for v in args.ef.split(",") if v]
    skip = {v for v in args.skip.split(",") if v}
    if args.num_vectors:
        rng = np.random.default_rng(0)
        data = unit(rng.standard_normal((args.num_vectors, args.dim), dtype=np.float32))
        queries = unit(rng.standard_normal((args.num_queries, args.dim), dtype=np.float32))
        sizes = [int(v) for v in args.exact_sizes.split(",") if v and int(v) <= args.num_vectors]
        if sizes:
            exact_sizes(data, queries, sizes)
        run(f"{args.num_vectors:,} random unit vectors, {args.dim}-d, {args.num_queries} queries", data, queries,
            args.threads, args.connectivity, ef_values, skip, args.max_sqlite_queries)
        del data
    if args.num_lines:
        lines, line_queries = minilm_data(args.num_lines, args.num_queries, args.embeddings_cache)
        run(f"{len(lines):,} MiniLM embeddings of Tiny Shakespeare lines, {len(line_queries)} queries", lines,
            line_queries, args.threads, args.connectivity, ef_values, skip, args.max_sqlite_queries)


if __name__ == "__main__":
    main()
