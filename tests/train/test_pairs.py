"""Stage 2's data: the join by id, the hash split, and the epoch plan (seeded, length-grouped, every language per batch)."""

import numpy as np
import pytest

from mclip.config import TrainConfig
from mclip.store import shards
from mclip.train.batches import EpochPlan, Shuffle
from mclip.train.pairs import hash_unit, prepare_pairs
from tests import tiny


def plan_epoch(lengths, langs, batch_size, seed, epoch, group):
    """The whole epoch's plan as one (steps, batch_size) array, from the per-step EpochPlan."""
    plan = EpochPlan(lengths, langs, batch_size, seed, epoch, group)
    return np.stack([plan[k] for k in range(len(plan))])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17, 1000, 1024, 1025, 65_537])
def test_shuffle_is_a_seeded_permutation(n):
    shuffle = Shuffle(n, np.random.default_rng([3, 0]))
    order = shuffle(np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))  # a bijection of range(n)
    assert np.array_equal(order, Shuffle(n, np.random.default_rng([3, 0]))(np.arange(n)))  # the same on every rank
    assert np.array_equal(shuffle(np.arange(n)[::-1]), order[::-1])  # any positions, in any order
    if n >= 1000:
        assert not np.array_equal(order, Shuffle(n, np.random.default_rng([3, 1]))(np.arange(n)))  # another epoch


def test_shuffle_looks_random():
    # where position 0 lands, over 2000 seeds, is uniform on range(n); neighbours in the order are uncorrelated
    n = 1000
    first = np.array([Shuffle(n, np.random.default_rng(s))(np.array([0]))[0] for s in range(2000)])
    counts = np.bincount(first * 10 // n, minlength=10)  # 10 bins of 200 expected
    assert ((counts - 200) ** 2 / 200).sum() < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    order = Shuffle(100_000, np.random.default_rng(0))(np.arange(100_000)).astype(float)
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.02
    assert abs(np.corrcoef(np.arange(100_000), order)[0, 1]) < 0.02


@pytest.mark.parametrize("group", [1, 3, 64])
def test_epoch_plan_is_a_partition_across_its_blocks(group):
    # 1003 pairs in batches of 4: 250 steps, several blocks of batches (64 ungrouped, `group` grouped), a partial last one
    lengths = np.random.default_rng(0).integers(1, 50, 1003)
    plan = plan_epoch(lengths, np.zeros(1003, np.int8), 4, seed=5, epoch=2, group=group)
    assert plan.shape == (250, 4) and len(np.unique(plan)) == 1000
    assert all((np.diff(lengths[b]) <= 0).all() for b in plan)


def test_epoch_plan_holds_nothing_per_pair():
    class Langs:  # 10 billion pairs: an array per pair would not fit; the plan reads only len()
        def __len__(self):
            return 10**10

    plan = EpochPlan(None, Langs(), 512, seed=0, epoch=0, group=1)
    assert len(plan) == 10**10 // 512
    steps = [plan[k] for k in (0, 1, len(plan) - 1)]
    together = np.concatenate(steps)
    assert len(np.unique(together)) == 3 * 512 and together.min() >= 0 and together.max() < 10**10
    with pytest.raises(IndexError):
        plan[len(plan)]


def test_plan_epoch_is_a_seeded_length_grouped_partition():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=103)
    langs = np.zeros(103, np.int64)
    plan = plan_epoch(lengths, langs, batch_size=8, seed=1, epoch=0, group=4)
    assert plan.shape == (12, 8)  # 103 // 8 batches; the partial one is dropped
    assert len(np.unique(plan)) == plan.size  # no pair twice in an epoch
    assert np.array_equal(plan, plan_epoch(lengths, langs, 8, 1, 0, 4))  # the same on every rank and on resume
    assert not np.array_equal(plan, plan_epoch(lengths, langs, 8, 1, 1, 4))  # reshuffled each epoch
    # inside a mega-batch of 4 batches lengths are sorted, so each batch's spread is far below a random batch's
    spread = np.mean([np.ptp(lengths[b]) for b in plan])
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.random.default_rng(2).permutation(96).reshape(12, 8)])
    assert spread < random_spread / 2
    assert all((np.diff(lengths[b]) <= 0).all() for b in plan)  # sorted inside a batch: ranks take alike lengths


def test_length_grouping_keeps_every_language_in_every_batch():
    # 300 ids x 6 languages; languages 0-2 are short (like ja, ko, zh captions), 3-5 three times longer. One sort of all
    # pairs by length (the previous rule) gives batches of the short scripts only.
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(300), 6)
    langs = np.tile(np.arange(6), 300)
    lengths = np.where(langs < 3, 1, 3) * rng.integers(2, 30, size=300)[ids] + rng.integers(0, 3, size=ids.size)
    plan = plan_epoch(lengths, langs, batch_size=24, seed=0, epoch=0, group=16)
    assert len(np.unique(plan)) == plan.size == 1800
    assert min(len(np.unique(langs[b])) for b in plan) == 6  # every batch holds every language ...
    assert max(np.bincount(langs[b]).max() for b in plan) <= 6  # ... in about its share (4 of 24)
    # and the padding (batch size x its longest pair) stays well below a random batching's
    padded = lambda batches: sum(len(b) * lengths[b].max() for b in batches)  # noqa: E731
    assert padded(plan) < 0.7 * padded(plan_epoch(lengths, langs, 24, 0, 0, group=1))
    one_sort = np.argsort(-lengths, kind="stable").reshape(75, 24)
    assert min(len(np.unique(langs[b])) for b in one_sort) <= 3


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


def test_token_lengths_are_the_tokenizers_own_counts_cut_at_max_length(tmp_path, bert_student):
    from transformers import AutoTokenizer

    from mclip.train.batches import open_lengths, token_lengths

    texts = ["a red cat", "", "ein sehr langer Satz " * 20, "红色的猫", "🙂 emoji", "x"]
    ids = [f"i{k}" for k in range(len(texts))]
    cache = _cache(tmp_path / "cache", ids, texts)
    data = tiny.write_captions(
        tmp_path / "d.jsonl", [{"id": i, "caption_zh": t or "-", "caption_de": t or "-"} for i, t in zip(ids, texts)]
    )
    train, _, _ = prepare_pairs(_config(tmp_path, data), cache)
    xlmr = tiny.write_tiny_xlmr(tmp_path / "xlmr", corpus=texts)
    for folder in (bert_student, xlmr):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        token_lengths(tokenizer, train, 16, tmp_path / "lengths")
        want = [len(x) for x in tokenizer(train.texts(), truncation=True, max_length=16)["input_ids"]]
        assert np.asarray(open_lengths(tmp_path / "lengths", len(train))).tolist() == want and max(want) == 16


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


def test_bits_is_a_set_of_rows_in_an_eighth_of_a_bool_array():
    from mclip.store.columns import Bits

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
