"""mclip.store.spill: (hash, row, string) records spilled into hash partitions, each sorted alone, find every repeated
string and its first row exactly as a dict would, across partitions, added chunks and forced hash collisions."""

import numpy as np
import pyarrow as pa
import pytest

from mclip.store import spill
from mclip.store.join import hash64
from mclip.store.spill import Spill, first_equal


def _strings(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    pool = ["red apple", "red apple ", "Red apple", "a dog", "", "猫", "blue car", "x" * 40]
    return [pool[i] if i < len(pool) else f"unique {k}" for k, i in enumerate(rng.integers(0, 2 * len(pool), n))]


def _oracle(strings: list[str]) -> set[tuple[int, int, str]]:
    """(row, first row, string) for each row whose string an earlier row holds."""
    first: dict[str, int] = {}
    return {(row, first[s], s) for row, s in enumerate(strings) if first.setdefault(s, row) != row}


@pytest.mark.parametrize("collide", [False, True])
def test_repeats_are_a_dicts_across_partitions_and_chunks(tmp_path, monkeypatch, collide):
    monkeypatch.setattr(spill, "PARTITION_ROWS", 8)  # 100 records: 13 partitions
    strings = _strings(100, seed=1)
    records = Spill(tmp_path / "spill", len(strings))
    assert records.k == 13
    for a in range(0, len(strings), 17):  # added in chunks, as stage 1 reads its input
        chunk = pa.array(strings[a : a + 17])
        hashes = hash64(chunk) % np.uint64(3) if collide else hash64(chunk)  # collide: 3 hashes for ~20 strings
        records.add(hashes, np.arange(a, a + len(chunk), dtype=np.int64), chunk)
    assert set(records.repeats()) == _oracle(strings)
    rows = []
    for p in range(records.k):
        hashes, part_rows, part_strings = records.partition(p)
        assert (np.diff(hashes.astype(np.float64)) >= 0).all() and len(part_strings) == len(part_rows)
        assert [strings[r] for r in part_rows] == part_strings.to_pylist()  # each row keeps its own string
        rows.extend(part_rows.tolist())
    assert sorted(rows) == list(range(len(strings)))  # every record in exactly one partition
    records.remove()
    assert not (tmp_path / "spill").exists()


def test_a_spill_without_records_has_no_repeats(tmp_path):
    records = Spill(tmp_path / "spill", 0)
    assert records.k == 1 and list(records.repeats()) == []
    hashes, rows, strings = records.partition(0)
    assert len(hashes) == len(rows) == len(strings) == 0


def test_first_equal_splits_a_hash_collision_into_its_exact_strings():
    # sorted by (hash, row): hash 5 holds two strings that collide, interleaved; hash 9 one string twice
    hashes = np.array([1, 5, 5, 5, 5, 9, 9], np.uint64)
    strings = pa.array(["a", "b", "c", "b", "c", "d", "d"], pa.large_string())
    assert first_equal(hashes, strings).tolist() == [0, 1, 2, 1, 2, 5, 5]
    assert first_equal(hashes[:1], strings[:1]).tolist() == [0]
