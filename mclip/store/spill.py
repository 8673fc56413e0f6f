"""A spill: (hash, row, string) records routed by hash into partition files, each small enough to sort alone, the
sort-based stand-in for a hash table of every row. Stage 1's duplicate-id check and its dedup plan both use it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PARTITION_ROWS = 1 << 16  # records per hash partition: each is sorted alone in memory (~20 MB at this size)


MAX_PARTITIONS = 256  # open spill files at a time; beyond 16M rows the partitions grow instead (110k rows at 28M)


def first_equal(hashes: np.ndarray, strings) -> np.ndarray:
    """For records sorted by (hash, row): the index of the first record holding the identical string (its own index
    when it is the first). Equal hashes are compared as strings: a collision splits into its exact strings."""
    index = np.arange(len(hashes))
    new = np.ones(len(hashes), bool)
    new[1:] = hashes[1:] != hashes[:-1]
    first = np.maximum.accumulate(np.where(new, index, 0))
    same = pc.equal(strings, strings.take(pa.array(first))).to_numpy(zero_copy_only=False)
    if not same.all():  # two different strings with one 64-bit hash: regroup those hash groups exactly (rare)
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], len(hashes))
        for start in np.unique(first[~same]):
            end = ends[np.searchsorted(starts, start)]
            seen: dict[str, int] = {}
            for i, value in enumerate(strings[start:end].to_pylist(), start):
                first[i] = seen.setdefault(value, i)
    return first


class Spill:
    """(hash, row, string) records routed by hash into partition files under `folder`, each small enough to sort alone:
    the sort-based stand-in for a hash table of every row."""

    def __init__(self, folder: Path, rows: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.k = int(min(MAX_PARTITIONS, max(1, -(-rows // PARTITION_ROWS))))
        self.schema = pa.schema([("hash", pa.uint64()), ("row", pa.int64()), ("text", pa.large_string())])
        self.writers: dict[int, tuple] = {}

    def _path(self, p: int) -> Path:
        return self.folder / f"part-{p:05d}.arrows"

    def add(self, hashes: np.ndarray, rows: np.ndarray, strings) -> None:
        part = (hashes % np.uint64(self.k)).astype(np.int64)
        order = np.argsort(part, kind="stable")  # keeps rows ascending within a partition
        counts = np.bincount(part, minlength=self.k)
        ends = np.cumsum(counts)
        strings = strings.cast(pa.large_string())
        for p in np.flatnonzero(counts):
            idx = order[ends[p] - counts[p] : ends[p]]
            if p not in self.writers:
                sink = pa.OSFile(str(self._path(p)), "wb")
                self.writers[p] = (sink, pa.ipc.new_stream(sink, self.schema))
            batch = pa.record_batch(
                [pa.array(hashes[idx]), pa.array(rows[idx]), strings.take(pa.array(idx))], schema=self.schema
            )
            self.writers[p][1].write_batch(batch)

    def close(self) -> None:
        for sink, writer in self.writers.values():
            writer.close()
            sink.close()
        self.writers = {}

    def partition(self, p: int):
        """Partition p's records sorted by (hash, row): hashes, rows (int64 numpy) and strings (Arrow)."""
        self.close()
        pa.default_memory_pool().release_unused()  # what the previous partition held goes back to the system
        if not self._path(p).exists():
            return np.zeros(0, np.uint64), np.zeros(0, np.int64), pa.array([], pa.large_string())
        with pa.OSFile(str(self._path(p))) as source:  # read, not mapped: the memory goes with the partition
            table = pa.ipc.open_stream(source).read_all()
        hashes = table["hash"].to_numpy()
        order = np.argsort(hashes, kind="stable")
        return hashes[order], table["row"].to_numpy()[order], table["text"].combine_chunks().take(pa.array(order))

    def repeats(self):
        """(row, first row, string) for each record whose string an earlier row holds, partition by partition."""
        for p in range(self.k):
            hashes, rows, strings = self.partition(p)
            first = first_equal(hashes, strings)
            for i in np.flatnonzero(first != np.arange(len(first))):
                yield int(rows[i]), int(rows[first[i]]), strings[int(i)].as_py()
            del hashes, rows, strings, first

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
