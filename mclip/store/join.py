"""Captions joined to the teacher cache by id in bounded memory: a sorted 64-bit hash index of the cache ids on disk.

A dict of every cache id costs ~100 bytes a row per process (28M ids: ~3 GB per rank). Instead the ids are hashed in
record-batch chunks, spilled into partitions by the hash's top bits, and each partition sorted alone, so the index file is
globally sorted and no step holds more than one partition. `lookup` merges a chunk of sorted query hashes with it in
one sequential read (never a memory map, whose touched pages would count as RSS) and compares the real id strings of
every hit, so a hash collision can never join the wrong row.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mclip.errors import UserError

PARTITION_ROWS = 1 << 17  # (hash, row) pairs sorted at once while building: 2 MiB (1M ids: 8 partitions)
LOOKUP_CHUNK = 1 << 20  # query ids hashed and searched at once: one pass over the index files per chunk
BLOCK = 1 << 17  # index values read at once (1 MiB): a million ids never make a block of all of them
HASH_CHUNK = 1 << 14  # strings hashed in one vectorised pass
_MUL = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime, as the per-position multiplier


def _splitmix(x: np.ndarray) -> np.ndarray:
    """Stafford's mix13 finaliser (SplitMix64): spreads the polynomial sum over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash64(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) uint64 per string, vectorised over Arrow's buffers (no Python object per row); nulls hash as "".

    A position-weighted byte sum mod 2^64, then SplitMix64 with the length mixed in. Not cryptographic: callers compare
    the strings of every hit, so a collision costs a comparison, never a wrong answer.
    """
    if isinstance(strings, pa.ChunkedArray):
        parts = [hash64(chunk) for chunk in strings.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    if len(strings) > HASH_CHUNK:  # 10x faster in cache-sized pieces than in one pass over a million strings
        return np.concatenate([hash64(strings.slice(s, HASH_CHUNK)) for s in range(0, len(strings), HASH_CHUNK)])
    strings = pc.cast(strings, pa.large_string()).fill_null("")
    n = len(strings)
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[strings.offset : strings.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    data = data[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets).astype(np.uint64)
    with np.errstate(over="ignore"):
        pos = np.arange(len(data), dtype=np.int64) - np.repeat(offsets[:-1], np.diff(offsets))
        longest = int(pos.max()) + 1 if len(pos) else 0
        powers = np.cumprod(np.full(max(longest, 1), _MUL, dtype=np.uint64)) if longest else np.zeros(0, np.uint64)
        terms = (data.astype(np.uint64) + np.uint64(1)) * powers[pos]
        sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
        h = sums[offsets[1:]] - sums[offsets[:-1]]
        return _splitmix(h ^ (lengths * np.uint64(0x9E3779B97F4A7C15)))


def _fingerprint(cache) -> str:
    """Which cache an index belongs to: its shards' checksums (or names and sizes when a manifest has no checksums)."""
    return json.dumps([[s["file"], s.get("sha256"), s["rows"]] for s in cache.manifest["shards"]])


class IdIndex:
    """Cache id -> cache row, through a sorted (hash, row) index in a folder, read in sequential blocks."""

    def __init__(self, cache, folder: Path, hashes: Path, rows: Path):
        self.cache, self.folder, self.hashes, self.rows = cache, Path(folder), hashes, rows
        self._ids = None  # the cache's id column (Column), opened on the first lookup

    @classmethod
    def build(cls, cache, folder: str | Path) -> IdIndex:
        """Index the cache's ids into `folder` (reused when it already indexes this very cache). Bounded memory:
        one record batch of ids, then one partition of PARTITION_ROWS pairs at a time. Refuses duplicate ids."""
        folder = Path(folder)
        stamp = _fingerprint(cache)
        if (folder / "index.json").exists() and json.loads((folder / "index.json").read_text())["cache"] == stamp:
            return cls.open(cache, folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = len(cache)
        bits = max(0, int(np.ceil(np.log2(max(1, n) / PARTITION_ROWS))))
        parts = [open(tmp / f"part-{k:05d}.bin", "wb") for k in range(1 << bits)]
        pair = np.dtype([("hash", "<u8"), ("row", "<i8")])
        try:
            for first, ids in cache.batches("id"):
                chunk = np.empty(len(ids), pair)
                chunk["hash"], chunk["row"] = hash64(ids), np.arange(first, first + len(ids))
                which = (
                    (chunk["hash"] >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(ids), np.int64)
                )
                order = np.argsort(which, kind="stable")
                bounds = np.searchsorted(which[order], np.arange(len(parts) + 1))
                for k in np.flatnonzero(np.diff(bounds)):
                    parts[k].write(chunk[order[bounds[k] : bounds[k + 1]]].tobytes())
        finally:
            for handle in parts:
                handle.close()
        with open(tmp / "hash.u64", "wb") as hashes, open(tmp / "row.i64", "wb") as rows:
            for k in range(len(parts)):
                path = tmp / f"part-{k:05d}.bin"
                chunk = np.fromfile(path, dtype=pair)
                chunk = chunk[np.argsort(chunk["hash"], kind="stable")]
                hashes.write(chunk["hash"].tobytes())
                rows.write(chunk["row"].tobytes())
                path.unlink()
        (tmp / "index.json").write_text(json.dumps({"cache": stamp, "rows": n}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        index = cls.open(cache, folder)
        index._check_unique()
        return index

    @classmethod
    def open(cls, cache, folder: str | Path) -> IdIndex:
        folder = Path(folder)
        return cls(cache, folder, folder / "hash.u64", folder / "row.i64")

    def __len__(self) -> int:
        return self.hashes.stat().st_size // 8

    def _blocks(self, path: Path, dtype: str):
        """(first position, values) per BLOCK values of an index file, read in order (never memory-mapped: flat RSS)."""
        with open(path, "rb") as handle:
            start = 0
            while True:
                values = np.fromfile(handle, dtype=dtype, count=BLOCK)
                if not len(values):
                    return
                yield start, values
                start += len(values)

    def _read(self, path: Path, dtype: str, pos: int, count: int = 1) -> np.ndarray:
        with open(path, "rb") as handle:
            handle.seek(pos * 8)
            return np.fromfile(handle, dtype=dtype, count=count)

    def _id_column(self):
        if self._ids is None:
            self._ids = self.cache.column("id")  # Column: reads rows without mapping the shards
        return self._ids

    def _check_unique(self) -> None:
        """Equal hashes are either a collision (fine) or a duplicate id (refused: a caption would join two targets)."""

        previous = None
        for start, block in self._blocks(self.hashes, "<u8"):
            joined = block if previous is None else np.concatenate([previous[-1:], block])
            offset = start if previous is None else start - 1
            for pos in np.flatnonzero(joined[1:] == joined[:-1]):
                a, b = (int(x) for x in self._read(self.rows, "<i8", offset + int(pos), 2))
                ids = self._id_column().take(np.array([a, b])).to_pylist()
                if ids[0] == ids[1]:
                    raise UserError(
                        f"id {ids[0]!r} appears twice in cache {self.cache.path} (rows {a} and {b}); "
                        "rebuild it with `mclip embed-teacher` from data with unique ids"
                    )
            previous = block

    def _search(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For query hashes h: (leftmost index position with hash >= h, whether that hash equals h, its cache row), one
        sequential pass over the index files (a merge of the sorted queries with the sorted index)."""
        order = np.argsort(h, kind="stable")
        sorted_h = h[order]
        pos = np.full(len(h), len(self), dtype=np.int64)
        hit = np.zeros(len(h), dtype=bool)
        row = np.full(len(h), -1, dtype=np.int64)
        done = 0  # queries (in sorted order) placed so far
        for start, block in self._blocks(self.hashes, "<u8"):
            upto = done + int(
                np.searchsorted(sorted_h[done:], block[-1], side="right")
            )  # queries <= the block's last hash
            if upto > done:
                local = np.searchsorted(block, sorted_h[done:upto])
                where = order[done:upto]
                pos[where] = start + local
                hit[where] = block[local] == sorted_h[done:upto]
            done = upto
        found = np.flatnonzero(hit)
        if len(found):  # the rows of the hits, read block by block in position order
            by_pos = found[np.argsort(pos[found], kind="stable")]
            cursor = 0
            for start, block in self._blocks(self.rows, "<i8"):
                upto = cursor + int(np.searchsorted(pos[by_pos[cursor:]], start + len(block)))
                row[by_pos[cursor:upto]] = block[pos[by_pos[cursor:upto]] - start]
                cursor = upto
                if cursor == len(by_pos):
                    break
        return pos, hit, row

    def lookup(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(len(ids),) int64 cache rows, -1 where the cache has no such id (or the id is null)."""
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
        ids = pc.cast(ids, pa.string()) if ids.type not in (pa.string(), pa.large_string()) else ids
        out = np.full(len(ids), -1, dtype=np.int64)
        if len(self) == 0:
            return out
        for start in range(0, len(ids), LOOKUP_CHUNK):
            part = ids.slice(start, LOOKUP_CHUNK)
            h = hash64(part)
            pos, hit, cand = self._search(h)
            hit &= np.asarray(pc.is_valid(part))
            where = np.flatnonzero(hit)
            if not len(where):
                continue
            found = self._id_column().take(cand[where])
            same = pc.equal(pc.cast(found, pa.large_string()), pc.cast(part.take(pa.array(where)), pa.large_string()))
            same = same.to_numpy(zero_copy_only=False)
            out[start + where[same]] = cand[where][same]
            for w in where[~same]:  # a collision: the id may sit further along the run of equal hashes
                out[start + w] = self._scan(int(pos[w]), int(h[w]), part[int(w)].as_py())
        return out

    def _scan(self, pos: int, h: int, wanted: str) -> int:
        while pos < len(self) and int(self._read(self.hashes, "<u8", pos)[0]) == h:
            row = int(self._read(self.rows, "<i8", pos)[0])
            if self._id_column().take(np.array([row]))[0].as_py() == wanted:
                return row
            pos += 1
        return -1
