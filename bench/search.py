"""Search benchmarks (docs/search.md). Not a test: numbers depend on the machine and its load.

The vector index alone (worker.vector_index, FAISS): build time, query latency of exact and HNSW
search, and HNSW's recall@10 against exact search, on clustered synthetic unit vectors (a
mixture of anisotropic Gaussians, as real embeddings cluster; not uniform noise):

    .venv/bin/python -m bench.search --sizes 10000 100000 --dim 256

Through the API (``--api N``): the embedded stack (``mmbatch up``'s processes), an aligner trained
by an align job on the paired sample, then N synthetic item rows of one job with clustered
vectors of the aligner's width appended as a segment and merged (HNSW past the exact limit);
text queries one at a time, from 10 concurrent clients, and while an embed job runs:

    .venv/bin/python -m bench.search --api 100000

Results go to var/bench/search.json (and search_api.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, select

from cli.client import ApiError, Client
from cli.keyfile import ensure_first_key
from cli.stack import Stack, free_port
from mmbatch.settings import Settings
from samples.paired import write_paired
from store import jobs
from store import search as search_store
from store.migrate import upgrade
from store.schema import Item, Job
from worker.index_merge import merge_index
from worker.runtime import Runtime
from worker.vector_index import ModalityIndex, segment_bytes

QUERIES = ("a red boat on the sea", "a house in the snow at night", "a yellow kite at sunset",
           "a green car on the grass", "rain falling on an umbrella", "a flag by the ocean",
           "two orange balloons in the desert", "birds singing near a tree")


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
    del exact
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
    out["index_bytes"] = len(hnsw.to_bytes())  # the vectors and the graph: what it holds in memory
    return out


def _timed(client: Client, n: int, offset: int = 0,
           stages: dict[str, list[float]] | None = None) -> list[float]:
    """Seconds per query, as the client sees them; ``stages`` gathers the API's
    Server-Timing breakdown (seconds by stage) of each."""
    times = []
    for i in range(n):
        started = time.perf_counter()
        r = client.http.post(f"{client.base}/api/v1/search", timeout=60,
                             json={"text": f"{QUERIES[(i + offset) % len(QUERIES)]} {i}", "k": 10})
        times.append(time.perf_counter() - started)
        r.raise_for_status()
        if stages is not None:
            for part in r.headers.get("Server-Timing", "").split(","):
                name, _, dur = part.strip().partition(";dur=")
                if dur:
                    stages.setdefault(name, []).append(float(dur) / 1000)
    return times


def _summary(times: list[float], stages: dict[str, list[float]] | None = None
             ) -> dict[str, Any]:
    out: dict[str, Any] = {"queries": len(times), "p50_ms": ms(times, 50),
                           "p95_ms": ms(times, 95)}
    if stages:
        out["stages_p50_ms"] = {name: ms(v, 50) for name, v in stages.items()}
        out["stages_p95_ms"] = {name: ms(v, 95) for name, v in stages.items()}
    return out


def api_bench(items: int, out_dir: Path, clients: int = 10) -> dict[str, Any]:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    # one key sends every query: lift the per-key rate limit off the measurement
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(out_dir),
                                  "MMBATCH_RATE_LIMIT_PER_MINUTE": "1000000"})
    upgrade(settings.db_url)
    key = ensure_first_key(settings)
    assert key is not None  # a fresh database
    paired = write_paired(out_dir / "paired", n_train=264, n_gallery=160, seed=0)
    result: dict[str, Any] = {"items": items}
    with Stack(settings, "127.0.0.1", free_port(), log_dir=out_dir / "logs") as stack:
        client = Client(stack.url, api_key=key)
        job = client.wait(client.submit(paired.train, "align", name="bench")["id"],
                          timeout=1800)
        aligner = job["model"]["id"]
        while True:
            try:
                client.search("a boat", k=1)
                break
            except ApiError as exc:
                if exc.code != "index_not_ready":
                    raise
                time.sleep(1)
        rt = Runtime(settings)
        with rt.db.session() as s:
            tenant = s.scalar(select(Job.tenant_id).where(Job.id == job["id"]))
            index_id = search_store.index_of(s, aligner).id  # type: ignore[union-attr]
            dim = search_store.index_width(s, index_id)
            synthetic = jobs.create_job(s, kind="embed", archive_blob="", archive_name="bench",
                                        archive_bytes=0, model_version_id=aligner,
                                        tenant_id=tenant, state="succeeded").id
            labels = ("boat", "house", "tree", "car", "kite", "balloon", "umbrella", "flag")
            for start in range(0, items, 10_000):
                s.execute(insert(Item), [{"job_id": synthetic, "key": f"synthetic/{i:07d}",
                                          "media": {}, "label": labels[i % len(labels)]}
                                         for i in range(start, min(items, start + 10_000))])
            ids = np.array(sorted(s.scalars(select(Item.id).where(Item.job_id == synthetic))),
                           dtype=np.int64)
        started = time.perf_counter()
        blob = rt.blobs.put_bytes(segment_bytes({"image": (ids, clustered(items, dim, 0))}))
        with rt.db.session() as s:
            search_store.add_segment(s, index_id, blob, items)
        merge_index(rt, index_id)
        result["merge_seconds"] = round(time.perf_counter() - started, 1)
        result["dim"] = dim
        started = time.perf_counter()
        while len(client.search("a boat", k=10, jobs=[synthetic])["results"]) < 10:
            time.sleep(1)
        result["index_load_seconds"] = round(time.perf_counter() - started, 1)
        _timed(client, 10)  # warm
        stages: dict[str, list[float]] = {}
        result["sequential"] = _summary(_timed(client, 200, stages=stages), stages)
        print(json.dumps(result), flush=True)
        concurrent: list[float] = []
        lock = threading.Lock()

        def one_client(n: int) -> None:
            times = _timed(Client(stack.url, api_key=key), 30, n)
            with lock:
                concurrent.extend(times)

        threads = [threading.Thread(target=one_client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result[f"concurrent_{clients}"] = _summary(concurrent)
        running = client.submit(paired.gallery, "embed", model=aligner)["id"]
        during: list[float] = []
        while client.job(running)["state"] not in ("succeeded", "failed", "cancelled"):
            during += _timed(client, 5)
        result["during_embed_job"] = _summary(during)
        rt.close()
    return result



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("var/bench/search.json"))
    parser.add_argument("--api", type=int, default=0, metavar="ITEMS",
                        help="through the API, with this many synthetic indexed items")
    args = parser.parse_args(argv)
    if args.api:
        result = api_bench(args.api, Path("var/bench/search-api"))
        print(json.dumps(result), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        (args.out.parent / "search_api.json").write_text(json.dumps(result, indent=2))
        return 0
    rows = []
    for n in args.sizes:
        rows.append(run(n, args.dim, args.queries))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
