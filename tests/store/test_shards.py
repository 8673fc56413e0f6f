"""mclip.store.shards: the Arrow schema, atomic shard writes, stats of finished vs truncated shards, the reader and verify()."""

import numpy as np
import pyarrow as pa
import pytest

from mclip.errors import UserError
from mclip.store import shards
from mclip.store.columns import Bits, Column, RawArray


def _table(
    n: int, dim: int, dtype: str, first: int = 0, layers: dict | None = None, image_dim: int | None = None
) -> pa.Table:
    rng = np.random.default_rng(first)
    schema = shards.cache_schema(dim, dtype, layers, image_dim)
    columns = {
        "id": pa.array([f"r{first + i}" for i in range(n)]),
        "text": pa.array([f"caption {first + i}" for i in range(n)]),
        "caption_group": pa.array(np.arange(first, first + n), pa.int64()),
        "embedding": shards.fixed_list(rng.standard_normal((n, dim)), dtype),
    }
    for layer, width in (layers or {}).items():
        columns[shards.layer_column(layer)] = shards.fixed_list(rng.standard_normal((n, width)), dtype)
    if image_dim is not None:
        columns["image_id"] = pa.array([f"img{(first + i) // 2}" for i in range(n)])
        columns["image_embedding"] = shards.fixed_list(rng.standard_normal((n, image_dim)), dtype)
    return pa.table(columns, schema=schema)


def _write_cache(folder, sizes=(5, 4), dim=8, dtype="float32") -> shards.TeacherCache:
    """A cache laid out as embed-teacher lays it out: shards written through write_shard, then the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, first = [], 0
    for k, n in enumerate(sizes):
        path = shards.write_shard(folder, k, _table(n, dim, dtype, first), {"rows": n, "first_row": first})
        entries.append(
            {"file": path.name, "rows": n, "first_row": first, "end_row": first + n, "sha256": shards.file_sha256(path)}
        )
        first += n
    shards.write_json(
        folder / shards.MANIFEST,
        {
            "format": shards.FORMAT,
            "complete": True,
            "dim": dim,
            "dtype": dtype,
            "shards": entries,
            "totals": {"rows": first},
        },
    )
    return shards.open_cache(folder)


@pytest.mark.parametrize("dtype,arrow", [("float16", pa.float16()), ("float32", pa.float32())])
def test_schema_by_dtype(dtype, arrow):
    schema = shards.cache_schema(16, dtype, {2: 32, 1: 32}, image_dim=16)
    assert schema.names == [
        "id",
        "text",
        "caption_group",
        "embedding",
        "layer_1",
        "layer_2",
        "image_id",
        "image_embedding",
    ]
    assert schema.field("id").type == pa.string() and schema.field("image_id").type == pa.string()
    assert schema.field("caption_group").type == pa.int64() and not schema.field("caption_group").nullable
    assert schema.field("embedding").type == pa.list_(arrow, 16)
    assert schema.field("layer_2").type == pa.list_(arrow, 32)
    assert schema.field("image_embedding").type == pa.list_(arrow, 16)
    assert shards.cache_schema(4, dtype).names == ["id", "text", "caption_group", "embedding"]


def test_fixed_list_round_trip():
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    np.testing.assert_array_equal(shards.to_numpy(shards.fixed_list(x, "float32")), x)
    np.testing.assert_array_equal(
        shards.to_numpy(shards.fixed_list(x, "float16")), x.astype(np.float16).astype(np.float32)
    )
    chunked = pa.chunked_array([shards.fixed_list(x[:3], "float32"), shards.fixed_list(x[3:], "float32")])
    np.testing.assert_array_equal(shards.to_numpy(chunked), x)


def test_write_shard_is_atomic_and_carries_stats(tmp_path):
    table = _table(6, 4, "float16", layers={1: 8}, image_dim=4)
    path = shards.write_shard(tmp_path, 3, table, {"rows": 6, "first_row": 30})
    assert path.name == "shard-00003.arrow" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert shards.read_shard_stats(path) == {"rows": 6, "first_row": 30}
    back = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    assert back.schema.remove_metadata() == table.schema and back.equals(
        table.replace_schema_metadata(back.schema.metadata)
    )
    # stats that disagree with the rows on disk do not count as finished
    shards.write_shard(tmp_path, 4, table, {"rows": 7})
    assert shards.read_shard_stats(tmp_path / "shard-00004.arrow") is None


def test_truncated_or_foreign_file_is_not_a_finished_shard(tmp_path):
    path = shards.write_shard(tmp_path, 0, _table(50, 8, "float32"), {"rows": 50})
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 10, 0):
        path.write_bytes(data[:cut])
        assert shards.read_shard_stats(path) is None, cut
    assert shards.read_shard_stats(tmp_path / "shard-00009.arrow") is None
    plain = tmp_path / "plain.arrow"  # a valid Arrow file without mclip stats
    with pa.ipc.new_file(str(plain), _table(2, 8, "float32").schema) as writer:
        writer.write_table(_table(2, 8, "float32"))
    assert shards.read_shard_stats(plain) is None


def test_shard_files_ignores_temp_and_other_files(tmp_path):
    for name in (
        "shard-00001.arrow",
        "shard-00000.arrow",
        ".shard-00002.arrow.abc.tmp",
        "shard-2.arrow",
        "notes.txt",
        "manifest.json",
    ):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in shards.shard_files(tmp_path)] == ["shard-00000.arrow", "shard-00001.arrow"]
    assert shards.shard_files(tmp_path / "missing") == []


def test_cache_reader(tmp_path):
    cache = _write_cache(tmp_path / "cache", sizes=(5, 4))
    assert len(cache) == 9 and cache.dim == 8 and cache.layers == [] and not cache.has_images
    assert cache.ids() == [f"r{i}" for i in range(9)]
    emb = cache.embeddings()
    assert emb.shape == (9, 8) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[5:], shards.to_numpy(_table(4, 8, "float32", first=5)["embedding"]))
    assert cache.table(["id", "text"]).column_names == ["id", "text"]
    assert cache.dataset().count_rows() == 9
    assert cache.verify() == []


def test_a_version_1_cache_without_caption_group_still_reads(tmp_path):
    """Format version 2 added `caption_group`; a version-1 cache (no such column) opens and reads as it did."""
    folder = tmp_path / "v1"
    folder.mkdir()
    table = _table(4, 8, "float32").drop_columns(["caption_group"])
    path = shards.write_shard(folder, 0, table, {"rows": 4, "first_row": 0})
    shards.write_json(
        folder / shards.MANIFEST,
        {
            "format": shards.FORMAT,
            "format_version": 1,
            "complete": True,
            "dim": 8,
            "dtype": "float32",
            "totals": {"rows": 4},
            "shards": [{"file": path.name, "rows": 4, "first_row": 0, "end_row": 4}],
        },
    )
    cache = shards.open_cache(folder)
    assert (
        cache.table().column_names == ["id", "text", "embedding"]
        and "caption_group" not in cache.dataset().schema.names
    )
    assert cache.ids() == ["r0", "r1", "r2", "r3"] and cache.embeddings().shape == (4, 8) and cache.verify() == []


def test_shards_are_readable_by_pyarrow_dataset_and_hf_datasets(tmp_path):
    import datasets
    import pyarrow.dataset as pads

    cache = _write_cache(tmp_path / "cache", sizes=(3, 3, 2), dtype="float16")
    files = [str(f) for f in cache.files]
    table = pads.dataset(files, format="arrow").to_table()
    assert table.column("id").to_pylist() == cache.ids()
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 8)
    ds = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds["id"] == cache.ids()
    np.testing.assert_allclose(np.asarray(ds["embedding"], dtype=np.float32), cache.embeddings())


def test_verify_finds_corrupted_missing_and_short_shards(tmp_path):
    cache = _write_cache(tmp_path / "cache", sizes=(5, 4, 3))
    first, second, _ = cache.files
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    first.write_bytes(bytes(data))
    second.unlink()
    problems = cache.verify()
    assert len(problems) == 2
    assert "checksum differs" in problems[0] and str(first) in problems[0]
    assert "missing" in problems[1] and str(second) in problems[1]
    # a checksum-less manifest still catches a shard whose rows differ from the manifest
    cache.manifest["shards"][2]["sha256"] = ""
    cache.manifest["shards"][2]["rows"] = 99
    assert "wrong row count" in cache.verify()[-1]


def test_open_cache_refusals(tmp_path):
    with pytest.raises(UserError, match="does not exist; run `mclip embed-teacher"):
        shards.open_cache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no manifest.json"):
        shards.open_cache(tmp_path / "empty")
    cache = _write_cache(tmp_path / "cache")
    manifest = dict(cache.manifest, complete=False)
    shards.write_json(cache.path / shards.MANIFEST, manifest)
    with pytest.raises(UserError, match="is incomplete; rerun the same"):
        shards.open_cache(cache.path)
    shards.write_json(cache.path / shards.MANIFEST, {"format": "something-else"})
    with pytest.raises(UserError, match="not an mclip teacher cache manifest"):
        shards.open_cache(cache.path)
    (cache.path / shards.MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="is not valid JSON") as err:
        shards.open_cache(cache.path)
    assert "\n" not in str(err.value)


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

    from mclip.store import columns

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
