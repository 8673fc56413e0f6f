"""Stage 2's data: (caption, cached teacher target) pairs joined to the cache by id in bounded memory and kept on disk,
and the validation split by id. The batches cut from them are `mclip.train.batches`'."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mclip.config import TrainConfig
from mclip.errors import UserError
from mclip.store.captions import CaptionFile
from mclip.store.columns import Bits, Column, RawArray
from mclip.store.join import IdIndex
from mclip.store.outputs import write_array

PAIR_FILES = {"rows": "<i8", "src": "<i8", "langs": "<i1"}  # one raw little-endian array per field, P values each
CHUNK = 1 << 16  # pairs handled at once in a pass over them: bounded memory whatever the data's size


@dataclass
class Pairs:
    """(caption, teacher target) pairs, held on disk and memory-mapped: pair i is the caption at row `src[i]` of its
    language's text column and the cache row `rows[i]` (cache ids are unique, so row == id). Nothing here holds a
    Python object, or a copy of a caption, per pair: 17 bytes a pair on disk, read through the page cache every rank
    on a node shares."""

    sources: list  # per language: the text column (`Column` over a dataset's or the cache's memory-mapped batches)
    src: np.ndarray  # (P,) int64 row of each pair's caption in sources[langs[i]]
    rows: np.ndarray  # (P,) int64 cache rows
    langs: np.ndarray  # (P,) int8 index into `languages`
    languages: list[str]
    cache_groups: (
        np.ndarray
    )  # (N,) per cache row: equal for rows with the same English caption (one target, as in stage 3)

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, index: np.ndarray | None = None) -> list[str]:
        """The captions of pairs `index` (all pairs when None), in that order."""
        index = np.arange(len(self)) if index is None else np.asarray(index, dtype=np.int64)
        out: list = [None] * len(index)
        langs, src = np.asarray(self.langs[index]), np.asarray(self.src[index])
        for k in np.unique(langs):
            where = np.flatnonzero(langs == k)
            for w, text in zip(where.tolist(), self.sources[k].take(src[where]).to_pylist()):
                out[w] = text
        return out

    def groups(self, index: np.ndarray) -> np.ndarray:
        """(len(index),) int64 English-caption group of pairs `index`."""
        return np.asarray(self.cache_groups[np.asarray(self.rows[np.asarray(index)])], dtype=np.int64)

    def subset(self, keep: np.ndarray) -> Pairs:
        """The pairs where `keep` (a mask), in memory: for the validation set and the vocabulary pass, not the whole data."""
        idx = np.flatnonzero(keep)
        return Pairs(
            self.sources,
            np.asarray(self.src[idx]),
            np.asarray(self.rows[idx]),
            np.asarray(self.langs[idx]),
            self.languages,
            self.cache_groups,
        )

    def digest(self) -> str:
        """What the pairs are (texts, rows, languages, in order): a resumed run must train on exactly these."""
        h = hashlib.blake2b(digest_size=16)
        for start in range(0, len(self), CHUNK):
            index = np.arange(start, min(len(self), start + CHUNK))
            for text in self.texts(index):
                raw = text.encode("utf-8")
                h.update(len(raw).to_bytes(8, "little") + raw)
            h.update(np.asarray(self.rows[index]).tobytes())
            h.update(np.asarray(self.langs[index], dtype=np.int64).tobytes())
        return h.hexdigest()


class _PairWriter:
    """Appends pairs to raw files, one set per language (so a language's pairs stay together, in data order)."""

    def __init__(self, folder: Path, languages: list[str]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.files = {
            (k, name): open(folder / f"{name}.{k}", "wb") for k in range(len(languages)) for name in PAIR_FILES
        }
        self.count = np.zeros(len(languages), dtype=np.int64)

    def add(self, k: int, src: np.ndarray, rows: np.ndarray) -> None:
        self.files[k, "src"].write(np.asarray(src, "<i8").tobytes())
        self.files[k, "rows"].write(np.asarray(rows, "<i8").tobytes())
        self.files[k, "langs"].write(np.full(len(rows), k, "<i1").tobytes())
        self.count[k] += len(rows)

    def close(self) -> None:
        """Concatenate the languages' files in language order into one file per field."""
        for handle in self.files.values():
            handle.close()
        for name in PAIR_FILES:
            with open(self.folder / name, "wb") as whole:
                for k in range(len(self.count)):
                    part = self.folder / f"{name}.{k}"
                    with open(part, "rb") as piece:
                        shutil.copyfileobj(piece, whole, 1 << 22)
                    part.unlink()


def _open(folder: Path, sources: list, languages: list[str], cache_groups) -> Pairs:
    arrays = {name: RawArray(folder / name, dtype) for name, dtype in PAIR_FILES.items()}  # read by pread: flat RSS
    return Pairs(sources, arrays["src"], arrays["rows"], arrays["langs"], languages, cache_groups)


def text_groups(cache_texts: pa.Array) -> np.ndarray:
    """(N,) int64 per cache row: equal where two rows hold the same English caption."""
    return pc.dictionary_encode(cache_texts).indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _cache_groups(cache, folder: Path) -> np.ndarray:
    """(N,) English-caption group per cache row, on disk (read by pread): stage 1's `caption_group` column when the cache has it
    (streamed, bounded), else grouped by text here (caches of mclip before format 2: a hash table of the texts)."""
    path = folder / "cache_groups"
    if "caption_group" in cache.columns:
        with open(path, "wb") as handle:
            for _, values in cache.batches("caption_group"):
                handle.write(values.to_numpy(zero_copy_only=False).astype("<i8").tobytes())
    else:
        write_array(path, text_groups(cache.table(["text"]).column("text").combine_chunks()).astype("<i8"))
    return RawArray(path, "<i8")


def hash_unit(ids: list[str], seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per id from blake2b(seed:id): a split that holds across runs, machines and row order."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") / 2.0**64 for i in ids),
        dtype=np.float64,
        count=len(ids),
    )


class _Captions(CaptionFile):
    """Stage 2's caption file: wide (id, caption_<lang>...) or long (id, lang, text); its English pairs are the cache's text."""

    def __init__(self, config: TrainConfig, data: str, split: str, languages: list[str]):
        super().__init__(data, split, languages, id_column=config.id_column, template=config.text_column_template)


def _join(
    captions: _Captions,
    languages: list[str],
    index,
    n_cache: int,
    folder: Path,
    held: Bits | None,
    is_val: Bits | None,
    seed: int,
    val_fraction: float,
) -> tuple[dict, dict]:
    """Stream one caption file into pair files under folder/"all" (and folder/"held" for held-out ids): per language,
    each non-blank caption whose id is in the cache. "en" pairs take the cache's own text (what the teacher embedded) for
    every id joined in another language. `held`: the cache rows held out for validation (from --val-data), else the
    rows with hash_unit(id) < val_fraction are held out and added to `is_val`."""
    others = [lang for lang in languages if lang != "en"]
    writers = {"all": _PairWriter(folder / "all", languages), "held": _PairWriter(folder / "held", languages)}
    joined = Bits(n_cache)  # cache rows that joined in some language: the English pairs' rows
    trained = Bits(n_cache)  # cache rows with a training pair
    report = {
        lang: {"pairs": 0, "empty_texts": 0, "ids_without_target": 0, "examples_without_target": []} for lang in others
    }
    seen = {lang: Bits(n_cache) for lang in others}
    for start, ids, part in captions.chunks():  # refuses a long format's language without rows at the end
        rows = index.lookup(ids)  # (chunk,) cache row per data row, -1 where the cache lacks the id
        if is_val is not None and val_fraction > 0:
            for at in range(0, len(rows), CHUNK):  # a Python string per id for blake2b: a slice of them at a time
                found = at + np.flatnonzero(rows[at : at + CHUNK] >= 0)
                is_val.add(rows[found][hash_unit(ids.take(pa.array(found)).to_pylist(), seed) < val_fraction])
        for lang in others:
            keep, in_lang = captions.kept(part, lang)
            r = rows[keep]
            ok = r >= 0
            lost = keep[~ok]
            stats = report[lang]
            stats["empty_texts"] += in_lang - len(keep)
            stats["ids_without_target"] += len(lost)
            if len(stats["examples_without_target"]) < 20 and len(lost):
                stats["examples_without_target"] += ids.take(
                    pa.array(lost[: 20 - len(stats["examples_without_target"])])
                ).to_pylist()
            src, r = start + keep[ok], r[ok]
            out = held[r] if held is not None else (is_val[r] if is_val is not None else np.zeros(len(r), bool))
            k = languages.index(lang)
            writers["all"].add(k, src[~out], r[~out])
            writers["held"].add(k, src[out], r[out])
            joined.add(r)
            trained.add(r[~out])
            seen[lang].add(r)
            stats["pairs"] += len(r)
    for lang in others:
        report[lang]["targets_without_text"] = n_cache - seen[lang].count()
    if "en" in languages:
        k = languages.index("en")
        for start in range(0, n_cache, CHUNK):
            r = joined.rows(start, start + CHUNK)
            out = held[r] if held is not None else (is_val[r] if is_val is not None else np.zeros(len(r), bool))
            writers["all"].add(k, r[~out], r[~out])  # an English pair's caption is the cache's text of its own row
            writers["held"].add(k, r[out], r[out])
        report["en"] = {
            "pairs": joined.count(),
            "source": "cache text",
            "targets_without_text": n_cache - joined.count(),
        }
    for writer in writers.values():
        writer.close()
    return report, {name: int(w.count.sum()) for name, w in writers.items()} | {"train_ids": trained.count()}


def build_pairs(config: TrainConfig, cache, folder: Path) -> dict:
    """Join the caption file(s) to the cache into pair files under `folder` (rank 0, before training; bounded memory:
    a bitmap of the cache rows and one chunk of rows at a time). Returns the join report; `open_pairs` reads the result."""

    languages = _languages(config)
    others = [lang for lang in languages if lang != "en"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    index = IdIndex.build(cache, folder / "ids")
    n = len(cache)
    _cache_groups(cache, folder)
    sample_ids = cache.column("id").take(np.arange(min(3, n))).to_pylist()

    files: dict = {}  # where each caption file's columns lie, so the ranks read them without loading the dataset again

    def load_join(data: str, split: str, sub: str, held, is_val) -> dict:
        captions = _Captions(config, data, split, others)
        files[sub] = (
            {"files": captions.files, "columns": captions.columns, "rows": len(captions)} if captions.files else None
        )
        report, counts = _join(
            captions, languages, index, n, folder / sub, held, is_val, config.seed, config.val_fraction
        )
        if not any(report[lang]["pairs"] for lang in others):
            sample = next(iter(captions.chunks()))[1][:3].to_pylist() if len(captions) else []
            raise UserError(
                f"no caption id in {data} matches an id in the cache {config.cache} (data ids {sample} vs cache ids "
                f"{sample_ids}); build the cache from the same rows with `mclip embed-teacher --id-column {config.id_column}`"
            )
        return report | {"_counts": counts}

    held = is_val = None
    val_report = None
    if config.val_data:
        val_report = load_join(config.val_data, config.val_split, "val", None, None)
        held = Bits(n)
        val_pairs = _open(folder / "val" / "all", [], languages, np.zeros(0))
        for _, rows in val_pairs.rows.blocks(CHUNK):
            held.add(rows)
    elif config.val_fraction > 0:
        is_val = Bits(n)
    report = load_join(config.data, config.split, "train", held, is_val)
    held_rows = held if held is not None else is_val
    val_rows = held_rows.rows() if held_rows is not None else np.zeros(0, np.int64)
    if config.val_fraction > 0 and not config.val_data and len(val_rows) == 0:
        candidates = report["en"]["pairs"] if "en" in report else sum(report[lang]["pairs"] for lang in others)
        raise UserError(
            f"val_fraction={config.val_fraction} holds out none of the {candidates} ids; raise it or pass --val-data"
        )
    eval_rows = np.zeros(0, np.int64)
    if len(val_rows):  # the validation ids the periodic evaluation scores: the smallest hashes, at most val_max_ids
        order = np.argsort(hash_unit(cache.column("id").take(val_rows).to_pylist(), config.seed), kind="stable")
        eval_rows = np.sort(val_rows[order[: config.val_max_ids]])
    counts = report.pop("_counts")
    if val_report is not None:
        report["validation_join"] = {k: v for k, v in val_report.items() if k != "_counts"}
    report.update(
        {
            "train_pairs": counts["all"],
            "train_ids": counts["train_ids"],
            "validation_ids": len(val_rows),
            "held_out_pairs": counts["held"],
            "languages": languages,
        }
    )
    np.save(folder / "eval_rows.npy", eval_rows)
    (folder / "sources.json").write_text(json.dumps(files))
    (folder / "report.json").write_text(json.dumps(report))
    return report


def _languages(config: TrainConfig) -> list[str]:
    return list(config.languages) + (["en"] if config.include_english and "en" not in config.languages else [])


def open_pairs(config: TrainConfig, cache, folder: Path) -> tuple[Pairs, Pairs | None, dict]:
    """The pairs `build_pairs` wrote (every rank opens the same files): training pairs, validation pairs (the eval ids'
    pairs, in memory; ids held out whole, so no caption of a validation id is trained on) and the join report."""
    languages = _languages(config)
    report = json.loads((folder / "report.json").read_text())
    cache_groups = RawArray(folder / "cache_groups", "<i8")
    en_source = cache.column("text")

    known = json.loads((folder / "sources.json").read_text())

    def sources(data: str, split: str, sub: str) -> list:
        """Each language's caption column: from the Arrow files build_pairs found (loading a dataset maps all of its
        file into every rank for a moment: 0.26 GB at 10M rows), else through the dataset."""
        where = known.get(sub)
        if where is not None:
            columns = {lang: Column.from_files(where["files"], name) for lang, name in where["columns"].items()}
            if all(len(c) == where["rows"] for c in columns.values()):
                return [en_source if lang == "en" else columns[lang] for lang in languages]
        captions = _Captions(config, data, split, [lang for lang in languages if lang != "en"])
        return [en_source if lang == "en" else captions.source(lang) for lang in languages]

    train_sources = sources(config.data, config.split, "train")
    train = _open(folder / "train" / "all", train_sources, languages, cache_groups)
    eval_rows = np.load(folder / "eval_rows.npy")
    val = None
    if len(eval_rows):
        held = (
            _open(folder / "val" / "all", sources(config.val_data, config.val_split, "val"), languages, cache_groups)
            if config.val_data
            else _open(folder / "train" / "held", train_sources, languages, cache_groups)
        )
        # eval_rows is sorted and small (--val-max-ids): a membership test per block, nothing per cache row
        keep = (
            np.concatenate([np.isin(rows, eval_rows) for _, rows in held.rows.blocks(CHUNK)])
            if len(held)
            else np.zeros(0, bool)
        )
        val = held.subset(keep)
    report.update({"eval_ids": len(np.unique(val.rows)) if val else 0, "eval_pairs": len(val) if val else 0})
    if len(train) == 0:
        raise UserError(
            "no training pairs are left after holding out validation ids; lower --val-fraction or check --val-data"
        )
    return train, val, report


def prepare_pairs(config: TrainConfig, cache, folder: Path | None = None) -> tuple[Pairs, Pairs | None, dict]:
    """build_pairs + open_pairs in one process (tests, and a one-rank run); folder defaults to <out>/.pairs."""
    folder = Path(folder) if folder is not None else Path(config.out) / PAIRS_DIR
    build_pairs(config, cache, folder)
    return open_pairs(config, cache, folder)


PAIRS_DIR = ".pairs"
