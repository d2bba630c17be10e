"""The vector index alone (worker.vector_index, FAISS): build time, query latency of exact and
HNSW search, and HNSW's recall@10 against exact search, on clustered synthetic unit vectors (a
mixture of anisotropic Gaussians, as real embeddings cluster; not uniform noise).

    .venv/bin/python -m bench.search --sizes 10000 100000 --dim 256

Results go to var/bench/search.json. Not a test: numbers depend on the machine and its load.
Not measured here: the latency through the API (encoder + HTTP + database), nor 1,000,000
vectors (docs/search.md says what is and is not measured).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from worker.vector_index import ModalityIndex


def clustered(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).normal(size=(clusters, dim))
    scales = np.random.default_rng(54321).uniform(0.2, 1.0, size=(clusters, dim))
    which = rng.integers(0, clusters, size=n)
    x = centres[which] + rng.normal(size=(n, dim)) * scales[which]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def latencies(index: ModalityIndex, queries: np.ndarray, k: int,
              allowed: np.ndarray | None = None) -> tuple[list[float], list[np.ndarray]]:
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        ids, _ = index.search(q, k, allowed)
        times.append(time.perf_counter() - started)
        found.append(ids)
    return times, found


def ms(times: list[float], q: float) -> float:
    return round(float(np.percentile(times, q)) * 1000, 2)


def run(n: int, dim: int, queries: int, k: int = 10) -> dict[str, object]:
    vectors = clustered(n, dim, 0)
    ids = np.arange(1, n + 1, dtype=np.int64)
    qs = clustered(queries, dim, 1)
    out: dict[str, object] = {"vectors": n, "dim": dim, "queries": queries}
    exact = ModalityIndex(dim)
    started = time.perf_counter()
    exact.add(ids, vectors)
    out["exact_build_s"] = round(time.perf_counter() - started, 2)
    t_exact, truth = latencies(exact, qs, k)
    out["exact_p50_ms"], out["exact_p95_ms"] = ms(t_exact, 50), ms(t_exact, 95)
    hnsw = ModalityIndex(dim, hnsw=True)
    started = time.perf_counter()
    hnsw.add(ids, vectors)
    out["hnsw_build_s"] = round(time.perf_counter() - started, 2)
    t_hnsw, got = latencies(hnsw, qs, k)
    out["hnsw_p50_ms"], out["hnsw_p95_ms"] = ms(t_hnsw, 50), ms(t_hnsw, 95)
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, truth, strict=True))
    out["hnsw_recall@10"] = round(hits / (k * queries), 4)
    allowed = np.sort(np.random.default_rng(2).choice(ids, size=max(n // 100, k),
                                                        replace=False))
    t_filter, _ = latencies(hnsw, qs, k, allowed)
    out["filter_1pct_p95_ms"] = ms(t_filter, 95)
    out["index_bytes"] = len(hnsw.to_bytes())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("var/bench/search.json"))
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        rows.append(run(n, args.dim, args.queries))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
