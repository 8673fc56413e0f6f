"""Stage 3's scoring of one language in memory bounded by --query-batch-size and one index: per-caption arrays on disk,
galleries added to FAISS in batches read from the cache by pread, queries searched in batches, metrics counted per batch.

Per language, one index at a time: (1) the gallery of English targets (one per distinct English caption): each batch of
captions is encoded by every system (the student, the teacher baseline), searched against it (xx→en) and written to a
scratch file; (2) the gallery of images, searched by those vectors read back (xx→img); (3) per system, its own index of
the captions, each added under its target's label, which the English targets and the images search (en→xx, img→xx).
What stays in memory is that index (codes and ids for IVF,PQ; every vector for Flat), a training sample of at most
`metrics.IndexBuilder.train_size` vectors, one batch, and a few bits per cache row (which English captions and images
a language has); the labels of every caption, the targets' cache rows and the vectors are raw files read back by pread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mclip.config import EvalConfig
from mclip.evaluate import metrics
from mclip.evaluate.captions import BLOCK, Captions
from mclip.store import shards
from mclip.store.columns import Bits, RawArray
from mclip.store.outputs import write_array

GROUP_COLUMN = "caption_group"  # int64 per cache row, equal <=> identical English caption (cache format_version 2)
BASELINE = "teacher_baseline"
PART = 1 << 18  # targets placed at once when their rows are put in label order (2 MB)


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


@dataclass
class Values:
    """Per cache row, a value equal exactly for rows of one target (identical English captions, or one image), ordered
    as the targets are: a raw int64 file of values in 0..size-1."""

    values: RawArray
    size: int


def cache_values(cache: shards.TeacherCache, column: str, path: Path) -> Values:
    """Identical English captions are one target: by the cache's caption_group column when it has one (streamed), else
    by its English text; an image is one target by its image_id. Strings are ranked in memory (a v1 cache's texts, the
    image ids: Arrow's sort of the whole column), so targets keep the sorted order of their values either way."""
    if column == "text" and GROUP_COLUMN in cache.columns:
        size = 0
        with open(path, "wb") as out:
            for _, values in cache.batches(GROUP_COLUMN):
                values = values.to_numpy(zero_copy_only=False).astype("<i8")
                size = max(size, int(values.max()) + 1 if len(values) else 0)
                out.write(values.tobytes())
        return Values(RawArray(path, "<i8"), size)
    first, labels = groups(cache.table([column]).column(column))
    write_array(path, labels.astype("<i8"))
    return Values(RawArray(path, "<i8"), len(first))


@dataclass
class Targets:
    """One language's targets of one kind: `labels` (N,) the target of each caption, `rows` (G,) each target's cache row
    (its first caption's), in label order, both on disk; `most`: the most captions one target has."""

    labels: RawArray
    rows: RawArray
    most: int

    def __len__(self) -> int:
        return len(self.rows)


def targets(rows: RawArray, of: Values, path: Path) -> Targets:
    """The distinct values of the captions' cache rows `rows` are the targets, labelled in the order of the values (as
    np.unique would), in two passes of BLOCK captions and one of PART targets: a bit per value says which ones occur."""
    present = Bits(of.size)
    for start in range(0, len(rows), BLOCK):
        present.add(of.values[rows[start : start + BLOCK]])
    count = present.count()
    parts = [(open(f"{path}.first.{p}", "wb"), open(f"{path}.count.{p}", "wb")) for p in range(-(-count // PART))]
    placed = Bits(of.size)
    with open(f"{path}.labels", "wb") as out:
        for start in range(0, len(rows), BLOCK):
            r = rows[start : start + BLOCK]
            values = of.values[r]
            labels = present.ranks(values)
            out.write(labels.astype("<i8").tobytes())
            _, first = np.unique(values, return_index=True)
            first = np.sort(first[~placed[values[first]]])  # the captions that are their target's first
            placed.add(values[first])
            for p in np.unique(labels // PART):
                parts[p][1].write(labels[labels // PART == p].astype("<i8").tobytes())
                mine = first[labels[first] // PART == p]
                parts[p][0].write(np.stack([labels[mine], r[mine]], axis=1).astype("<i8").tobytes())
    most = 0
    with open(f"{path}.rows", "wb") as out:
        for p, (firsts, counts) in enumerate(parts):
            firsts.close()
            counts.close()
            pairs = np.fromfile(firsts.name, "<i8").reshape(-1, 2)
            placed_rows = np.empty(len(pairs), np.int64)
            placed_rows[pairs[:, 0] - p * PART] = pairs[:, 1]
            out.write(placed_rows.astype("<i8").tobytes())
            tally = np.zeros(len(pairs), np.int64)
            for _, labels in RawArray(counts.name, "<i8").blocks(BLOCK):
                tally += np.bincount(labels - p * PART, minlength=len(pairs))
            most = max(most, int(tally.max()) if len(tally) else 0)
            for done in (firsts.name, counts.name):
                Path(done).unlink()
    return Targets(RawArray(f"{path}.labels", "<i8"), RawArray(f"{path}.rows", "<i8"), most)


def _normalized(vectors: np.ndarray) -> np.ndarray:
    return metrics.l2_normalize(vectors)


def _gallery(read: Callable[[np.ndarray], np.ndarray], size: int, config: EvalConfig, dim: int) -> metrics.IndexBuilder:
    """An index of `size` vectors read `read(positions)` batch by batch; trained on a seeded sample of them when it needs
    training and they are more than its training sample (all of them, in order, otherwise: as one array would)."""
    builder = metrics.IndexBuilder(config.index, dim, config.nprobe, config.faiss_gpu)
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


class _Spill:
    """A system's caption vectors (N, D) float32, written batch by batch and read back the same way."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim, self.file, self.array = path, dim, open(path, "wb"), None

    def write(self, vectors: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(vectors, "<f4").tobytes())

    def read(self, at: np.ndarray) -> np.ndarray:
        if self.array is None:
            self.file.close()
            self.array = RawArray(self.path, "<f4")
        return self.array[int(at[0]) * self.dim : (int(at[-1]) + 1) * self.dim].reshape(len(at), self.dim)


def score(
    part: Captions,
    lang: str,
    cache: shards.TeacherCache,
    model,
    teacher,
    values: dict[str, Values],
    config: EvalConfig,
    folder: Path,
) -> tuple[dict[str, dict[str, tuple]], dict]:
    """system -> direction -> (metrics, queries, gallery) for one language, and its counts. `values`: cache_values of
    "text" and, when images are scored, of "image_id"; scratch files go to `folder`."""
    k, batch, n, ks = max(config.ks), config.query_batch_size, len(part), config.ks
    use_images = "image_id" in values
    vectors = cache.targets("embedding")
    en = targets(part.rows, values["text"], folder / f"{lang}.en")
    img = targets(part.rows, values["image_id"], folder / f"{lang}.img") if use_images else None
    counts = {
        "captions": n,
        "english_targets": len(en),
        "missing_ids": part.missing,
        "empty": part.empty,
        **({"images": len(img)} if use_images else {}),
    }

    systems: list[tuple[str, Callable, bool]] = [
        ("student", lambda texts, at: model.encode(texts, batch_size=config.batch_size, normalize=True), True)
    ]
    if teacher is not None and lang != "en":
        systems.append((BASELINE, lambda texts, at: teacher.encode(texts, batch_size=config.batch_size), True))
    elif lang == "en" and use_images:  # the cached teacher on its own English text: the ceiling the student aims at
        systems.append((BASELINE, lambda texts, at: vectors.gather(part.rows[int(at[0]) : int(at[-1]) + 1]), False))
    found = {
        (name, d): metrics.RankCounts(ks)
        for name, _, _ in systems
        for d in ("text_to_text", "text_to_text_reverse", "text_to_image", "image_to_text")
    }
    spills = {name: _Spill(folder / f"{lang}.{name}.f4", cache.dim) for name, _, _ in systems}

    gallery = _gallery(lambda at: vectors.gather(en.rows[at]), len(en), config, cache.dim)  # (1) xx→en
    depth = metrics.search_depth_of_counts(1, len(en), k)  # each English target is its own label
    bar = _bar(n, lang, config)
    for at in _batches(n, batch):
        texts = part.texts(int(at[0]), int(at[-1]) + 1)
        labels = en.labels[int(at[0]) : int(at[-1]) + 1]
        for name, encode, text in systems:
            encoded = _normalized(encode(texts, at))  # (B, D)
            if text:
                found[name, "text_to_text"].add(gallery.ranks(encoded, labels, depth, batch))
            spills[name].write(encoded)
        bar.update(len(at))
    bar.close()
    del gallery
    if use_images:  # (2) xx→img
        image_vectors = cache.targets("image_embedding")
        images = _gallery(lambda at: image_vectors.gather(img.rows[at]), len(img), config, cache.dim)
        depth = metrics.search_depth_of_counts(1, len(img), k)
        for at in _batches(n, batch):
            labels = img.labels[int(at[0]) : int(at[-1]) + 1]
            for name, _, _ in systems:
                found[name, "text_to_image"].add(images.ranks(spills[name].read(at), labels, depth, batch))
        del images
    n_img = len(img) if use_images else 1
    assert len(en) * n_img < 2**62, f"{len(en)} English targets x {n_img} images do not fit one int64 label"
    out: dict[str, dict[str, tuple]] = {}
    for name, _, text in systems:  # (3) en→xx, img→xx: one system's own index at a time
        own = metrics.IndexBuilder(config.index, cache.dim, config.nprobe, config.faiss_gpu, labelled=True)
        for at in _batches(n, batch):  # each caption under (its English target, its image) as one int64
            ids = en.labels[int(at[0]) : int(at[-1]) + 1] * n_img
            own.add(spills[name].read(at), ids + (img.labels[int(at[0]) : int(at[-1]) + 1] if use_images else 0))
        spills[name].path.unlink()
        if text:
            depth = metrics.search_depth_of_counts(en.most, n, k)
            for at in _batches(len(en), batch):
                found[name, "text_to_text_reverse"].add(
                    own.ranks(
                        _normalized(vectors.gather(en.rows[at])), at, depth, batch, label_of=lambda ids: ids // n_img
                    )
                )
        if use_images:
            depth = metrics.search_depth_of_counts(img.most, n, k)
            for at in _batches(len(img), batch):
                found[name, "image_to_text"].add(
                    own.ranks(
                        _normalized(image_vectors.gather(img.rows[at])),
                        at,
                        depth,
                        batch,
                        label_of=lambda ids: ids % n_img,
                    )
                )
        del own
        scored = out.setdefault(name, {})
        if text:
            scored["text_to_text"] = (found[name, "text_to_text"].metrics(), n, len(en))
            scored["text_to_text_reverse"] = (found[name, "text_to_text_reverse"].metrics(), len(en), n)
        if use_images:
            scored["text_to_image"] = (found[name, "text_to_image"].metrics(), n, len(img))
            scored["image_to_text"] = (found[name, "image_to_text"].metrics(), len(img), n)
    return out, counts


def _bar(total: int, lang: str, config: EvalConfig):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="caption",
        desc=f"eval {lang}",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
