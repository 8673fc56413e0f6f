"""Stage 1's input rows in Arrow (no Python object per row): the rows read a range at a time with their pages given
back, caption strings, ids (checked unique and non-empty in bounded memory), --strict, and images."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mclip.errors import UserError
from mclip.store.captions import as_string, blank
from mclip.store.columns import drop_mapped_pages
from mclip.store.join import hash64
from mclip.store.spill import Spill

CHUNK_ROWS = 1 << 16  # rows stage 1's whole-input passes hold at a time (ids, --strict, the dedup plan)


class Rows:
    """Stage 1's view of the input: `rows[a:b]` is an Arrow table of rows a..b, and `release()` gives back what the
    reads so far hold.

    `datasets` memory-maps its Arrow files, and every page read stays in the process's resident set until the end:
    70 MB more RSS for a 1M-row input than for a 100k-row one, 2 GB for LAION's 28M captions. `release` drops those
    pages from this process (madvise DONTNEED on the read-only mappings of the dataset's files, found in
    /proc/self/maps; they stay in the page cache, and a later read maps them again) and hands Arrow's freed memory
    back to the system. Elsewhere than Linux it only does the latter.
    """

    def __init__(self, dataset):
        self.table = dataset.with_format("arrow")
        self.files = {os.path.realpath(f["filename"]) for f in dataset.cache_files}

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, rows: slice):
        assert isinstance(rows, slice) and rows.step is None, f"rows are read by range, not {rows!r}"
        return self.table[rows]

    def release(self) -> None:
        drop_mapped_pages(self.files)
        pa.default_memory_pool().release_unused()


def caption_strings(column, caption_column: str, first_row: int):
    """A caption column (one Arrow array) as strings; refuse numbers and other non-text values, naming the first row."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        valid = pc.is_valid(column)
        if pc.any(valid).as_py():
            row = first_row + pc.index(valid, True).as_py()
            raise UserError(
                f"caption column {caption_column!r} holds {column.type} values (row {row}); point --caption-column at the text"
            )
    return pa.nulls(len(column), pa.string()) if pa.types.is_null(column.type) else as_string(column)


def check_ids(rows: Rows, id_column: str | None, n: int, work: Path) -> None:
    """Refuse empty or duplicate ids in the first n rows of the id column, in memory that does not grow with n: the ids
    are hashed chunk by chunk and spilled to partition files under `work`, each sorted alone (`store.spill.Spill`); a hash
    match is compared as strings, so a collision never invents a duplicate. `work` is removed afterwards."""
    if id_column is None:
        return
    spill = Spill(work, n)
    try:
        for a in range(0, n, CHUNK_ROWS):
            b = min(n, a + CHUNK_ROWS)
            column = rows[a:b][id_column].combine_chunks()
            if column.null_count:
                row = a + pc.index(pc.is_null(column), True).as_py()
                raise UserError(
                    f"id column {id_column!r} is empty at row {row}; fill every id or omit --id-column to use row numbers"
                )
            column = as_string(column)
            spill.add(hash64(column), np.arange(a, b, dtype=np.int64), column)
            rows.release()
        for row, first, value in spill.repeats():
            raise UserError(
                f"id {value!r} appears more than once in column {id_column!r} (rows {first} and {row}); ids must be unique "
                "(omit --id-column to use row numbers)"
            )
    finally:
        spill.remove()


def row_ids(part, id_column: str | None, a: int, b: int):
    """The string ids of rows a..b: the id column, or the row numbers."""
    if id_column is None:
        return as_string(pa.array(np.arange(a, b, dtype=np.int64)))
    return as_string(part[id_column].combine_chunks())


def check_strict(rows: Rows, caption_column: str, id_column: str | None, n: int) -> None:
    """Refuse the first blank caption of the first n rows (--strict), naming its id and row; a chunk at a time."""
    for a in range(0, n, CHUNK_ROWS):
        part = rows[a : min(n, a + CHUNK_ROWS)]
        bad = blank(caption_strings(part[caption_column].combine_chunks(), caption_column, a))
        if pc.any(bad).as_py():
            row = a + pc.index(bad, True).as_py()
            ident = row_ids(rows[row : row + 1], id_column, row, row + 1)[0].as_py()
            raise UserError(
                f"caption of id {ident!r} (row {row}) is empty; fill it, or drop --strict to skip and count such rows"
            )
        rows.release()


def image_key(image) -> tuple[object, str]:
    """A PIL image and a stable id (content hash) from what a dataset column may hold."""
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB"), hashlib.sha1(image).hexdigest()
    if isinstance(image, str):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read image {image!r} ({exc.strerror}); check the image column's paths") from None
        return Image.open(io.BytesIO(data)).convert("RGB"), hashlib.sha1(data).hexdigest()
    if hasattr(image, "convert"):
        image = image.convert("RGB")
        return image, hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
    raise UserError(f"image column holds {type(image).__name__} values; use images, image bytes or file paths")
