"""Stage 2's data: the join by id, the hash split, and the epoch plan (seeded, length-grouped, every language per batch)."""

import numpy as np

from mclip.data import ParallelCaptions
from mclip.pairs import hash_unit, join_pairs, plan_epoch


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


def test_join_counts_what_does_not_join_and_never_misaligns():
    import pyarrow as pa

    cache_ids = ["a", "b", "c", "d"]
    cache_texts = pa.array(["en a", "en b", "en c", "en d"])
    parallel = ParallelCaptions({"zh": (["b", "x", "a"], ["zh b", "zh x", "zh a"]), "de": (["c"], ["de c"])}, {"zh": 1, "de": 0})
    pairs, report = join_pairs(parallel, ["zh", "de", "en"], cache_ids, cache_texts)
    got = {(pairs.languages[l], t, cache_ids[r]) for t, r, l in zip(pairs.texts.to_pylist(), pairs.rows, pairs.langs)}
    assert got == {("zh", "zh b", "b"), ("zh", "zh a", "a"), ("de", "de c", "c"),
                   ("en", "en a", "a"), ("en", "en b", "b"), ("en", "en c", "c")}
    assert report["zh"] == {"pairs": 2, "empty_texts": 1, "ids_without_target": 1, "targets_without_text": 2,
                            "examples_without_target": ["x"]}
    assert report["de"]["targets_without_text"] == 3 and report["en"]["targets_without_text"] == 1


def test_hash_split_is_stable_and_seeded():
    ids = [f"id{i}" for i in range(2000)]
    u = hash_unit(ids, 42)
    assert np.array_equal(u, hash_unit(ids, 42)) and not np.array_equal(u, hash_unit(ids, 43))
    assert 0.07 < (u < 0.1).mean() < 0.13
    assert np.array_equal(hash_unit(ids[::-1], 42), u[::-1])  # a property of the id, not of its row
