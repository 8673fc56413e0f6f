"""mclip.train.pairs: stage 2's pairs, the join of captions to the cache by id, and the seeded hash split."""

import numpy as np

from mclip.config import TrainConfig
from mclip.store import shards
from mclip.train.pairs import hash_unit, prepare_pairs
from tests import tiny


def _cache(folder, ids, texts, dim=4, groups=True):
    """A finished cache of these ids and English texts (as stage 1 lays it out), two shards; groups=False: a cache of
    format 1, before stage 1 recorded caption_group."""
    import pyarrow as pa

    from mclip.store import outputs

    folder.mkdir(parents=True)
    entries, half = [], len(ids) // 2
    first = {}
    group = [first.setdefault(t, i) for i, t in enumerate(texts)]  # the input row of each caption's first appearance
    schema = shards.cache_schema(dim, "float32")
    if not groups:
        schema = schema.remove(schema.get_field_index("caption_group"))
    for k, (a, b) in enumerate([(0, half), (half, len(ids))]):
        columns = {
            "id": pa.array(ids[a:b]),
            "text": pa.array(texts[a:b]),
            "caption_group": pa.array(group[a:b], pa.int64()),
            "embedding": shards.fixed_list(np.eye(len(ids), dim)[a:b], "float32"),
        }
        table = pa.table({name: columns[name] for name in schema.names}, schema=schema)
        path = shards.write_shard(folder, k, table, {"rows": b - a, "first_row": a})
        entries.append(
            {"file": path.name, "rows": b - a, "first_row": a, "end_row": b, "sha256": outputs.file_sha256(path)}
        )
    shards.write_json(
        folder / shards.MANIFEST,
        {
            "format": shards.FORMAT,
            "complete": True,
            "dim": dim,
            "dtype": "float32",
            "shards": entries,
            "totals": {"rows": len(ids)},
        },
    )
    return shards.open_cache(folder)


def _config(tmp_path, data, **kw):
    return TrainConfig(
        cache=str(tmp_path / "cache"),
        data=str(data),
        out=str(tmp_path / "run"),
        languages=("zh", "de"),
        **({"val_fraction": 0.0} | kw),
    )


def test_join_counts_what_does_not_join_and_never_misaligns(tmp_path):
    cache = _cache(tmp_path / "cache", ["a", "b", "c", "d"], ["en a", "en b", "en c", "en d"])
    data = tiny.write_captions(
        tmp_path / "data.jsonl",
        [
            {"id": "b", "caption_zh": "zh b", "caption_de": ""},
            {"id": "x", "caption_zh": "zh x", "caption_de": None},
            {"id": "a", "caption_zh": "zh a", "caption_de": "  "},
            {"id": "c", "caption_zh": None, "caption_de": "de c"},
        ],
    )
    pairs, val, report = prepare_pairs(_config(tmp_path, data), cache)
    ids = cache.ids()
    got = [(pairs.languages[l], t, ids[r]) for t, r, l in zip(pairs.texts(), pairs.rows, pairs.langs)]
    assert got == [
        ("zh", "zh b", "b"),
        ("zh", "zh a", "a"),
        ("de", "de c", "c"),  # language by language, in data order
        ("en", "en a", "a"),
        ("en", "en b", "b"),
        ("en", "en c", "c"),
    ]
    assert val is None
    assert report["zh"] == {
        "pairs": 2,
        "empty_texts": 1,
        "ids_without_target": 1,
        "targets_without_text": 2,
        "examples_without_target": ["x"],
    }
    assert (
        report["de"]["empty_texts"] == 3
        and report["de"]["targets_without_text"] == 3
        and report["en"]["targets_without_text"] == 1
    )


def test_pairs_built_a_chunk_at_a_time_equal_one_pass_and_read_the_long_format(tmp_path, monkeypatch):
    from mclip.store import captions as mcaptions
    from mclip.train import pairs as mpairs

    n = 50
    ids = [f"id{i}" for i in range(n)]
    cache = _cache(tmp_path / "cache", ids, [f"en {i % 7}" for i in range(n)], dim=n)
    rng = np.random.default_rng(0)
    rows = [
        {"id": ids[i], "caption_zh": f"zh {i}" if rng.random() > 0.2 else "", "caption_de": f"de {i}"}
        for i in rng.permutation(n + 5)
        if i < n
    ] + [{"id": "nope", "caption_zh": "zh nope", "caption_de": "de nope"}]
    wide = tiny.write_captions(tmp_path / "wide.jsonl", rows)
    config = _config(tmp_path, wide, val_fraction=0.3)
    whole = prepare_pairs(config, cache, tmp_path / "p1")
    monkeypatch.setattr(mpairs, "CHUNK", 7)
    monkeypatch.setattr(mcaptions, "CHUNK", 5)
    chunked = prepare_pairs(config, cache, tmp_path / "p2")
    long_rows = [{"id": r["id"], "lang": lang, "text": r[f"caption_{lang}"]} for lang in ("zh", "de") for r in rows]
    long = prepare_pairs(
        _config(tmp_path, tiny.write_captions(tmp_path / "long.jsonl", long_rows), val_fraction=0.3),
        cache,
        tmp_path / "p3",
    )
    for other in (chunked, long):
        for a, b in zip(whole[:2], other[:2]):
            assert a.texts() == b.texts() and np.array_equal(a.rows, b.rows) and np.array_equal(a.langs, b.langs)
        assert (
            whole[2]["train_pairs"] == other[2]["train_pairs"]
            and whole[2]["held_out_pairs"] == other[2]["held_out_pairs"]
        )
    train, val, report = whole
    assert not set(np.asarray(train.rows)) & set(np.asarray(val.rows))  # validation ids are held out whole
    # the English caption groups: equal exactly where the cache's English texts are equal
    texts = cache.column("text").take(np.asarray(train.rows)).to_pylist()
    groups = train.groups(np.arange(len(train)))
    assert all(
        (groups[i] == groups[j]) == (texts[i] == texts[j]) for i in range(0, len(train), 3) for j in range(len(train))
    )


def test_hash_split_is_stable_and_seeded():
    ids = [f"id{i}" for i in range(2000)]
    u = hash_unit(ids, 42)
    assert np.array_equal(u, hash_unit(ids, 42)) and not np.array_equal(u, hash_unit(ids, 43))
    assert 0.07 < (u < 0.1).mean() < 0.13
    assert np.array_equal(hash_unit(ids[::-1], 42), u[::-1])  # a property of the id, not of its row


def test_a_language_the_long_format_lacks_is_one_line(tmp_path):
    import pytest

    from mclip.errors import UserError

    cache = _cache(tmp_path / "cache", ["a", "b"], ["en a", "en b"])
    data = tiny.write_captions(
        tmp_path / "long.jsonl", [{"id": "a", "lang": "zh", "text": "zh a"}, {"id": "b", "lang": "fr", "text": "fr b"}]
    )
    with pytest.raises(
        UserError, match=r"language 'de' has no rows in .*long.jsonl \(column 'lang' has fr, zh\); fix --languages"
    ):
        prepare_pairs(_config(tmp_path, data), cache)


def test_the_caches_caption_groups_are_used_when_it_has_them(tmp_path):
    """Stage 1 (format 2) records caption_group; without it (older caches) the English texts are grouped here."""
    import pyarrow as pa

    from mclip.store import outputs
    from mclip.train.pairs import _cache_groups

    old = _cache(tmp_path / "old", ["a", "b", "c"], ["same", "other", "same"], groups=False)
    assert np.asarray(_cache_groups(old, tmp_path)).tolist() == [0, 1, 0]
    folder = tmp_path / "new"
    folder.mkdir()
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": ["same", "other", "same"],
            "embedding": shards.fixed_list(np.eye(3), "float32"),
            "caption_group": pa.array([0, 1, 0], pa.int64()),
        }
    )
    path = shards.write_shard(folder, 0, table, {"rows": 3, "first_row": 0})
    shards.write_json(
        folder / shards.MANIFEST,
        {
            "format": shards.FORMAT,
            "complete": True,
            "dim": 3,
            "dtype": "float32",
            "totals": {"rows": 3},
            "shards": [{"file": path.name, "rows": 3, "sha256": outputs.file_sha256(path)}],
        },
    )
    new = shards.open_cache(folder)
    groups = np.asarray(_cache_groups(new, tmp_path))
    assert groups.tolist() == [0, 1, 0]
    # read from the column, not recomputed: a cache whose groups say otherwise is believed
    table = table.set_column(3, "caption_group", pa.array([5, 5, 7], pa.int64()))
    shards.write_shard(folder, 0, table, {"rows": 3, "first_row": 0})
    assert np.asarray(_cache_groups(shards.TeacherCache(folder, new.manifest), tmp_path)).tolist() == [5, 5, 7]
