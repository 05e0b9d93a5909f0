"""Edit-memory search speed at 100k entries: the vectorised brute-force search of
kedit_core/memory.py against a naive Python loop (one dot product per entry), measured in
the same process on the same vectors, reported as a ratio (the machine is shared, so
absolute figures are noisy; the ratio is what to read).

Also times the embedding of questions with MiniLM (the real per-question cost of
retrieval) and the DuckDB round trip of the memory.

    python benchmarks/bench_retrieval.py [--entries 100000] [--queries 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kedit_core.memory import EditMemory, MemoryEntry


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def naive_search(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """What one would write first: score every entry in a Python loop, sort."""
    scores = [(float(np.dot(query, v)), i) for i, v in enumerate(vectors)]
    scores.sort(reverse=True)
    return [i for _, i in scores[:k]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--naive-queries", type=int, default=3, help="the loop is slow: time a few queries")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--db-entries", type=int, default=10_000, help="entries for the DuckDB round trip (0: skip)")
    ap.add_argument("--embed", action="store_true", help="also time MiniLM question embedding")
    args = ap.parse_args()

    vectors = unit_vectors(args.entries, args.dim, 0)
    queries = unit_vectors(args.queries, args.dim, 1)
    mem = EditMemory("bench", embedder=object())
    t0 = time.perf_counter()
    mem.add([MemoryEntry(f"bench:{i}", f"fact {i}", f"key {i}") for i in range(args.entries)], vectors)
    print(f"memory: {args.entries} entries x {args.dim} dims, built in {time.perf_counter() - t0:.2f}s")

    mem.search_vectors(queries[:2], k=args.k)  # warm-up
    t0 = time.perf_counter()
    batched = mem.search_vectors(queries, k=args.k)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [mem.search_vectors(q, k=args.k)[0] for q in queries]
    t_single = time.perf_counter() - t0
    nq = args.naive_queries
    t0 = time.perf_counter()
    naive = [naive_search(vectors, q, args.k) for q in queries[:nq]]
    t_naive = time.perf_counter() - t0

    for i in range(nq):  # same answers, or the speed means nothing
        assert [int(h.entry.entry_id.split(":")[1]) for h in batched[i]] == naive[i]
        assert [h.entry.entry_id for h in single[i]] == [h.entry.entry_id for h in batched[i]]
    qps_batched = args.queries / t_batched
    qps_single = args.queries / t_single
    qps_naive = nq / t_naive
    print(f"naive Python loop          : {qps_naive:10.2f} queries/s ({nq} queries)")
    print(f"vectorised, one at a time  : {qps_single:10.2f} queries/s  = {qps_single / qps_naive:8.1f}x the loop")
    print(f"vectorised, batch of {args.queries:<5} : {qps_batched:10.2f} queries/s  = {qps_batched / qps_naive:8.1f}x the loop")

    if args.db_entries:
        from storage.db import open_db
        from storage.memory_store import DuckDBMemoryStore

        n = min(args.db_entries, args.entries)
        with tempfile.TemporaryDirectory() as tmp:
            store = DuckDBMemoryStore(open_db(Path(tmp) / "bench.duckdb"))
            t0 = time.perf_counter()
            store.add_entries("bench", mem.entries[:n], vectors[:n])
            t_write = time.perf_counter() - t0
            t0 = time.perf_counter()
            entries, loaded = store.load("bench")
            t_read = time.perf_counter() - t0
            assert np.array_equal(loaded, vectors[:n]) and len(entries) == n
        print(f"DuckDB edit_memory         : write {n} entries {n / t_write:9.0f}/s, read back {n / t_read:9.0f}/s (exact)")

    if args.embed:
        from kedit_core.embedder import get_embedder

        emb = get_embedder()
        qs = [f"What is the product made by company number {i}?" for i in range(64)]
        emb.encode(qs[:2])
        t0 = time.perf_counter()
        emb.encode(qs)
        t_emb = time.perf_counter() - t0
        print(f"MiniLM question embedding  : {64 / t_emb:10.2f} questions/s (batch of 64); "
              f"search is {qps_single / (64 / t_emb):.1f}x faster than embedding, per question")


if __name__ == "__main__":
    main()
