"""Stage 3's captions: each language's non-empty captions whose id is in the teacher cache, as row numbers on disk.

The data is read by `mclip.store.captions.CaptionFile` (stage 2's reader: the formats, column rules and errors) in one pass of
chunks, each joined through `mclip.store.join.IdIndex`, so no Python list of a column or dict of ids is ever built. What is
kept per language is two raw int64 files in a scratch folder (the data row of each caption, the cache row of its id),
read back with pread batch by batch, and the texts are read from the data's own Arrow files by row when they are encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mclip.config import EvalConfig
from mclip.errors import UserError
from mclip.store import shards
from mclip.store.captions import CaptionFile
from mclip.store.columns import Bits, Column, RawArray

BLOCK = 1 << 16  # caption rows read and joined at once, and handled at once in a pass over a language's rows


@dataclass
class Captions:
    """One language's captions joined to the cache: texts are read from `source` (a column) at `data_rows`."""

    source: Column  # the text column the captions are read from: the data's, or the cache's own English text
    data_rows: RawArray  # (N,) int64 row in `source` of each caption, on disk
    rows: RawArray  # (N,) int64 cache row of its id, on disk
    missing: int  # captions whose id is not in the cache
    empty: int  # captions left out as empty

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, start: int, stop: int) -> list[str]:
        """The texts of captions start..stop (a Python list of just those)."""
        return self.source.take(self.data_rows[start:stop]).to_pylist()


class _Scan:
    """A language's join, written as it goes: the first --limit captions' data and cache rows, and what was left out."""

    def __init__(self, folder: Path, lang: str, limit: int | None):
        self.paths = folder / f"{lang}.data_rows", folder / f"{lang}.rows"
        self.files = [open(path, "wb") for path in self.paths]
        self.limit, self.kept, self.joined, self.missing, self.empty = limit, 0, 0, 0, 0
        self.first_id = self.first_lost = None

    def add(self, data_rows: np.ndarray, rows: np.ndarray) -> None:
        self.joined += len(rows)
        room = len(rows) if self.limit is None else max(0, min(len(rows), self.limit - self.kept))
        for handle, values in zip(self.files, (data_rows, rows)):
            handle.write(np.asarray(values[:room], "<i8").tobytes())
        self.kept += room

    def close(self) -> tuple[RawArray, RawArray]:
        for handle in self.files:
            handle.close()
        return RawArray(self.paths[0], "<i8"), RawArray(self.paths[1], "<i8")


def _cache_english(scans: list[RawArray], n_cache: int, path: Path, limit: int | None) -> RawArray:
    """The cache rows the other languages scored, each once, in the order first scored (at most `limit`), on disk."""
    seen, kept = Bits(n_cache), 0
    with open(path, "wb") as out:
        for rows in scans:
            for start in range(0, len(rows), BLOCK):
                block = rows[start : start + BLOCK]
                _, first = np.unique(block, return_index=True)
                new = block[np.sort(first)]
                new = new[~seen[new]]
                new = new[: None if limit is None else max(0, limit - kept)]
                seen.add(new)
                out.write(new.astype("<i8").tobytes())
                kept += len(new)
    return RawArray(path, "<i8")


def join(
    config: EvalConfig, cache: shards.TeacherCache, index, languages: list[str], folder: Path
) -> tuple[dict[str, Captions], list[str]]:
    """Each language's captions with the cache row of their id (`index`: a `join.IdIndex` of the cache), and warnings;
    ids absent from the cache are counted and left out. "en" without English captions in the data: the cache's own
    English text of the ids the other languages scored. Row files go to `folder`."""

    reader = CaptionFile(
        config.data,
        config.split,
        list(config.languages),
        id_column=config.id_column,
        template=config.text_column_template,
        lang_column=config.lang_column,
        text_column=config.text_column,
        english_column=config.caption_column,
        optional=() if "en" in config.languages else ("en",),
    )
    scans = {lang: _Scan(folder, lang, config.limit) for lang in languages if lang in reader.columns}
    for start, ids, part in reader.chunks(BLOCK):  # refuses, at the end, a long format's language without rows
        found = index.lookup(ids)  # (chunk,) cache row per data row, -1 where the cache lacks the id
        for lang, scan in scans.items():
            keep, in_lang = reader.kept(part, lang)
            scan.empty += in_lang - len(keep)
            if not len(keep):
                continue
            rows = found[keep]
            hit = rows >= 0
            scan.first_id = ids[int(keep[0])].as_py() if scan.first_id is None else scan.first_id
            if scan.first_lost is None and not hit.all():
                scan.first_lost = ids[int(keep[int(np.argmin(hit))])].as_py()
            scan.missing += int((~hit).sum())
            scan.add(start + keep[hit], rows[hit])
    joined, total, notes = {}, 0, []  # notes become warnings only once the join is known to hold something
    for lang in languages:
        scan = scans.get(lang)
        if scan is not None:
            data_rows, rows = scan.close()
        if lang == "en" and (scan is None or scan.first_id is None):  # no English in the data: the cache's own captions
            rows = _cache_english(
                [part.rows for part in joined.values()], len(cache), folder / "en.cache_rows", config.limit
            )
            joined[lang] = Captions(cache.column("text"), rows, rows, 0, 0)
            continue
        if scan.missing:
            notes.append(
                f"{lang}: {scan.missing:,} of {scan.joined + scan.missing:,} ids are not in the cache "
                f"(e.g. {scan.first_lost!r}); they are left out"
            )
        joined[lang] = Captions(reader.source(lang), data_rows, rows, scan.missing, scan.empty)
        total += len(joined[lang])
    if total == 0:
        sample = next((s.first_id for s in scans.values() if s.first_id is not None), None)
        first_cache_id = cache.column("id").take(np.zeros(1, np.int64))[0].as_py() if len(cache) else None
        raise UserError(
            f"none of the ids in {config.data} (e.g. {sample!r}, column {config.id_column!r}) are in cache {config.cache} "
            f"(e.g. {first_cache_id!r}); pass the cache built from this data, or the right --id-column"
        )
    for lang in [code for code in joined if len(joined[code]) == 0]:
        notes.append(f"{lang}: no caption joins the cache; the language is left out")
        del joined[lang]
    return joined, notes
