"""Reading rows of Arrow IPC files and raw arrays by global index with pread, never through a memory map that stays
in RSS: `Column` (a column of cache shards or of a dataset's Arrow files), `RawArray` (a raw little-endian array on
disk), `drop_mapped_pages` (give back the pages an Arrow file's memory map touched) and `Bits` (a set of rows in a
bit each)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa


def ipc_batches(source) -> Iterable[pa.RecordBatch]:
    """The record batches of an Arrow IPC file or stream (`source` an open pa.OSFile or memory map), one at a time (from a
    map zero-copy: only the headers are read)."""
    try:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    except pa.ArrowInvalid:
        source.seek(0)
        yield from pa.ipc.open_stream(source)


def _drop_range(address: int, size: int) -> None:
    """madvise(MADV_DONTNEED) on [address, address + size) of a read-only file mapping (see drop_mapped_pages)."""
    import ctypes
    import mmap

    if size and hasattr(mmap, "MADV_DONTNEED"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), mmap.MADV_DONTNEED)


def drop_mapped_pages(files) -> None:
    """madvise(MADV_DONTNEED) on this process's read-only mappings of `files`: safe, since pages of an unwritable file
    mapping are read again from the file on the next access. Opening an Arrow IPC file through a memory map reads every
    record batch's header, and on kernels that map whole folios that maps most of the file (a dataset's 0.26 GB at 10M
    rows): this gives those pages back, so only what is read later counts in RSS."""
    files = {str(Path(f).resolve()) for f in files}
    if not files:
        return
    try:
        lines = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "w" not in fields[1] and fields[5] in files:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            _drop_range(start, end - start)


MAPPED_GATHER = 4096  # a gather of at least this many indices reads through short-lived maps of WINDOW bytes
WINDOW = 1 << 23


class RawArray:
    """A 1-D little-endian array in a raw file, read with pread: `a[i]`, `a[start:stop]`, `a[index array or mask]`,
    `len(a)`, `np.asarray(a)` (the whole file: for small arrays). Like `np.memmap` without the mapping, whose touched
    pages would count in RSS (~0.5 MB a random read on kernels that map whole folios)."""

    def __init__(self, path: str | Path, dtype: str):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.n = self.path.stat().st_size // self.dtype.itemsize
        self._fd = None

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(str(self.path), os.O_RDONLY)
        return self._fd

    def __getstate__(self) -> dict:  # a DataLoader worker started with spawn opens the file itself
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __len__(self) -> int:
        return self.n

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(0, self.dtype)
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self.fd, (stop - start) * size, start * size), dtype=self.dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.n)
            return self._range(start, max(start, stop))[::step] if step > 0 else np.asarray(self)[key]
        if np.isscalar(key):
            i = int(key) + (self.n if int(key) < 0 else 0)
            if not 0 <= i < self.n:
                raise IndexError(f"index {key} out of range for {self.n} values")
            return self._range(i, i + 1)[0]
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False)
        out = np.empty(index.shape, dtype=self.dtype)
        flat = index.reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.n):
            raise IndexError(f"index out of range for {self.n} values")
        order = np.argsort(flat, kind="stable")
        ordered = flat[order]
        result = out.reshape(-1)
        if len(flat) >= MAPPED_GATHER:
            self._mapped_gather(ordered, order, result)
            return out
        breaks = np.flatnonzero(np.diff(ordered) > 1) + 1  # repeats and neighbours share one read
        for run in np.split(np.arange(len(order)), breaks) if len(flat) else []:
            lo, hi = int(ordered[run[0]]), int(ordered[run[-1]])
            result[order[run]] = self._range(lo, hi + 1)[ordered[run] - lo]
        return out

    def _mapped_gather(self, ordered: np.ndarray, order: np.ndarray, result: np.ndarray) -> None:
        """result[order] = self[ordered] (ordered: sorted indices) for many scattered indices, a window of the file at a
        time through a short-lived memory map: numpy's gather at C speed, where a pread per index costs ~10 us of
        Python; unmapping each window gives its pages back, so RSS grows by one window (WINDOW bytes) at most."""
        import mmap

        size = self.dtype.itemsize
        per = WINDOW // size  # values a window holds (WINDOW is a multiple of the mapping granularity)
        first, last = int(ordered[0]) // per, int(ordered[-1]) // per
        cuts = np.searchsorted(ordered, np.arange(first, last + 2) * per)
        for w, (a, b) in enumerate(itertools.pairwise(cuts), start=first):
            if a == b:
                continue
            lo = w * per
            count = min(per, self.n - lo)
            with mmap.mmap(self.fd, count * size, access=mmap.ACCESS_READ, offset=lo * size) as view:
                values = np.frombuffer(view, dtype=self.dtype, count=count)
                result[order[a:b]] = values[ordered[a:b] - lo]
                del values  # the map cannot close while an array views it

    def __array__(self, dtype=None, copy=None):
        whole = self._range(0, self.n)
        return whole.astype(dtype) if dtype is not None else whole

    def __iter__(self):
        return iter(np.asarray(self))

    def __eq__(self, other):  # elementwise, as numpy's (the default would compare the objects: silently False)
        return np.asarray(self) == other

    def __ne__(self, other):
        return np.asarray(self) != other

    __hash__ = None

    def blocks(self, size: int = 1 << 20):
        """(start, values) per `size` values, in order: a sequential pass in bounded memory."""
        for start in range(0, self.n, size):
            yield start, self._range(start, min(self.n, start + size))


class Column:
    """One column of Arrow IPC files (cache shards, a dataset's cache files) that reads rows by global index with
    `pread`, never touching the rest: `take` (any type; strings and fixed-size lists from the file) and `gather`
    (fixed-size list vectors -> numpy). Rows come through the page cache, which every rank on a node shares, and are
    never mapped into the process, so its RSS stays flat however many rows an epoch touches (a memory map's pages count
    as RSS once touched: ~1.3 MB a random row here, as the kernel maps whole folios). Arrow's own ChunkedArray.take
    would first concatenate every chunk: a copy of the whole column."""

    def __init__(self, chunks: list[pa.Array], where: list[tuple[int, int] | None] | None = None):
        keep = [i for i, c in enumerate(chunks) if len(c)]
        self.chunks = [chunks[i] for i in keep]
        self.where = (
            [where[i] for i in keep] if where is not None else [None] * len(self.chunks)
        )  # (fd, mapping base) per chunk
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])  # (C + 1,)
        self._layout: dict[int, tuple] = {}

    @classmethod
    def from_files(cls, paths: Iterable[Path], name: str) -> Column:
        """Column `name` of IPC files (file or stream format), read zero-copy to learn where each buffer lies."""
        chunks, where, paths = [], [], list(paths)
        for path in paths:
            source = pa.memory_map(str(path), "r")
            base = source.read_buffer(1).address if source.size() else 0  # zero-copy: the mapping's first byte
            source.seek(0)
            fd = os.open(str(path), os.O_RDONLY)
            for k, batch in enumerate(ipc_batches(source)):
                chunks.append(batch.column(name))
                where.append((fd, base, source.size()))
                if k % 64 == 63:  # reading batch headers through the map maps whole folios: give them back as we go
                    _drop_range(base, source.size())
            _drop_range(base, source.size())
        column = cls(chunks, where)
        column._source = ([str(p) for p in paths], name)
        return column

    def __reduce__(
        self,
    ):  # to a DataLoader worker started with spawn: reopen the files there (file descriptors do not travel)
        source = getattr(self, "_source", None)
        return (Column.from_files, source) if source is not None else (Column, (self.chunks,))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __del__(self) -> None:
        for fd in {w[0] for w in getattr(self, "where", []) if w is not None}:
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def width(self) -> int:
        return self.chunks[0].type.list_size if self.chunks else 0

    def _split(self, rows: np.ndarray):
        """(chunk, positions in `rows`, rows local to the chunk) per chunk that `rows` touch."""
        rows = np.asarray(rows, dtype=np.int64)
        assert rows.ndim == 1 and (len(rows) == 0 or (rows.min() >= 0 and rows.max() < len(self))), (
            f"rows out of range 0..{len(self)}"
        )
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for part in np.split(order, bounds) if len(rows) else []:
            c = int(chunk[part[0]])
            yield c, part, rows[part] - self.starts[c]

    def _file_offset(self, c: int, buffer: pa.Buffer, skip: int) -> int | None:
        """Where `buffer` (+ skip bytes) lies in chunk c's file, or None when it is not a piece of the mapped file."""
        fd, base, size = self.where[c] or (None, 0, 0)
        if fd is None or buffer is None or not base <= buffer.address < base + size:
            return None
        return buffer.address - base + skip

    def _layout_of(self, c: int) -> tuple:
        """('list', fd, offset, row bytes, dtype) | ('str', fd, offsets offset, offset dtype, data offset) | ('mem',)."""
        if c not in self._layout:
            chunk, kind = self.chunks[c], ("mem",)
            if pa.types.is_fixed_size_list(chunk.type):
                values = chunk.flatten()
                dtype = np.dtype(values.type.to_pandas_dtype())
                off = self._file_offset(c, values.buffers()[1], values.offset * dtype.itemsize)
                if off is not None:
                    kind = ("list", self.where[c][0], off, chunk.type.list_size * dtype.itemsize, dtype)
            elif pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
                odt = np.dtype("<i4") if pa.types.is_string(chunk.type) else np.dtype("<i8")
                _, offsets, data = chunk.buffers()
                off = self._file_offset(c, offsets, chunk.offset * odt.itemsize)
                data_off = self._file_offset(c, data, 0) if data is not None and data.size else 0
                if off is not None and data_off is not None:
                    kind = ("str", self.where[c][0], off, odt, data_off)
            self._layout[c] = kind
        return self._layout[c]

    @staticmethod
    def _runs(local: np.ndarray):
        """(positions, first row, count) per run of consecutive rows in `local`: one read each."""
        order = np.argsort(local, kind="stable")
        ordered = local[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for run in np.split(np.arange(len(order)), breaks):
            yield order[run], int(ordered[run[0]]), len(run)

    def take(self, rows: np.ndarray) -> pa.Array:
        """The values at `rows`, in that order (nulls read back as what the file stores under them)."""
        rows = np.asarray(rows, dtype=np.int64)
        pieces, where = [], []
        for c, part, local in self._split(rows):
            layout = self._layout_of(c)
            if layout[0] != "str":
                pieces.append(self.chunks[c].take(pa.array(local)))
                where.append(part)
                continue
            _, fd, off, odt, data_off = layout
            for pos, first, count in self._runs(local):
                offsets = np.frombuffer(os.pread(fd, (count + 1) * odt.itemsize, off + first * odt.itemsize), dtype=odt)
                data = os.pread(fd, int(offsets[-1] - offsets[0]), data_off + int(offsets[0]))
                pieces.append(
                    pa.Array.from_buffers(
                        pa.large_string(),
                        count,
                        [None, pa.py_buffer((offsets - offsets[0]).astype("<i8")), pa.py_buffer(data)],
                    )
                )
                where.append(part[pos])
        if not pieces:
            return pa.array([], self.chunks[0].type if self.chunks else pa.null())
        pieces = [p.cast(pa.large_string()) if pa.types.is_string(p.type) else p for p in pieces]
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[np.concatenate(where)] = np.arange(len(rows))
        return pa.concat_arrays(pieces).take(pa.array(inverse))

    def gather(self, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """(len(rows), D) vectors of a fixed_size_list column at `rows` (a copy of just those rows)."""
        out = np.empty((len(rows), self.width), dtype=dtype)
        for c, part, local in self._split(rows):
            layout = self._layout_of(c)
            if layout[0] == "list":
                _, fd, off, row_bytes, value = layout
                for pos, first, count in self._runs(local):
                    block = np.frombuffer(os.pread(fd, count * row_bytes, off + first * row_bytes), dtype=value)
                    out[part[pos]] = block.reshape(count, self.width)
            else:
                chunk = self.chunks[c]
                out[part] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), self.width)[local]
        return out


class Bits:
    """A set of cache rows 0..n-1 in n/8 bytes (a bool array would take n: 28 MB a set at laion28m, and the join keeps
    a few)."""

    def __init__(self, n: int):
        self.n, self.words = n, np.zeros((n + 7) // 8, dtype=np.uint8)

    def add(self, rows: np.ndarray) -> None:
        assert getattr(self, "_before", None) is None, "a set is not added to once its ranks are counted"
        rows = np.asarray(rows, dtype=np.int64)
        np.bitwise_or.at(self.words, rows >> 3, np.left_shift(1, rows & 7).astype(np.uint8))

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return ((self.words[rows >> 3] >> (rows & 7).astype(np.uint8)) & 1).astype(bool)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The members in [start, stop), ascending."""
        stop = self.n if stop is None else min(stop, self.n)
        low = start // 8 * 8
        flags = np.unpackbits(self.words[low // 8 : (stop + 7) // 8], bitorder="little")[start - low : stop - low]
        return start + np.flatnonzero(flags)

    def count(self) -> int:
        return int(
            sum(
                np.unpackbits(self.words[i : i + (1 << 16)], bitorder="little").sum()
                for i in range(0, len(self.words), 1 << 16)
            )
        )

    def ranks(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) int64: how many members are below each row (a member's position among them, in order). The first
        call counts the members of each 64-bit word: n/8 bytes more; adding members afterwards is not allowed."""
        if getattr(self, "_before", None) is None:
            words = np.zeros((len(self.words) + 7) // 8 * 8, np.uint8)
            words[: len(self.words)] = self.words
            self._words64 = words.view("<u8")
            self._before = np.concatenate([[0], np.cumsum(np.bitwise_count(self._words64), dtype=np.int64)[:-1]])
        rows = np.asarray(rows, dtype=np.int64)
        low = self._words64[rows >> 6] & ((np.uint64(1) << (rows & 63).astype(np.uint64)) - np.uint64(1))
        return self._before[rows >> 6] + np.bitwise_count(low).astype(np.int64)
