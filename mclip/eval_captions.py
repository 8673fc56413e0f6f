"""Stage 3's captions: each language's non-empty captions whose id is in the teacher cache, as row numbers.

The data is read in chunks of Arrow rows and joined through `mclip.join.IdIndex`, so no Python list of a column or dict
of ids is ever built: what is kept per language is two int64 arrays (the data row of each caption, the cache row of its
id), and the texts are taken from the memory-mapped data batch by batch when they are encoded. The formats and column
rules are `mclip.data.load_parallel`'s (wide: id, caption, caption_<lang>; long: id, lang, text).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mclip import shards
from mclip.config import EvalConfig
from mclip.errors import UserError

CHUNK = 1 << 16  # data rows read, checked and joined at once


@dataclass
class Captions:
    """One language's captions joined to the cache: texts are read from `source` (a column) at `data_rows`."""

    source: shards.Column  # the text column the captions are read from: the data's, or the cache's own English text
    data_rows: np.ndarray  # (N,) int64 row in `source` of each caption
    rows: np.ndarray  # (N,) int64 cache row of its id
    missing: int  # captions whose id is not in the cache
    empty: int  # captions left out as empty

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, start: int, stop: int) -> list[str]:
        """The texts of captions start..stop (a Python list of just those)."""
        return self.source.take(self.data_rows[start:stop]).to_pylist()


@dataclass
class _Scan:
    """A language before the --limit cut: what the join found, with the first id of the data and the first lost one."""

    column: str
    data_rows: np.ndarray
    rows: np.ndarray
    missing: int
    empty: int
    first_id: str | None
    first_lost: str | None


def _layout(ds, config: EvalConfig, wanted: list[str]) -> tuple[bool, dict[str, str]]:
    """(long format?, lang -> text column), with load_parallel's errors for what is not there."""
    have = set(ds.column_names)
    if config.id_column not in have:
        raise UserError(f"column {config.id_column!r} not found in {config.data}; it has {', '.join(ds.column_names)} (use --id-column)")
    template = config.text_column_template
    long = {config.lang_column, config.text_column} <= have and not any(template.format(lang=l) in have for l in config.languages)
    if long:
        return True, {lang: config.text_column for lang in wanted}
    columns = {}
    for lang in wanted:
        column = config.caption_column if lang == "en" and config.caption_column in have else template.format(lang=lang)
        if column not in have:
            if lang == "en" and lang not in config.languages:
                continue
            raise UserError(f"column {column!r} for language {lang!r} not found in {config.data}; it has {', '.join(ds.column_names)} "
                            "(fix --languages or --text-column-template)")
        columns[lang] = column
    return False, columns


def _scan(table, lang: str, column: str, long: bool, config: EvalConfig, index) -> _Scan:
    """One language's captions chunk by chunk: blank ones counted, the rest joined to the cache by id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mclip.data import as_string, blank

    data_rows, rows, missing, empty, first_id, first_lost = [], [], 0, 0, None, None
    for start in range(0, table.num_rows, CHUNK):
        part = table.slice(start, CHUNK)
        texts = part.column(column)
        is_text = pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
        bad = blank(texts).to_numpy(zero_copy_only=False) if is_text else np.ones(part.num_rows, bool)  # non-text: empty, as before
        mine = pc.equal(as_string(part.column(config.lang_column)), lang).fill_null(False).to_numpy(zero_copy_only=False) if long else True
        empty += int((bad & mine).sum())
        keep = np.flatnonzero(~bad & mine)
        if not len(keep):
            continue
        ids = as_string(part.column(config.id_column).take(pa.array(keep)))
        found = index.lookup(ids)
        hit = found >= 0
        first_id = ids[0].as_py() if first_id is None else first_id
        if first_lost is None and not hit.all():
            first_lost = ids[int(np.argmin(hit))].as_py()
        missing += int((~hit).sum())
        data_rows.append(start + keep[hit])
        rows.append(found[hit])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return _Scan(column, cat(data_rows), cat(rows), missing, empty, first_id, first_lost)


def join(config: EvalConfig, cache: shards.TeacherCache, index, languages: list[str]) -> tuple[dict[str, Captions], list[str]]:
    """Each language's captions with the cache row of their id (`index`: a `join.IdIndex` of the cache), and warnings;
    ids absent from the cache are counted and left out. "en" without English captions in the data: the cache's own
    English text of the ids the other languages scored."""
    import pyarrow.compute as pc

    from mclip.data import load_dataset

    ds = load_dataset(config.data, config.split)
    wanted = list(config.languages) + (["en"] if "en" not in config.languages else [])
    long, columns = _layout(ds, config, wanted)
    table = ds.with_format("arrow")[:]  # memory-mapped (a copy only for a dataset with a selection applied)
    if long:
        present = {str(v) for v in pc.unique(table.column(config.lang_column)).to_pylist()}
        for lang in wanted:
            if lang != "en" and lang not in present:
                found = sorted(present)
                raise UserError(f"language {lang!r} has no rows in {config.data} (column {config.lang_column!r} has "
                                f"{', '.join(found[:20])}); fix --languages")
    scans = {lang: _scan(table, lang, columns[lang], long, config, index) for lang in languages if lang in columns}
    text_of = {name: shards.Column(table.column(name).chunks) for name in {s.column for s in scans.values()}}
    joined, total, notes = {}, 0, []  # notes become warnings only once the join is known to hold something
    for lang in languages:
        scan = scans.get(lang)
        if lang == "en" and (scan is None or scan.first_id is None):  # no English in the data: the cache's own captions
            scored = np.concatenate([part.rows for part in joined.values()]) if joined else np.zeros(0, np.int64)
            _, first = np.unique(scored, return_index=True)
            rows = scored[np.sort(first)][: config.limit]  # in the order they were first scored
            joined[lang] = Captions(cache.column("text"), rows, rows, 0, 0)
            continue
        if scan.missing:
            notes.append(f"{lang}: {scan.missing:,} of {len(scan.rows) + scan.missing:,} ids are not in the cache "
                         f"(e.g. {scan.first_lost!r}); they are left out")
        keep = slice(config.limit)
        joined[lang] = Captions(text_of[scan.column], scan.data_rows[keep], scan.rows[keep], scan.missing, scan.empty)
        total += len(joined[lang])
    if total == 0:
        sample = next((s.first_id for s in scans.values() if s.first_id is not None), None)
        first_cache_id = cache.column("id").take(np.zeros(1, np.int64))[0].as_py() if len(cache) else None
        raise UserError(f"none of the ids in {config.data} (e.g. {sample!r}, column {config.id_column!r}) are in cache {config.cache} "
                        f"(e.g. {first_cache_id!r}); pass the cache built from this data, or the right --id-column")
    for lang in [code for code in joined if len(joined[code]) == 0]:
        notes.append(f"{lang}: no caption joins the cache; the language is left out")
        del joined[lang]
    return joined, notes
