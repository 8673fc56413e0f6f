"""The teacher-cache contract: Arrow IPC shard schema and naming, atomic shard writes, manifest.json, and the reader.

Every stage reads and writes the cache through this module; nothing else opens shards by hand.
A cache folder holds `shard-00000.arrow`, `shard-00001.arrow`, ... (Arrow IPC *file* format, memory-mappable,
readable by `pyarrow.dataset.dataset(files, format="arrow")` and `datasets.load_dataset("arrow", ...)`) and
`manifest.json`, which is written first with `"complete": false` and rewritten atomically when the last shard lands.
The atomic writes and checksums themselves are `mclip.store.outputs`'.

Columns: `id`, `text`, `caption_group`, `embedding`, optional `layer_<i>`, `image_id` and `image_embedding`.
`caption_group` (int64, format version 2) is the input row index of the first row, in input order, whose caption is
the identical string: two rows have equal `caption_group` exactly when their English captions are identical, across
the whole cache (whether or not --dedup was on). A version-1 cache has no such column; it is read as before.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from mclip.errors import UserError
from mclip.store.columns import Column
from mclip.store.outputs import atomic_file, file_sha256, write_json

MANIFEST = "manifest.json"
FORMAT = "mclip-teacher-cache"
FORMAT_VERSION = 2  # 2: the caption_group column
SHARD_RE = re.compile(r"^shard-(\d{5,})\.arrow$")
ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def layer_column(layer: int) -> str:
    return f"layer_{layer}"


def cache_schema(
    dim: int, dtype: str, layer_dims: dict[int, int] | None = None, image_dim: int | None = None
) -> pa.Schema:
    """The Arrow schema of a shard: id, text, caption_group, embedding (D), optional layer_<i> (H) and
    image_id/image_embedding (D)."""
    value = ARROW_DTYPES[dtype]
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("caption_group", pa.int64(), nullable=False),
        pa.field("embedding", pa.list_(value, dim), nullable=False),
    ]
    for layer, width in sorted((layer_dims or {}).items()):
        fields.append(pa.field(layer_column(layer), pa.list_(value, width), nullable=False))
    if image_dim is not None:
        fields.append(pa.field("image_id", pa.string(), nullable=False))
        fields.append(pa.field("image_embedding", pa.list_(value, image_dim), nullable=False))
    return pa.schema(fields)


def fixed_list(matrix: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """(N, D) numpy -> Arrow fixed_size_list<dtype>[D] without a Python-level copy per row."""
    assert matrix.ndim == 2, f"expected (N, D), got {matrix.shape}"
    flat = np.ascontiguousarray(matrix, dtype=np.dtype(dtype)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=ARROW_DTYPES[dtype]), matrix.shape[1])


def to_numpy(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """Arrow fixed_size_list column -> (N, D) numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, width).astype(dtype, copy=False)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write manifest.json atomically (readers see the previous manifest or this one)."""
    write_json(Path(folder) / MANIFEST, manifest)


def write_shard(folder: Path, index: int, table: pa.Table, stats: dict) -> Path:
    """Write one shard atomically (temp file in the same folder, fsync, rename); `stats` go in the schema metadata."""
    path = Path(folder) / shard_name(index)
    table = table.replace_schema_metadata({"mclip": json.dumps(stats)})
    with atomic_file(path) as tmp, pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=8192)
    return path


def read_shard_stats(path: Path) -> dict | None:
    """The stats stored in a finished shard, or None when the file is missing or unreadable (e.g. truncated)."""
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_file(source)
            meta = reader.schema.metadata or {}
            stats = json.loads(meta[b"mclip"].decode())
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (OSError, pa.ArrowInvalid, KeyError, ValueError):
        return None
    return stats if stats.get("rows") == rows else None


def shard_files(folder: Path) -> list[Path]:
    """Finished shard files in a folder, in index order (temp files are never matched)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name))


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); restore it or rerun with --overwrite") from None
    if manifest.get("format") != FORMAT:
        raise UserError(
            f"{path} is not an mclip teacher cache manifest; point to a folder written by `mclip embed-teacher`"
        )
    return manifest


@dataclass
class TeacherCache:
    """A finished teacher cache, opened read-only and memory-mapped."""

    path: Path
    manifest: dict

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def files(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.manifest.get("layers", [])]

    @property
    def columns(self) -> list[str]:
        """The shards' column names (read from the first shard's footer)."""
        if not self.files:
            return []
        with pa.memory_map(str(self.files[0]), "r") as source:
            return pa.ipc.open_file(source).schema.names

    @property
    def has_images(self) -> bool:
        return self.manifest.get("image_dim") is not None

    def __len__(self) -> int:
        return int(self.manifest["totals"]["rows"])

    def dataset(self):
        """A `pyarrow.dataset.Dataset` over all shards."""
        import pyarrow.dataset as pads

        return pads.dataset([str(f) for f in self.files], format="arrow")

    def table(self, columns: Iterable[str] | None = None) -> pa.Table:
        """All rows as one memory-mapped table (no copy of the embedding buffers)."""
        cols = list(columns) if columns is not None else None
        tables = []
        for f in self.files:
            reader = pa.ipc.open_file(pa.memory_map(str(f), "r"))
            table = reader.read_all()
            tables.append(table.select(cols) if cols is not None else table)
        if not tables:
            return cache_schema(self.dim, self.manifest["dtype"]).empty_table()
        return pa.concat_tables(tables)

    def batches(self, name: str):
        """(first row, array) per record batch of one column, read in order with plain reads of just that column's
        buffers: a pass over every row in bounded memory, with nothing left mapped."""
        row = 0
        for path in self.files:
            with pa.OSFile(str(path), "rb") as source:
                field = pa.ipc.open_file(source).schema.get_field_index(name)
                reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=[field]))
                for i in range(reader.num_record_batches):
                    values = reader.get_batch(i).column(0)
                    yield row, values
                    row += len(values)

    def column(self, name: str) -> Column:
        """One column, read by row (stage 2's targets and texts, stage 3's gallery) with no copy of the rest."""
        return Column.from_files(self.files, name)

    def targets(self, column: str = "embedding") -> Column:
        """A vector column (embedding, layer_<i>, image_embedding) to `gather(rows)` from, with no copy of the rest."""
        return self.column(column)

    def ids(self) -> list[str]:
        return self.table(["id"]).column("id").to_pylist()

    def embeddings(self, column: str = "embedding") -> np.ndarray:
        """(N, D) float32 array of a vector column, in shard order."""
        return to_numpy(self.table([column]).column(column))

    def damage(self) -> tuple[Path, str] | None:
        """A cheap look for the first damaged shard, (path, what is wrong), or None: every shard is there, has its
        recorded size and a readable Arrow footer with the recorded row count. Reads no embedding bytes, so a flipped bit
        inside is found only by `verify` (`mclip verify`)."""
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            if not path.is_file():
                return path, "is missing"
            if shard.get("bytes") is not None and path.stat().st_size != shard["bytes"]:
                return (
                    path,
                    f"has {path.stat().st_size} bytes, not the {shard['bytes']} recorded in manifest.json (truncated or changed)",
                )
            stats = read_shard_stats(path)
            if stats is None or stats.get("rows") != shard["rows"]:
                return path, "is truncated or unreadable"
        return None

    def check(self) -> None:
        """Raise a one-line UserError naming the first damaged shard (see `damage`)."""
        found = self.damage()
        if found is not None:
            raise UserError(
                f"teacher cache shard {found[0]} {found[1]}; delete it and rerun the same `mclip embed-teacher` command "
                f"to recompute it (`mclip verify {self.path}` checks every file)"
            )

    def verify(self) -> list[str]:
        """Problems found (missing files, changed checksums, row counts); empty when the cache is intact."""
        problems = []
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            if shard.get("sha256") and file_sha256(path) != shard["sha256"]:
                problems.append(f"{path}: checksum differs from manifest.json (file corrupted or changed)")
                continue
            stats = read_shard_stats(path)
            if stats is None or stats.get("rows") != shard["rows"]:
                problems.append(f"{path}: unreadable or wrong row count")
        return problems


def open_cache(path: str | Path, check: bool = True) -> TeacherCache:
    """Open a finished teacher cache, or raise a one-line UserError saying what is wrong (`check`: the cheap
    `TeacherCache.check` of every shard; full hashing is `TeacherCache.verify`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"teacher cache {folder} does not exist; run `mclip embed-teacher --out {folder}` first")
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder} has no {MANIFEST}; point to a folder written by `mclip embed-teacher`")
    if not manifest.get("complete"):
        raise UserError(
            f"teacher cache {folder} is incomplete; rerun the same `mclip embed-teacher` command to finish it"
        )
    cache = TeacherCache(folder, manifest)
    if check:
        cache.check()
    return cache
