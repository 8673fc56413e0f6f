"""Stage 1's plan: which input rows hold the same caption, across the whole input, in memory that does not grow with it.

Before anything is embedded, rank 0 streams over the input a chunk of rows at a time (`inputs.CHUNK_ROWS`), hashes each
kept caption to 64 bits (`hash64`) and spills (hash, row, caption) records into partition files routed by hash
(`store.spill.Spill`, under `--out/.plan/`). Each partition, about `PARTITION_ROWS` records, is then sorted alone (numpy argsort):
rows with equal hashes whose captions are the identical string (compared as strings, so a hash collision never merges
two captions) form a group, whose first input row is the group's `caption_group`. A partition's distinct captions,
ordered by that first row, are cut into units of `--shard-size` captions; slot g numbers them over all partitions.
The (row, caption_group, slot) triples go through row-range bucket files into `group.bin` and `slot.bin` (int64 per
input row, -1 for a skipped row), read back a shard's range at a time. The duplicate-id check is the same spill (`Spill`).

Embedding then runs in two steps. Every distinct caption is embedded once, by the rank that owns its unit (unit
u % world), into `.plan/parts/shard-<u>.arrow`; after a barrier each rank assembles its row shards by gathering every
row's vectors from the parts by slot (memory-mapped, one shard's rows at a time). The plan depends only on the input
and the request, never on the world size, so torchrun gives what one process gives; it is complete once `plan.json`
is written and is reused by a resumed run of the same request (with the finished parts); `.plan/` goes with the
finished cache. Without --dedup every shard embeds its own rows, as before; `caption_group` is written all the same.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mclip.config import request
from mclip.embed import inputs
from mclip.errors import writing
from mclip.store import shards
from mclip.store.captions import blank
from mclip.store.join import (
    hash64,  # the project's one string hash (vectorised over Arrow's buffers; the same in every process)
)
from mclip.store.outputs import write_array, write_json
from mclip.store.spill import Spill, first_equal

PLAN = ".plan"  # the work folder inside --out
BUCKET_ROWS = 1 << 17  # input rows per bucket of the row-order pass


def _bucket_pass(folder: Path, n: int, triples) -> None:
    """(rows, groups, slots) arrays, in any order -> group.bin and slot.bin in row order (-1 where no row came),
    through row-range bucket files, so no array of every row is ever held."""
    buckets = folder / "rows"
    buckets.mkdir()
    for rows, groups, slots in triples:
        bucket = rows // BUCKET_ROWS
        order = np.argsort(bucket, kind="stable")
        records = np.stack([rows, groups, slots], axis=1)[order]
        for b, start, end in _runs(bucket[order]):
            with open(buckets / f"{b:06d}.bin", "ab") as handle:
                write_array(handle, records[start:end])
        del rows, groups, slots, bucket, order, records  # before the next partition is read: one in memory at a time
    with open(folder / "group.bin", "wb") as group_file, open(folder / "slot.bin", "wb") as slot_file:
        for b in range(-(-n // BUCKET_ROWS)):
            a = b * BUCKET_ROWS
            group, slot = np.full((2, min(n, a + BUCKET_ROWS) - a), -1, np.int64)
            path = buckets / f"{b:06d}.bin"
            if path.exists():
                records = np.fromfile(path, np.int64).reshape(-1, 3)
                group[records[:, 0] - a], slot[records[:, 0] - a] = records[:, 1], records[:, 2]
            write_array(group_file, group)
            write_array(slot_file, slot)
    shutil.rmtree(buckets)


def _runs(sorted_keys: np.ndarray):
    """(key, start, end) of each run of equal keys in a sorted array."""
    if not len(sorted_keys):
        return []
    starts = np.flatnonzero(np.diff(sorted_keys, prepend=sorted_keys[0] - 1))
    ends = np.append(starts[1:], len(sorted_keys))
    return [(int(sorted_keys[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def build(rows: inputs.Rows, n: int, config, out: Path, fingerprint: str) -> Plan:
    """The plan of this request in `out/.plan` (reused when a killed run of the same request finished it), the
    duplicate-id and --strict checks included; a UserError leaves no `.plan` behind."""
    folder = Path(out) / PLAN
    key = {"request": request(config), "rows": n, "teacher": fingerprint}
    plan = Plan.open(folder)
    if plan is not None and plan.meta["key"] == key:
        return plan
    shutil.rmtree(folder, ignore_errors=True)
    try:
        with writing(folder, "rerun the same command"):
            return _build(rows, n, config, folder, key)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _build(rows: inputs.Rows, n: int, config, folder: Path, key: dict) -> Plan:
    import pyarrow as pa

    folder.mkdir(parents=True)
    inputs.check_ids(rows, config.id_column, n, folder / "ids")
    if config.strict:
        inputs.check_strict(rows, config.caption_column, config.id_column, n)
    spill = Spill(folder / "captions", n)
    for a in range(0, n, inputs.CHUNK_ROWS):
        b = min(n, a + inputs.CHUNK_ROWS)
        column = inputs.caption_strings(rows[a:b][config.caption_column].combine_chunks(), config.caption_column, a)
        keep = ~blank(column).to_numpy(zero_copy_only=False)
        texts = column.filter(pa.array(keep))
        spill.add(hash64(texts), a + np.flatnonzero(keep), texts)
        rows.release()
    base, unit_base, size = [0], [0], config.shard_size

    def partitions():
        for p in range(spill.k):
            hashes, kept, strings = spill.partition(p)
            first = first_equal(hashes, strings)
            owners = np.flatnonzero(first == np.arange(len(first)))
            owners = owners[np.argsort(kept[owners], kind="stable")]  # the partition's distinct captions, by first row
            slot = np.empty(len(first), np.int64)
            slot[owners] = base[-1] + np.arange(len(owners))
            with pa.OSFile(str(folder / f"distinct-{p:05d}.arrow"), "wb") as sink:
                texts = strings.take(pa.array(owners))
                with pa.ipc.new_file(sink, pa.schema([("text", pa.large_string())])) as writer:
                    for start in range(0, len(owners), size):  # batch c = unit c of the partition
                        writer.write_batch(pa.record_batch([texts[start : start + size]], names=["text"]))
            base.append(base[-1] + len(owners))
            unit_base.append(unit_base[-1] + -(-len(owners) // size))
            yield kept, kept[first], slot[first]
            del hashes, kept, strings, first, owners, slot, texts  # before the next partition is read

    _bucket_pass(folder, n, partitions())
    spill.remove()
    pa.default_memory_pool().release_unused()
    meta = {"key": key, "rows": n, "unit_size": size, "base": base, "unit_base": unit_base, "distinct": base[-1]}
    write_json(folder / "plan.json", meta)  # last, atomically: a plan without it is rebuilt
    return Plan(folder, meta)


@dataclass
class Plan:
    """A finished plan: per-row caption groups and slots, the distinct captions by unit, and the parts' folder."""

    folder: Path
    meta: dict

    @staticmethod
    def open(folder: Path) -> Plan | None:
        """The finished plan in `folder`, or None when there is none or it is damaged (a file missing or of another size
        than plan.json implies, as a full disk once left one): either way `build` makes it again."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
            sizes = {name: 8 * int(meta["rows"]) for name in ("group.bin", "slot.bin")}
            if not all((folder / name).stat().st_size == size for name, size in sizes.items()):
                return None
            if not all((folder / f"distinct-{p:05d}.arrow").is_file() for p in range(len(meta["base"]) - 1)):
                return None
            return Plan(folder, meta)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def distinct(self) -> int:
        return int(self.meta["distinct"])

    @property
    def units(self) -> int:
        return int(self.meta["unit_base"][-1])

    @property
    def parts(self) -> Path:
        return self.folder / "parts"

    def _read(self, name: str, a: int, b: int) -> np.ndarray:
        return np.fromfile(self.folder / name, np.int64, count=b - a, offset=8 * a)

    def groups(self, a: int, b: int) -> np.ndarray:
        """caption_group of input rows a..b: the first input row with the identical caption; -1 for a skipped row."""
        return self._read("group.bin", a, b)

    def slots(self, a: int, b: int) -> np.ndarray:
        return self._read("slot.bin", a, b)

    def locate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots -> (unit, position in the unit)."""
        base, unit_base, size = (np.asarray(self.meta[k]) for k in ("base", "unit_base", "unit_size"))
        p = np.searchsorted(base, slots, side="right") - 1
        j = slots - base[p]
        return unit_base[p] + j // size, j % size

    def unit_texts(self, u: int):
        import pyarrow as pa

        p = int(np.searchsorted(self.meta["unit_base"], u, side="right") - 1)
        with pa.OSFile(str(self.folder / f"distinct-{p:05d}.arrow")) as source:
            return pa.ipc.open_file(source).get_batch(u - self.meta["unit_base"][p]).column(0).cast(pa.string())

    def unit_done(self, u: int) -> bool:
        stats = shards.read_shard_stats(self.parts / shards.shard_name(u))
        return stats is not None and stats.get("unit") == u

    def needed_units(self, shard_ranges) -> list[int]:
        """The units the shards of `shard_ranges` [(first_row, end_row)] gather from."""
        needed = np.zeros(self.units, bool)
        for a, b in shard_ranges:
            slots = self.slots(a, b)
            needed[self.locate(slots[slots >= 0])[0]] = True
        return np.flatnonzero(needed).tolist()

    def gather(self, slots: np.ndarray, widths: dict[str, int | None], dtype: str) -> dict[str, np.ndarray]:
        """Column -> (len(slots), width) values from the parts (`dtype` as stored; a width of None: one bool per row,
        `truncated`), one part file memory-mapped at a time."""
        import pyarrow as pa

        out = {
            c: np.empty((len(slots), w), np.dtype(dtype)) if w else np.empty(len(slots), bool)
            for c, w in widths.items()
        }
        units, positions = self.locate(slots)
        order = np.argsort(units, kind="stable")
        for u, start, end in _runs(units[order]):
            idx = order[start:end]
            with pa.memory_map(str(self.parts / shards.shard_name(u))) as source:
                taken = pa.ipc.open_file(source).read_all().take(pa.array(positions[idx]))
            for column, width in widths.items():
                out[column][idx] = (
                    shards.to_numpy(taken[column], np.dtype(dtype)) if width else taken[column].to_numpy()
                )
        return out
