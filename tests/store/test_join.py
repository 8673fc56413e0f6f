"""mclip.store.join: the cache id index (sorted 64-bit hashes on disk) against a dict oracle, collisions, duplicates, reuse."""

import numpy as np
import pyarrow as pa
import pytest

from mclip.errors import UserError
from mclip.store import join
from tests.store.test_shards import _write_cache


def test_hash64_is_vectorised_stable_and_separates_near_strings():
    strings = pa.array(["", "a", "b", "ab", "ba", "aa", "a" * 300, "é", "ü", "caption 1", "caption 2", None])
    h = join.hash64(strings)
    assert h.dtype == np.uint64 and len(h) == len(strings)
    assert len(set(h[:-1].tolist())) == len(strings) - 1  # no two differ only by order, length or one letter
    assert h[-1] == h[0]  # null hashes as ""
    sliced = strings.slice(3, 4)
    np.testing.assert_array_equal(join.hash64(sliced), h[3:7])  # an array's offset is honoured
    np.testing.assert_array_equal(join.hash64(pa.chunked_array([strings[:5], strings[5:]])), h)
    np.testing.assert_array_equal(join.hash64(pa.array(["ab"], pa.large_string())), h[3:4])


def test_lookup_equals_a_dict_of_every_id(tmp_path, monkeypatch):
    monkeypatch.setattr(join, "PARTITION_ROWS", 4)  # several partitions even for a small cache
    monkeypatch.setattr(join, "LOOKUP_CHUNK", 5)
    monkeypatch.setattr(join, "BLOCK", 3)  # queries fall on block edges
    cache = _write_cache(tmp_path / "c", sizes=(9, 3, 11))
    index = join.IdIndex.build(cache, tmp_path / "index")
    assert len(list((tmp_path / "index").glob("part-*"))) == 0  # the spilled partitions are gone
    hashes = np.fromfile(index.hashes, dtype="<u8")
    np.testing.assert_array_equal(np.sort(hashes), hashes)  # globally sorted
    oracle = {cid: r for r, cid in enumerate(cache.ids())}
    queries = ["r7", "nope", "r22", "r0", None, "r7", "r12", "r-1", "r9"]
    expected = [oracle.get(q, -1) if q is not None else -1 for q in queries]
    np.testing.assert_array_equal(index.lookup(pa.array(queries)), expected)
    np.testing.assert_array_equal(index.lookup(pa.array([7, 3])), [-1, -1])  # numbers are read as "7", not "r7"


def test_a_hash_collision_never_joins_the_wrong_row(tmp_path, monkeypatch):
    real = join.hash64
    monkeypatch.setattr(join, "hash64", lambda s: real(s) & np.uint64(3))  # 4 hash values: collisions everywhere
    monkeypatch.setattr(join, "BLOCK", 4)
    cache = _write_cache(tmp_path / "c", sizes=(10, 6))
    index = join.IdIndex.build(cache, tmp_path / "index")
    queries = [f"r{i}" for i in range(16)] + ["r16", "x"]
    np.testing.assert_array_equal(index.lookup(pa.array(queries)), list(range(16)) + [-1, -1])


def test_duplicate_ids_are_refused_in_one_line(tmp_path):
    cache = _write_cache(tmp_path / "c", sizes=(4, 4))
    cache.manifest["shards"][1] = dict(cache.manifest["shards"][1])
    other = _write_cache(tmp_path / "d", sizes=(4,))  # ids r0..r3 again
    cache.manifest["shards"].append({**other.manifest["shards"][0], "file": "../d/shard-00000.arrow"})
    cache.manifest["totals"]["rows"] = 12
    with pytest.raises(UserError, match=r"id 'r\d' appears twice in cache .*rows \d+ and \d+"):
        join.IdIndex.build(cache, tmp_path / "index")


def test_an_index_is_reused_for_its_cache_and_rebuilt_for_another(tmp_path):
    cache = _write_cache(tmp_path / "c", sizes=(5,))
    index = join.IdIndex.build(cache, tmp_path / "index")
    stamp = (tmp_path / "index" / "hash.u64").stat().st_mtime_ns
    join.IdIndex.build(cache, tmp_path / "index")
    assert (tmp_path / "index" / "hash.u64").stat().st_mtime_ns == stamp
    other = _write_cache(tmp_path / "c2", sizes=(3, 3))
    again = join.IdIndex.build(other, tmp_path / "index")
    np.testing.assert_array_equal(again.lookup(pa.array(["r4", "r5", "r6"])), [4, 5, -1])
    assert index.lookup(pa.array(["r4"]))[0] == 4


def test_lookup_over_many_blocks_and_chunks_equals_the_dict(tmp_path, monkeypatch):
    monkeypatch.setattr(join, "PARTITION_ROWS", 128)
    monkeypatch.setattr(join, "BLOCK", 37)
    monkeypatch.setattr(join, "LOOKUP_CHUNK", 101)
    cache = _write_cache(tmp_path / "c", sizes=(700, 1, 599))
    index = join.IdIndex.build(cache, tmp_path / "index")
    rng = np.random.default_rng(0)
    queries = [f"r{i}" for i in rng.integers(-50, 1350, size=3000)]
    oracle = {cid: r for r, cid in enumerate(cache.ids())}
    np.testing.assert_array_equal(index.lookup(pa.array(queries)), [oracle.get(q, -1) for q in queries])
