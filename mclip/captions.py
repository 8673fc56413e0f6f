"""A parallel-caption dataset read chunk by chunk, the one reader of stage 2's and stage 3's caption files: the format
(wide: id, caption_<lang>...; long: id, lang, text), the column checks and their errors, blank captions, and the rows
read from the dataset's own Arrow files by plain reads (a pass over every row through its memory map would leave all of
its pages in RSS)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mclip import shards
from mclip.columns import ipc_batches
from mclip.errors import UserError

CHUNK = 1 << 18  # caption rows read, checked and joined at once (~25 MB of work arrays in a join)


class CaptionFile:
    """Per language, the column of its captions; `chunks()` the rows in order. Long format when the data has the
    language and text columns and none of the wide columns asked for. `optional` languages may lack a column (wide)
    or rows (long) and are then left out of `columns`; `english_column` is the wide format's English column, when
    present (else `template` is used for "en" too)."""

    def __init__(
        self,
        data: str,
        split: str,
        languages: list[str],
        *,
        id_column: str,
        template: str,
        lang_column: str = "lang",
        text_column: str = "text",
        english_column: str | None = None,
        optional: tuple[str, ...] = (),
    ):
        from mclip import data as mdata

        ds = mdata.load_dataset(data, split)
        if getattr(ds, "_indices", None) is not None:  # a selected or shuffled dataset: give it its own rows
            ds = ds.flatten_indices()
        self.table, self.data = ds.data.table if hasattr(ds.data, "table") else ds.data, data
        self.files = [f["filename"] for f in ds.cache_files]  # the Arrow files `datasets` memory-maps, when it has them
        shards.drop_mapped_pages(self.files)  # loading read every batch header through the map: give those pages back
        names = self.table.column_names
        have = set(names)
        if id_column not in have:
            raise UserError(f"column {id_column!r} not found in {data}; it has {', '.join(names)} (use --id-column)")
        self.id_column, self.lang_column, self.optional = id_column, lang_column, set(optional)
        self.long = {lang_column, text_column} <= have and not any(template.format(lang=l) in have for l in languages)
        self.columns: dict[str, str] = {}
        for lang in list(languages) + [l for l in optional if l not in languages]:
            column = english_column if lang == "en" and english_column in have else template.format(lang=lang)
            column = text_column if self.long else column
            if column not in have:
                if lang in self.optional:
                    continue
                raise UserError(
                    f"column {column!r} for language {lang!r} not found in {data}; it has {', '.join(names)} "
                    f"(fix --languages or --text-column-template{self._long_hint(have, lang_column, text_column)})"
                )
            self.columns[lang] = column
        self.seen_languages: set = set()  # the long format's languages, gathered by chunks()

    @staticmethod
    def _long_hint(have: set, lang_column: str, text_column: str) -> str:
        """How the data falls short of the long format, when it looks meant to be in it (one of its two columns)."""
        missing = [c for c in (lang_column, text_column) if c not in have]
        if len(missing) == 1:
            needs = f"columns {lang_column!r} and {text_column!r}"
            return f"; the long format needs {needs} by the id: it has no {missing[0]!r}"
        return f"; or give the long format: columns id, {lang_column}, {text_column}"

    def __len__(self) -> int:
        return self.table.num_rows

    def source(self, lang: str) -> shards.Column:
        """The caption column of `lang`, read by row from the dataset's own Arrow files (flat RSS), else from memory."""
        name = self.columns[lang]
        if self.files:
            column = shards.Column.from_files(self.files, name)
            if len(column) == len(self):
                return column
        return shards.Column(self.table.column(name).chunks)

    def _batches(self, size: int):
        if not self.files:
            yield from self.table.to_batches(max_chunksize=size)
            return
        for path in self.files:
            with pa.OSFile(
                path, "rb"
            ) as source:  # plain reads: a pass over every row through the map would stay in RSS
                yield from ipc_batches(source)

    def chunks(self, size: int | None = None, check: bool = True):
        """(first row, ids (string array), rows (a table)) per `size` rows (CHUNK), in order. At the end (with `check`),
        a long format's language asked for that has no rows is refused."""
        size = size or CHUNK
        first, pending, count = 0, [], 0
        for batch in self._batches(size):
            pending.append(batch)
            count += batch.num_rows
            if count >= size:
                yield first, *self._chunk(pending)
                first, pending, count = first + count, [], 0
        if pending:
            yield first, *self._chunk(pending)
            first += count
        assert first == len(self), f"{self.data}: read {first} rows from {self.files}, the dataset has {len(self)}"
        if check and self.long:  # English may come from a cache's own text instead
            for lang in [l for l in self.columns if l not in self.optional | {"en"} and l not in self.seen_languages]:
                raise UserError(
                    f"language {lang!r} has no rows in {self.data} (column {self.lang_column!r} has "
                    f"{', '.join(sorted(map(str, self.seen_languages))[:20])}); fix --languages"
                )

    def _chunk(self, batches: list) -> tuple:
        from mclip.data import as_string

        part = pa.Table.from_batches(batches).combine_chunks()
        if self.long:
            self.seen_languages |= {
                str(v) for v in pc.unique(part.column(self.lang_column)).to_pylist() if v is not None
            }
        return as_string(part.column(self.id_column)).combine_chunks(), part

    def _mine(self, part, lang: str):
        """Rows of the chunk in language `lang` (all of them in the wide format)."""
        from mclip.data import as_string

        return pc.fill_null(pc.equal(as_string(part.column(self.lang_column)), lang), False) if self.long else None

    def kept(self, part, lang: str) -> tuple[np.ndarray, int]:
        """(rows of the chunk with a caption of `lang`, how many of its rows are in `lang`): blank and None captions are
        left out, and counted by the difference."""
        from mclip.data import blank

        column = part.column(self.columns[lang])
        ok = pc.invert(blank(pc.cast(column, pa.string()) if column.type != pa.large_string() else column))
        mine = self._mine(part, lang)
        if mine is not None:
            ok = pc.and_(ok, mine)
        ok = ok.combine_chunks() if isinstance(ok, pa.ChunkedArray) else ok
        rows = len(part) if mine is None else int(pc.sum(mine).as_py() or 0)
        return np.flatnonzero(ok.to_numpy(zero_copy_only=False)), rows
