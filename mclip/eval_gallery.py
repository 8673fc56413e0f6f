"""Stage 3's scoring of one language in bounded memory: galleries added to FAISS in batches read from the cache's memory
map, queries encoded and searched in batches of --query-batch-size, and only their ranks kept.

Per language: the gallery of English targets (one per distinct English caption) and of images is added to its index in
batches; each batch of captions is encoded by every system (the student, the teacher baseline), searched against those
indexes (xx→en, xx→img) and added to that system's own index, which the English targets and the images then search
(en→xx, img→xx). What stays in memory is the indexes (codes for IVF,PQ; every vector for Flat), a training sample of at
most `retrieval.IndexBuilder.train_size` vectors, one batch, and int64 labels and float ranks per caption.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from mclip import retrieval, shards
from mclip.config import EvalConfig
from mclip.eval_captions import Captions

GROUP_COLUMN = "caption_group"  # int64 per cache row, equal <=> identical English caption (cache format_version 2)
BASELINE = "teacher_baseline"


def groups(values) -> tuple[np.ndarray, np.ndarray]:
    """(first, labels) of `np.unique(values, return_index=True, return_inverse=True)`: the position of each distinct value's
    first occurrence, in sorted order of the values, and each position's label. Also for an Arrow string array, sorted
    by Arrow without a Python object per row (UTF-8 byte order is code point order, Python's string order; Arrow's sort
    is stable, so the first of a run of equal values is its first occurrence)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, np.ndarray):
        _, first, labels = np.unique(values, return_index=True, return_inverse=True)
        return first, labels.reshape(-1).astype(np.int64)
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    order = pc.array_sort_indices(values).to_numpy(zero_copy_only=False).astype(np.int64)  # (N,) stable
    ordered = values.take(pa.array(order))
    new = np.ones(len(order), bool)  # a run of equal values starts here
    if len(order) > 1:
        new[1:] = ~pc.equal(ordered.slice(1), ordered.slice(0, len(order) - 1)).to_numpy(zero_copy_only=False)
    del ordered
    labels = np.empty(len(order), np.int64)
    labels[order] = np.cumsum(new) - 1
    return order[new], labels


def english_groups(cache: shards.TeacherCache, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Identical English captions are one target: (first, labels) over the cache rows of one language's captions, from the
    cache's caption_group column when it has one, else from its English text."""
    if GROUP_COLUMN in cache.columns:
        return groups(cache.column(GROUP_COLUMN).take(rows).to_numpy(zero_copy_only=False))
    return groups(cache.column("text").take(rows))


def _normalized(vectors: np.ndarray) -> np.ndarray:
    return retrieval.l2_normalize(vectors)


def _gallery(read: Callable[[np.ndarray], np.ndarray], size: int, config: EvalConfig, dim: int) -> retrieval.IndexBuilder:
    """An index of `size` vectors read `read(positions)` batch by batch; trained on a seeded sample of them when it needs
    training and they are more than its training sample (all of them, in order, otherwise: as one array would)."""
    builder = retrieval.IndexBuilder(config.index, dim, config.nprobe, config.faiss_gpu)
    if builder.train_size and size > builder.train_size:
        sample = np.sort(np.random.default_rng(0).choice(size, builder.train_size, replace=False))
        builder.train(_normalized(read(sample)))
    for at in _batches(size, config.query_batch_size):
        builder.add(_normalized(read(at)))
    return builder


def _batches(size: int, batch: int):
    """Positions 0..size in consecutive int64 runs of `batch`."""
    for start in range(0, size, batch):
        yield np.arange(start, min(size, start + batch))


def _reverse(index: retrieval.IndexBuilder, read: Callable[[np.ndarray], np.ndarray], size: int, labels: np.ndarray,
             config: EvalConfig) -> dict[str, float]:
    """Metrics of `size` targets (target i has label i), read in batches, searching a system's own index of captions
    (caption j has `labels[j]`): en→xx and img→xx."""
    depth = retrieval.search_depth(labels, max(config.ks))
    ranks = [index.ranks(_normalized(read(at)), at, labels, depth, config.query_batch_size)
             for at in _batches(size, config.query_batch_size)]
    return retrieval.metrics_from_ranks(np.concatenate(ranks), config.ks)


def score(part: Captions, lang: str, cache: shards.TeacherCache, model, teacher, use_images: bool,
          config: EvalConfig, last: dict | None = None) -> tuple[dict[str, dict[str, tuple]], dict]:
    """system -> direction -> (metrics, queries, gallery) for one language, and its counts. `last` keeps the English
    gallery's index from one language to the next, which reuses it when its targets are the same (as English's are)."""
    k, batch, n = max(config.ks), config.query_batch_size, len(part)
    targets = cache.targets("embedding")
    en_first, en_label = english_groups(cache, part.rows)  # (G,), (N,)
    en_rows = part.rows[en_first]
    images = None
    if use_images:
        img_first, img_label = groups(cache.column("image_id").take(part.rows))
        img_rows = part.rows[img_first]
        image_vec = cache.targets("image_embedding")
        images = _gallery(lambda at: image_vec.gather(img_rows[at]), len(img_rows), config, cache.dim)
    last = {} if last is None else last
    if "rows" in last and np.array_equal(last["rows"], en_rows):
        gallery = last["index"]
    else:
        last.clear()  # the previous language's index goes before this one is built
        gallery = _gallery(lambda at: targets.gather(en_rows[at]), len(en_rows), config, cache.dim)
        last.update(rows=en_rows, index=gallery)
    counts = {"captions": n, "english_targets": len(en_rows), "missing_ids": part.missing, "empty": part.empty,
              **({"images": len(img_rows)} if use_images else {})}

    systems: list[tuple[str, Callable, bool]] = [("student", lambda texts, at: model.encode(texts, batch_size=config.batch_size,
                                                                                            normalize=True), True)]
    if teacher is not None and lang != "en":
        systems.append((BASELINE, lambda texts, at: teacher.encode(texts, batch_size=config.batch_size), True))
    elif lang == "en" and images is not None:  # the cached teacher on its own English text: the ceiling the student aims at
        systems.append((BASELINE, lambda texts, at: targets.gather(part.rows[at]), False))
    own = {name: retrieval.IndexBuilder(config.index, cache.dim, config.nprobe, config.faiss_gpu) for name, _, _ in systems}
    ranks = {(name, d): [] for name, _, _ in systems for d in ("text_to_text", "text_to_image")}  # per batch: (B,) each
    en_ids = np.arange(len(en_rows))  # each English target is its own label
    img_ids = np.arange(len(img_rows)) if use_images else None
    en_depth = retrieval.search_depth(en_ids, k)
    img_depth = retrieval.search_depth(img_ids, k) if use_images else 0
    bar = _bar(n, lang, config)
    for at in _batches(n, batch):
        texts = part.texts(int(at[0]), int(at[-1]) + 1)
        for name, encode, text in systems:
            vectors = _normalized(encode(texts, at))  # (B, D)
            if text:
                ranks[name, "text_to_text"].append(gallery.ranks(vectors, en_label[at], en_ids, en_depth, batch))
            if images is not None:
                ranks[name, "text_to_image"].append(images.ranks(vectors, img_label[at], img_ids, img_depth, batch))
            own[name].add(vectors)
        bar.update(len(at))
    bar.close()
    gallery = images = None  # the reverse directions search the systems' own indexes
    out: dict[str, dict[str, tuple]] = {}
    for name, _, text in systems:
        scored = out.setdefault(name, {})
        if text:
            scored["text_to_text"] = (retrieval.metrics_from_ranks(np.concatenate(ranks[name, "text_to_text"]), config.ks), n, len(en_rows))
            scored["text_to_text_reverse"] = (_reverse(own[name], lambda at: targets.gather(en_rows[at]), len(en_rows), en_label, config),
                                              len(en_rows), n)
        if use_images:
            scored["text_to_image"] = (retrieval.metrics_from_ranks(np.concatenate(ranks[name, "text_to_image"]), config.ks), n, len(img_rows))
            scored["image_to_text"] = (_reverse(own[name], lambda at: image_vec.gather(img_rows[at]), len(img_rows), img_label, config),
                                       len(img_rows), n)
        del own[name]  # one system's index at a time from here on
    return out, counts


def _bar(total: int, lang: str, config: EvalConfig):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="caption", desc=f"eval {lang}", disable=not config.progress, file=sys.stderr, dynamic_ncols=True)
