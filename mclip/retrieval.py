"""Retrieval metrics as pure functions over arrays, and the FAISS index helpers stage 3 searches with.

Relevance is label equality: gallery item j is relevant to query q iff `gallery_labels[j] == query_labels[q]`. One
rule covers every protocol: caption -> its image (one relevant item), image -> its captions (several), and caption ->
English captions (identical English texts share a label, so duplicates are never counted as misses).

Ties count against the query. The rank of a query is 1 + the number of non-relevant gallery items scoring at least
as high as its best relevant item (within `atol`, so float noise between equal vectors is still a tie). A model that
maps everything to one vector therefore scores near zero instead of a perfect R@1, and the rank never depends on the
order in which FAISS happens to return tied items.
"""

from __future__ import annotations

import re

import numpy as np

from mclip.errors import UserError, first_line

TIE_ATOL = 1e-6  # scores closer than this are equal: equal vectors may differ in the last bit through BLAS


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 rows of unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def ranks_from_topk(ids: np.ndarray, scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                    atol: float = TIE_ATOL) -> np.ndarray:
    """Each query's rank (1-based, float) of its best relevant gallery item, ties counted against it; inf when unknown.

    ids, scores (Q, L): the top-L gallery indices and scores per query, best first, id -1 for padding.
    query_labels (Q,), gallery_labels (G,): relevance is label equality.
    rank = 1 + #non-relevant listed items with score >= s* - atol, s* = best relevant score in the list. The rank is inf
    when no relevant item is listed, or when the list is cut (L < G, no padding) while its last score still ties s*:
    tied items may then lie beyond the list. Searching L = K + (most relevant items of any query) makes every rank <= K exact.
    """
    ids, scores = np.asarray(ids), np.asarray(scores, dtype=np.float64)
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    assert ids.shape == scores.shape and ids.ndim == 2, f"ids {ids.shape} and scores {scores.shape} must both be (Q, L)"
    assert ids.shape[0] == len(query_labels), f"{ids.shape[0]} result rows for {len(query_labels)} queries"
    valid = ids >= 0  # (Q, L)
    relevant = valid & (gallery_labels[np.where(valid, ids, 0)] == query_labels[:, None])
    best = np.where(relevant, scores, -np.inf).max(axis=1) if ids.shape[1] else np.full(len(ids), -np.inf)  # (Q,)
    above = valid & ~relevant & (scores >= best[:, None] - atol)
    ranks = 1.0 + above.sum(axis=1)
    cut = valid.all(axis=1) & (ids.shape[1] < len(gallery_labels))
    if ids.shape[1]:
        cut &= scores[:, -1] >= best - atol
    return np.where(relevant.any(axis=1) & ~cut, ranks, np.inf)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of queries whose best relevant item ranks within the top k."""
    return float(np.mean(np.asarray(ranks) <= k)) if len(ranks) else 0.0


def mrr_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean reciprocal rank, counting ranks beyond k as 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0))) if len(ranks) else 0.0


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """{"R@1": ..., "R@5": ..., "R@10": ..., "MRR@10": ...} (MRR cut at the largest k)."""
    out = {f"R@{k}": recall_at_k(ranks, k) for k in ks}
    out[f"MRR@{max(ks)}"] = mrr_at_k(ranks, max(ks))
    return out


def search_depth(gallery_labels: np.ndarray, k: int) -> int:
    """List length that makes every rank <= k exact: k plus the most gallery items any one label has, capped at G."""
    counts = np.unique(np.asarray(gallery_labels), return_counts=True)[1]
    return int(min(len(gallery_labels), k + (counts.max() if len(counts) else 0)))


# ---- FAISS ----


def _faiss_message(exc: Exception) -> str:
    """FAISS's C++ error text without its 'Error in <signature> at <file>:<line>:' preamble."""
    text = first_line(exc)
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    return re.sub(r"^Error: ", "", text).strip()


def make_index(factory: str, dim: int):
    """An untrained inner-product FAISS index from an index_factory string; a string FAISS rejects is a UserError."""
    import faiss

    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UserError(f"FAISS rejects index {factory!r} for dimension {dim} ({_faiss_message(exc)}); "
                        "use Flat (exact) or a factory string such as IVF256,Flat, HNSW32, IVF256,PQ16") from None


def default_nprobe(nlist: int) -> int:
    """IVF lists to probe: 1/16 of them, at least 16 (all of them for small indexes), so recall stays near exact."""
    return int(min(nlist, max(16, nlist // 16)))


def _skip_polysemous_training(index) -> None:
    """PQ indexes train polysemous codes by default: tens of seconds per index, and only used for Hamming-threshold
    search, which mclip never turns on."""
    import faiss

    index = faiss.downcast_index(index)
    while index is not None:
        if hasattr(index, "do_polysemous_training"):
            index.do_polysemous_training = False
            return
        inner = getattr(index, "index", None)  # IndexPreTransform (PCA, OPQ) wraps the real index
        index = faiss.downcast_index(inner) if inner is not None else None


TRAIN_PER_LIST = 64  # k-means points per IVF list an index is trained on (FAISS warns below 39 and uses at most 256)
TRAIN_MIN = 1 << 15  # at least this many when an index trains at all: 128 points per centroid of a PQ codebook


class IndexBuilder:
    """A FAISS inner-product index filled batch by batch, so a gallery never has to be in memory as one array.

    An index that needs training (IVF, PQ, ...) is trained on at most `train_size` vectors: a sample handed to `train`,
    or else the first vectors added, held until that many have come (all of them for a smaller gallery, which trains it
    exactly as one call with the whole gallery would). Memory is then the training sample plus the index itself: codes
    for IVF,PQ (16 bytes a vector for PQ16, the choice for millions), every vector for Flat.
    """

    def __init__(self, factory: str, dim: int, nprobe: int | None = None, use_gpu: bool = True):
        import faiss

        self.factory = factory
        self.index = make_index(factory, dim)
        space = faiss.ParameterSpace()
        space.initialize(self.index)  # lists the search-time knobs this index has (also inside PCA/OPQ pre-transforms)
        self.knobs = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
        self.nlist = faiss.extract_index_ivf(self.index).nlist if "nprobe" in self.knobs else None
        self.nprobe = nprobe
        self.on_gpu = False
        if use_gpu and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
            try:
                self.index, self.on_gpu = faiss.index_cpu_to_all_gpus(self.index), True
            except (RuntimeError, AttributeError):  # e.g. HNSW has no GPU version: search it on CPU
                pass
        self.train_size = 0 if self.index.is_trained else max(TRAIN_MIN, TRAIN_PER_LIST * (self.nlist or 0))
        self._held: list[np.ndarray] = []  # vectors added before the index is trained
        self._held_rows = 0
        self.ntotal = 0  # vectors added so far
        self._depth = None

    def train(self, sample: np.ndarray) -> None:
        """Train on `sample` (S, D), S <= train_size, before anything is added."""
        assert self.ntotal == 0 and not self.index.is_trained, "train before adding, once"
        self._train(sample)

    def _train(self, sample: np.ndarray) -> None:
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        _skip_polysemous_training(self.index)
        try:
            self.index.train(sample)
        except RuntimeError as exc:
            raise UserError(f"index {self.factory!r} cannot be trained on this gallery of {len(sample):,} vectors "
                            f"({_faiss_message(exc)}); use fewer IVF lists (e.g. IVF{max(1, len(sample) // 39)},Flat) "
                            "or the exact Flat index") from None

    def add(self, vectors: np.ndarray) -> None:
        """Append (B, D) vectors; their ids follow on from the vectors added before."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ntotal += len(vectors)
        if self.index.is_trained:
            self.index.add(vectors)
            return
        self._held.append(vectors)
        self._held_rows += len(vectors)
        if self._held_rows >= self.train_size:
            self._flush()

    def _flush(self) -> None:
        held = np.concatenate(self._held) if len(self._held) > 1 else self._held[0]
        self._held, self._held_rows = [], 0
        if not self.index.is_trained:
            self._train(held[: self.train_size])
        self.index.add(held)

    def finish(self, depth: int = 10):
        """The searchable index, tuned for lists of `depth` (nprobe for IVF, efSearch for HNSW: at least 2 x depth)."""
        import faiss

        assert self.ntotal > 0, "an empty gallery cannot be searched"
        if self._held:
            self._flush()
        if depth == self._depth:
            return self.index
        self._depth = depth
        params = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        probes = int(min(self.nprobe or default_nprobe(self.nlist), self.nlist)) if self.nlist is not None else 0
        if self.nlist is not None:
            params.set_index_parameter(self.index, "nprobe", probes)
        if "efSearch" in self.knobs:
            params.set_index_parameter(self.index, "efSearch", max(64, 2 * depth))
        if "quantizer_efSearch" in self.knobs:  # an HNSW coarse quantizer must return at least nprobe lists
            params.set_index_parameter(self.index, "quantizer_efSearch", max(64, 2 * probes))
        return self.index

    def ranks(self, queries: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, depth: int,
              batch_size: int = 4096) -> np.ndarray:
        """(Q,) ranks of L2-normalised `queries` against everything added (`gallery_labels` (G,), one per vector added)."""
        assert len(gallery_labels) == self.ntotal, f"{len(gallery_labels)} gallery labels for {self.ntotal} vectors"
        scores, ids = search(self.finish(depth), queries, depth, batch_size)
        return ranks_from_topk(ids, scores, query_labels, gallery_labels)


def build_index(gallery: np.ndarray, factory: str = "Flat", nprobe: int | None = None, use_gpu: bool = True,
                depth: int = 10):
    """gallery (G, D) float32 -> a searchable FAISS inner-product index, trained on the gallery when it needs training
    (on its first `IndexBuilder.train_size` vectors).

    Sets nprobe (IVF) and efSearch (HNSW, at least 2 x the search depth); moves to GPU FAISS when one is visible.
    """
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    assert len(gallery) > 0, "an empty gallery cannot be searched"
    builder = IndexBuilder(factory, gallery.shape[1], nprobe, use_gpu)
    builder.add(gallery)
    return builder.finish(depth)


def search(index, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """queries (Q, D) -> scores (Q, k) float32, ids (Q, k) int64 (best first, -1 padding), searched in batches."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        scores[start : start + batch_size], ids[start : start + batch_size] = index.search(queries[start : start + batch_size], k)
    return scores, ids


def retrieve(queries: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
             ks: tuple[int, ...] = (1, 5, 10), factory: str = "Flat", nprobe: int | None = None, use_gpu: bool = True,
             batch_size: int = 4096) -> tuple[dict[str, float], np.ndarray]:
    """L2-normalise both sides, search the gallery with FAISS, and score: (metrics dict, ranks (Q,))."""
    assert queries.shape[1] == gallery.shape[1], f"queries {queries.shape} and gallery {gallery.shape} differ in dimension"
    assert len(gallery) == len(gallery_labels) and len(queries) == len(query_labels)
    depth = search_depth(gallery_labels, max(ks))
    index = build_index(l2_normalize(gallery), factory, nprobe, use_gpu, depth)
    scores, ids = search(index, l2_normalize(queries), depth, batch_size)
    ranks = ranks_from_topk(ids, scores, query_labels, gallery_labels)
    return metrics_from_ranks(ranks, ks), ranks
