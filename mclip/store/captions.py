"""Captions in, the one reader every stage uses: loading with `datasets` (hub names, save_to_disk folders and local
parquet/jsonl/csv/arrow files) with its UTF-8 and column checks, blank captions in Arrow, and `CaptionFile`, a
parallel-caption dataset read chunk by chunk for stages 2 and 3: the format (wide: id, caption_<lang>...; long: id,
lang, text), the column checks and their errors, and the rows read from the dataset's own Arrow files by plain reads (a
pass over every row through its memory map would leave all of its pages in RSS)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mclip.errors import UserError, first_line
from mclip.store.columns import Column, drop_mapped_pages, ipc_batches

UTF8_ROWS = 1 << 16  # rows of a text column validated as UTF-8 at a time (their mapped pages given back after each)
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

    table = dataset.data.table
    files = [f["filename"] for f in dataset.cache_files]
    for name in table.column_names:
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        for start in range(0, len(column), UTF8_ROWS):  # a slice at a time, its mapped pages given back after each
            part = column.slice(start, UTF8_ROWS)
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


def as_string(column):

    return column if column.type == pa.string() else pc.cast(column, pa.string())


def blank(column):
    """Null or all-whitespace captions (a boolean array): skipped and counted, or refused with --strict. Arrow's
    whitespace is Python's `str.isspace` set, code point for code point (\x1c-\x1f included): the rows
    `not text.strip()` found."""

    return pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), "")).fill_null(True)


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
        ds = load_dataset(data, split)
        if getattr(ds, "_indices", None) is not None:  # a selected or shuffled dataset: give it its own rows
            ds = ds.flatten_indices()
        self.table, self.data = ds.data.table if hasattr(ds.data, "table") else ds.data, data
        self.files = [f["filename"] for f in ds.cache_files]  # the Arrow files `datasets` memory-maps, when it has them
        drop_mapped_pages(self.files)  # loading read every batch header through the map: give those pages back
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

    def source(self, lang: str) -> Column:
        """The caption column of `lang`, read by row from the dataset's own Arrow files (flat RSS), else from memory."""
        name = self.columns[lang]
        if self.files:
            column = Column.from_files(self.files, name)
            if len(column) == len(self):
                return column
        return Column(self.table.column(name).chunks)

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
        part = pa.Table.from_batches(batches).combine_chunks()
        if self.long:
            self.seen_languages |= {
                str(v) for v in pc.unique(part.column(self.lang_column)).to_pylist() if v is not None
            }
        return as_string(part.column(self.id_column)).combine_chunks(), part

    def _mine(self, part, lang: str):
        """Rows of the chunk in language `lang` (all of them in the wide format)."""
        return pc.fill_null(pc.equal(as_string(part.column(self.lang_column)), lang), False) if self.long else None

    def texts(self, lang: str) -> tuple[list[str], list[str]]:
        """(ids, captions) of `lang`'s non-blank captions, in data order, as Python lists: for small files (the bundled
        data's checks, benchmarks); the stages read `chunks()`."""
        ids, texts = [], []
        for _, chunk_ids, part in self.chunks():
            keep, _ = self.kept(part, lang)
            ids += chunk_ids.take(keep).to_pylist()
            texts += part.column(self.columns[lang]).take(keep).to_pylist()
        return ids, texts

    def kept(self, part, lang: str) -> tuple[np.ndarray, int]:
        """(rows of the chunk with a caption of `lang`, how many of its rows are in `lang`): blank and None captions are
        left out, and counted by the difference."""
        column = part.column(self.columns[lang])
        ok = pc.invert(blank(pc.cast(column, pa.string()) if column.type != pa.large_string() else column))
        mine = self._mine(part, lang)
        if mine is not None:
            ok = pc.and_(ok, mine)
        ok = ok.combine_chunks() if isinstance(ok, pa.ChunkedArray) else ok
        rows = len(part) if mine is None else int(pc.sum(mine).as_py() or 0)
        return np.flatnonzero(ok.to_numpy(zero_copy_only=False)), rows
