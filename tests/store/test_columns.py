"""mclip.store.columns: rows gathered from Arrow files with pread (Column), raw numpy files read like arrays (RawArray),
and sets of rows as bits (Bits), each against what numpy or Arrow holds in memory."""

import numpy as np
import pyarrow as pa
import pytest

from mclip.store import columns
from mclip.store.columns import Bits, Column, RawArray
from tests.store.test_shards import _write_cache


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_column_gathers_rows_across_shards_as_the_whole_column_would(tmp_path, dtype):
    cache = _write_cache(tmp_path / "c", sizes=(5, 1, 7), dim=4, dtype=dtype)
    whole = cache.embeddings()
    rows = np.array([12, 0, 5, 5, 4, 6, 11, 0])
    column = cache.targets()
    assert len(column) == 13 and column.width == 4
    np.testing.assert_array_equal(column.gather(rows), whole[rows])
    assert column.gather(np.zeros(0, np.int64)).shape == (0, 4)
    assert cache.column("id").take(rows).to_pylist() == [f"r{r}" for r in rows]
    with pytest.raises(AssertionError, match="out of range"):
        column.gather(np.array([13]))


def test_column_reads_rows_from_the_file_not_from_a_mapping(tmp_path):
    """Rows are read with pread (flat RSS), and equal what Arrow holds, for vectors, strings and large strings, in the
    file format (cache shards) and the stream format (a `datasets` cache file), sliced or not."""
    cache = _write_cache(tmp_path / "c", sizes=(6, 5), dim=4, dtype="float16")
    rows = np.array([10, 0, 3, 4, 5, 6, 6, 1])
    column = cache.targets()
    np.testing.assert_array_equal(column.gather(rows), cache.embeddings()[rows])
    assert {column._layout_of(c)[0] for c in range(len(column.chunks))} == {"list"}  # from the file, every chunk
    ids = cache.column("id")
    assert ids.take(rows).to_pylist() == [f"r{r}" for r in rows] and ids._layout_of(0)[0] == "str"
    texts = [f"текст {i} 猫" * (i % 3) for i in range(40)]
    for kind in (pa.string(), pa.large_string()):
        table = pa.table({"text": pa.array(texts, kind)})
        path = tmp_path / f"stream-{kind}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=7)
        from_file = Column.from_files([path], "text")
        picks = np.array([39, 0, 1, 2, 20, 21, 22, 8, 8])
        assert from_file.take(picks).to_pylist() == [texts[i] for i in picks]
        assert from_file._layout_of(3)[0] == "str"
        in_memory = Column(table.column("text").slice(3).chunks)  # sliced chunks, nothing on disk
        assert in_memory.take(picks - 3 * (picks >= 3)).to_pylist() == [texts[3:][i] for i in picks - 3 * (picks >= 3)]


def test_raw_array_reads_like_the_numpy_array_it_stores(tmp_path):
    values = np.random.default_rng(0).integers(-1000, 1000, 50).astype("<i8")
    values.tofile(tmp_path / "a")
    a = RawArray(tmp_path / "a", "<i8")
    index = np.array([[3, 4, 4, 49], [0, 1, 2, 10]])
    assert len(a) == 50 and a[7] == values[7] and a[-1] == values[-1]
    np.testing.assert_array_equal(a[index], values[index])
    np.testing.assert_array_equal(a[5:20:3], values[5:20:3])
    np.testing.assert_array_equal(a[values > 0], values[values > 0])
    np.testing.assert_array_equal(np.asarray(a), values)
    np.testing.assert_array_equal(a == values[0], values == values[0])
    assert a[np.zeros(0, np.int64)].shape == (0,)
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(IndexError):
        a[np.array([1, 50])]


def test_raw_array_gathers_many_indices_window_by_window(tmp_path, monkeypatch):
    # a gather of many scattered indices goes through short-lived maps of one window each: windows of one mapping
    # granularity here, so the 20,000 values span several, and the last one is partial
    import mmap

    monkeypatch.setattr(columns, "WINDOW", mmap.ALLOCATIONGRANULARITY)
    values = np.random.default_rng(1).integers(-(2**15), 2**15, 20_000).astype("<i2")
    values.tofile(tmp_path / "a")
    a = RawArray(tmp_path / "a", "<i2")
    index = np.random.default_rng(2).integers(0, len(values), (3, 5000))  # repeats included, any order
    index[0, :3] = [0, len(values) - 1, len(values) - 1]
    assert index.size >= columns.MAPPED_GATHER
    np.testing.assert_array_equal(a[index], values[index])
    np.testing.assert_array_equal(a[np.arange(len(values))], values)  # every window, whole
    assert (a[np.full(columns.MAPPED_GATHER, 7)] == values[7]).all()  # all in one window
    with pytest.raises(IndexError):
        a[np.append(index.ravel(), len(values))]


def test_columns_and_raw_arrays_travel_to_a_spawned_worker(tmp_path):
    import pickle

    cache = _write_cache(tmp_path / "c", sizes=(3, 4), dim=4)
    column = pickle.loads(pickle.dumps(cache.targets()))  # what a spawn-started DataLoader worker receives
    np.testing.assert_array_equal(column.gather(np.array([6, 0])), cache.embeddings()[[6, 0]])
    np.arange(5, dtype="<i8").tofile(tmp_path / "a")
    raw = RawArray(tmp_path / "a", "<i8")
    raw[0]
    assert pickle.loads(pickle.dumps(raw))[4] == 4


def test_bits_ranks_count_the_members_below_each_row():
    rng = np.random.default_rng(3)
    for n in (1, 63, 64, 65, 1003):
        want = rng.random(n) < 0.4
        bits = Bits(n)
        bits.add(np.flatnonzero(want))
        rows = rng.integers(0, n, 200)
        np.testing.assert_array_equal(bits.ranks(rows), np.concatenate([[0], np.cumsum(want)])[rows])


def test_bits_is_a_set_of_rows_in_an_eighth_of_a_bool_array():
    rng = np.random.default_rng(0)
    members = rng.integers(0, 1003, 400)
    bits = Bits(1003)
    bits.add(members[:200])
    bits.add(members[200:])
    bits.add(np.zeros(0, np.int64))
    want = np.zeros(1003, bool)
    want[members] = True
    assert len(bits.words) == 126 and bits.count() == want.sum()
    np.testing.assert_array_equal(bits[np.arange(1003)], want)
    np.testing.assert_array_equal(bits.rows(), np.flatnonzero(want))
    np.testing.assert_array_equal(bits.rows(512, 900), 512 + np.flatnonzero(want[512:900]))
