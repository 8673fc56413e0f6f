"""Retrieval benchmark: FAISS exact search against plain numpy matmul + argsort, and an IVF index's recall and speed-up.

    python tests/bench/bench_retrieval.py          # 100k gallery for queries/s; 1M clustered vectors for IVF (a few minutes)
    python tests/bench/bench_retrieval.py --quick  # 20k gallery, 200k IVF vectors: under a minute

Vectors are synthetic, dim 512, float32, L2-normalised and seeded. The IVF data is clustered the way embeddings are
(points near a 64-dimensional subspace, grouped in Zipf-sized clusters of varying spread, plus noise), because on
uniform noise every neighbour is as far as every other and no index can have meaningful recall. The FAISS side goes
through mclip.evaluate.metrics (make_index, search, default_nprobe), as stage 3 does. The last printed line is the JSON result.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import common  # tests/bench is the script's folder; also puts this checkout first on sys.path
import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="finish within a minute (smaller galleries, one repeat)")
    p.add_argument(
        "--gallery", type=int, help="gallery size for the queries/s comparison (default 100000; 20000 with --quick)"
    )
    p.add_argument("--queries", type=int, help="queries per timing (default 1000; 200 with --quick)")
    p.add_argument("--ivf-vectors", type=int, help="vectors for the IVF test (default 1000000; 200000 with --quick)")
    p.add_argument("--nlist", type=int, help="IVF lists (default about 1 per 1000 vectors, a power of two)")
    p.add_argument(
        "--nprobe", type=int, help="IVF lists probed per query (default mclip.evaluate.metrics.default_nprobe(nlist))"
    )
    p.add_argument("--repeats", type=int, help="timed repeats (default 3; 1 with --quick)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, full, small in (
        ("gallery", 100_000, 20_000),
        ("queries", 1000, 200),
        ("ivf_vectors", 1_000_000, 200_000),
        ("repeats", 3, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    if args.nlist is None:
        args.nlist = 1 << max(4, round(np.log2(max(args.ivf_vectors, 16) / 1000)))
    return args


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def uniform_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    return normalize(rng.standard_normal((n, dim), dtype=np.float32))


def clustered_vectors(
    n: int, dim: int, rng: np.random.Generator, clusters: int = 2000, rank: int = 64, block: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors with embedding-like structure, and the recipe to draw more (queries) from the same law."""
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].astype(np.float32)  # (dim, rank) orthonormal
    centres = rng.standard_normal((clusters, rank)).astype(np.float32)
    spread = rng.uniform(0.3, 0.9, clusters).astype(np.float32)  # some clusters tight, some diffuse
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8  # Zipf-like: a few big topics, a long tail
    weights /= weights.sum()

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for start in range(0, m, block):  # in blocks: the 1M x 512 result is the only big array
            size = min(block, m - start)
            c = rng.choice(clusters, size, p=weights)
            z = centres[c] + spread[c, None] * rng.standard_normal((size, rank), dtype=np.float32)
            x = z @ basis.T + 0.05 * rng.standard_normal((size, dim), dtype=np.float32)
            out[start : start + size] = normalize(x)
        return out

    return draw(n), draw


def numpy_topk(gallery: np.ndarray, queries: np.ndarray, k: int, batch: int = 100) -> np.ndarray:
    """What a plain script does: scores by matmul, a full argsort per query, keep the first k."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch):
        scores = queries[start : start + batch] @ gallery.T
        out[start : start + batch] = np.argsort(-scores, axis=1)[:, :k]
    return out


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def thread_counts() -> dict:
    try:
        from threadpoolctl import threadpool_info

        return {f"{i['internal_api']}": i["num_threads"] for i in threadpool_info()}
    except ImportError:
        return {}


def main(argv=None) -> None:
    args = parse_args(argv)
    import faiss

    from mclip.evaluate import metrics as retrieval

    rng = np.random.default_rng(args.seed)
    k = args.k

    # 1. Exact search: FAISS Flat (inner product) against numpy matmul + argsort, same gallery and queries.
    gallery = uniform_vectors(args.gallery, args.dim, rng)
    queries = uniform_vectors(args.queries, args.dim, rng)
    flat = retrieval.build_index(gallery, "Flat", use_gpu=False)
    retrieval.search(flat, queries[:8], k)  # warm-up
    numpy_topk(gallery, queries[:8], k)
    faiss_times, numpy_times = [], []
    for _ in range(args.repeats):
        (_, faiss_ids), t = timed(retrieval.search, flat, queries, k)
        faiss_times.append(t)
        numpy_ids, t = timed(numpy_topk, gallery, queries, k)
        numpy_times.append(t)
    agreement = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(faiss_ids, numpy_ids)]))
    faiss_qps = args.queries / common.median(faiss_times)
    numpy_qps = args.queries / common.median(numpy_times)
    print(f"exact: FAISS {faiss_qps:,.0f} q/s, numpy {numpy_qps:,.0f} q/s on {args.gallery:,} vectors", file=sys.stderr)
    del gallery, flat

    # 2. IVF on clustered vectors: recall@k against exact search, and its speed-up over exact search.
    t0 = time.perf_counter()
    data, draw = clustered_vectors(args.ivf_vectors, args.dim, rng)
    ivf_queries = draw(args.queries)
    exact = retrieval.build_index(data, "Flat", use_gpu=False)
    (_, truth), exact_s = timed(retrieval.search, exact, ivf_queries, k)
    factory = f"IVF{args.nlist},Flat"
    index = retrieval.make_index(factory, args.dim)
    # k-means on a sample of 64 points per list (FAISS warns below 39): training on all 1M would dominate the run
    sample = data[rng.choice(len(data), min(len(data), 64 * args.nlist), replace=False)]
    _, train_s = timed(index.train, sample)
    _, add_s = timed(index.add, data)
    del data, sample
    nprobe = args.nprobe or retrieval.default_nprobe(args.nlist)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    retrieval.search(index, ivf_queries[:8], k)
    ivf_times, exact_times = [], [exact_s]
    for r in range(args.repeats):
        (_, found), t = timed(retrieval.search, index, ivf_queries, k)
        ivf_times.append(t)
        if r > 0:  # the search that found the truth was the first exact timing
            exact_times.append(timed(retrieval.search, exact, ivf_queries, k)[1])
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
    ivf_speedup = common.median(exact_times) / common.median(ivf_times)
    print(f"IVF: built in {time.perf_counter() - t0:.1f}s (train {train_s:.1f}s, add {add_s:.1f}s)", file=sys.stderr)

    res = {
        "faiss_qps": common.sig(faiss_qps),
        "numpy_qps": common.sig(numpy_qps),
        "faiss_speedup_vs_numpy": common.sig(faiss_qps / numpy_qps),
        "ivf_recall_at_10" if k == 10 else f"ivf_recall_at_{k}": common.sig(recall),
        "ivf_speedup": common.sig(ivf_speedup),
        "ivf_qps": common.sig(args.queries / common.median(ivf_times)),
        "exact_qps_ivf_data": common.sig(args.queries / common.median(exact_times)),
        "flat_vs_numpy_topk_agreement": common.sig(agreement),
        "gallery": args.gallery,
        "queries": args.queries,
        "ivf_vectors": args.ivf_vectors,
        "ivf_factory": factory,
        "nprobe": nprobe,
        "dim": args.dim,
        "repeats": args.repeats,
        "threads": thread_counts(),
        "faiss_version": faiss.__version__,
        "quick": args.quick,
        "load_avg_1min": common.sig(os.getloadavg()[0], 3),  # other work on the machine when the run ended
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    common.emit(
        [
            f"exact top-{k} over {args.gallery:,} x {args.dim} float32 vectors, {args.queries:,} queries:",
            f"  FAISS Flat (mclip.evaluate.metrics)  {faiss_qps:10,.0f} queries/s",
            f"  numpy matmul + argsort        {numpy_qps:10,.0f} queries/s  -> {faiss_qps / numpy_qps:.1f}x "
            f"(top-{k} agree {agreement:.3f})",
            f"{factory} (nprobe {nprobe}) over {args.ivf_vectors:,} clustered vectors: R@{k} {recall:.3f} against exact search, "
            f"{ivf_speedup:.1f}x faster ({res['ivf_qps']:,.0f} vs {res['exact_qps_ivf_data']:,.0f} queries/s)",
        ],
        res,
    )


if __name__ == "__main__":
    main()
