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
from collections.abc import Callable

import numpy as np

from mclip.errors import UserError, first_line

TIE_ATOL = 1e-6  # scores closer than this are equal: equal vectors may differ in the last bit through BLAS


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 rows of unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def ranks_from_topk(
    ids: np.ndarray, scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, atol: float = TIE_ATOL
) -> np.ndarray:
    """Each query's rank (1-based, float) of its best relevant gallery item, ties counted against it; inf when unknown.

    ids, scores (Q, L): the top-L gallery indices and scores per query, best first, id -1 for padding.
    query_labels (Q,), gallery_labels (G,): relevance is label equality.
    rank = 1 + #non-relevant listed items with score >= s* - atol, s* = best relevant score in the list. The rank is inf
    when no relevant item is listed, or when the list is cut (L < G, no padding) while its last score still ties s*:
    tied items may then lie beyond the list. Searching L = K + (most relevant items of any query) makes every rank <= K exact.
    """
    ids, gallery_labels = np.asarray(ids), np.asarray(gallery_labels)
    assert ids.ndim == 2, f"ids {ids.shape} must be (Q, L)"
    valid = ids >= 0  # (Q, L)
    return ranks_from_labels(
        gallery_labels[np.where(valid, ids, 0)], valid, scores, query_labels, len(gallery_labels), atol
    )


def ranks_from_labels(
    found: np.ndarray,
    valid: np.ndarray,
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_size: int,
    atol: float = TIE_ATOL,
) -> np.ndarray:
    """`ranks_from_topk` given the labels of the listed items: found (Q, L) labels, valid (Q, L) False for padding,
    scores (Q, L) best first, query_labels (Q,), gallery_size G: how many items were searched."""
    scores, query_labels = np.asarray(scores, dtype=np.float64), np.asarray(query_labels)
    assert found.shape == scores.shape == valid.shape and scores.ndim == 2, (
        f"found {found.shape}, scores {scores.shape} must be (Q, L)"
    )
    assert scores.shape[0] == len(query_labels), f"{scores.shape[0]} result rows for {len(query_labels)} queries"
    relevant = valid & (found == query_labels[:, None])
    best = np.where(relevant, scores, -np.inf).max(axis=1) if scores.shape[1] else np.full(len(scores), -np.inf)  # (Q,)
    above = valid & ~relevant & (scores >= best[:, None] - atol)
    ranks = 1.0 + above.sum(axis=1)
    cut = valid.all(axis=1) & (scores.shape[1] < gallery_size)
    if scores.shape[1]:
        cut &= scores[:, -1] >= best - atol
    return np.where(relevant.any(axis=1) & ~cut, ranks, np.inf)


class RankCounts:
    """R@K and MRR@K of ranks added batch by batch: how many queries had each rank up to the largest K, and how many
    there were. No array of every rank is kept, and the sums are exact (integer counts, MRR as a fraction rounded once),
    so the metrics cannot depend on how the queries were batched."""

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10)):
        self.ks, self.n, self.at = tuple(ks), 0, {}  # at: rank -> queries with that rank (ranks <= max(ks) only)

    def add(self, ranks: np.ndarray) -> RankCounts:
        ranks = np.asarray(ranks, dtype=np.float64)
        self.n += len(ranks)
        values, counts = np.unique(ranks[ranks <= max(self.ks)], return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            self.at[value] = self.at.get(value, 0) + count
        return self

    def metrics(self) -> dict[str, float]:
        """{"R@1": ..., "R@5": ..., "R@10": ..., "MRR@10": ...} (MRR cut at the largest k; all 0 without queries)."""
        from fractions import Fraction

        n = max(self.n, 1)
        out = {f"R@{k}": sum(c for r, c in self.at.items() if r <= k) / n for k in self.ks}
        out[f"MRR@{max(self.ks)}"] = float(
            sum((Fraction(c) / Fraction(r) for r, c in self.at.items()), Fraction(0)) / n
        )
        return out


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """{"R@1": ..., "R@5": ..., "R@10": ..., "MRR@10": ...} (MRR cut at the largest k): R@k the share of queries whose
    best relevant item ranks within the top k, MRR the mean reciprocal rank counting ranks beyond k as 0."""
    return RankCounts(ks).add(ranks).metrics()


def search_depth_of_counts(most: int, gallery_size: int, k: int) -> int:
    """`search_depth` from the most gallery items any one label has and the gallery's size."""
    return int(min(gallery_size, k + most))


def search_depth(gallery_labels: np.ndarray, k: int) -> int:
    """List length that makes every rank <= k exact: k plus the most gallery items any one label has, capped at G."""
    counts = np.unique(np.asarray(gallery_labels), return_counts=True)[1]
    return search_depth_of_counts(int(counts.max()) if len(counts) else 0, len(gallery_labels), k)


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
        raise UserError(
            f"FAISS rejects index {factory!r} for dimension {dim} ({_faiss_message(exc)}); "
            "use Flat (exact) or a factory string such as IVF256,Flat, HNSW32, IVF256,PQ16"
        ) from None


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
    for IVF,PQ (16 bytes a vector for PQ16, the choice for millions) and an 8-byte id, every vector for Flat.

    With `labelled`, each vector is added with an int64 id of the caller's (its label), which searches return instead
    of its position: IVF indexes store ids anyway; any other is wrapped in an IndexIDMap (8 bytes a vector more).
    """

    def __init__(self, factory: str, dim: int, nprobe: int | None = None, use_gpu: bool = True, labelled: bool = False):
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
        self.labelled = labelled
        self._top = (
            faiss.IndexIDMap(self.index) if labelled and self.nlist is None else self.index
        )  # what adds and searches
        self._held: list[np.ndarray] = []  # vectors added before the index is trained
        self._held_ids: list[np.ndarray] = []
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
            raise UserError(
                f"index {self.factory!r} cannot be trained on this gallery of {len(sample):,} vectors "
                f"({_faiss_message(exc)}); use fewer IVF lists (e.g. IVF{max(1, len(sample) // 39)},Flat) "
                "or the exact Flat index"
            ) from None

    def add(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Append (B, D) vectors: with `labelled`, under `ids` (B,) int64, else their ids follow on from the vectors added before."""
        assert (ids is not None) == self.labelled, "ids go with a labelled index, and only there"
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = None if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
        self.ntotal += len(vectors)
        if self.index.is_trained:
            self._add(vectors, ids)
            return
        self._held.append(vectors)
        self._held_ids += [ids] if ids is not None else []
        self._held_rows += len(vectors)
        if self._held_rows >= self.train_size:
            self._flush()

    def _add(self, vectors: np.ndarray, ids: np.ndarray | None) -> None:
        self._top.add(vectors) if ids is None else self._top.add_with_ids(vectors, ids)

    def _flush(self) -> None:
        held = np.concatenate(self._held) if len(self._held) > 1 else self._held[0]
        ids = np.concatenate(self._held_ids) if self._held_ids else None
        self._held, self._held_ids, self._held_rows = [], [], 0
        if not self.index.is_trained:
            self._train(held[: self.train_size])
        self._add(held, ids)

    def finish(self, depth: int = 10):
        """The searchable index, tuned for lists of `depth` (nprobe for IVF, efSearch for HNSW: at least 2 x depth)."""
        import faiss

        assert self.ntotal > 0, "an empty gallery cannot be searched"
        if self._held:
            self._flush()
        if depth == self._depth:
            return self._top
        self._depth = depth
        params = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        probes = int(min(self.nprobe or default_nprobe(self.nlist), self.nlist)) if self.nlist is not None else 0
        if self.nlist is not None:
            params.set_index_parameter(self.index, "nprobe", probes)
        if "efSearch" in self.knobs:
            params.set_index_parameter(self.index, "efSearch", max(64, 2 * depth))
        if "quantizer_efSearch" in self.knobs:  # an HNSW coarse quantizer must return at least nprobe lists
            params.set_index_parameter(self.index, "quantizer_efSearch", max(64, 2 * probes))
        return self._top

    def ranks(
        self,
        queries: np.ndarray,
        query_labels: np.ndarray,
        depth: int,
        batch_size: int = 4096,
        label_of: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """(Q,) ranks of L2-normalised `queries` against everything added: a listed item is relevant when its label
        equals the query's, its label being `label_of(id)`, or the id itself (a labelled index's ids, or positions)."""
        scores, ids = search(self.finish(depth), queries, depth, batch_size)
        valid = ids >= 0
        found = ids if label_of is None else np.where(valid, label_of(np.where(valid, ids, 0)), -1)
        return ranks_from_labels(found, valid, scores, query_labels, self.ntotal)


def build_index(
    gallery: np.ndarray, factory: str = "Flat", nprobe: int | None = None, use_gpu: bool = True, depth: int = 10
):
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
        scores[start : start + batch_size], ids[start : start + batch_size] = index.search(
            queries[start : start + batch_size], k
        )
    return scores, ids


def retrieve(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    factory: str = "Flat",
    nprobe: int | None = None,
    use_gpu: bool = True,
    batch_size: int = 4096,
) -> tuple[dict[str, float], np.ndarray]:
    """L2-normalise both sides, search the gallery with FAISS, and score: (metrics dict, ranks (Q,))."""
    assert queries.shape[1] == gallery.shape[1], (
        f"queries {queries.shape} and gallery {gallery.shape} differ in dimension"
    )
    assert len(gallery) == len(gallery_labels) and len(queries) == len(query_labels)
    depth = search_depth(gallery_labels, max(ks))
    index = build_index(l2_normalize(gallery), factory, nprobe, use_gpu, depth)
    scores, ids = search(index, l2_normalize(queries), depth, batch_size)
    ranks = ranks_from_topk(ids, scores, query_labels, gallery_labels)
    return metrics_from_ranks(ranks, ks), ranks
