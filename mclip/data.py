"""Captions in: loading with `datasets` (hub names, save_to_disk folders and local parquet/jsonl/csv/arrow files), column
checks, stage 1's ids, blank captions and images in Arrow, and parallel captions joined to the teacher cache by id."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from mclip.errors import UserError, first_line

BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}


def _builder_for(files: list[str]) -> str:
    kinds = {BUILDERS.get(_suffix(f)) for f in files}
    if None in kinds or len(kinds) != 1:
        raise UserError(
            f"cannot tell the format of {files[0]}; use .parquet, .jsonl, .json, .csv, .tsv or .arrow files"
        )
    return kinds.pop()


def _suffix(name: str) -> str:
    for ext in (".gz", ".zst", ".bz2", ".xz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return Path(name).suffix.lower()


def load_dataset(data: str, split: str = "train"):
    """A `datasets.Dataset` (memory-mapped Arrow) for a hub name, a save_to_disk folder, a data folder, files or a glob."""
    import datasets

    # CRITICAL, not ERROR: the csv builder logs the parse error it then raises, and mclip reports it once itself
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()  # mclip shows its own progress
    path = Path(data)
    try:
        if path.is_dir() and (
            (path / "dataset_info.json").exists()
            or (path / "dataset_dict.json").exists()
            or (path / "state.json").exists()
        ):
            if (path / "dataset_dict.json").exists():
                splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
                if split not in splits:
                    raise UserError(f"split {split!r} not in {data}; it has {', '.join(splits)} (use --split)")
                path = path / split  # only the split asked for: loading them all also fails on an empty sibling split
            if (path / "state.json").exists() and not json.loads((path / "state.json").read_text(encoding="utf-8"))[
                "_data_files"
            ]:
                # a saved zero-row dataset has no Arrow file, and load_from_disk dies on it with an IndexError
                raise UserError(f"{data} (split {split!r}) has zero rows; check --data and --split")
            return datasets.load_from_disk(str(path))
        files = sorted(glob.glob(data)) if any(c in data for c in "*?[") else ([data] if path.is_file() else [])
        if path.is_dir():
            files = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file() and _suffix(p.name) in BUILDERS and not p.name.startswith(".")
            )
            if not files:
                raise UserError(
                    f"{data} holds no dataset files (.parquet, .jsonl, .csv, .arrow) and no save_to_disk dataset"
                )
        if files:
            if split != "train":  # nothing to select: the files are read whole, whatever the split was called
                raise UserError(
                    f"split {split!r} does not apply to {data}: local files are read whole, as the one split datasets "
                    "names 'train'; pass --split train (--val-split train for --val-data), or a dataset that has splits"
                )
            builder = _builder_for(files)
            if _zero_rows(files, builder):  # the json and parquet builders crash on these (StopIteration, ArrowInvalid)
                raise UserError(f"{data} is empty (zero rows); check --data")
            kwargs = {"delimiter": "\t"} if builder == "csv" and _suffix(files[0]) == ".tsv" else {}
            if builder == "csv":  # every column as text: pandas would read ids 000, 001 as the integers 0, 1
                kwargs["features"] = _text_features(files[0], kwargs.get("delimiter", ","))
            loaded = datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
            if builder in ("json", "csv", "text"):
                _check_utf8(loaded, data)
            return loaded
        if path.suffix or data.startswith((".", "/", "~")):
            raise UserError(f"{data} does not exist; check the path or pass a dataset name from the hub")
        return datasets.load_dataset(data, split=split)
    except UserError:
        raise
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{data} is not valid UTF-8 text ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
        first = first_line(exc)
        raise UserError(f"cannot load dataset {data!r} (split {split!r}): {first}") from None
    except Exception as exc:  # pyarrow/datasets parse errors of a malformed file have many types
        cause = exc
        while cause is not None and not isinstance(cause, UnicodeDecodeError):  # the csv builder wraps it
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise UserError(f"{data} is not valid UTF-8 text ({cause.reason}); re-encode the file as UTF-8") from None
        if type(exc).__module__.startswith(("pyarrow", "datasets")):
            first = first_line(exc)
            raise UserError(f"cannot read dataset {data!r}: {first}; fix or re-export the file") from None
        raise


def _text_features(path: str, delimiter: str):
    """`datasets.Features` reading every column of a CSV/TSV file (named by its header) as a string, as ids are."""
    import csv

    import datasets

    with open(path, encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    return datasets.Features({name: datasets.Value("string") for name in header}) if header else None


def _zero_rows(files: list[str], builder: str) -> bool:
    if all(Path(f).stat().st_size == 0 for f in files):
        return True
    if builder == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0
    return False


def _check_utf8(dataset, data: str) -> None:
    """Refuse invalid UTF-8 now: pyarrow's JSON reader stores such bytes in string columns unchecked, and they would
    only fail mid-run, with a traceback, when the captions are read. The check reads every caption through `datasets`'
    memory map, so the pages it touched are given back slice by slice (else all of the file stays in RSS)."""
    import pyarrow as pa

    from mclip.columns import drop_mapped_pages

    table = dataset.data.table
    files = [f["filename"] for f in dataset.cache_files]
    for name in table.column_names:
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        for start in range(0, len(column), CHUNK_ROWS):  # a slice at a time, its mapped pages given back after each
            part = column.slice(start, CHUNK_ROWS)
            try:
                part.validate(full=True)
            except pa.ArrowInvalid:
                row = start + _first_bad_utf8(part)
                raise UserError(
                    f"{data} is not valid UTF-8 text (column {name!r}, row {row}); re-encode the file as UTF-8"
                ) from None
            finally:
                drop_mapped_pages(files)


def _first_bad_utf8(column) -> int:
    import pyarrow as pa

    for row, value in enumerate(column.cast(pa.large_binary()).to_pylist()):
        try:
            value is None or value.decode("utf-8")
        except UnicodeDecodeError:
            return row
    return -1


def require_columns(dataset, columns: dict[str, str | None], data: str) -> None:
    """Refuse a missing column, naming the ones that exist and the option that picks another."""
    have = list(dataset.column_names)
    for option, column in columns.items():
        if column is not None and column not in have:
            raise UserError(f"column {column!r} not found in {data}; it has {', '.join(have)} (use {option})")


class ParallelCaptions:
    """Captions per language, each kept as (ids, texts) with empty texts dropped and counted; joined to the cache by id."""

    def __init__(self, by_lang: dict[str, tuple[list[str], list[str]]], missing: dict[str, int]):
        self.by_lang = by_lang
        self.missing = missing  # lang -> rows whose text was empty or None

    @property
    def languages(self) -> list[str]:
        return list(self.by_lang)

    def pairs(self, lang: str) -> tuple[list[str], list[str]]:
        return self.by_lang[lang]

    def join(self, lang: str, row_of: dict[str, int]) -> tuple[list[str], np.ndarray, list[str]]:
        """One language's captions joined to the cache by id (never by row order): the texts whose id the cache holds and
        their cache rows (`row_of`: cache id -> row), in data order, and the ids the cache lacks (left out, for the
        caller to count)."""
        ids, texts = self.by_lang[lang]
        rows = np.fromiter((row_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        found = rows >= 0
        return [t for t, ok in zip(texts, found) if ok], rows[found], [i for i, ok in zip(ids, found) if not ok]


def load_parallel(
    data: str,
    split: str,
    languages: tuple[str, ...] | list[str],
    *,
    id_column: str = "id",
    caption_column: str = "caption",
    text_column_template: str = "caption_{lang}",
    english: bool = True,
    lang_column: str = "lang",
    text_column: str = "text",
) -> ParallelCaptions:
    """Parallel captions in the wide format (id, caption, caption_<lang>...) or the long one (id, lang, text).

    `english` adds the English captions under "en" (from `caption_column`, or lang == "en" rows in the long format).
    """
    import pyarrow.compute as pc

    ds = load_dataset(data, split)
    have = set(ds.column_names)
    table = ds.with_format("arrow")[:]
    if id_column not in have:
        raise UserError(
            f"column {id_column!r} not found in {data}; it has {', '.join(ds.column_names)} (use --id-column)"
        )
    ids_all = pc.cast(table[id_column], "string").to_pylist()
    long = {lang_column, text_column} <= have and not any(
        text_column_template.format(lang=l) in have for l in languages
    )
    wanted = list(languages) + (["en"] if english and "en" not in languages else [])
    by_lang, missing = {}, {}
    if long:
        langs = table[lang_column].to_pylist()
        texts = table[text_column].to_pylist()
        for lang in wanted:
            rows = [(i, t) for i, l, t in zip(ids_all, langs, texts) if l == lang]
            if not rows and lang != "en":
                found = sorted({str(l) for l in langs})
                raise UserError(
                    f"language {lang!r} has no rows in {data} (column {lang_column!r} has {', '.join(found[:20])}); fix --languages"
                )
            by_lang[lang] = _clean(rows, missing, lang)
        return ParallelCaptions(by_lang, missing)
    for lang in wanted:
        column = caption_column if lang == "en" and caption_column in have else text_column_template.format(lang=lang)
        if column not in have:
            if lang == "en" and lang not in languages:
                continue
            raise UserError(
                f"column {column!r} for language {lang!r} not found in {data}; it has {', '.join(ds.column_names)} "
                "(fix --languages or --text-column-template)"
            )
        by_lang[lang] = _clean(list(zip(ids_all, table[column].to_pylist())), missing, lang)
    return ParallelCaptions(by_lang, missing)


def _clean(rows: list[tuple[str, object]], missing: dict[str, int], lang: str) -> tuple[list[str], list[str]]:
    kept = [(i, t) for i, t in rows if isinstance(t, str) and t.strip()]
    missing[lang] = len(rows) - len(kept)
    return [i for i, _ in kept], [t for _, t in kept]


# ---- stage 1's captions, ids and images, in Arrow (no Python object per row) ----

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
        import pyarrow as pa

        from mclip.shards import drop_mapped_pages

        drop_mapped_pages(self.files)
        pa.default_memory_pool().release_unused()


def caption_strings(column, caption_column: str, first_row: int):
    """A caption column (one Arrow array) as strings; refuse numbers and other non-text values, naming the first row."""
    import pyarrow as pa
    import pyarrow.compute as pc

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
    are hashed chunk by chunk and spilled to partition files under `work`, each sorted alone (`dedup.Spill`); a hash
    match is compared as strings, so a collision never invents a duplicate. `work` is removed afterwards."""
    import pyarrow.compute as pc

    from mclip.dedup import Spill, hash64

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


def as_string(column):
    import pyarrow as pa
    import pyarrow.compute as pc

    return column if column.type == pa.string() else pc.cast(column, pa.string())


def row_ids(part, id_column: str | None, a: int, b: int):
    """The string ids of rows a..b: the id column, or the row numbers."""
    import pyarrow as pa

    if id_column is None:
        return as_string(pa.array(np.arange(a, b, dtype=np.int64)))
    return as_string(part[id_column].combine_chunks())


def blank(column):
    """Null or all-whitespace captions (a boolean array): skipped and counted, or refused with --strict. Arrow's
    whitespace is Python's `str.isspace` set, code point for code point (\x1c-\x1f included): the rows
    `not text.strip()` found."""
    import pyarrow.compute as pc

    return pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), "")).fill_null(True)


def check_strict(rows: Rows, caption_column: str, id_column: str | None, n: int) -> None:
    """Refuse the first blank caption of the first n rows (--strict), naming its id and row; a chunk at a time."""
    import pyarrow.compute as pc

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
